"""Pushing models to the fleet over the in-memory broker: targets, canary and abort, probation,
refusals, rollback, the one version line (issue 13). The same flows run against Mosquitto in
tests/integration/test_push_mqtt.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bedside.aggregator.releases import ReleaseStore, golden_vectors
from bedside.aggregator.rollout import PushOptions, stage_push, stage_rollback, status
from bedside.constants import topic_model, topic_release
from bedside.errors import InputError
from bedside.federation.release import Golden, Probation
from bedside.manifest import load_manifest, verify_model_file
from tests.fleet import mem_fleet
from tests.release_tools import drive, other_model, stores


@pytest.fixture()
def fleet(tmp_path):
    mf = mem_fleet(tmp_path, clients=3, rounds=1)
    mf.run()
    assert [a.models.current_version() for a in mf.agents] == [2, 2, 2]
    return mf


def _push(mf, tmp_path, name="pushed", scale=0.5, golden=None, **opts):
    cfg, store, registry = stores(mf.aggregator)
    src = other_model(registry.path(registry.latest()), tmp_path / name, scale)
    return stage_push(cfg, store, registry, src, PushOptions(**opts), golden), src


def _versions(mf):
    return [a.models.current_version() for a in mf.agents]


def _reports(mf, counter):
    return {r["device"]: (r["state"], r["reason"]) for r in
            mf.aggregator.rollouts.store.reports(counter)}


def test_a_release_reaches_the_targeted_device_and_only_it(fleet, tmp_path):
    rid, src = _push(fleet, tmp_path, to="device:clinic-2")
    drive(fleet)
    r = fleet.aggregator.rollouts.store.get(rid)
    assert (r.status, r.version) == ("complete", 3)
    assert _versions(fleet) == [2, 3, 2]
    assert fleet.agents[1].models.manifest().sha256 == load_manifest(src).sha256
    assert _reports(fleet, r.counter) == {"clinic-2": ("active", "")}
    st = status(fleet.aggregator.rollouts.store, fleet.fleet.clinic_ids)
    assert {d["device"]: d["version"] for d in st["devices"]} == {
        "clinic-1": 2, "clinic-2": 3, "clinic-3": 2}
    # a targeted version is not the federation's: rounds go on training the base version
    assert fleet.aggregator.rollouts.base_version() == 2


def test_a_group_and_everyone(fleet, tmp_path):
    fleet.aggregator.cfg.groups["icu"] = ["clinic-1", "clinic-3"]  # as aggregator.toml says
    _push(fleet, tmp_path, to="group:icu")
    drive(fleet)
    assert _versions(fleet) == [3, 2, 3]
    rid, _ = _push(fleet, tmp_path, name="second", scale=0.25)
    drive(fleet)
    assert _versions(fleet) == [4, 4, 4]
    assert fleet.aggregator.rollouts.base_version() == 4
    assert fleet.aggregator.rollouts.store.get(rid).status == "complete"


def test_failing_golden_vectors_abort_on_the_canary(fleet, tmp_path):
    agg = fleet.aggregator
    cfg, store, registry = stores(agg)
    src = other_model(registry.path(2), tmp_path / "m", 0.5)
    m = load_manifest(src)
    right = golden_vectors(verify_model_file(src, m), m)
    # vectors this model does not reproduce on the devices' runtime (written as the service
    # reads them: the push command itself refuses vectors its own machine does not reproduce)
    wrong = Golden(right.inputs, np.roll(right.outputs, 1, axis=1), 1e-4)
    with pytest.raises(InputError, match="golden vectors"):
        stage_push(cfg, store, registry, src, PushOptions(canary="1"), wrong)
    rid = stage_push(cfg, store, registry, src, PushOptions(canary="1"))
    params = json.loads(store.db.execute("SELECT params FROM rollouts WHERE id = ?",
                                         (rid,)).fetchone()[0])
    params["golden"] = wrong.to_meta()
    store.db.execute("UPDATE rollouts SET params = ? WHERE id = ?", (json.dumps(params), rid))
    drive(fleet)
    r = store.get(rid)
    assert r.status == "aborted" and "failure rate 1.00" in r.reason
    assert len(r.canary) == 1
    canary = fleet.fleet.clinic_ids.index(r.canary[0])
    assert _reports(fleet, r.counter) == {r.canary[0]: ("rejected", "golden_vectors")}
    assert _versions(fleet) == [2, 2, 2]  # the canary kept serving; nobody else saw it
    assert fleet.agents[canary].models.latest_version() == 2
    assert agg.rollouts.base_version() == 2


def test_probation_rolls_back_a_slow_model(fleet, tmp_path):
    rid, _ = _push(fleet, tmp_path, to="device:clinic-1",
                   probation=Probation(seconds=30, max_latency_ms=0.0))  # every check too slow
    drive(fleet, advance=1.0)
    r = fleet.aggregator.rollouts.store.get(rid)
    state, reason = _reports(fleet, r.counter)["clinic-1"]
    assert (state, reason) == ("rolled_back", "probation")
    assert _versions(fleet) == [2, 2, 2]
    assert 3 in fleet.agents[0].models.blocked()


def test_probation_passes(fleet, tmp_path):
    rid, _ = _push(fleet, tmp_path, to="device:clinic-1", canary=None,
                   probation=Probation(seconds=5, max_latency_ms=10_000.0, interval=1.0))
    drive(fleet, steps=3)
    counter = fleet.aggregator.rollouts.store.get(rid).counter
    assert _reports(fleet, counter)["clinic-1"][0] == "verified"  # in probation, serving
    assert _versions(fleet) == [3, 2, 2]
    drive(fleet, steps=10, advance=1.0)
    assert _reports(fleet, counter)["clinic-1"][0] == "active"


def test_canary_then_the_rest(fleet, tmp_path):
    rid, _ = _push(fleet, tmp_path, canary="1", probation=Probation(seconds=3,
                                                                       max_latency_ms=1e4))
    drive(fleet, steps=3)
    store = fleet.aggregator.rollouts.store
    r = store.get(rid)
    assert r.status == "canary" and sorted(_versions(fleet)) == [2, 2, 3]
    drive(fleet, steps=10, advance=1.0)
    assert store.get(rid).status == "complete"
    drive(fleet, steps=3)
    assert _versions(fleet) == [3, 3, 3]
    assert set(_reports(fleet, r.counter).values()) == {("active", "")}


def test_old_replayed_and_forged_releases_are_refused_and_reported(fleet, tmp_path):
    agg, broker = fleet.aggregator, fleet.broker
    old = agg.registry.release(1)  # a genuine, older release
    current = agg.registry.release(2)
    _push(fleet, tmp_path, to="all")
    drive(fleet)
    assert _versions(fleet) == [3, 3, 3]
    broker.publish(topic_release("demo", "clinic-1"), old, retain=False)
    broker.publish(topic_model("demo"), current, retain=False)
    forged = bytearray(agg.registry.release(3))
    forged[-5] ^= 0xFF  # the model's bytes changed after signing
    broker.publish(topic_release("demo", "clinic-2"), bytes(forged), retain=False)
    drive(fleet, steps=5)
    assert _versions(fleet) == [3, 3, 3]  # every device kept serving v3
    rows = agg.state.db.execute("SELECT sender, reason FROM rejections WHERE reason LIKE "
                                "'release_%'").fetchall()
    assert ("clinic-1", "release_older_counter") in rows
    assert ("clinic-3", "release_older_counter") in rows
    assert ("clinic-2", "release_bad_signature") in rows


def test_rollback_is_a_new_higher_release(fleet, tmp_path):
    _push(fleet, tmp_path)
    drive(fleet)
    assert _versions(fleet) == [3, 3, 3]
    cfg, store, registry = stores(fleet.aggregator)
    rid = stage_rollback(cfg, store, registry, 2, PushOptions())
    drive(fleet)
    r = store.get(rid)
    assert r.status == "complete" and r.version == 4
    assert registry.manifest(4).sha256 == registry.manifest(2).sha256
    assert registry.manifest(4).parent_version == 2
    assert _versions(fleet) == [4, 4, 4]
    with pytest.raises(InputError, match="no version 9"):
        stage_rollback(cfg, store, registry, 9, PushOptions())


def test_a_new_schema_needs_saying_so(fleet, tmp_path):
    cfg, store, registry = stores(fleet.aggregator)
    src = _renamed_feature(other_model(registry.path(2), tmp_path / "m"))
    with pytest.raises(InputError, match="differs from the federation's"):
        stage_push(cfg, store, registry, src, PushOptions())
    stage_push(cfg, store, registry, src, PushOptions(new_schema=True, to="device:clinic-1"))
    drive(fleet)
    assert _versions(fleet) == [3, 2, 2]
    # the device checks it too: a release of another schema that does not say so is refused
    rid = stage_push(cfg, store, registry, src, PushOptions(new_schema=True,
                                                            to="device:clinic-2"))
    params = json.loads(store.db.execute("SELECT params FROM rollouts WHERE id = ?",
                                         (rid,)).fetchone()[0])
    params["new_schema"] = False
    store.db.execute("UPDATE rollouts SET params = ? WHERE id = ?", (json.dumps(params), rid))
    drive(fleet)
    assert _reports(fleet, store.get(rid).counter) == {"clinic-2": ("rejected", "schema")}
    assert _versions(fleet) == [3, 2, 2]


def test_bad_options_are_clear(fleet, tmp_path):
    for opts, msg in [(PushOptions(to="group:none"), "no device group"),
                      (PushOptions(canary="ten"), "--canary"),
                      (PushOptions(abort_on_failure_rate=2.0), "abort-on-failure-rate")]:
        with pytest.raises(InputError, match=msg):
            _push(fleet, tmp_path, **opts.__dict__)


def test_a_fleet_wide_rollout_waits_for_the_round_and_rounds_train_on_it(tmp_path):
    mf = mem_fleet(tmp_path, clients=3, rounds=2)
    agg = mf.aggregator
    assert agg.state.current_round().status == "open"  # round 1, on v1
    rid, _ = _push(mf, tmp_path, canary="1", probation=Probation(seconds=2,
                                                                   max_latency_ms=1e4))
    store = agg.rollouts.store
    agg.step(0.0)
    assert store.get(rid).status == "staged"  # waits: a round is open
    seen_open_in_canary = False
    for _ in range(60):
        drive(mf, steps=1, advance=0.5)
        r = store.get(rid)
        cur = agg.state.current_round()
        if r.status == "canary" and cur.status == "open" and cur.round > 1:
            seen_open_in_canary = True
        if agg.finished:
            break
    assert not seen_open_in_canary  # no round opened while the version was in canary
    r = store.get(rid)
    assert r.status == "complete" and r.version == 3  # round 1 made v2; the push is v3
    rounds = agg.state.rounds()
    assert [x.model_version for x in rounds] == [1, 3]  # round 2 trained the pushed version
    assert agg.registry.manifest(4).parent_version == 3


def test_the_release_store_ignores_stale_reports(tmp_path):
    import sqlite3

    store = ReleaseStore(sqlite3.connect(tmp_path / "s.db", isolation_level=None))
    assert store.report("d", 1, 1, "active", "", "", 1.0)
    assert not store.report("d", 1, 1, "downloading", "", "", 2.0)  # redelivered late
    assert store.report("d", 1, 1, "rolled_back", "probation", "", 3.0)
    assert not store.report("d", 1, 1, "bogus", "", "", 4.0)
    assert store.devices()["d"]["state"] == "rolled_back"


def test_a_canary_release_names_only_the_canary(fleet, tmp_path):
    """Relayed elsewhere (a broker, a replay), a canary's release widens nothing, and the
    endpoint stops serving an aborted model."""
    from bedside.wire.envelope import peek

    cfg, store, registry = stores(fleet.aggregator)
    src = other_model(registry.path(2), tmp_path / "m", 0.5)
    rid = stage_push(cfg, store, registry, src, PushOptions(canary="1"))
    _set_params(store, rid, golden=_wrong_golden(src).to_meta())
    drive(fleet)
    r = store.get(rid)
    assert r.status == "aborted"
    canary_release = registry.release(r.version)
    assert peek(canary_release).meta["release"]["devices"] == list(r.canary)
    fleet.broker.publish(topic_model("demo"), canary_release, retain=False)
    drive(fleet, steps=3)
    assert _versions(fleet) == [2, 2, 2]
    others = [a for a in fleet.agents if a.cfg.device_id not in r.canary]
    assert all(a.releases.get(r.counter) is None for a in others)
    assert load_manifest(src).sha256 not in fleet.aggregator.rollouts.servable


def test_a_silent_canary_counts_as_failed(fleet, tmp_path):
    fleet.aggregator.cfg.releases.__dict__["wave_timeout_seconds"] = 10.0
    rid, _ = _push(fleet, tmp_path, canary="1")
    fleet.aggregator.step(0.0)  # the canary release goes out; nobody answers
    r = fleet.aggregator.rollouts.store.get(rid)
    assert r.status == "canary"
    fleet.clock.advance(11.0)
    fleet.aggregator.step(0.0)
    r = fleet.aggregator.rollouts.store.get(rid)
    assert r.status == "aborted" and "no report within" in r.reason


def test_a_crash_between_storing_and_releasing_leaves_the_base_alone(fleet, tmp_path):
    agg = fleet.aggregator
    rid, _ = _push(fleet, tmp_path)
    agg.rollouts._materialize(agg.rollouts.store.get(rid))  # stored as v3, then the crash
    assert agg.registry.latest() == 3
    agg.state.close()
    fleet.aggregator = fleet.new_aggregator()
    fleet.aggregator.start()  # the restart must not release v3 as the fleet's model
    assert fleet.aggregator.rollouts.base_version() == 2
    drive(fleet)  # the rollout then goes on as staged
    assert fleet.aggregator.rollouts.store.get(rid).status == "complete"
    assert _versions(fleet) == [3, 3, 3]


def test_a_release_that_cannot_be_signed_aborts_its_rollout_not_the_service(fleet, tmp_path):
    cfg, store, registry = stores(fleet.aggregator)
    rid, src = _push(fleet, tmp_path)
    m = load_manifest(src)
    right = golden_vectors(verify_model_file(src, m), m)
    huge = Golden(np.repeat(right.inputs, 3000, axis=0), np.repeat(right.outputs, 3000, axis=0))
    _set_params(store, rid, golden=huge.to_meta())  # far beyond a release's header
    drive(fleet, steps=3)
    r = store.get(rid)
    assert r.status == "aborted" and "TooLargeError" in r.reason
    assert fleet.aggregator.rollouts.base_version() == 2
    assert fleet.aggregator.step(0.0) is not None  # the service goes on
    with pytest.raises(InputError, match="release header"):  # the push command says so first
        stage_push(cfg, store, registry, src, PushOptions(), huge)


def test_reports_out_of_range_do_not_stop_the_service(fleet):
    from bedside.constants import KIND_REPORT, topic_report
    from bedside.wire.envelope import encode
    from bedside.wire.signing import SigningKey

    a = fleet.agents[0]
    for counter in (2**70, -1, "7", 10**6):
        msg = encode(KIND_REPORT, a.cfg.device_id, a.key, {}, round=0, model_version=1,
                     meta={"fleet": "demo", "counter": counter, "state": "active"})
        fleet.broker.publish(topic_report("demo", a.cfg.device_id), msg, retain=False)
    forged = encode(KIND_REPORT, a.cfg.device_id, SigningKey.generate(), {}, round=0,
                    model_version=1, meta={"fleet": "demo", "counter": 1, "state": "rejected"})
    fleet.broker.publish(topic_report("demo", a.cfg.device_id), forged, retain=False)
    fleet.aggregator.step(0.0)
    assert not any(r["counter"] > 2 for r in fleet.aggregator.rollouts.store.reports())
    assert fleet.aggregator.rollouts.store.reports(1)[0]["state"] == "active"


def test_rollback_checks_the_schema(fleet, tmp_path):
    cfg, store, registry = stores(fleet.aggregator)
    src = _renamed_feature(other_model(registry.path(2), tmp_path / "m"))
    stage_push(cfg, store, registry, src, PushOptions(new_schema=True))
    drive(fleet)
    assert fleet.aggregator.rollouts.base_version() == 3
    with pytest.raises(InputError, match="differs from the federation's"):
        stage_rollback(cfg, store, registry, 2, PushOptions())
    stage_rollback(cfg, store, registry, 2, PushOptions(new_schema=True))


def _wrong_golden(src):
    m = load_manifest(src)
    right = golden_vectors(verify_model_file(src, m), m)
    return Golden(right.inputs, np.roll(right.outputs, 1, axis=1), 1e-4)


def _set_params(store, rid, **changes):
    params = json.loads(store.db.execute("SELECT params FROM rollouts WHERE id = ?",
                                         (rid,)).fetchone()[0])
    params.update(changes)
    store.db.execute("UPDATE rollouts SET params = ? WHERE id = ?", (json.dumps(params), rid))


def _renamed_feature(src):
    """The model directory with its first feature renamed: another input schema."""
    mf = json.loads((src / "manifest.json").read_text())
    mf["input_schema"]["features"][0]["name"] = "renamed"
    (src / "manifest.json").write_text(json.dumps(mf))
    return src
