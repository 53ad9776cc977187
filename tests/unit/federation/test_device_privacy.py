"""The device owns its privacy (issue 11): its own policy, no side channel from its records, a
ledger that covers the past and cannot forget, rounded status, private files, and a test that
inspects everything a device publishes."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import shutil
import stat
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest

from bedside import constants
from bedside.constants import KIND_KEY, KIND_REPORT, KIND_UPDATE
from bedside.demo.run import to_toml
from bedside.wire.envelope import decode
from tests.fleet import mem_fleet

UPDATE_META = {"weight", "record_epsilon", "record_delta", "decline", "fleet", "seeded", "task",
               "clip_bit"}
DECLINES = {"policy", "budget", "ledger_unavailable", "not_sampled", "no_records",
            "model_mismatch", "bad_announcement", "cannot_train", "training_failed",
            "model_unavailable", "statistics_unavailable", "statistics_released"}


def _rewrite_agent(mf, i, **privacy):
    c = mf.fleet.plan["clinics"][i]["config"]
    c.setdefault("privacy", {}).update(privacy)
    mf.fleet.agent_toml(i).write_text(to_toml(c))
    mf.agents[i].transport.close()
    mf.agents[i] = mf.new_agent(i)
    mf.agents[i].start()


def _is_rounded(x):
    return x is None or math.isclose(x, math.ceil(x * 100) / 100, abs_tol=1e-12)


REPORT_META = {"fleet", "counter", "state", "reason", "detail", "refusal"}
#: How each per-device topic a device publishes on is read: the envelope kinds it may carry
#: (signed by the device), or None for a JSON status.
READERS: dict[str, set[str] | None] = {"topic_update": {KIND_UPDATE},
                                       "topic_report": {KIND_REPORT, KIND_KEY},
                                       "topic_status": None}


def device_topics(fleet: str, device: str) -> dict[str, str]:
    """Every per-device topic bedside.constants defines (helper name -> topic): derived, so a
    topic added there is one this test is told about."""
    return {name: fn(fleet, device) for name, fn in vars(constants).items()
            if name.startswith("topic_") and inspect.isfunction(fn)
            and len(inspect.signature(fn).parameters) == 2}


def published_by_devices(mf, traffic) -> list[tuple[str, str, Any]]:
    """Every message a device published, whatever the topic: (device, topic helper, body), the
    body decoded (signature checked against the device's enrolled key) or parsed (status). A
    topic this test cannot read fails it: extend READERS (and the assertions) first."""
    fleets = {a.cfg.fleet for a in mf.agents}
    out = []
    for client, topic, payload in traffic:
        if client not in mf.fleet.clinic_ids:
            continue
        names = [n for f in fleets for n, t in device_topics(f, client).items() if t == topic]
        assert names, f"{client} published on {topic}, none of its topics in bedside.constants"
        assert names[0] in READERS, f"{client} published on {topic} ({names[0]}): not inspected"
        kinds = READERS[names[0]]
        if kinds is None:
            out.append((client, names[0], json.loads(payload)))
            continue
        body = decode(payload, mf.aggregator.devices, kinds=kinds)
        assert body.header.sender == client
        out.append((client, names[0], body))
    return out


def _hostile_ranges(mf, limit: float) -> None:
    """A hostile aggregator: every version it makes narrows the first feature's allowed range
    to ``limit`` (below the largest value one device holds); the rounds after train on them."""
    from bedside.manifest import Manifest

    agg = mf.aggregator
    make = agg._next_manifest

    def narrowed(prev, note):
        d = make(prev, note).to_dict()
        d["input_schema"]["features"][0]["max"] = limit
        return Manifest.from_dict(d)

    agg._next_manifest = narrowed


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _record_values_in(text: str, records: np.ndarray) -> set[str]:
    """Record values written in ``text`` with 4 decimals, or with 2 when the value has at least
    two integer digits (shorter ones collide with the timings the logs rightly carry), as whole
    numbers (not the leading digits of another figure)."""
    values = {abs(float(v)) for v in np.asarray(records, dtype=np.float64).ravel() if v}
    written = {f"{v:.4f}" for v in values} | {f"{v:.2f}" for v in values if v >= 10}
    return set(_NUMBER.findall(text)) & written


def _texts(bodies: Iterable[Any]) -> str:
    out = []
    for b in bodies:
        out.append(json.dumps(b if isinstance(b, dict) else b.header.meta, default=str))
    return "\n".join(out)


def test_nothing_a_device_publishes_depends_on_its_records_or_is_exact(tmp_path, traffic,
                                                                       caplog):
    """A hostile aggregator publishes versions whose allowed range of a feature excludes the
    records of exactly one device, and two rounds train on them. That device verifies and
    installs each version (its status says so), keeps its old model serving, takes part like the
    others, and nothing it publishes on any topic (updates, declines, status, release reports),
    nor its log, depends on whether its records fit: only privatized, rounded, coded content."""
    caplog.set_level(logging.DEBUG)
    mf = mem_fleet(tmp_path, clients=3, rounds=3, aggregator={"evaluation": None})
    agg = mf.aggregator
    schema = agg.registry.manifest(1).schema
    records = [a.store.load(schema)[0] for a in mf.agents]
    tops = [float(x[:, 0].max()) for x in records]
    out = int(np.argmax(tops))  # the device whose records will not fit
    second = max(t for i, t in enumerate(tops) if i != out)
    assert second < tops[out]
    limit = (second + tops[out]) / 2
    _hostile_ranges(mf, limit)
    mf.run()

    newest = agg.registry.latest()
    hostile = [v for v in agg.registry.versions()
               if agg.registry.manifest(v).schema.features[0].max == pytest.approx(limit)]
    assert hostile == [2, 3, 4] == list(range(2, newest + 1))
    assert [r.model_version for r in agg.state.rounds()] == [1, 2, 3]  # two train on them
    for i, a in enumerate(mf.agents):
        assert [a.state.handled(r) for r in (1, 2, 3)] == ["contributed"] * 3
        assert a.models.latest_version() == newest and not a.refused_versions
        # serving is local: the device whose records do not fit keeps v1, the others move on
        assert a.models.current_version() == (1 if i == out else newest)

    sent = published_by_devices(mf, traffic)
    names = {n for _, n, _ in sent}
    assert names == set(READERS)  # every topic a device publishes on was seen and inspected
    statuses: dict[str, list[dict[str, Any]]] = {d: [] for d in mf.fleet.clinic_ids}
    reports: dict[str, list[tuple[Any, ...]]] = {d: [] for d in mf.fleet.clinic_ids}
    for device, name, body in sent:
        if name == "topic_status":
            statuses[device].append(body)
            assert body["refusing"] is None or body["refusing"] in DECLINES
            for unit in body["privacy"].values():
                assert set(unit) == {"epsilon", "epsilon_device_enforced", "delta",
                                     "budget_epsilon"}
                assert _is_rounded(unit["epsilon"]) and _is_rounded(
                    unit["epsilon_device_enforced"])
            rel = body.get("release")
            assert rel is None or (rel["state"] in ("verified", "active") and not rel["reason"])
            continue
        meta = body.header.meta
        if name == "topic_report":
            assert body.header.kind == KIND_REPORT and not body.tensors
            assert set(meta) <= REPORT_META
            reports[device].append((meta["counter"], meta["state"], meta["reason"],
                                    meta["detail"]))
            continue
        assert set(meta) <= UPDATE_META, name
        assert meta.get("decline") is None  # no refusal, no model_unavailable: every round
        assert _is_rounded(meta.get("record_epsilon"))
        w = meta.get("weight")
        assert w is None or (w & (w - 1)) == 0  # counts leave only as powers of two
        norm = np.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64)))
                           for t in body.tensors.values()))
        assert norm <= 1.0 + 1e-5  # clipped to C (central mode: no local noise)
    # the status reports the newest verified version (each hostile one in turn), never which
    # one serves; the device whose records do not fit says just what the others say
    odd = mf.fleet.clinic_ids[out]
    for device in mf.fleet.clinic_ids:
        assert len(statuses[device]) >= 6
        assert statuses[device][-1]["model_version"] == newest
        assert set(hostile) <= {s["model_version"] for s in statuses[device]}
        assert {s["refusing"] for s in statuses[device]} == {None}
        assert reports[device] == reports[odd]  # release by release, the same states
    assert {state for _, state, _, _ in reports[odd]} == {"active"}
    published = _texts(b for _, _, b in sent)
    # no patient value in the log (which may be shipped) nor in anything published
    log_text = "\n".join(r.getMessage() for r in caplog.records)
    assert "is outside the allowed range" not in log_text
    for v in records[out][:, 0]:
        assert f"value {float(v):g} is outside" not in log_text
    for x in records:
        leaked = _record_values_in(log_text, x), _record_values_in(published, x)
        assert leaked == (set(), set()), f"record values in the log, published: {leaked}"


def test_the_device_decides_its_noise(tmp_path, traffic):
    """A device that accepts only local noise declines a central round with reason 'policy' and
    nothing else; devices that accept central noise record it as depending on the aggregator."""
    mf = mem_fleet(tmp_path, clients=3, rounds=2)
    _rewrite_agent(mf, 0, accept_noise=["local"])
    _rewrite_agent(mf, 1, min_noise_multiplier=5.0)
    mf.run()
    for i in (0, 1):
        assert [mf.agents[i].state.handled(r) for r in (1, 2)] == ["declined:policy"] * 2
        assert mf.agents[i]._ledger.releases("record") == []  # nothing released
    declines = [b for _, n, b in published_by_devices(mf, traffic)
                if n == "topic_update" and b.header.meta.get("decline")]
    assert declines and all(set(d.header.meta) == {"decline", "fleet"} for d in declines)
    assert {d.header.meta["decline"] for d in declines} == {"policy"}
    trusting = mf.agents[2].privacy_report()["device"]
    assert trusting["epsilon"] > 0 and trusting["epsilon_device_enforced"] is None
    assert "if the aggregator added the central noise" in trusting["guarantee"]
    assert mf.agents[2].privacy_report()["record"]["epsilon_device_enforced"] == pytest.approx(
        mf.agents[2].privacy_report()["record"]["epsilon"])



@pytest.mark.parametrize("limit", ["max_clip_norm", "max_local_epochs", "max_sample_rate"])
def test_a_round_beyond_a_device_limit_is_declined_as_policy_and_nothing_else(tmp_path, traffic,
                                                                              limit):
    """[privacy] max_clip_norm, max_local_epochs and max_sample_rate: a round beyond the limit
    gets a signed decline that says 'policy' and nothing else, and releases nothing; a round
    at the limit is taken part in."""
    from bedside.privacy.dpsgd import sample_rate

    mf = mem_fleet(tmp_path, clients=3, rounds=2)
    s = mf.aggregator.state.current_round().settings
    schema = mf.aggregator.registry.manifest(1).schema
    n = [len(a.store.load(schema)[0]) for a in mf.agents[:2]]
    beyond, at = {
        "max_clip_norm": (s.clip_norm / 2, s.clip_norm),
        "max_local_epochs": (s.train.epochs - 1, s.train.epochs),
        "max_sample_rate": (sample_rate(n[0], s.train.batch_size) / 2,
                            sample_rate(n[1], s.train.batch_size)),
    }[limit]
    _rewrite_agent(mf, 0, **{limit: beyond})
    _rewrite_agent(mf, 1, **{limit: at})
    mf.run()
    refuser, fleet = mf.agents[0], mf.agents[0].cfg.fleet
    assert [refuser.state.handled(r) for r in (1, 2)] == ["declined:policy"] * 2
    assert refuser._ledger.rounds() == set()  # no release, in any unit
    assert [mf.agents[1].state.handled(r) for r in (1, 2)] == ["contributed"] * 2
    assert mf.agents[1]._ledger.rounds() == {(fleet, 1), (fleet, 2)}
    sent = [(n, b) for d, n, b in published_by_devices(mf, traffic)
            if d == refuser.cfg.device_id]
    updates = [b for n, b in sent if n == "topic_update"]
    assert sorted({u.header.round for u in updates}) == [1, 2]
    for u in updates:  # signed (decode checked it against the enrolled key); says only 'policy'
        assert u.header.meta == {"decline": "policy", "fleet": fleet} and not u.tensors
    statuses = [b for n, b in sent if n == "topic_status"]
    assert statuses and {st["refusing"] for st in statuses} <= {None, "policy"}
    assert statuses[-1]["refusing"] == "policy"

def test_a_budget_added_later_counts_a_past_without_dp(tmp_path):
    mf = mem_fleet(tmp_path, clients=2, rounds=3,
                   agent={"privacy": {"record_epsilon": None, "allow_no_record_dp": True}})
    mf.run()
    a = mf.agents[0]
    assert a.privacy_report()["record"]["epsilon"] is None  # trained without DP-SGD
    # the operator now gives the device a record budget: it must not start again from zero
    _rewrite_agent(mf, 0, record_epsilon=8.0, allow_no_record_dp=False)
    mf.aggregator.transport.close()
    cfg = mf.fleet.plan["aggregator"]
    cfg["rounds"]["rounds"] = 4
    mf.fleet.aggregator_toml.write_text(to_toml(cfg))
    mf.aggregator = mf.new_aggregator()
    mf.aggregator.start()
    mf.run()
    assert mf.agents[0].state.handled(4) == "declined:budget"
    assert mf.agents[1].state.handled(4) == "contributed"


def test_another_federation_keeps_spending_from_the_same_ledger(tmp_path):
    mf = mem_fleet(tmp_path, clients=2, rounds=2)
    mf.run()
    spent = mf.agents[0].privacy_report()["record"]["epsilon"]
    assert mf.agents[0]._ledger.rounds() >= {("demo", 1), ("demo", 2)}
    # the same devices join a new federation, in the same data folders
    for i in range(2):
        c = mf.fleet.plan["clinics"][i]["config"]
        c["fleet"] = "second"
        mf.fleet.agent_toml(i).write_text(to_toml(c))
    agg = mf.fleet.plan["aggregator"]
    agg["fleet"], agg["data_dir"] = "second", "data-second"
    mf.fleet.aggregator_toml.write_text(to_toml(agg))
    for a in mf.agents:
        a.transport.close()
    mf.aggregator.transport.close()
    mf.restart()
    mf.run()
    a = mf.agents[0]
    assert [a.state.handled(r) for r in (1, 2)] == ["contributed"] * 2
    assert a._ledger.rounds() >= {("demo", 1), ("demo", 2), ("second", 1), ("second", 2)}
    assert a.privacy_report()["record"]["epsilon"] > spent


def test_a_restored_ledger_cannot_forget(tmp_path):
    mf = mem_fleet(tmp_path, clients=2, rounds=3)
    a = mf.agents[0]
    backup = tmp_path / "ledger-backup.db"
    for _ in range(200):  # run until round 1 has been recorded, then back the ledger up
        mf.step()
        if a.state.handled(1) == "contributed":
            break
    import sqlite3

    src, dst = sqlite3.connect(a.cfg.ledger_path), sqlite3.connect(backup)
    src.backup(dst)  # a consistent copy (the newest releases may still be in the WAL)
    src.close()
    dst.close()
    os.chmod(backup, 0o600)  # a backup kept as private as the ledger (else it is refused)
    mf.run()
    assert a.state.handled(3) == "contributed"
    a._ledger.close()
    a.transport.close()
    for wal in a.cfg.ledger_path.parent.glob("ledger.db-*"):
        wal.unlink()
    shutil.copy(backup, a.cfg.ledger_path)  # "restored" from the old backup
    b = mf.new_agent(0)
    assert b._ledger is None and "lacks 2 round(s)" in b.ledger_error
    assert "restore the most recent ledger" in b.ledger_error


def test_files_a_patients_data_touches_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        mf = mem_fleet(tmp_path, clients=2, rounds=1)
        mf.run()
    finally:
        os.umask(old)
    a = mf.agents[0]
    for f in (a.cfg.records_path, a.cfg.ledger_path, a.cfg.state_path):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        for journal in f.parent.glob(f.name + "-*"):
            assert stat.S_IMODE(journal.stat().st_mode) == 0o600, journal
    for d in (a.cfg.data, a.cfg.models_path):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    agg = mf.aggregator.cfg
    assert stat.S_IMODE(agg.state_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(agg.registry_path.stat().st_mode) == 0o700


def test_seeded_noise_says_so_in_updates_models_and_rounds(tmp_path, traffic):
    """Reproducible noise is never private by accident: a seeded run is marked everywhere, and a
    seeded aggregator mixes the round into its seed (a restart never reuses a round's noise)."""
    from bedside.federation.seeds import round_rng

    mf = mem_fleet(tmp_path, clients=2, rounds=2)  # the unit-test fleet is seeded (testing)
    mf.run()
    updates = [b for _, n, b in published_by_devices(mf, traffic)
               if n == "topic_update" and b.tensors]
    assert updates and all(u.header.meta.get("seeded") is True for u in updates)
    privacy = mf.aggregator.registry.manifest(mf.aggregator.registry.latest()).privacy
    assert privacy["seeded_noise"] is True and "NOT private" in privacy["warning"]
    assert all(r.settings.seeded for r in mf.aggregator.state.rounds())
    assert round_rng(0, 1).random() != round_rng(0, 2).random()


@pytest.mark.parametrize("which", ["records_path", "ledger_path", "state_path"])
def test_the_agent_refuses_to_start_on_data_files_others_can_read(tmp_path, which, capsys):
    """A records, ledger or agent database readable by others is refused with the fix, not
    silently tightened (it may have been read: the operator must know)."""
    from bedside.cli import main
    from bedside.edge.agent import Agent
    from bedside.edge.config import load as load_agent
    from bedside.errors import ConfigError

    mf = mem_fleet(tmp_path, clients=2, rounds=1)
    mf.run()
    a = mf.agents[0]
    a.close()
    path = getattr(a.cfg, which)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match=f"chmod 600 {path}"):
        Agent(load_agent(mf.fleet.agent_toml(0)), mf.new_agent(1).transport)
    assert main(["edge", "run", "--config", str(mf.fleet.agent_toml(0))]) == 2
    assert "readable or writable by others" in capsys.readouterr().err
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not silently changed
