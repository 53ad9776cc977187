"""Validator workers benchmark: updates per second recorded by the single-process service
(SQLite) and by a coordinator with 1 and 2 validator workers (PostgreSQL), through Mosquitto.

Each case starts a fresh Mosquitto (TLS, client certificates, the fleet's ACL), for the worker
cases a fresh PostgreSQL database, the real ``bedside aggregator serve`` and, for the worker
cases, ``bedside aggregator worker`` processes. One publisher (this process) sends N signed
updates of the digits MLP (hidden 256 x 128, about 51k parameters, 204 KB each) as fast as
the broker takes them; the rate is N / (time from the first publish to the N-th update recorded
in the database). Every update is checked as the service checks it (signature, round, replay,
shapes, finite values, norm) and recorded durably before it is acknowledged.

Run from the repository root: ``.venv/bin/python benchmarks/workers.py`` (about 2 minutes on
2 cores; each case 3 times, interleaved, the median reported). Writes
``benchmarks/results/workers.json`` and the ``## Validator workers`` section of
``benchmarks/README.md``. Needs Mosquitto and PostgreSQL (``make test`` installs them).
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import REPO, RESULTS, load_average, log, machine, write_section

sys.path.insert(0, str(REPO))

RESULTS_JSON = RESULTS / "workers.json"
FLEET = "bench"
UPDATES = 1000
REPEATS = 3  # each case, interleaved; the table gives the median
CASES = (("service", 0), ("workers", 1), ("workers", 2))
BIG_HIDDEN = [256, 128]


def export_model(root: Path) -> tuple[Path, dict[str, tuple[int, ...]]]:
    from bedside.demo.run import DemoConfig, export_initial_model
    from bedside.models import datasets

    cfg = DemoConfig(dataset="digits", arch="mlp", arch_params={"hidden": BIG_HIDDEN}, seed=0)
    train, holdout = datasets.train_test_split(datasets.load("digits"), 0.2, seed=0)
    m = export_initial_model(train, holdout, cfg, root / "model")
    return root / "model", {k: tuple(v) for k, v in m.parameters.items()}


def signed_updates(n: int, shapes: dict[str, tuple[int, ...]], devices: Path
                   ) -> list[tuple[str, bytes]]:
    import numpy as np

    from bedside.constants import KIND_UPDATE
    from bedside.wire.envelope import encode
    from bedside.wire.signing import SigningKey

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        d, key = f"dev-{i:04d}", SigningKey.generate()
        key.public.save(devices / f"{d}.pub")
        t = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in t.values()))
        t = {k: (v * (0.5 / norm)).astype(np.float32) for k, v in t.items()}
        out.append((d, encode(KIND_UPDATE, d, key, t, round=1, model_version=1,
                              meta={"fleet": FLEET})))
    return out


def run_case(kind: str, workers: int, work: Path, model: Path, updates: list[tuple[str, bytes]],
             devices: Path, pg: Any, tag: str) -> dict[str, Any]:
    from bedside.constants import TOPIC_ROOT, topic_update
    from bedside.demo.run import to_toml
    from bedside.transport.mqtt import MqttTransport
    from bedside.wire.signing import SigningKey
    from tests.brokers import start_mosquitto

    ids = [str(i + 1) for i in range(workers)]
    work.mkdir(parents=True)
    SigningKey.generate().save(work / "aggregator.key")
    broker = start_mosquitto(work / "mq", fleet=FLEET, workers=ids,
                             acl_extra=f"user loadgen\ntopic write {TOPIC_ROOT}/{FLEET}/update/+\n")
    cfg: dict[str, Any] = {
        "fleet": FLEET, "data_dir": str(work / "data"), "key": str(work / "aggregator.key"),
        "devices": str(devices), "initial_model": str(model),
        "mqtt": broker.table("aggregator"),
        "rounds": {"rounds": 1, "min_participants": 1, "deadline_seconds": 3600.0,
                   "expected_participants": len(updates) + 1},
        "privacy": {"noise": "none", "clip_norm": 1.0},
        "strategy": {"rule": "fedavg", "optimizer": "sgd"}}
    dsn = ""
    if workers:
        dsn = pg.create_db(f"bench_{workers}_{tag}")
        cfg["state"] = {"backend": "postgresql", "dsn": dsn}
        cfg["workers"] = {"group": "validators", "ids": ids}
    (work / "aggregator.toml").write_text(to_toml(cfg))
    exe = str(Path(sys.executable).parent / "bedside")
    procs = [subprocess.Popen([exe, "aggregator", "serve", "--config",
                               str(work / "aggregator.toml")],
                              stdout=subprocess.DEVNULL, stderr=(work / "serve.log").open("wb"))]
    for i in ids:
        c = broker.config(f"aggregator-worker-{i}")
        procs.append(subprocess.Popen(
            [exe, "aggregator", "worker", "--config", str(work / "aggregator.toml"), "--id", i,
             "--cert", str(c.cert_file), "--key", str(c.key_file)],
            stdout=subprocess.DEVNULL, stderr=(work / f"worker-{i}.log").open("wb")))
    pub = MqttTransport(broker.config("loadgen"), client_id="loadgen")
    count, close = _counter(work, dsn)
    try:
        _wait(lambda: count("SELECT COUNT(*) FROM rounds WHERE status = 'open'") == 1, 120,
              "round 1 to open", work)
        for i in ids:
            _wait(lambda i=i: "validating updates" in (work / f"worker-{i}.log").read_text(),
                  60, f"worker {i}", work)
        if not pub.wait_connected(10):
            raise RuntimeError("the publisher could not connect")
        time.sleep(0.5)
        t0 = time.perf_counter()
        for d, payload in updates:
            pub.publish(topic_update(FLEET, d), payload, qos=1, wait=False)
        _wait(lambda: count("SELECT COUNT(*) FROM updates") >= len(updates), 600,
              "every update to be recorded", work)
        seconds = time.perf_counter() - t0
        accepted = count("SELECT COUNT(*) FROM updates")
    finally:
        close()
        pub.close()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()
    rate = len(updates) / seconds
    label = "single process, SQLite" if not workers else \
        f"coordinator + {workers} worker{'s' if workers > 1 else ''}, PostgreSQL"
    log(f"{label}: {len(updates)} updates in {seconds:.2f} s = {rate:.0f}/s")
    return {"case": label, "workers": workers, "updates": len(updates), "accepted": accepted,
            "seconds": round(seconds, 3), "per_s": round(rate, 1)}


def _counter(work: Path, dsn: str) -> tuple[Any, Any]:
    if dsn:
        import psycopg

        conn = psycopg.connect(dsn, autocommit=True)

        def pg_count(sql: str) -> int:
            try:
                row = conn.execute(sql).fetchone()
            except psycopg.errors.UndefinedTable:  # the service has not created it yet
                return 0
            return int(row[0]) if row else 0
        return pg_count, conn.close

    def sqlite_count(sql: str) -> int:
        db = work / "data" / "state.db"
        if not db.exists():
            return 0
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            row = c.execute(sql).fetchone()
            return int(row[0]) if row else 0
        except sqlite3.OperationalError:  # not created yet
            return 0
        finally:
            c.close()
    return sqlite_count, lambda: None


def _wait(cond: Any, timeout: float, what: str, work: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    logs = {p.name: p.read_text(errors="replace")[-1500:] for p in work.glob("*.log")}
    raise RuntimeError(f"timed out waiting for {what}: {logs}")


def markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    rows = ["| case | updates | updates/s (median) | runs | vs single process |",
            "| --- | --- | --- | --- | --- |"]
    base = res["cases"][0]["per_s"]
    for c in res["cases"]:
        runs = ", ".join(f"{r:,.0f}" for r in c["runs_per_s"])
        rows.append(f"| {c['case']} | {c['updates']:,} | {c['per_s']:,.0f} | {runs} | "
                    f"{c['per_s'] / base:.2f}x |")
    return "\n".join([
        f"Measured {env['date']} on {env['cpu_model']} ({env['usable_cores']} usable cores), "
        f"Python {env['python']}; `.venv/bin/python benchmarks/workers.py`.",
        "",
        f"{res['updates']:,} signed updates of the {res['parameters']:,}-parameter digits MLP "
        "(about 204 KB each, one enrolled device each) published as fast as Mosquitto (TLS) takes "
        "them; the rate is updates recorded durably per second, from the first publish to the "
        f"last record; {res['repeats']} runs of each case, interleaved. Publisher, Mosquitto, "
        "PostgreSQL, the coordinator and the workers share the machine's cores.",
        "", *rows, "",
        "Workers exist for more cores or machines than one process can use; on this machine "
        "they compete with the broker, the database and the publisher for two cores, so the "
        "table shows what a worker costs and whether the path scales on the cores there are, "
        "not a many-core figure (docs/scaling.md).",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--updates", type=int, default=UPDATES)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    from tests.postgres import start_postgres

    res: dict[str, Any] = {"benchmark": "workers", "environment": machine(),
                           "updates": args.updates, "cases": []}
    with tempfile.TemporaryDirectory(prefix="bedside-bench-workers-") as tmp:
        work = Path(tmp)
        model, shapes = export_model(work)
        res["parameters"] = sum(math.prod(s) for s in shapes.values())
        devices = work / "devices"
        devices.mkdir()
        updates = signed_updates(args.updates, shapes, devices)
        pg = start_postgres()
        runs: dict[int, list[dict[str, Any]]] = {n: [] for _, n in CASES}
        try:
            for rep in range(args.repeats):
                for kind, n in CASES:
                    runs[n].append(run_case(kind, n, work / f"{kind}-{n}-{rep}", model, updates,
                                            devices, pg, f"r{rep}"))
        finally:
            pg.stop()
        for _, n in CASES:
            rs = sorted(runs[n], key=lambda r: r["per_s"])
            median = rs[len(rs) // 2]
            res["cases"].append({**median, "runs_per_s": [r["per_s"] for r in runs[n]]})
        res["repeats"] = args.repeats
    res["environment"]["load_average_end"] = load_average()
    if args.no_write:
        print(json.dumps(res, indent=2))
        return 0
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(res, indent=2) + "\n")
    write_section("workers", "## Validator workers", markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
