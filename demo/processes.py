"""Start the demo's aggregator and clinic agents as separate processes, imports paid once.

Each clinic device in a real deployment is its own machine and pays for importing torch once, at
start-up. Simulating five of them on one machine as five fresh interpreters would pay it five
times at once (torch alone is a second of CPU each; on two cores, most of the demo's first
round). So the demo starts a *fork server* (``multiprocessing``'s ``forkserver`` start method)
that imports the heavy modules once, and every service process is forked from it: still separate
processes, each with its own memory, data directory, keys, ledger and broker connection, running
exactly what ``bedside edge run`` / ``bedside aggregator serve`` runs (:func:`bedside.cli.main`),
with its output in its own log file. The demo's own preparation (data, split, the starting
model's export) runs in a forked child too (:func:`call`), so the demo's process never imports
torch or scikit-learn.

The fork server only imports modules (it runs no torch operation), so the forked children start
from a clean torch (no OpenMP thread pool to inherit). ``OMP_NUM_THREADS=1`` keeps every process
to one thread, as on a small clinic box.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from bedside.errors import BedsideError, InputError

#: What the services import; loaded once in the fork server (a missing optional dependency is
#: skipped by multiprocessing, and the child then imports what it needs itself).
PRELOAD = [
    "bedside.demo.preload",
]

_context: ForkServerContext | None = None


def context() -> ForkServerContext:
    """The fork server context, started (in the background) on first use."""
    global _context
    if _context is None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        ctx = multiprocessing.get_context("forkserver")
        assert isinstance(ctx, ForkServerContext)
        ctx.set_forkserver_preload(PRELOAD)
        _context = ctx
    return _context


def warm_up() -> None:
    """Start the fork server now, so that its imports overlap the caller's own work."""
    from multiprocessing import forkserver

    context()
    forkserver.ensure_running()


def start(args: list[str], log_path: Path, cwd: Path, name: str) -> BaseProcess:
    """Run ``bedside ARGS`` in a new process forked from the fork server."""
    proc = context().Process(target=_run_cli, args=(args, str(log_path), str(cwd)), name=name,
                             daemon=False)
    proc.start()
    return proc


def call(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a process forked from the fork server and return its result.

    ``fn`` returns a JSON-able dict, which travels back as JSON in a file. A BedsideError in the
    child is raised again here with its message and exit code; any other error as a failure that
    names the child's exception.
    """
    with tempfile.TemporaryDirectory(prefix="bedside-demo-call-") as tmp:
        out = Path(tmp) / "result.json"
        proc = context().Process(target=_call, args=(fn, args, str(out)), daemon=False)
        proc.start()
        proc.join()
        try:
            result = json.loads(out.read_text())
        except (OSError, ValueError):
            raise BedsideError(
                f"{getattr(fn, '__name__', 'a step')} failed in its process (exit code "
                f"{proc.exitcode}) without a result. Processes are started with "
                "multiprocessing's fork server, which imports the calling script again: a script "
                "that runs the demo must guard it with `if __name__ == '__main__':`") from None
    if "error" in result:
        cls = InputError if result.get("exit_code") == 2 else BedsideError
        raise cls(result["error"])
    return dict(result["ok"])


def _call(fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], out: str) -> None:
    try:
        result: dict[str, Any] = {"ok": fn(*args)}
    except BedsideError as exc:
        result = {"error": str(exc), "exit_code": exc.exit_code}
    except Exception as exc:
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}", "exit_code": 1}
    Path(out).write_text(json.dumps(result, default=str))


def _run_cli(args: list[str], log_path: str, cwd: str) -> None:
    """In the child: the service's own log file, its directory, then the CLI."""
    os.chdir(cwd)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ["PYTHONUNBUFFERED"] = "1"
    from bedside.cli import main

    try:
        code = main(args)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)
