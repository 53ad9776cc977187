"""A new federation on the same devices (issue 13, item 5): the devices keep their records and
their ledger, and say why they ignore what they ignore; the aggregator says when it ignores
``initial_model``."""

from __future__ import annotations

import logging

import pytest

from bedside.demo.run import to_toml
from bedside.errors import InputError
from bedside.transport.memory import MemoryBroker
from tests.fleet import mem_fleet


def _restart(mf, **aggregator):
    """Stop every service and start them again on a fresh broker with the configs rewritten."""
    for a in mf.agents:
        a.close()
    mf.aggregator.state.close()
    mf.fleet.plan["aggregator"].update(aggregator)
    mf.fleet.aggregator_toml.write_text(to_toml(mf.fleet.plan["aggregator"]))
    for i, c in enumerate(mf.fleet.plan["clinics"]):
        if "fleet" in aggregator:
            c["config"]["fleet"] = aggregator["fleet"]
        mf.fleet.agent_toml(i).write_text(to_toml(c["config"]))
    mf.broker = MemoryBroker()
    mf.restart()


def test_a_new_fleet_name_starts_a_new_federation_on_the_same_devices(tmp_path):
    mf = mem_fleet(tmp_path, clients=2, rounds=2)
    mf.run()
    spent = [a._ledger.spent("record") for a in mf.agents]
    rows = [a.store.count(a.models.manifest().schema) for a in mf.agents]
    _restart(mf, fleet="ward-b", data_dir="data-ward-b", rounds={"rounds": 2,
                                                                 "min_participants": 1})
    mf.run()
    assert mf.aggregator.finished
    assert [r.result["accepted"] for r in mf.aggregator.state.rounds()] == [2, 2]
    for a, before, n in zip(mf.agents, spent, rows, strict=True):
        assert a.store.count(a.models.manifest().schema) == n  # kept, not re-ingested
        assert a._ledger.spent("record") > before  # one ledger: the budget spans federations
        assert {f for f, _ in a._ledger.rounds()} == {"demo", "ward-b"}
        assert a.models.latest_version() == 3  # the new federation's versions


def test_what_is_ignored_is_logged_with_its_reason(tmp_path, caplog):
    """An aggregator that starts over under the same fleet name: it says that its
    initial_model is ignored (if the registry is kept) and the devices say why they ignore its
    round 1 and model v1 (if it is not)."""
    mf = mem_fleet(tmp_path, clients=2, rounds=2)
    mf.run()
    caplog.set_level(logging.WARNING)
    other = tmp_path / "other-model"
    import json
    import shutil

    shutil.copytree(mf.fleet.work / "initial-model", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["sha256"] = "0" * 64  # another model (only its manifest is read at start)
    (other / "manifest.json").write_text(json.dumps(manifest))
    _restart(mf, initial_model=str(other))  # same registry: the new initial model is ignored
    assert "initial_model" in caplog.text and "is ignored" in caplog.text
    caplog.clear()
    _restart(mf, data_dir="data-fresh", initial_model=str(mf.fleet.work / "initial-model"))
    mf.run(max_steps=20)
    assert "round 1 announcement of fleet 'demo' ignored: this device has seen round 2" in \
        caplog.text
    assert ("model release 1 (v1): rejected (older_counter: release counter 1 is older than the "
            "newest this device handled (3)") in caplog.text


def _new_federation(tmp_path, **kw):
    from bedside.models import datasets
    from bedside.models.pipeline import export_model

    mf = mem_fleet(tmp_path, clients=2, rounds=1, **kw)
    mf.run()
    assert mf.aggregator.finished and mf.aggregator.registry.versions() == [1, 2]
    mlp = tmp_path / "mlp"
    export_model(datasets.load("wdbc"), "mlp", mlp)  # another architecture, the same schema
    return mf, mlp


def test_one_command_starts_a_new_federation_on_the_same_devices(tmp_path):
    """``bedside models push DIR --new-federation`` (issue 13, item 5): another architecture,
    released to every device; its rounds count from 1; devices keep records and ledger."""
    from bedside.aggregator.rollout import PushOptions, stage_push
    from tests.release_tools import drive

    # devices without a record-level budget (their device-level one is large): they can train
    # in both federations
    mf, mlp = _new_federation(tmp_path, agent={"privacy": {"record_epsilon": None,
                                                           "allow_no_record_dp": True}})
    agg = mf.aggregator
    rows = [a.store.count(a.models.manifest().schema) for a in mf.agents]
    with pytest.raises(InputError, match="--to all"):
        stage_push(agg.cfg, agg.rollouts.store, agg.registry, mlp,
                   PushOptions(new_federation=True, to="device:clinic-1"))
    stage_push(agg.cfg, agg.rollouts.store, agg.registry, mlp, PushOptions(new_federation=True))
    drive(mf, steps=200)
    rounds = agg.state.rounds()
    assert [(r.model_version, r.status) for r in rounds] == [(1, "closed"), (3, "closed")]
    assert agg.finished  # after its own one planned round
    assert agg.registry.manifest(4).parent_version == 3
    assert agg.registry.manifest(4).arch["name"] == "mlp"
    for a, n in zip(mf.agents, rows, strict=True):
        assert a.models.current_version() == 4
        assert a.store.count(a.models.manifest().schema) == n  # no re-ingestion
        assert {r for _, r in a._ledger.rounds()} == {1, 2}  # one ledger across federations


def test_a_new_federation_draws_on_the_same_privacy_budget(tmp_path):
    """Devices whose record-level budget the first federation spent decline the new one's
    rounds: a new federation does not reset what patients are protected by."""
    from bedside.aggregator.rollout import PushOptions, stage_push
    from tests.release_tools import drive

    mf, mlp = _new_federation(tmp_path)
    agg = mf.aggregator
    stage_push(agg.cfg, agg.rollouts.store, agg.registry, mlp, PushOptions(new_federation=True))
    drive(mf, steps=200)
    last = agg.state.rounds()[-1]
    assert (last.round, last.model_version, last.status) == (2, 3, "failed")
    assert agg.state.declines(2) == {"clinic-1": "budget", "clinic-2": "budget"}
