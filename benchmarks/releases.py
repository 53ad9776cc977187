"""Release benchmark: rolling a model out to a fleet of devices, over each broker.

For each model size (1 MB and 100 MB by default) and each broker (the embedded amqtt broker and
Mosquitto with the deploy/ TLS + ACL configuration, both on 127.0.0.1), a fresh fleet of N
devices (default 50) is enrolled with the aggregator service, which has released a small starting
model to them. Then ``stage_push`` pushes a model of the given size (the starting model with an
unused initializer of random bytes) to every device, and the run measures:

* **time**: from the push being staged to the last device reporting it ``active`` (the service
  signs and sends it; each device judges it, downloads it if it is larger than one message,
  verifies its sha256, writes it through staging, self-tests, runs the golden vectors, swaps);
* **bytes**: the release message's size times the devices it reached through the broker, and the
  bytes the download endpoint served (models larger than ``max_message_bytes`` = 16 MiB travel in
  4 MiB chunks over HTTP);
* **a device's peak memory**: one of the N devices runs in its own process (the others share
  one process, stepping in turn); its peak RSS is read when its download has finished and after
  the model is installed, each minus its RSS before the release arrived.

Run from the repository root: ``.venv/bin/python benchmarks/releases.py`` (about 6 minutes on 2
cores; ``--quick`` for 5 devices and 1 MB / 20 MB). Writes ``results/releases.json`` and the
``## Releases`` section of ``benchmarks/README.md``. Needs Mosquitto (``make setup``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import REPO, RESULTS, load_average, log, machine, write_section

sys.path.insert(0, str(REPO))

RESULTS_JSON = RESULTS / "releases.json"
HEADING = "## Releases"
MB = 1024 * 1024
FLEET = "bench"


def _rss_mb() -> float:
    """This process's current resident set size, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS counter of this process (Linux 4.0+)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return _peak_mb()


# -- the fleet -------------------------------------------------------------------------------------
def prepare(work: Path, n: int, broker: Any, starting: Path) -> dict[str, Any]:
    """Keys, configs and an aggregator.toml whose one round ends at once (the devices hold no
    records and decline), so that the service only releases models."""
    from bedside.demo.run import to_toml
    from bedside.transport import free_port
    from bedside.wire.signing import SigningKey

    keys = work / "keys"
    (keys / "devices").mkdir(parents=True)
    agg_key = SigningKey.generate()
    agg_key.save(keys / "aggregator.key")
    agg_key.public.save(keys / "aggregator.pub")
    devices = [f"device-{i:03d}" for i in range(n)]

    for d in devices:
        k = SigningKey.generate()
        k.save(keys / f"{d}.key")
        k.public.save(keys / "devices" / f"{d}.pub")
        cfg = {"device_id": d, "fleet": FLEET, "key": str(keys / f"{d}.key"),
               "aggregator_key": str(keys / "aggregator.pub"), "data_dir": str(work / d),
               "mqtt": broker.table(d), "privacy": {"allow_no_record_dp": True},
               "agent": {"status_seconds": 60.0, "quality_tolerance": False}}
        (work / f"{d}.toml").write_text(to_toml(cfg))
    agg = {"fleet": FLEET, "key": str(keys / "aggregator.key"), "devices": str(keys / "devices"),
           "data_dir": str(work / "aggregator"), "initial_model": str(starting),
           "mqtt": broker.table("aggregator"),
           "rounds": {"rounds": 1, "min_participants": 1, "deadline_seconds": 30.0},
           "privacy": {"noise": "none"},
           "releases": {"max_message_bytes": 16 * MB, "chunk_bytes": 4 * MB,
                        "http_port": free_port()}}
    (work / "aggregator.toml").write_text(to_toml(agg))
    return {"devices": devices, "aggregator_toml": work / "aggregator.toml"}


def _agent(toml: Path) -> Any:
    from bedside.edge.agent import Agent
    from bedside.edge.config import load

    return Agent(load(toml))


def probe_device(toml: str, out: str) -> int:
    """One device in its own process: runs until told to stop; writes its memory figures."""
    from bedside.edge import releases

    agent = _agent(Path(toml))
    agent.start()
    figures: dict[str, float] = {}
    real = releases.Download.verified_file

    def at_end_of_transfer(self: Any) -> Path:
        figures["peak_after_download_mb"] = _peak_hwm_mb()
        return real(self)

    releases.Download.verified_file = at_end_of_transfer
    stop = Path(out).with_suffix(".stop")
    base_version = None
    while not stop.exists():
        agent.step(0.05)
        v = agent.models.current_version()
        if base_version is None and v is not None:
            base_version = v
            agent.models.predictor()  # serving, as a device does
            figures["rss_before_mb"] = _rss_mb()
            _reset_peak()
        if base_version is not None and v is not None and v != base_version:
            figures.setdefault("peak_after_install_mb", _peak_hwm_mb())
    Path(out).write_text(json.dumps(figures))
    agent.transport.close()
    return 0


def run_case(size_mb: int, kind: str, n: int, starting: Path, work: Path) -> dict[str, Any]:
    from bedside.aggregator.config import load as load_agg
    from bedside.aggregator.rollout import PushOptions, stage_push
    from bedside.aggregator.service import Aggregator
    from bedside.wire.envelope import peek
    from tests.brokers import start_embedded, start_mosquitto
    from tests.release_tools import other_model

    broker = (start_mosquitto(work / "mosquitto", [f"device-{i:03d}" for i in range(n)],
                              fleet=FLEET) if kind == "mosquitto" else start_embedded())
    probe = None
    try:
        plan = prepare(work, n, broker, starting)
        devices = plan["devices"]
        probe_out = work / "probe.json"
        probe = subprocess.Popen([sys.executable, __file__, "--probe-device",
                                  str(work / f"{devices[-1]}.toml"), str(probe_out)],
                                 cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        agents = [_agent(work / f"{d}.toml") for d in devices[:-1]]
        for a in agents:
            a.start()
        agg = Aggregator(load_agg(plan["aggregator_toml"]))
        agg.start()  # stepped below with the devices (its download endpoint has its own threads)

        def step_all(until: Any, timeout: float, what: str) -> None:
            deadline = time.monotonic() + timeout
            while not until():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timed out waiting for {what}")
                agg.step(0.0)
                for a in agents:
                    a.step(0.0)
                time.sleep(0.005)

        store = agg.rollouts.store

        def all_report(counter: int) -> bool:
            return sum(1 for r in store.reports(counter) if r["state"] == "active") >= n

        step_all(lambda: all_report(1), 120, "the starting model on every device")
        src = other_model(agg.registry.path(1), work / "pushed", 0.5,
                          pad_bytes=max(0, size_mb * MB - 8 * 1024))
        size = (src / "model.onnx").stat().st_size
        served_before = _served_bytes(agg)
        t0 = time.perf_counter()
        rid = stage_push(agg.cfg, store, agg.registry, src, PushOptions())
        step_all(lambda: (r := store.get(rid)).counter is not None and all_report(r.counter),
                 1800, "every device to run the pushed model")
        seconds = time.perf_counter() - t0
        r = store.get(rid)
        envelope = agg.registry.release(r.version)
        assert envelope is not None
        chunks = len(peek(envelope).meta["release"]["chunks"])
        (work / "probe.stop").write_text("")
        probe.wait(60)
        mem = json.loads(probe_out.read_text())
        http_bytes = _served_bytes(agg) - served_before
        agg.close()
        for a in agents:
            a.transport.close()
            a.close()
        agg.transport.close()
        agg.state.close()
        return {
            "broker": kind, "devices": n, "model_bytes": size, "seconds": round(seconds, 2),
            "inline": chunks == 0, "chunks": chunks,
            "broker_bytes": len(envelope) * n, "release_message_bytes": len(envelope),
            "http_bytes": http_bytes,
            "device_rss_before_mb": round(mem.get("rss_before_mb", 0.0), 1),
            "device_peak_download_mb": round(mem.get("peak_after_download_mb", 0.0)
                                             - mem.get("rss_before_mb", 0.0), 1)
            if "peak_after_download_mb" in mem else None,
            "device_peak_install_mb": round(mem.get("peak_after_install_mb", 0.0)
                                            - mem.get("rss_before_mb", 0.0), 1),
            "load_average_end": load_average(),
        }
    finally:
        if probe is not None and probe.poll() is None:
            probe.kill()
        broker.stop()


def _served_bytes(agg: Any) -> int:
    return int(getattr(agg.downloads, "bytes_served", 0)) if agg.downloads else 0


def markdown(res: dict[str, Any]) -> str:
    env = res["machine"]
    rows = ["| model | broker | devices | time s | per device ms | release message | through "
            "broker | over HTTP | device RSS before | device peak, download | device peak, "
            "installed |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in res["cases"]:
        how = "inline" if c["inline"] else f"{c['chunks']} chunks"
        dl = c["device_peak_download_mb"]
        dl_text = "-" if dl is None else f"+{dl:.0f} MB"
        rows.append(
            f"| {c['model_bytes'] / MB:.0f} MB ({how}) | {c['broker']} | {c['devices']} | "
            f"{c['seconds']:.1f} | {1000 * c['seconds'] / c['devices']:.0f} | "
            f"{c['release_message_bytes'] / MB:.2f} MB | {c['broker_bytes'] / MB:.0f} MB | "
            f"{c['http_bytes'] / MB:.0f} MB | {c['device_rss_before_mb']:.0f} MB | {dl_text} | "
            f"+{c['device_peak_install_mb']:.0f} MB |")
    return (f"Measured {env['date']} on {env['cpu_model']} ({env['usable_cores']} usable cores), "
            f"`benchmarks/releases.py`. A push of one model to every device of a fresh fleet: "
            "from staging to the last device's `active` report. All devices but one step in one "
            "process (so the time is the fleet's work done one device after another on a shared "
            "CPU, a bound for real devices that work in parallel); the last runs in its own "
            "process, whose RSS growth is shown (peaks over its RSS before the release, serving "
            "the starting model). Models above 16 MiB travel in 4 MiB chunks from the "
            "aggregator's download endpoint; the download peak is bounded by the chunk size, the "
            "installed peak by the model (onnxruntime holds it, and the file is hashed and "
            "self-tested once in memory).\n\n" + "\n".join(rows))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 100], metavar="MB")
    p.add_argument("--brokers", nargs="+", default=["embedded", "mosquitto"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--probe-device", nargs=2, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.probe_device:
        return probe_device(*ns.probe_device)
    if ns.quick:
        ns.devices, ns.sizes = 5, [1, 20]
    # every device holds a socket and three SQLite files in this process
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    from bedside.models import datasets
    from bedside.models.pipeline import export_model

    res: dict[str, Any] = {"machine": machine(), "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        starting = Path(tmp) / "starting"
        log("exporting the starting model")
        export_model(datasets.load("wdbc"), "logreg", starting)
        for size in ns.sizes:
            for kind in ns.brokers:
                log(f"{size} MB to {ns.devices} devices over {kind}")
                work = Path(tmp) / f"{kind}-{size}"
                work.mkdir()
                case = run_case(size, kind, ns.devices, starting, work)
                log(f"  {case['seconds']:.1f} s, device peak +{case['device_peak_install_mb']} MB")
                res["cases"].append(case)
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(res, indent=2) + "\n")
    write_section("releases", HEADING, markdown(res))
    log(f"wrote {RESULTS_JSON.relative_to(REPO)} and the README section")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
