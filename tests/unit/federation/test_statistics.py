"""Federated feature statistics (issue 11, item 7): the model's input scaling from noised,
accounted releases, never from pooled or evaluated rows."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from bedside.constants import UNIT_DEVICE, UNIT_RECORD
from bedside.errors import InputError, ValidationError
from bedside.federation import statistics as st
from bedside.models import datasets
from bedside.privacy import accountant as acct
from bedside.privacy.ledger import releases_event
from bedside.schema import Feature, Schema
from bedside.tabular import read_csv
from tests.fleet import mem_fleet


def _schema(n=3, lo=0.0, hi=10.0) -> Schema:
    return Schema(features=tuple(Feature(name=f"f{i}", min=lo, max=hi) for i in range(n)),
                  labels=("a", "b"))


SETTINGS = st.StatisticsSettings()


def test_one_record_moves_the_release_by_at_most_its_bound():
    rng = np.random.default_rng(0)
    schema = _schema(4)
    b = st.record_bound(schema, SETTINGS)
    assert b == pytest.approx(0.8 * math.sqrt(9))
    x = rng.uniform(-50, 60, size=(40, 4))  # far outside the allowed range too
    vectors = st.record_vectors(x, schema, b)
    assert vectors.shape == (40, 9)
    assert np.linalg.norm(vectors, axis=1).max() <= b + 1e-9
    # add/remove one record: the (device-clipped) sum moves by at most b
    d = st.device_bound(schema, SETTINGS)
    for i in range(40):
        full = vectors.sum(0)
        without = np.delete(vectors, i, axis=0).sum(0)

        def clip(v):
            return v * min(1.0, d / np.linalg.norm(v))
        assert np.linalg.norm(clip(full) - clip(without)) <= b + 1e-9


def test_time_series_contribute_their_means_over_the_window():
    ds = datasets.load("vitals")
    v = st.record_vectors(ds.x[:5], ds.schema)
    f = ds.schema.n_features
    assert v.shape == (5, 2 * f + 1)
    c, h = st.public_center_halfwidth(ds.schema)
    u = np.clip((ds.x[:5] - c[None, :, None]) / h[None, :, None], -1, 1)
    np.testing.assert_allclose(v[:, :f], u.mean(axis=2), rtol=1e-6)
    np.testing.assert_allclose(v[:, -1], 1.0)


def test_the_releases_are_the_gaussian_mechanisms_the_device_runs():
    rel = st.statistics_releases(1, SETTINGS, fleet="f")
    by_unit = {r.unit: r for r in rel}
    assert by_unit[UNIT_RECORD].noise_multiplier == SETTINGS.noise_multiplier
    assert by_unit[UNIT_DEVICE].noise_multiplier == pytest.approx(
        SETTINGS.noise_multiplier / (2 * SETTINGS.device_records))
    assert all(r.sample_rate == 1.0 and r.steps == 1 and r.enforced_by == "device" for r in rel)
    # one Gaussian release at multiplier 1: epsilon at delta 1e-5 is about 4.4 (analytic
    # Gaussian mechanism, Balle & Wang 2018: sigma = 1 gives epsilon 4.38 at delta 1e-5)
    eps = acct.epsilon(releases_event([by_unit[UNIT_RECORD]]), 1e-5)
    assert eps == pytest.approx(4.38, abs=0.05)


def test_an_honest_devices_vector_is_within_the_validation_bound():
    schema = _schema(6)
    rng = np.random.default_rng(1)
    bound = st.norm_bound(st.dimension(schema), SETTINGS)
    for n in (0, 3, 300, 5000):
        x = rng.uniform(0, 10, size=(n, 6))
        v = st.local_statistics(x, schema, SETTINGS, rng)
        assert v.dtype == np.float32 and np.linalg.norm(v) <= bound


def test_combine_recovers_the_scaling_and_floors_what_noise_hides():
    rng = np.random.default_rng(2)
    schema = _schema(3, 0.0, 100.0)
    x = np.column_stack([rng.normal(30, 5, 4000), rng.normal(70, 12, 4000),
                         np.full(4000, 50.0)])  # the last feature: no spread at all
    x = np.clip(x, 0, 100)
    low_noise = replace(SETTINGS, noise_multiplier=0.01, device_records=10_000, record_clip=1.0)
    vectors = [st.local_statistics(part, schema, low_noise, rng)
               for part in np.array_split(x, 4)]
    loc, scale, info = st.combine(vectors, schema, low_noise)
    np.testing.assert_allclose(loc[:2], x[:, :2].mean(0), atol=0.2)
    np.testing.assert_allclose(scale[:2], x[:, :2].std(0), rtol=0.03)
    assert info["floored"] == ["f2"] and scale[2] == pytest.approx(0.02 * 50)
    assert info["records"] == pytest.approx(4000, abs=5)
    schema2 = schema.with_scaling(loc, scale)
    assert schema2.features[0].loc == pytest.approx(float(loc[0]))
    assert schema2.features[0].min == 0.0  # ranges unchanged


def test_combine_refuses_what_it_cannot_estimate():
    schema = _schema(2)
    with pytest.raises(InputError, match="no device answered"):
        st.combine([], schema, SETTINGS)
    with pytest.raises(InputError, match="record count"):
        st.combine([np.zeros(5)], schema, SETTINGS)


def test_the_frame_is_the_typical_range_where_the_schema_states_one():
    schema = Schema(features=(Feature(name="crp", min=0, max=500, typical_min=0, typical_max=10),
                              Feature(name="hr", min=20, max=250)), labels=("a", "b"))
    c, h = st.public_center_halfwidth(schema)
    np.testing.assert_allclose(c, [5.0, 135.0])
    np.testing.assert_allclose(h, [5.0, 115.0])


def test_statistics_need_allowed_ranges_and_say_which_are_missing():
    schema = Schema(features=(Feature(name="age", min=0, max=120), Feature(name="crp")),
                    labels=("a", "b"))
    with pytest.raises(InputError, match="crp"):
        st.public_center_halfwidth(schema)


def test_inferred_ranges_widen_the_reference_and_keep_signs():
    schema = Schema(features=(Feature(name="a"), Feature(name="b"), Feature(name="c"),
                              Feature(name="d", min=-5.0, max=5.0)), labels=("x", "y"))
    ref = np.array([[0.0, -4.0, 7.0, 1.0], [10.0, 4.0, 7.0, 2.0]])
    out = datasets.infer_ranges(schema, ref)
    a, b, c, d = out.features
    assert (a.min, a.max) == (0.0, 20.0)  # widened, rounded outward; never negative: stays >= 0
    assert (b.min, b.max) == (-8.0, 8.0)
    assert (c.min, c.max) == (6.0, 8.0)  # constant: +-1
    assert (d.min, d.max, d.loc, d.scale) == (-5.0, 5.0, 0.0, 1.0)  # stated ranges are kept
    assert (a.loc, a.scale) == (10.0, 10.0)
    assert out.within_range(np.array([[21.0, 0, 7, 0], [1.0, 0, 7, 0]])).tolist() == [False,
                                                                                     True]
    fine = datasets.infer_ranges(Schema(features=(Feature(name="p"),), labels=("x", "y")),
                                 np.array([[0.137], [0.462]]))
    assert (fine.features[0].min, fine.features[0].max) == (0.0, 0.7)  # not the raw extremes
    with pytest.raises(InputError, match="NaN"):
        datasets.infer_ranges(schema, np.array([[np.nan, 0, 0, 0]]))


def _train_rows(mf):
    schema = mf.fleet.plan["model_v1"].schema
    return np.concatenate([read_csv(c["dir"] / "records.csv", schema, "label").x
                           for c in mf.fleet.plan["clinics"]])


def test_a_statistics_round_sets_the_scaling_before_training(tmp_path):
    mf = mem_fleet(tmp_path, clients=3, rounds=2, statistics=True)
    mf.run()
    agg = mf.aggregator
    rounds = agg.state.rounds()
    assert [(r.settings.task, r.status) for r in rounds] == [("statistics", "closed"),
                                                            ("train", "closed"),
                                                            ("train", "closed")]
    v1, v2 = agg.registry.manifest(1), agg.registry.manifest(2)
    assert v2.parameters == v1.parameters and v2.schema != v1.schema
    info = v2.training["feature_statistics"]
    # what the aggregator would estimate without noise: each clinic's clipped sum (a clinic with
    # more than device_records records is down-weighted), combined
    cfg = rounds[0].settings.statistics
    assert cfg is not None
    clean = []
    for c in mf.fleet.plan["clinics"]:
        x = read_csv(c["dir"] / "records.csv", v1.schema, "label").x
        total = st.record_vectors(x, v1.schema, st.record_bound(v1.schema, cfg)).sum(0)
        d = st.device_bound(v1.schema, cfg)
        clean.append(total * min(1.0, d / np.linalg.norm(total)))
    want_loc, want_scale, want = st.combine(clean, v1.schema, replace(cfg, noise_multiplier=1e-9))
    assert info["records"] == pytest.approx(want["records"], abs=25)  # noise std about 7
    assert info["records"] <= len(_train_rows(mf)) + 25
    loc, scale = v2.schema.loc_scale()
    _, h = st.public_center_halfwidth(v1.schema)
    # within the noise of three devices' releases: a mean's error has standard deviation at
    # most sqrt(2) * sigma * sqrt(3) / count (sigma: the noise std per coordinate); 4 of them
    announced = rounds[0].settings.statistics
    sigma = st.noise_std(v1.schema, announced)
    tol = 4 * math.sqrt(2) * sigma * math.sqrt(3) / info["records"]
    assert np.all(np.abs(loc - want_loc) <= tol * h)
    # The variances, in the frame's units: each within a few standard deviations of the noise
    # of its estimate (combine's own figure, sigma sqrt(3) / count (1 + 2 |mean|)); a floored
    # one sits at that level.
    c, _ = st.public_center_halfwidth(v1.schema)
    mean_u = (want_loc - c) / h
    noise_var = sigma * math.sqrt(3) / info["records"] * (1 + 2 * np.abs(mean_u))
    assert np.all(np.abs((scale / h) ** 2 - (want_scale / h) ** 2) <= 5 * noise_var)
    assert set(info["floored"]) <= set(v1.schema.feature_names)
    # the model's initializers carry it (what onnxruntime computes with), later versions too
    from bedside.constants import ONNX_INV_SCALE, ONNX_LOC
    from bedside.models.onnx_weights import read_weights

    final = agg.registry.latest()
    w = read_weights(agg.registry.model_bytes(final), [ONNX_LOC, ONNX_INV_SCALE])
    np.testing.assert_allclose(w[ONNX_LOC].reshape(-1), loc, rtol=1e-6)
    np.testing.assert_allclose(w[ONNX_INV_SCALE].reshape(-1), 1 / scale, rtol=1e-5)
    assert agg.registry.manifest(final).training["feature_statistics"] == info
    # every device accounted the release before it sent it, and reports the composed epsilon
    for a in mf.agents:
        notes = [r.note for r in a._ledger.releases(UNIT_RECORD)]
        assert any(n.startswith("feature statistics") for n in notes)
        rep = a.privacy_report()
        assert rep["record"]["epsilon"] <= rep["record"]["budget_epsilon"]
    # the training rounds' lr decay counts training rounds only
    assert [r.settings.train for r in rounds[1:]] == [
        agg.federation.training.for_round(1), agg.federation.training.for_round(2)]


def test_a_device_declines_statistics_its_policy_refuses(tmp_path):
    mf = mem_fleet(tmp_path, clients=3, rounds=1, statistics=True)
    from tests.unit.federation.test_device_privacy import _rewrite_agent

    _rewrite_agent(mf, 0, min_statistics_noise=2.0)
    mf.run()
    first = mf.aggregator.state.rounds()[0]
    assert first.settings.task == "statistics" and first.status == "closed"
    assert mf.aggregator.state.declines(first.round) == {mf.fleet.clinic_ids[0]: "policy"}
    notes = [r.note for r in mf.agents[0]._ledger.releases(UNIT_RECORD)]
    assert not any(n.startswith("feature statistics") for n in notes)  # nothing released


def test_statistics_beyond_the_budget_are_declined_and_training_goes_on(tmp_path):
    # the release alone costs about 4.4 at record level: a budget of 2 cannot pay for it
    mf = mem_fleet(tmp_path, clients=3, rounds=1, statistics=True,
                   agent={"privacy": {"record_epsilon": 2.0}})
    mf.run()
    rounds = mf.aggregator.state.rounds()
    tries = [r for r in rounds if r.settings.task == "statistics"]
    assert len(tries) == 3 and all(r.status == "failed" for r in tries)
    for r in tries:
        assert set(mf.aggregator.state.declines(r.round).values()) == {"budget"}
    assert rounds[-1].settings.task == "train"  # then training, with the model's own scaling
    for a in mf.agents:
        assert a._ledger.releases(UNIT_RECORD) == [] or all(
            not r.note.startswith("feature statistics") for r in a._ledger.releases(UNIT_RECORD))


def test_an_oversized_statistics_vector_is_rejected(tmp_path):
    from bedside.constants import KIND_UPDATE
    from bedside.federation.settings import FederationSettings
    from bedside.federation.validate import (
        OpenRound,
        Prior,
        digest,
        open_update,
        validate_update,
    )
    from bedside.wire.envelope import encode
    from bedside.wire.signing import KeyRing, SigningKey

    schema = _schema(3)
    fed = FederationSettings(statistics=SETTINGS)
    s = fed.announce_statistics("f", 1, deadline=1e12, model_sha256="0" * 64)
    shapes = {"stats": (st.dimension(schema),)}
    current = OpenRound(round=1, model_version=1, settings=s, shapes=shapes)
    key = SigningKey.generate()
    ring = KeyRing({"dev": key.public})
    bound = current.norm_bound()
    big = np.zeros(7, np.float32)
    big[-1] = bound * 1.01
    payload = encode(KIND_UPDATE, "dev", key, {"stats": big}, round=1, model_version=1,
                     meta={"fleet": "f", "task": "statistics"})
    env = open_update(payload, ring, shapes, 1 << 20)
    with pytest.raises(ValidationError) as err:
        validate_update(env, topic_sender="dev", fleet="f", digest=digest(payload),
                        current=current, prior=Prior())
    assert err.value.reason == "norm_bound"


def test_a_retried_statistics_round_never_makes_a_device_pay_twice(tmp_path):
    # three clinics, all three needed; clinic 1's policy declines the first attempt
    mf = mem_fleet(tmp_path, clients=3, rounds=1, statistics=True,
                   aggregator={"rounds": {"min_participants": 3}})
    from tests.unit.federation.test_device_privacy import _rewrite_agent

    _rewrite_agent(mf, 0, min_statistics_noise=5.0)
    for _ in range(500):
        mf.step()
        rounds = mf.aggregator.state.rounds()
        if rounds and rounds[0].status != "open":
            break
    first = mf.aggregator.state.rounds()[0]
    assert first.status == "failed" and "2 device(s) released statistics" in first.result["reason"]
    _rewrite_agent(mf, 0, min_statistics_noise=0.5)  # its operator relents
    mf.run()
    rounds = mf.aggregator.state.rounds()
    closing = next(r for r in rounds if r.status == "closed")
    assert closing.settings.task == "statistics" and closing.round in (2, 3)
    ids = mf.fleet.clinic_ids
    # the two that paid in the first attempt decline; their vectors still count
    declines = mf.aggregator.state.declines(closing.round)
    assert declines == {ids[1]: "statistics_released", ids[2]: "statistics_released"}
    assert mf.aggregator.registry.manifest(2).training["feature_statistics"]["devices"] == 3
    for a in mf.agents:
        notes = [r.note for r in a._ledger.releases(UNIT_RECORD)]
        assert sum(n.startswith("feature statistics") for n in notes) == 1
    # the vectors are dropped once the scaling is made
    assert mf.aggregator.state.first_tensors([r.round for r in rounds]) == []


def test_an_aggregator_with_statistics_refuses_a_model_without_ranges(tmp_path):
    import json

    from bedside.aggregator.config import load as load_agg
    from bedside.aggregator.service import Aggregator
    from bedside.demo.run import to_toml
    from bedside.errors import ConfigError
    from bedside.transport.memory import MemoryBroker, MemoryTransport
    from tests.fleet import make_fleet

    fleet = make_fleet(tmp_path, clients=2, rounds=1, statistics=True)
    fleet.plan["aggregator"]["mqtt"]["port"] = 1883
    fleet.aggregator_toml.write_text(to_toml(fleet.plan["aggregator"]))
    manifest = tmp_path / "initial-model" / "manifest.json"
    m = json.loads(manifest.read_text())
    for f in m["input_schema"]["features"][:2]:
        for k in ("min", "max", "typical_min", "typical_max"):
            f.pop(k, None)
    manifest.write_text(json.dumps(m))
    agg = Aggregator(load_agg(fleet.aggregator_toml),
                     MemoryTransport(MemoryBroker(), "aggregator", clean_session=False))
    with pytest.raises(ConfigError, match=r"\[statistics\].*mean radius"):
        agg.start()
