"""Aggregation rules and server optimizers: correctness, robustness, streaming memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bedside.errors import ConfigError, InputError
from bedside.federation.strategies import (
    OPTIMIZERS,
    RULES,
    make_optimizer,
    make_rule,
    materialize,
)

SHAPES = {"w": (3, 2), "b": (2,)}


def _updates(rng, n, scale=1.0):
    return [({k: rng.normal(size=s).astype(np.float32) * scale for k, s in SHAPES.items()},
             float(rng.integers(1, 10))) for _ in range(n)]


def test_registry_has_the_documented_names():
    assert {"fedavg", "median", "trimmed_mean"} <= set(RULES)
    assert {"sgd", "fedavgm", "fedadam"} <= set(OPTIMIZERS)
    with pytest.raises(ConfigError, match="unknown aggregation rule 'krum'"):
        make_rule("krum")
    with pytest.raises(ConfigError, match="trim_fraction"):
        make_rule("trimmed_mean", trim_fraction=0.6)
    with pytest.raises(ConfigError, match="unexpected keyword"):
        make_optimizer("sgd", momentum=0.9)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 12))
def test_fedavg_is_the_weighted_mean(seed, n):
    rng = np.random.default_rng(seed)
    ups = _updates(rng, n)
    out = make_rule("fedavg").aggregate(materialize(ups), SHAPES)
    total = sum(w for _, w in ups)
    for k in SHAPES:
        want = sum(w * t[k].astype(np.float64) for t, w in ups) / total
        np.testing.assert_allclose(out[k], want, rtol=1e-5, atol=1e-6)
        assert out[k].dtype == np.float32 and out[k].shape == SHAPES[k]


def test_empty_round_is_a_clear_error():
    for name in ("fedavg", "median", "trimmed_mean"):
        with pytest.raises(InputError, match="empty"):
            make_rule(name).aggregate(materialize([]), SHAPES)


def test_robust_rules_resist_a_faulty_minority():
    rng = np.random.default_rng(0)
    honest = [({k: np.full(s, 1.0, np.float32) + rng.normal(size=s).astype(np.float32) * 0.01
                for k, s in SHAPES.items()}, 1.0) for _ in range(7)]
    faulty = [({k: np.full(s, 1e4, np.float32) for k, s in SHAPES.items()}, 1.0)
              for _ in range(2)]
    ups = honest + faulty
    mean = make_rule("fedavg").aggregate(materialize(ups), SHAPES)
    med = make_rule("median").aggregate(materialize(ups), SHAPES)
    trim = make_rule("trimmed_mean", trim_fraction=0.25).aggregate(materialize(ups), SHAPES)
    assert np.abs(mean["w"] - 1).max() > 100  # the mean is dragged away
    assert np.abs(med["w"] - 1).max() < 0.05
    assert np.abs(trim["w"] - 1).max() < 0.05


def test_fedavg_streams_in_constant_memory():
    shapes = {"w": (256, 256)}  # 256 KiB per float32 update

    def source(n):
        def gen():
            for i in range(n):
                yield {"w": np.full(shapes["w"], float(i % 3), np.float32)}, 1.0
        return gen

    peaks = []
    for n in (10, 200):
        tracemalloc.start()
        make_rule("fedavg").aggregate(source(n), shapes)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < peaks[0] * 1.5  # 20x the updates, about the same peak


def test_server_optimizers():
    w = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    d = {"w": np.full((3, 2), 0.5, np.float32), "b": np.ones(2, np.float32)}
    new, state = make_optimizer("sgd").step(w, d, {})
    np.testing.assert_allclose(new["w"], 1.5)
    assert state == {}
    opt = make_optimizer("fedavgm", lr=1.0, momentum=0.5)
    w1, s1 = opt.step(w, d, {})
    w2, s2 = opt.step(w1, d, s1)
    np.testing.assert_allclose(s2["m.w"], 0.5 * 0.5 + 0.5)  # m = beta m + delta
    np.testing.assert_allclose(w2["w"], 1 + 0.5 + 0.75)
    adam = make_optimizer("fedadam", lr=0.1)
    a1, st1 = adam.step(w, d, {})
    # first step: m = 0.1 d, v = 0.01 d^2 -> update = lr * m / (sqrt(v) + tau)
    want = 1 + 0.1 * (0.1 * 0.5) / (np.sqrt(0.01 * 0.25) + 1e-3)
    np.testing.assert_allclose(a1["w"], want, rtol=1e-5)
    assert set(st1) == {"m.w", "v.w", "m.b", "v.b"}
