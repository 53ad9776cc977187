"""Aggregator and agents over the in-memory broker: the protocol's behaviour, deterministically.

The same scenarios run against real Mosquitto in tests/integration; here they are fast and
exhaustive about reasons and edge cases.
"""

from __future__ import annotations

import numpy as np
import pytest

from bedside.constants import KIND_UPDATE, topic_update
from bedside.edge.predictor import Predictor
from bedside.wire.envelope import decode, encode
from bedside.wire.signing import SigningKey
from tests.fleet import mem_fleet
from tests.wire_tools import resign, with_nan


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    mf = mem_fleet(tmp_path_factory.mktemp("fed"), clients=3, rounds=3)
    mf.run()
    return mf


def test_full_run(finished):
    mf = finished
    agg = mf.aggregator
    assert agg.finished
    rounds = agg.state.rounds()
    assert [r.status for r in rounds] == ["closed"] * 3
    assert [r.result["accepted"] for r in rounds] == [3, 3, 3]
    assert agg.registry.versions() == [1, 2, 3, 4]
    for a in mf.agents:
        assert a.models.current_version() == 4
        assert a.done
        rep = a.privacy_report()
        assert rep["record"]["epsilon"] <= rep["record"]["budget_epsilon"]
        assert rep["record"]["rounds"] == 3
        assert a.state.counts() == {"accepted": 3}
    m = agg.registry.manifest(4)
    assert m.parent_version == 3 and m.training["contributors"] == 3
    assert m.privacy["unit"] == "device" and m.privacy["rounds"] == 3
    assert 0 < m.privacy["epsilon"] < np.inf
    assert m.metrics["holdout"]["rows"] == mf.fleet.plan["holdout_rows"]
    # each round's privacy report grows with the rounds
    eps = [r.result["privacy"]["epsilon"] for r in rounds]
    assert eps == sorted(eps) and eps[0] < eps[-1]


def test_nothing_but_privatized_updates_leaves_a_device(finished):
    mf = finished
    for topic, payload in mf.broker.published:
        if "/update/" not in topic:
            continue
        env = decode(payload, mf.aggregator.devices, kinds={KIND_UPDATE})
        assert set(env.header.meta) <= {"weight", "record_epsilon", "record_delta", "decline",
                                        "fleet", "seeded"}
        w = env.header.meta.get("weight")
        assert w is None or (w & (w - 1)) == 0  # counts leave only as powers of two
        if env.tensors:
            norm = np.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64)))
                               for t in env.tensors.values()))
            assert norm <= 1.0 + 1e-5  # clipped to C (central mode: no local noise)


def _open_round(tmp_path, **kw):
    """A fleet with a silent enrolled device, so the round stays open until its deadline."""
    mf = mem_fleet(tmp_path, clients=3, rounds=2, extra_devices=1, **kw)
    return mf


def _honest_update(mf, i):
    """A well-formed update from clinic i for the open round (zeros)."""
    agg = mf.aggregator
    cur = agg.state.current_round()
    cid = mf.fleet.clinic_ids[i]
    key = SigningKey.load(mf.fleet.plan["clinics"][i]["dir"] / "keys" / f"{cid}.key")
    tensors = {k: np.zeros(s, np.float32) for k, s in agg._shapes.items()}
    return cid, key, encode(KIND_UPDATE, cid, key, tensors, round=cur.round,
                            model_version=cur.model_version,
                            meta={"weight": 1, "fleet": mf.fleet.plan["fleet"]})


def test_malicious_updates_are_rejected_and_the_round_completes(tmp_path):
    mf = _open_round(tmp_path)
    agg, fleet = mf.aggregator, mf.fleet
    send = mf.broker.publish
    cid, key, good = _honest_update(mf, 0)
    topic = topic_update(fleet.plan["fleet"], cid)
    # forged signature: clinic-1's id, someone else's key
    _, _, forged = _honest_update(mf, 0)
    forged = resign(forged, SigningKey.generate())
    send(topic, forged, False)
    # NaN values, correctly signed by clinic-1
    send(topic, with_nan(good, key), False)
    # oversized
    send(topic, b"\0" * (agg.cfg.max_update_bytes + 1), False)
    # clinic-2's update published on clinic-1's topic
    _, _, other = _honest_update(mf, 1)
    send(topic, other, False)
    # wrong round, wrong shapes, unknown sender, garbage
    send(topic, resign(good, key, edit=lambda h: h.update(round=h["round"] + 5)), False)
    bad_shape = encode(KIND_UPDATE, cid, key, {k: np.zeros(3, np.float32) for k in agg._shapes},
                       round=1, model_version=1, meta={"fleet": fleet.plan["fleet"]})
    send(topic, bad_shape, False)
    stranger = SigningKey.generate()
    send(topic_update(fleet.plan["fleet"], "stranger"),
         encode(KIND_UPDATE, "stranger", stranger, {}, round=1, model_version=1,
                meta={"decline": "x"}), False)
    send(topic, b"not an envelope", False)
    # an update signed for another fleet
    send(topic, resign(good, key, edit=lambda h: h["meta"].update(fleet="elsewhere")), False)
    # then a good update, and its replay
    send(topic, good, False)
    send(topic, good, False)
    agg.step(0.0)
    rej = agg.state.rejections(1)
    assert rej == {"bad_signature": 1, "non_finite": 1, "too_large": 1, "topic_mismatch": 1,
                   "wrong_round": 1, "shape_mismatch": 1, "unknown_sender": 1, "malformed": 1,
                   "duplicate": 1, "wrong_fleet": 1}
    assert [u["sender"] for u in agg.state.accepted(1)] == [cid]
    # the honest agents take part, the silent device never answers: closes at the deadline
    mf.run(max_steps=20)
    assert agg.state.current_round().status == "open"
    mf.clock.advance(agg.cfg.rounds.deadline_seconds + 1)
    mf.step()
    r1 = agg.state.get_round(1)
    assert r1.status == "closed"
    assert r1.result["accepted"] == 3  # the injected zero update counts for clinic-1 ...
    assert r1.result["rejected"]["already_contributed"] == 1  # ... so its agent's is refused
    assert sum(r1.result["rejected"].values()) == 10 and r1.result["duplicates"] == 1
    # the same accepted update replayed into the next round is a replay, not a contribution
    mf.step()
    assert agg.state.current_round().round == 2
    send(topic, good, False)
    agg.step(0.0)
    assert agg.state.rejections(2).get("replay") == 1
    from bedside.wire.envelope import peek

    assert peek(good).nonce not in {u["nonce"] for u in agg.state.accepted(2)}
    assert mf.agents[0].state.counts()["rejected"] == 1  # its round-1 update


def test_budget_refusal_survives_restart_and_inference_goes_on(tmp_path):
    from bedside.privacy import accountant as acct

    # a device-level budget that admits one round of central noise z = 1 (multiplier z/2), not two
    one, two = (acct.epsilon(acct.gaussian(0.5, k), 1e-5) for k in (1, 2))
    budget = (one + two) / 2
    mf = mem_fleet(tmp_path, clients=3, rounds=4, noise_multiplier=1.0,
                   agent={"privacy": {"device_epsilon": budget}})
    mf.run()
    agg = mf.aggregator
    assert agg.finished
    a = mf.agents[0]
    actions = [a.state.handled(r) for r in (1, 2, 3, 4)]
    assert actions[0] == "contributed" and actions[1:] == ["declined:budget"] * 3
    rep = a.privacy_report()
    assert rep["device"]["epsilon"] == pytest.approx(one, rel=1e-6)
    assert rep["device"]["epsilon"] <= budget and rep["record"]["epsilon"] <= 8.0
    assert a.status()["state"] == "refusing"
    # rounds closed with the declines counted, and the model kept improving without them
    assert all(len(r.result["declined"]) == 3 for r in agg.state.rounds()[1:])
    assert a.models.current_version() == agg.registry.latest()
    pred = Predictor(a.models.root / "current")
    assert pred.predict_proba(mf.fleet.plan["model_v1"].schema.reference_rows(1)).shape == (1, 2)
    # restart: a new agent on the same data directory still refuses
    a.transport.close()
    b = mf.new_agent(0)
    assert b.privacy_report()["device"]["epsilon"] == pytest.approx(rep["device"]["epsilon"])
    from bedside.errors import BudgetExceededError
    from bedside.privacy.ledger import Release

    with pytest.raises(BudgetExceededError):
        b._ledger.check([Release(round=9, unit="device", mechanism="gaussian",
                                 noise_multiplier=0.5, sample_rate=1.0, steps=1)])


def test_unreadable_ledger_refuses_to_contribute(tmp_path):
    mf = mem_fleet(tmp_path, clients=2, rounds=1)
    a = mf.agents[0]
    a._ledger.close()
    a.cfg.ledger_path.write_bytes(b"this is not a ledger" * 100)
    for wal in a.cfg.ledger_path.parent.glob("ledger.db-*"):
        wal.unlink()
    a._ledger = None
    mf.run()
    assert a.state.handled(1) == "declined:ledger_unavailable"
    assert a.status()["refusing"] == "ledger_unavailable"  # a reason code; the message stays local
    assert a.refusing.startswith("ledger unavailable")


def test_outbox_delivers_after_an_outage(tmp_path):
    mf = _open_round(tmp_path)
    a = mf.agents[0]
    mf.broker.set_up(False)  # the device trains while the broker is unreachable
    a.step(0.0)
    assert a.state.handled(1) == "contributed"
    assert len(a.state.pending()) == 1
    mf.broker.set_up(True)
    mf.clock.advance(a.cfg.agent.resend_seconds)
    mf.run(max_steps=10)
    assert a.state.counts().get("accepted") == 1
    assert mf.fleet.clinic_ids[0] in {u["sender"] for u in mf.aggregator.state.accepted(1)}


def test_outbox_drops_a_stale_update(tmp_path):
    mf = _open_round(tmp_path)
    a, others = mf.agents[0], mf.agents[1:]
    mf.broker.set_up(False)
    a.step(0.0)
    assert len(a.state.pending()) == 1
    mf.broker.set_up(True)
    # the round runs to its deadline without clinic-1
    mf.run(max_steps=10, agents=others)
    mf.clock.advance(mf.aggregator.cfg.rounds.deadline_seconds + 1)
    mf.aggregator.step(0.0)
    assert mf.aggregator.state.get_round(1).status == "closed"
    a.step(0.0)  # sees round 2: drops the round-1 update as stale
    assert a.state.counts().get("stale") == 1
    assert mf.fleet.clinic_ids[0] not in {u["sender"] for u in mf.aggregator.state.accepted(1)}


def test_aggregator_restart_mid_round_loses_nothing(tmp_path):
    mf = _open_round(tmp_path)
    mf.run(max_steps=5, agents=mf.agents[:2])
    agg = mf.aggregator
    assert len(agg.state.accepted(1)) == 2
    announce = agg.state.current_round().announce
    agg.transport._connected = False  # crash: no goodbye
    mf.aggregator = mf.new_aggregator()
    mf.aggregator.start()
    assert mf.aggregator.state.current_round().announce == announce  # same signed round
    assert len(mf.aggregator.state.accepted(1)) == 2
    # the broker redelivers the two updates (as Mosquitto does for unacknowledged messages):
    # they must not be counted twice
    sent = [(t, p) for t, p in mf.broker.published if "/update/" in t]
    assert len(sent) == 2
    for topic, payload in sent:
        mf.broker.publish(topic, payload, False)
    mf.run(max_steps=20)
    mf.clock.advance(mf.aggregator.cfg.rounds.deadline_seconds + 1)
    mf.step()
    r1 = mf.aggregator.state.get_round(1)
    assert r1.status == "closed" and r1.result["accepted"] == 3
    assert r1.result["rejected"] == {} and r1.result["duplicates"] == 2


def test_forged_model_and_announcement_are_ignored(tmp_path):
    mf = mem_fleet(tmp_path, clients=2, rounds=1)
    a = mf.agents[0]
    mf.run(max_steps=1)
    before = a.models.current_version()
    evil = SigningKey.generate()
    fleet = mf.fleet.plan["fleet"]
    from bedside.constants import KIND_ANNOUNCE, KIND_MODEL, topic_model, topic_round

    mf.broker.publish(topic_model(fleet), encode(
        KIND_MODEL, "aggregator", evil, {"onnx": np.zeros(10, np.uint8)}, round=1,
        model_version=99, meta={"manifest": {}}), True)
    mf.broker.publish(topic_round(fleet), encode(
        KIND_ANNOUNCE, "aggregator", evil, {}, round=50, model_version=99,
        meta={"fleet": fleet, "state": "open"}), True)
    a.step(0.0)
    assert a.models.current_version() == before
    assert a.announce is None or a.announce.header.round < 50


def test_local_mode_noises_on_device(tmp_path):
    mf = mem_fleet(tmp_path, clients=3, rounds=1, mode="local", noise_multiplier=0.5)
    mf.run()
    r = mf.aggregator.state.get_round(1)
    assert r.status == "closed" and r.result["accepted"] == 3
    norms = [u["norm"] for u in mf.aggregator.state.accepted(1)]
    assert all(n > 1.0 for n in norms)  # clipped to 1, then noised by the device
    rep = mf.agents[0].privacy_report()
    assert rep["device"]["epsilon"] > 0


def test_hostile_but_signed_meta_never_stops_the_aggregator(tmp_path):
    """An enrolled device sends numbers no float can hold, and odd types, in its update meta."""
    mf = _open_round(tmp_path)
    agg = mf.aggregator
    cid, key, _ = _honest_update(mf, 0)
    cur = agg.state.current_round()
    tensors = {k: np.zeros(s, np.float32) for k, s in agg._shapes.items()}
    topic = topic_update(mf.fleet.plan["fleet"], cid)
    for meta in ({"fleet": "demo", "record_epsilon": 10**400, "weight": 10**400},
                 {"fleet": "demo", "record_epsilon": "lots", "record_delta": [1]},
                 {"fleet": ["demo"]}, {"fleet": "demo", "decline": 10**400}):
        mf.broker.publish(topic, encode(KIND_UPDATE, cid, key, tensors if "decline" not in meta
                                        else {}, round=cur.round,
                                        model_version=cur.model_version, meta=meta), False)
    agg.step(0.0)  # must not raise
    rej = agg.state.rejections(1)
    assert [u["sender"] for u in agg.state.accepted(1)] == [cid]  # the first was well-formed
    assert agg.state.accepted(1)[0]["info"] == {}  # its unusable epsilon was not relayed
    assert rej == {"wrong_fleet": 1, "already_contributed": 2}


def _aggregator_key(mf):
    return SigningKey.load(mf.fleet.plan["aggregator_dir"] / "keys" / "aggregator.key")


@pytest.mark.parametrize("bad", [
    {"deadline": 10**400}, {"deadline": "soon"}, {"train": None},
    {"train": {"epochs": 0, "batch_size": 16, "lr": 0.1, "optimizer": "sgd"}},
    {"train": {"epochs": 10**6, "batch_size": 16, "lr": 0.1, "optimizer": "sgd"}},
    {"train": {"epochs": 1, "batch_size": 0, "lr": 0.1, "optimizer": "sgd"}},
    {"train": {"epochs": 1, "batch_size": 16, "lr": 0.1, "optimizer": "rmsprop"}},
    {"participation_rate": 2}, {"clip_norm": -1}, {"noise": "local", "noise_multiplier": 0},
    {"planned_rounds": "x"}, {"model_sha256": "abc"},
])
def test_signed_but_malformed_announcement_is_declined_not_fatal(tmp_path, bad):
    from bedside.constants import KIND_ANNOUNCE, topic_round

    mf = mem_fleet(tmp_path, clients=2, rounds=2)
    a = mf.agents[0]
    cur = mf.aggregator.state.current_round()
    meta = {**cur.settings.to_meta(), **bad}
    mf.broker.publish(topic_round(mf.fleet.plan["fleet"]), encode(
        KIND_ANNOUNCE, "aggregator", _aggregator_key(mf), {}, round=cur.round + 1,
        model_version=cur.model_version, meta=meta), True)
    a.step(0.0)  # must not raise
    assert a.state.handled(cur.round + 1) == "declined:bad_announcement"
    assert a.privacy_report()["record"]["releases"] == 0  # nothing was spent


def test_a_vanished_ledger_is_not_silently_recreated(tmp_path):
    mf = mem_fleet(tmp_path, clients=2, rounds=2)
    mf.run()
    a = mf.agents[0]
    assert a.privacy_report()["record"]["releases"] == 2
    a._ledger.close()
    a.cfg.ledger_path.unlink()
    for extra in a.cfg.ledger_path.parent.glob("ledger.db-*"):
        extra.unlink()
    a.transport.close()
    b = mf.new_agent(0)  # restart after someone deleted the ledger
    assert b._ledger is None and "missing" in b.ledger_error
    assert not a.cfg.ledger_path.exists()
    assert "error" in b.privacy_report()


def test_merge_overrides_merges_tables_and_removes_keys():
    from bedside.demo.run import merge_overrides

    cfg = {"privacy": {"record_epsilon": 8.0, "device_epsilon": 1e6}, "fleet": "demo"}
    merge_overrides(cfg, {"privacy": {"record_epsilon": None, "allow_no_record_dp": True},
                          "fleet": "other", "new": {"a": 1, "gone": None}})
    assert cfg == {"privacy": {"device_epsilon": 1e6, "allow_no_record_dp": True},
                   "fleet": "other", "new": {"a": 1}}


def test_non_private_baseline_claims_no_guarantee(tmp_path):
    """The benchmark's non-private baseline (configured through overrides): no DP-SGD, no device
    noise; it trains, and nobody reports a privacy figure it does not have."""
    mf = mem_fleet(tmp_path, clients=3, rounds=2,
                   aggregator={"privacy": {"noise": "none"}},
                   agent={"privacy": {"record_epsilon": None, "device_epsilon": None,
                                      "allow_no_record_dp": True, "accept_noise": ["none"]}})
    mf.run()
    agg = mf.aggregator
    assert [r.result["accepted"] for r in agg.state.rounds()] == [3, 3]
    report = agg.privacy_report()
    assert report["epsilon"] is None and "no device-level guarantee" in report["note"]
    assert agg.registry.manifest(3).privacy["epsilon"] is None
    for a in mf.agents:  # no budgets, but every release is on record, as one without DP
        rep = a.privacy_report()
        for unit in ("record", "device"):
            assert rep[unit]["epsilon"] is None and rep[unit]["releases"] == 2
            assert rep[unit]["guarantee"].startswith(f"no {unit}-level guarantee")
        assert a.state.counts() == {"accepted": 2}


def test_lr_decay_is_announced_per_round(tmp_path):
    from bedside.aggregator.state import State

    mf = mem_fleet(tmp_path, clients=2, rounds=3, aggregator={"training": {"lr_decay": 0.5}})
    mf.run()
    lrs = [r.settings.train.lr for r in State(mf.aggregator.cfg.state_path).rounds()]
    assert lrs == pytest.approx([0.5, 0.25, 0.125])  # the demo's lr 0.5, halved every round
    assert all(r.status == "closed" for r in mf.aggregator.state.rounds())


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1])
def test_lr_decay_outside_0_1_is_refused(tmp_path, bad):
    from bedside.aggregator.config import load
    from bedside.demo.run import to_toml
    from bedside.errors import ConfigError
    from tests.fleet import make_fleet

    fleet = make_fleet(tmp_path, clients=2, rounds=1, aggregator={"training": {"lr_decay": bad}})
    fleet.plan["aggregator"]["mqtt"]["port"] = 1883
    fleet.aggregator_toml.write_text(to_toml(fleet.plan["aggregator"]))
    with pytest.raises(ConfigError, match="lr_decay"):
        load(fleet.aggregator_toml)
