"""Plain-numpy metrics agree with scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from bedside import metrics
from bedside.errors import InputError


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5), st.integers(10, 80))
def test_against_sklearn(seed, k, n):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)  # every class present
    p = rng.dirichlet(np.ones(k), n)
    p = np.round(p, 2)  # create ties
    p = p / p.sum(1, keepdims=True)
    assert metrics.accuracy(y, p) == pytest.approx(accuracy_score(y, p.argmax(1)))
    want = roc_auc_score(y, p[:, 1]) if k == 2 else roc_auc_score(
        y, p, multi_class="ovr", average="macro")
    assert metrics.roc_auc(y, p) == pytest.approx(want, abs=1e-9)
    assert metrics.log_loss(y, p) == pytest.approx(log_loss(y, np.clip(p, 1e-12, 1),
                                                           labels=range(k)), rel=1e-6)


def test_auc_undefined_with_one_class():
    assert np.isnan(metrics.roc_auc(np.zeros(4, int), np.full((4, 2), 0.5)))


def test_bad_shapes():
    with pytest.raises(InputError):
        metrics.accuracy(np.zeros(3), np.zeros((2, 2)))
    with pytest.raises(InputError, match="no rows"):
        metrics.evaluate(np.zeros(0, int), np.zeros((0, 2)))
