"""Validator workers (issue 16, item 3): three ``bedside aggregator worker`` processes read a
fleet's updates from a Mosquitto shared subscription and record them in a real PostgreSQL; the
coordinator (``Aggregator`` with ``[workers]``) closes the round from their partial sums.

Every update is published twice (a redelivery, or a device's re-send), so two workers often
judge the same update at once: the database decides which one records it."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bedside.constants import KIND_UPDATE, TOPIC_ROOT, topic_update
from bedside.federation.strategies import RunningSum
from bedside.manifest import load_manifest
from bedside.models.onnx_weights import read_weights
from bedside.wire.envelope import encode
from bedside.wire.signing import SigningKey
from tests.brokers import start_mosquitto
from tests.conftest import bedside_exe
from tests.fleet import seeded_fleet
from tests.postgres import Postgres

FLEET = "wk"
WORKERS = ["1", "2", "3"]
UPDATES = 300


class Rig:
    """Mosquitto, PostgreSQL, a coordinator in this process (its clock is the test's), worker
    subprocesses, ``n`` enrolled devices whose updates the test signs and publishes."""

    def __init__(self, tmp_path: Path, pg: Postgres, n: int) -> None:
        from bedside.demo.run import to_toml

        model = seeded_fleet(tmp_path / "fed", clients=2, rounds=1).work / "initial-model"
        self.work = tmp_path / "agg"
        (self.work / "devices").mkdir(parents=True)
        SigningKey.generate().save(self.work / "aggregator.key")
        self.ids = [f"dev-{i:03d}" for i in range(n)]
        self.keys = {d: SigningKey.generate() for d in self.ids}
        for d, k in self.keys.items():
            k.public.save(self.work / "devices" / f"{d}.pub")
        root = f"{TOPIC_ROOT}/{FLEET}"
        self.broker = start_mosquitto(
            tmp_path / "mq", fleet=FLEET, workers=WORKERS,
            acl_extra=f"user loadgen\ntopic write {root}/update/+\n")
        from bedside.transport import free_port

        self.monitor_port = free_port()
        self.dsn = pg.create_db(f"wk_{os.getpid()}_{int(time.time() * 1000) % 10**9}")
        (self.work / "aggregator.toml").write_text(to_toml({
            "fleet": FLEET, "data_dir": str(self.work / "data"),
            "key": str(self.work / "aggregator.key"), "devices": str(self.work / "devices"),
            "initial_model": str(model), "mqtt": self.broker.table("aggregator"),
            # never closes by itself: the test moves the coordinator's clock past the deadline
            "rounds": {"rounds": 1, "min_participants": 1, "deadline_seconds": 3600.0,
                       "expected_participants": n + 1},
            "privacy": {"noise": "none", "clip_norm": 1.0},
            "strategy": {"rule": "fedavg", "optimizer": "sgd"},
            "state": {"backend": "postgresql", "dsn": self.dsn},
            "workers": {"group": "validators", "ids": WORKERS},
            "monitor": {"port": self.monitor_port}}))
        self.shapes = {k: tuple(v) for k, v in load_manifest(model).parameters.items()}
        self.weights = read_weights((model / "model.onnx").read_bytes(), list(self.shapes))
        self.rng = np.random.default_rng(0)
        self.procs: dict[str, subprocess.Popen] = {}
        self.sent: dict[str, bytes] = {}
        self.now = [time.time()]
        self.stop = threading.Event()
        from bedside.aggregator.config import load
        from bedside.aggregator.service import Aggregator

        self.cfg = load(self.work / "aggregator.toml")
        self.agg = Aggregator(self.cfg, clock=lambda: self.now[0])
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        from bedside.aggregator.pgstate import PgRounds

        self.db = PgRounds(self.dsn, FLEET, writer="test")
        self.wait(lambda: (r := self.db.current_round()) is not None and r.status == "open",
                  "round 1 to open")
        from bedside.transport.mqtt import MqttTransport

        self.loadgen = MqttTransport(self.broker.config("loadgen"), client_id="loadgen")

    def _run(self) -> None:
        try:
            self.agg.run(self.stop, poll=0.05)
        except BaseException as exc:  # reported by the test, not lost in a thread
            self.errors.append(exc)

    def start_worker(self, wid: str, metrics_port: int = 0) -> None:
        c = self.broker.config(f"aggregator-worker-{wid}")
        log = (self.work / f"worker-{wid}.log").open("ab")
        self.procs[wid] = subprocess.Popen(
            [bedside_exe(), "aggregator", "worker", "--config", str(self.work / "aggregator.toml"),
             "--id", wid, "--cert", str(c.cert_file), "--key", str(c.key_file),
             "--monitor-port", str(metrics_port)],
            stdout=log, stderr=log)
        self.wait(lambda: "validating updates" in self.log(wid), f"worker {wid} to subscribe")

    def log(self, wid: str) -> str:
        return (self.work / f"worker-{wid}.log").read_text(errors="replace")

    def wait(self, cond, what: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.errors:
                raise self.errors[0]
            for wid, p in self.procs.items():
                if p.poll() is not None and p.returncode != -signal.SIGKILL:
                    raise AssertionError(f"worker {wid} exited {p.returncode}: {self.log(wid)}")
            if cond():
                return
            time.sleep(0.05)
        logs = {w: self.log(w)[-3000:] for w in self.procs}
        raise AssertionError(f"timed out waiting for {what}; worker logs: {logs}")

    def update(self, device: str) -> tuple[bytes, dict[str, np.ndarray]]:
        t = {k: self.rng.standard_normal(s).astype(np.float32) for k, s in self.shapes.items()}
        norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in t.values()))
        t = {k: (v * (0.5 / norm)).astype(np.float32) for k, v in t.items()}
        return encode(KIND_UPDATE, device, self.keys[device], t, round=1, model_version=1,
                      meta={"fleet": FLEET}), t

    def publish(self, devices: list[str], copies: int = 2,
                deltas: list[dict[str, np.ndarray]] | None = None) -> list[dict[str, np.ndarray]]:
        """Each device's update, published ``copies`` times (the same message: a redelivery or a
        re-send); their deltas. With ``deltas``, the messages sent before are sent again."""
        out = []
        for d in devices:
            if deltas is None:
                payload, t = self.update(d)
                self.sent[d] = payload
                out.append(t)
            for _ in range(copies):
                self.loadgen.publish(topic_update(FLEET, d), self.sent[d], qos=1)
        return out

    def settle(self, quiet: float = 1.5, timeout: float = 60.0) -> None:
        """Wait until what the store holds (accepted updates, rejections) has not changed for
        ``quiet`` seconds."""
        last: object = None
        since, deadline = time.monotonic(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = (self.accepted(), self.db.rejections(1))
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.1)

    def accepted(self) -> int:
        r = self.db._one("SELECT COUNT(*) FROM updates WHERE round = 1")
        return int(r[0]) if r else 0

    def by_writer(self) -> dict[str, int]:
        return {w: RunningSum.from_bytes(b, self.shapes).count for w, b in self.db._all(
            "SELECT writer, sums FROM round_sums WHERE round = 1")}

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.stop.set()
        self.thread.join(20)
        self.agg.close()
        self.agg.transport.close()
        self.loadgen.close()
        self.db.close()
        self.broker.stop()


@pytest.fixture()
def rig(tmp_path, pg):
    r = Rig(tmp_path, pg, UPDATES)
    try:
        yield r
    finally:
        r.close()


def _check_round(rig: Rig, deltas: list[dict[str, np.ndarray]]) -> None:
    """Every update recorded once, the workers' partial sums merge into the sum of exactly these
    updates, and the coordinator's new version is the old weights plus their mean."""
    rows = rig.db._all("SELECT sender, COUNT(*) FROM updates WHERE round = 1 GROUP BY sender")
    assert len(rows) == UPDATES and all(n == 1 for _, n in rows)
    expected = RunningSum(rig.shapes)
    for t in deltas:
        expected.add(t)
    merged = RunningSum(rig.shapes)
    for part in rig.db.partial_sums(1):
        merged.merge(RunningSum.from_bytes(part, rig.shapes))
    assert merged.count == UPDATES and merged.weight == pytest.approx(UPDATES)
    for k in rig.shapes:
        np.testing.assert_allclose(merged.sums[k], expected.sums[k], rtol=1e-12, atol=1e-12)

    rig.now[0] += 7200.0  # past the deadline: the coordinator closes the round
    rig.wait(lambda: (r := rig.db.get_round(1)) is not None and r.status == "closed",
             "the coordinator to close round 1")
    result = rig.db.get_round(1).result
    assert result["accepted"] == UPDATES
    new = read_weights(rig.agg.registry.model_bytes(2), list(rig.shapes))
    mean = expected.mean()
    for k in rig.shapes:
        np.testing.assert_allclose(new[k], rig.weights[k] + mean[k], rtol=1e-6, atol=1e-7)


def _status(port: int) -> dict:
    import json
    import urllib.request

    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status",
                                             timeout=10).read())


def _metric(port: int, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(name + " "))


def _rejected(port: int, reason: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    line = f'bedside_updates_rejected_total{{reason="{reason}"}} '
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))


def test_three_workers_accept_each_update_exactly_once(rig):
    from bedside.transport import free_port

    ports = {w: free_port() for w in WORKERS}
    for w in WORKERS:
        rig.start_worker(w, metrics_port=ports[w])
    deltas = rig.publish(rig.ids)
    forged = encode(KIND_UPDATE, "dev-000", SigningKey.generate(), {}, round=1,
                    model_version=1, meta={"fleet": FLEET})
    rig.loadgen.publish(topic_update(FLEET, "dev-000"), forged, qos=1)
    rig.wait(lambda: rig.accepted() == UPDATES and
             rig.db.rejections(1).get("duplicate", 0) == UPDATES and
             rig.db.rejections(1).get("bad_signature", 0) == 1, "every update and its copy")
    # the shared subscription spread the work: every worker judged messages. (Who records an
    # update is a race between the two workers that got its copies, and a worker may lose all
    # of its races: its partial sum can be empty.)
    def judged() -> dict[str, float]:  # each message counted once, when its verdict is durable
        return {w: _metric(ports[w], "bedside_updates_received_total") for w in WORKERS}

    rig.wait(lambda: sum(judged().values()) >= 2 * UPDATES + 1, "every message's verdict")
    shares = judged()  # every update, its copy and the forgery, each judged by one worker only
    assert sum(shares.values()) == 2 * UPDATES + 1 and min(shares.values()) > 0, shares
    counts = rig.by_writer()
    assert set(counts) <= set(WORKERS) and sum(counts.values()) == UPDATES, counts
    # the worker that judged the forgery counted it; the coordinator's page reads the database
    assert sum(_rejected(p, "bad_signature") for p in ports.values()) == 1
    rig.wait(lambda: _status(rig.monitor_port)["rejections"].get("bad_signature") == 1,
             "the coordinator's status page to show the forgery")
    _check_round(rig, deltas)
    # the operator's view reads the shared database too
    import json

    out = subprocess.run([bedside_exe(), "aggregator", "status", "--json", "--config",
                          str(rig.work / "aggregator.toml")], capture_output=True, text=True,
                         check=True, timeout=120)
    (r1,) = json.loads(out.stdout)["rounds"]
    assert (r1["status"], r1["accepted"], r1["rejected"]) == ("closed", UPDATES,
                                                              {"bad_signature": 1})


def test_a_worker_killed_mid_round_loses_nothing_and_counts_nothing_twice(rig):
    for w in WORKERS:
        rig.start_worker(w)
    deltas = rig.publish(rig.ids[:150], copies=1)
    rig.wait(lambda: rig.by_writer().get("2", 0) > 0, "worker 2 to record some updates")
    rig.procs["2"].kill()  # SIGKILL, mid-stream: what it held unacknowledged stays in its session
    rig.procs["2"].wait(10)
    deltas += rig.publish(rig.ids[150:], copies=1)
    rig.settle()  # the live workers have done what reached them
    before = rig.accepted()
    rig.start_worker("2")  # the same id: the broker delivers its persistent session's messages
    rig.wait(lambda: rig.accepted() == UPDATES, "every update")
    # Mosquitto kept giving worker 2 its share while it was down: those waited in its session
    assert before < UPDATES
    rig.settle()  # what worker 2 recorded but had not acknowledged comes back as duplicates
    redelivered = rig.db.rejections(1).get("duplicate", 0)
    rig.publish(rig.ids, copies=1, deltas=deltas)  # every device sends again: all duplicates
    rig.wait(lambda: rig.db.rejections(1).get("duplicate", 0) == redelivered + UPDATES,
             "every re-send")
    _check_round(rig, deltas)
