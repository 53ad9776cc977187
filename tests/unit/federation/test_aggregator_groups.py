"""The aggregator at scale (issue 16, item 2): one durable running sum per round instead of every
update (disk O(model)), messages recorded in groups and acknowledged only once their group is
durable, redeliveries and restarts counted exactly once."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from bedside.constants import KIND_UPDATE, topic_update
from bedside.errors import InputError
from bedside.federation.strategies import FedAvg, RunningSum, materialize
from bedside.manifest import load_manifest
from bedside.models.onnx_weights import read_weights
from bedside.wire.envelope import encode
from bedside.wire.signing import SigningKey
from tests.fleet import seeded_fleet

FLEET = "scale"


class Rig:
    """An aggregator service on an in-memory broker with ``n`` enrolled devices that the test
    signs updates for."""

    def __init__(self, tmp_path: Path, n: int, rule: str = "fedavg") -> None:
        from bedside.demo.run import to_toml
        from bedside.transport.memory import MemoryBroker, MemoryTransport

        model = seeded_fleet(tmp_path / "fed", clients=2, rounds=1).work / "initial-model"
        self.work = tmp_path / "agg"
        (self.work / "devices").mkdir(parents=True)
        SigningKey.generate().save(self.work / "aggregator.key")
        self.ids = [f"dev-{i:03d}" for i in range(n)]
        self.keys = {}
        for d in self.ids:
            self.keys[d] = SigningKey.generate()
            self.keys[d].public.save(self.work / "devices" / f"{d}.pub")
        (self.work / "aggregator.toml").write_text(to_toml({
            "fleet": FLEET, "data_dir": str(self.work / "data"),
            "key": str(self.work / "aggregator.key"), "devices": str(self.work / "devices"),
            "initial_model": str(model), "mqtt": {"host": "127.0.0.1", "port": 1883},
            "rounds": {"rounds": 1, "min_participants": 1, "deadline_seconds": 3600.0,
                       "expected_participants": n + 1},
            "privacy": {"noise": "none", "clip_norm": 1.0},
            "strategy": {"rule": rule, "optimizer": "sgd"}}))
        self.shapes = {k: tuple(v) for k, v in load_manifest(model).parameters.items()}
        self.weights = read_weights((model / "model.onnx").read_bytes(), list(self.shapes))
        self.broker = MemoryBroker()
        self.devices = MemoryTransport(self.broker, "devices")
        self.now = [1_000_000.0]
        self.rng = np.random.default_rng(0)
        self.agg = self.new_aggregator()

    def new_aggregator(self):
        from bedside.aggregator.config import load
        from bedside.aggregator.service import Aggregator
        from bedside.transport.memory import MemoryTransport

        agg = Aggregator(load(self.work / "aggregator.toml"),
                         MemoryTransport(self.broker, "aggregator", clean_session=False,
                                         manual_ack=True), clock=lambda: self.now[0])
        agg.start()
        return agg

    def update(self, device: str, scale: float = 0.5) -> tuple[bytes, dict[str, np.ndarray]]:
        t = {k: self.rng.standard_normal(s).astype(np.float32) for k, s in self.shapes.items()}
        norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in t.values()))
        t = {k: (v * (scale / norm)).astype(np.float32) for k, v in t.items()}
        return encode(KIND_UPDATE, device, self.keys[device], t, round=1, model_version=1,
                      meta={"fleet": FLEET}), t

    def send(self, device: str, payload: bytes) -> None:
        self.devices.publish(topic_update(FLEET, device), payload)

    def send_updates(self, devices: list[str]) -> list[dict[str, np.ndarray]]:
        """A fresh update from each of ``devices``, published; their deltas."""
        deltas = []
        for d in devices:
            payload, t = self.update(d)
            self.send(d, payload)
            deltas.append(t)
        return deltas

    def close_round(self) -> dict[str, np.ndarray]:
        self.now[0] += 7200.0
        self.agg.step(0.0)
        assert self.agg.state.get_round(1).status == "closed"
        return read_weights(self.agg.registry.model_bytes(2), list(self.shapes))

    def close_and_check(self, deltas: list[dict[str, np.ndarray]]) -> None:
        """Close the round; the new weights are the old plus the mean of exactly ``deltas``."""
        new = self.close_round()
        for k, v in self.expected(deltas).items():
            np.testing.assert_allclose(new[k], v, rtol=1e-6, atol=1e-7)

    def expected(self, deltas: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        mean = FedAvg().aggregate(materialize((d, 1.0) for d in deltas), self.shapes)
        return {k: self.weights[k] + mean[k] for k in self.shapes}


def _tensors_kept(agg) -> int:
    return agg.state.db.execute("SELECT COUNT(*) FROM updates WHERE tensors IS NOT NULL"
                                ).fetchone()[0]


def test_a_round_keeps_one_running_sum_not_every_update(tmp_path):
    rig = Rig(tmp_path, 40)
    deltas = []
    for burst in (rig.ids[:25], rig.ids[25:]):  # two turns of the loop, groups of 25 and 15
        deltas += rig.send_updates(burst)
        rig.agg.step(0.0)
    assert len(rig.agg.state.accepted(1)) == 40 and _tensors_kept(rig.agg) == 0
    stored = RunningSum.from_bytes(rig.agg.state.running_sum(1), rig.shapes)
    assert stored.count == 40 and stored.weight == 40.0
    rig.close_and_check(deltas)
    assert rig.agg.state.running_sum(1) is None  # dropped with the round
    receipts = [t for t, _ in rig.broker.published if "/receipt/" in t]
    assert len(receipts) == 40


def test_a_group_is_acknowledged_only_once_it_is_durable(tmp_path, monkeypatch):
    """The group's transaction fails: nothing of it is acknowledged or receipted; after a
    restart the broker redelivers it and every update counts once."""
    from bedside.aggregator.state import State

    rig = Rig(tmp_path, 6)
    deltas = rig.send_updates(rig.ids)
    real = State.commit_batch

    def broken(self, batch):
        raise sqlite3.OperationalError("disk I/O error")
    monkeypatch.setattr(State, "commit_batch", broken)
    with pytest.raises(sqlite3.OperationalError):
        rig.agg.step(0.0)
    assert len(rig.broker._sessions["aggregator"].unacked) == 6  # none acknowledged
    assert not [t for t, _ in rig.broker.published if "/receipt/" in t]
    monkeypatch.setattr(State, "commit_batch", real)
    rig.agg.transport.close()
    rig.agg.state.close()
    rig.agg = rig.new_aggregator()  # the operator restarts it with working storage
    rig.agg.step(0.0)
    assert sorted(u["sender"] for u in rig.agg.state.accepted(1)) == rig.ids
    assert not rig.broker._sessions["aggregator"].unacked
    rig.close_and_check(deltas)


def test_a_resend_and_a_second_update_in_one_group_count_once(tmp_path):
    rig = Rig(tmp_path, 2)
    first, t = rig.update(rig.ids[0])
    second, _ = rig.update(rig.ids[0])
    rig.send(rig.ids[0], first)
    rig.send(rig.ids[0], first)  # a re-send: its receipt was lost
    rig.send(rig.ids[0], second)  # another update from the same device
    rig.agg.step(0.0)
    assert [u["sender"] for u in rig.agg.state.accepted(1)] == [rig.ids[0]]
    assert rig.agg.state.rejections(1) == {"duplicate": 1, "already_contributed": 1}
    stored = RunningSum.from_bytes(rig.agg.state.running_sum(1), rig.shapes)
    assert stored.count == 1
    rig.close_and_check([t])


def test_a_restart_mid_round_resumes_from_the_durable_sum(tmp_path):
    rig = Rig(tmp_path, 10)
    deltas = []
    for i, d in enumerate(rig.ids):
        if i == 5:  # killed between two groups: the first five are durable
            rig.agg.transport.close()
            rig.agg.state.close()
            rig.agg = rig.new_aggregator()
        deltas += rig.send_updates([d])
        rig.agg.step(0.0)
    rig.close_and_check(deltas)


def test_a_round_recorded_with_every_update_kept_is_resumed(tmp_path):
    """A state written before running sums (each update's tensors kept, no sum): the open round
    resumes with the sum rebuilt from them."""
    from bedside.aggregator.state import Batch, UpdateRow

    rig = Rig(tmp_path, 4)
    old = []
    for d in rig.ids[:2]:
        _, t = rig.update(d)
        old.append(t)
        rig.agg.state.commit_batch(Batch(updates=[UpdateRow(1, d, f"n-{d}", "0" * 64, 1.0, 0.5,
                                                            {}, t)]))
    rig.agg.transport.close()
    rig.agg.state.close()
    rig.agg = rig.new_aggregator()
    new_ones = rig.send_updates(rig.ids[2:])
    rig.agg.step(0.0)
    rig.close_and_check(old + new_ones)


def test_rules_that_need_every_update_keep_them_until_the_round_closes(tmp_path):
    rig = Rig(tmp_path, 3, rule="median")
    rig.send_updates(rig.ids)
    rig.agg.step(0.0)
    assert _tensors_kept(rig.agg) == 3 and rig.agg.state.running_sum(1) is None
    rig.close_round()
    assert _tensors_kept(rig.agg) == 0


def test_running_sums_merge_and_survive_a_round_trip_through_bytes():
    shapes = {"a": (3, 2), "b": (4,)}
    rng = np.random.default_rng(1)
    updates = [({k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()},
                float(w)) for w in (1, 2, 1, 3)]
    whole, left, right = RunningSum(shapes), RunningSum(shapes), RunningSum(shapes)
    for i, (t, w) in enumerate(updates):
        whole.add(t, w)
        (left if i % 2 else right).add(t, w)
    left.merge(right)
    back = RunningSum.from_bytes(left.to_bytes(), shapes)
    assert (back.count, back.weight) == (4, 7.0)
    for k in shapes:
        np.testing.assert_allclose(back.mean()[k], whole.mean()[k], rtol=1e-6)
        np.testing.assert_allclose(whole.mean()[k], FedAvg().aggregate(materialize(updates),
                                                                       shapes)[k])
    with pytest.raises(InputError, match="shapes"):
        RunningSum.from_bytes(left.to_bytes(), {"a": (3, 2), "b": (5,)})
    with pytest.raises(InputError, match="different models"):
        whole.merge(RunningSum({"a": (3, 2)}))
    with pytest.raises(InputError, match="empty"):
        RunningSum(shapes).mean()


def test_a_storage_error_while_judging_leaves_no_phantom_in_the_running_sum(tmp_path,
                                                                           monkeypatch):
    """The group is abandoned (nothing acknowledged); the cached sum holds only what is durable,
    so the redelivered updates count once, in the same process."""
    from bedside.aggregator.state import State

    rig = Rig(tmp_path, 3)
    deltas = rig.send_updates(rig.ids)
    calls = [0]
    real = State.seen

    def flaky(self, sender, nonce, round_id):
        calls[0] += 1
        if calls[0] == 3:  # the third message of the group: the database fails
            raise sqlite3.OperationalError("database is locked")
        return real(self, sender, nonce, round_id)
    monkeypatch.setattr(State, "seen", flaky)
    with pytest.raises(sqlite3.OperationalError):
        rig.agg.step(0.0)
    monkeypatch.setattr(State, "seen", real)
    assert rig.agg.state.accepted(1) == []
    rig.agg.transport.close()  # the broker redelivers the unacknowledged group
    rig.agg.transport.reconnect()
    rig.agg.step(0.0)
    assert sorted(u["sender"] for u in rig.agg.state.accepted(1)) == rig.ids
    rig.close_and_check(deltas)


def test_changing_to_a_rule_that_needs_every_update_mid_round_is_refused(tmp_path):
    from bedside.demo.run import to_toml
    from bedside.errors import ConfigError

    rig = Rig(tmp_path, 3)
    payload, _ = rig.update(rig.ids[0])
    rig.send(rig.ids[0], payload)
    rig.agg.step(0.0)
    rig.agg.transport.close()
    rig.agg.state.close()
    import tomllib

    conf = tomllib.loads((rig.work / "aggregator.toml").read_text())
    conf["strategy"]["rule"] = "median"
    (rig.work / "aggregator.toml").write_text(to_toml(conf))
    with pytest.raises(ConfigError, match="running sum"):
        rig.new_aggregator()


def test_a_resend_recorded_by_an_earlier_version_is_a_duplicate(tmp_path):
    """state.db rows written before Envelope.digest held the whole message's sha256."""
    import hashlib

    from bedside.wire.envelope import peek

    rig = Rig(tmp_path, 2)
    payload, _ = rig.update(rig.ids[0])
    rig.send(rig.ids[0], payload)
    rig.agg.step(0.0)
    rig.agg.state.db.execute("UPDATE updates SET digest = ? WHERE nonce = ?",
                             (hashlib.sha256(payload).hexdigest(), peek(payload).nonce))
    rig.agg.state.db.commit()
    rig.send(rig.ids[0], payload)
    rig.agg.step(0.0)
    assert rig.agg.state.rejections(1) == {"duplicate": 1}
