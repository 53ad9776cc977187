"""What every benchmark script shares: paths, progress lines, the machine, the README section.

Each script is run from the repository root (``.venv/bin/python benchmarks/<name>.py``); Python
puts ``benchmarks/`` first on ``sys.path``, so ``import benchlib`` finds this file.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "benchmarks" / "README.md"
README_INTRO = ("# Benchmarks\n\nSide-by-side measurements; each script writes "
                "`results/<name>.json` and its section below.\n")

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line on stderr, with the seconds since the script started."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """Date, CPU, cores, platform, Python and the load average when the run started."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
    }


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def write_section(name: str, heading: str, section: str) -> None:
    """Replace the ``<!-- name:start -->`` ... ``<!-- name:end -->`` block of the README (or append
    it under ``heading``), leaving every other script's section as it is."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{section}\n{end}"
    text = README.read_text() if README.exists() else README_INTRO
    if start in text and end in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        README.write_text(head + block + tail)
    else:
        README.write_text(text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n")


def finish(name: str, heading: str, res: dict[str, Any], markdown: Any, started: float,
           print_only: bool) -> int:
    """Close a benchmark run: its duration and end load in ``res``; then print the JSON
    (``print_only``) or write ``results/<name>.json`` and the README section ``markdown(res)``."""
    import json

    res["seconds"] = round(time.perf_counter() - started, 1)
    res["machine"]["load_average_end"] = load_average()
    text = json.dumps(res, indent=2)
    if print_only:
        print(text)
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(text + "\n")
    write_section(name, heading, markdown(res))
    log(f"wrote {RESULTS / (name + '.json')} and {README.name}")
    return 0
