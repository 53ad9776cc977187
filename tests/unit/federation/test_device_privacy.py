"""The device owns its privacy (issue 11): its own policy, no side channel from its records, a
ledger that covers the past and cannot forget, rounded status, private files, and a test that
inspects everything a device publishes."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat

import numpy as np
import pytest

from bedside.constants import KIND_UPDATE
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


def published_by_devices(mf):
    """Every message a device published: (topic, decoded body)."""
    out = []
    for topic, payload in mf.broker.published:
        if "/update/" in topic:
            out.append((topic, decode(payload, mf.aggregator.devices, kinds={KIND_UPDATE})))
        elif "/status/" in topic and not topic.endswith("/aggregator"):
            out.append((topic, json.loads(payload)))
    return out


def _narrowed_version(mf):
    """A hostile aggregator: the next version narrows a feature's allowed range below the
    largest value one device holds (the old code refused such a model, publicly)."""
    from bedside.models.registry import Registry

    agg = mf.aggregator
    reg: Registry = agg.registry
    latest = reg.latest()
    m = reg.manifest(latest)
    x, _ = mf.agents[0].store.load(m.schema)
    top = float(x[:, 0].max())
    schema = m.schema.to_dict()
    schema["features"][0]["max"] = top * 0.5
    d = m.to_dict()
    d["input_schema"] = schema
    d["version"] = latest + 1
    from bedside.manifest import Manifest

    reg.add(reg.model_bytes(latest), Manifest.from_dict(d))


def test_nothing_a_device_publishes_depends_on_its_records_or_is_exact(tmp_path):
    """Updates, declines and status of every device, over rounds that include a hostile model
    whose ranges exclude one device's records: only privatized, rounded, coded content; the
    device installs the model (it does not serve it), and takes part."""
    mf = mem_fleet(tmp_path, clients=3, rounds=3)
    for _ in range(40):  # round 1, then stop before round 2's model lands
        mf.step()
        if mf.aggregator.state.current_round().round == 2:
            break
    mf.aggregator.transport.close()
    _narrowed_version(mf)
    cfg = mf.fleet.plan["aggregator"]
    cfg.pop("evaluation")  # its own reference set would not fit the narrowed ranges either
    mf.fleet.aggregator_toml.write_text(to_toml(cfg))
    mf.aggregator = mf.new_aggregator()  # restarted by its (hostile) operator
    mf.aggregator.start()
    mf.run()
    a = mf.agents[0]
    hostile = mf.aggregator.registry.versions()[-2]  # the narrowed version, trained on in round 2
    assert a.models.latest_version() >= hostile and hostile not in a.refused_versions
    assert all(ag.state.handled(2) == "contributed" for ag in mf.agents)
    seen_status = 0
    for topic, body in published_by_devices(mf):
        if isinstance(body, dict):  # status
            seen_status += 1
            assert body["refusing"] is None or body["refusing"] in DECLINES
            for unit in body["privacy"].values():
                assert set(unit) == {"epsilon", "epsilon_device_enforced", "delta",
                                     "budget_epsilon"}
                assert _is_rounded(unit["epsilon"]) and _is_rounded(
                    unit["epsilon_device_enforced"])
            continue
        meta = body.header.meta
        assert set(meta) <= UPDATE_META, topic
        assert meta.get("decline") in (None, *DECLINES - {"model_unavailable"})
        assert _is_rounded(meta.get("record_epsilon"))
        w = meta.get("weight")
        assert w is None or (w & (w - 1)) == 0  # counts leave only as powers of two
        if body.tensors:
            norm = np.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64)))
                               for t in body.tensors.values()))
            assert norm <= 1.0 + 1e-5  # clipped to C (central mode: no local noise)
    assert seen_status >= 6


def test_the_device_decides_its_noise(tmp_path):
    """A device that accepts only local noise declines a central round with reason 'policy' and
    nothing else; devices that accept central noise record it as depending on the aggregator."""
    mf = mem_fleet(tmp_path, clients=3, rounds=2)
    _rewrite_agent(mf, 0, accept_noise=["local"])
    _rewrite_agent(mf, 1, min_noise_multiplier=5.0)
    mf.run()
    for i in (0, 1):
        assert [mf.agents[i].state.handled(r) for r in (1, 2)] == ["declined:policy"] * 2
        assert mf.agents[i]._ledger.releases("record") == []  # nothing released
    declines = [b for t, b in published_by_devices(mf)
                if not isinstance(b, dict) and b.header.meta.get("decline")]
    assert declines and all(set(d.header.meta) == {"decline", "fleet"} for d in declines)
    assert {d.header.meta["decline"] for d in declines} == {"policy"}
    trusting = mf.agents[2].privacy_report()["device"]
    assert trusting["epsilon"] > 0 and trusting["epsilon_device_enforced"] is None
    assert "if the aggregator added the central noise" in trusting["guarantee"]
    assert mf.agents[2].privacy_report()["record"]["epsilon_device_enforced"] == pytest.approx(
        mf.agents[2].privacy_report()["record"]["epsilon"])


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


def test_seeded_noise_says_so_in_updates_models_and_rounds(tmp_path):
    """Reproducible noise is never private by accident: a seeded run is marked everywhere, and a
    seeded aggregator mixes the round into its seed (a restart never reuses a round's noise)."""
    from bedside.federation.seeds import round_rng

    mf = mem_fleet(tmp_path, clients=2, rounds=2)  # the unit-test fleet is seeded (testing)
    mf.run()
    updates = [b for t, b in published_by_devices(mf) if not isinstance(b, dict) and b.tensors]
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
