"""Clinic shards: disjoint, complete, reproducible, skewed as asked, min_size respected."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bedside.errors import InputError
from bedside.models.partition import describe, label_skew, partition

# Ten classes of uneven size (like a digits or diagnosis-code data set), 2000 rows.
Y = np.random.default_rng(0).choice(10, size=2000, p=np.linspace(1, 2, 10) / 15)


def _check_cover(shards: list[np.ndarray], n: int, k: int, min_size: int) -> None:
    assert len(shards) == k
    assert all(s.dtype == np.int64 and s.ndim == 1 for s in shards)
    joined = np.concatenate(shards)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))  # disjoint, complete
    assert min(len(s) for s in shards) >= min_size


@pytest.mark.parametrize(
    "kw",
    [{"scheme": "iid"}, {"scheme": "iid", "quantity_skew": 1.0},
     {"scheme": "dirichlet", "alpha": 0.1}, {"scheme": "dirichlet", "alpha": 0.5,
                                             "quantity_skew": 0.8}],
)
def test_disjoint_complete_reproducible(kw):
    a = partition(Y, 8, seed=5, **kw)
    _check_cover(a, len(Y), 8, 2)
    b = partition(Y, 8, seed=5, **kw)
    assert all(np.array_equal(s, t) for s, t in zip(a, b, strict=True))
    c = partition(Y, 8, seed=6, **kw)
    assert not all(np.array_equal(s, t) for s, t in zip(a, c, strict=True))


def test_iid_equal_sizes():
    sizes = [len(s) for s in partition(np.zeros(103, np.int64), 10)]
    assert sorted(sizes) == [10] * 7 + [11] * 3


def test_dirichlet_small_alpha_is_more_skewed_than_iid():
    iid = np.mean([label_skew(partition(Y, 10, seed=s), Y) for s in range(5)])
    small = np.mean([label_skew(partition(Y, 10, scheme="dirichlet", alpha=0.1, seed=s), Y)
                     for s in range(5)])
    large = np.mean([label_skew(partition(Y, 10, scheme="dirichlet", alpha=100.0, seed=s), Y)
                     for s in range(5)])
    assert iid < 0.1
    assert small > 0.5 and small > 4 * iid
    assert large < 0.1  # large alpha approaches IID


def test_quantity_skew_spreads_sizes():
    def cv(shards):
        sizes = np.array([len(s) for s in shards])
        return sizes.std() / sizes.mean()

    assert cv(partition(Y, 10)) < 0.01
    assert np.mean([cv(partition(Y, 10, quantity_skew=1.0, seed=s)) for s in range(5)]) > 0.4
    flat = np.mean([cv(partition(Y, 10, scheme="dirichlet", alpha=10.0, seed=s))
                    for s in range(5)])
    skewed = np.mean([cv(partition(Y, 10, scheme="dirichlet", alpha=10.0, quantity_skew=1.0,
                                   seed=s)) for s in range(5)])
    assert skewed > 2 * flat


def test_min_size_is_respected_even_when_the_draws_fail():
    y = np.repeat(np.arange(3), 20)  # 60 rows, 3 classes: alpha 0.01 puts each class on 1 client
    shards = partition(y, 20, scheme="dirichlet", alpha=0.01, min_size=3, seed=1)
    _check_cover(shards, 60, 20, 3)
    assert [len(s) for s in shards] == [3] * 20
    shards = partition(y, 10, scheme="iid", quantity_skew=3.0, min_size=5, seed=2)
    _check_cover(shards, 60, 10, 5)


@pytest.mark.parametrize(
    ("kw", "name"),
    [({"n_clients": 0}, "n_clients"), ({"n_clients": 11}, "min_size"),
     ({"n_clients": 2, "min_size": -1}, "min_size"),
     ({"n_clients": 2, "scheme": "dirichlet", "alpha": 0.0}, "alpha"),
     ({"n_clients": 2, "alpha": float("nan")}, "alpha"),
     ({"n_clients": 2, "quantity_skew": -0.1}, "quantity_skew"),
     ({"n_clients": 2, "scheme": "zipf"}, "scheme"),
     ({"n_clients": 2.5}, "n_clients")],
)
def test_invalid_arguments_name_the_parameter(kw, name):
    with pytest.raises(InputError, match=f"'{name}'"):
        partition(np.zeros(20, np.int64), **kw)


def test_labels_must_be_integers():
    with pytest.raises(InputError, match="'y'"):
        partition(np.zeros(10, np.float32), 2)


def test_describe():
    y = np.array([0, 0, 1, 1, 1, 2])
    shards = [np.array([0, 2]), np.array([1, 3, 4, 5])]
    out = describe(shards, y, ["a", "b", "c"])
    assert out == [
        {"client": 0, "size": 2, "histogram": {"a": 1, "b": 1, "c": 0}},
        {"client": 1, "size": 4, "histogram": {"a": 1, "b": 2, "c": 1}},
    ]
    with pytest.raises(InputError, match="labels"):
        describe(shards, y, ["a", "b"])
    assert label_skew([np.arange(6)], y) == 0.0
    assert label_skew([np.array([2, 3, 4])], y) == pytest.approx(0.5)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    n=st.integers(1, 300),
    n_classes=st.integers(1, 8),
    k=st.integers(1, 12),
    min_size=st.integers(0, 5),
    scheme=st.sampled_from(["iid", "dirichlet"]),
    alpha=st.floats(0.01, 100.0),
    quantity_skew=st.sampled_from([0.0, 0.5, 2.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_cover_min_size_reproducible(n, n_classes, k, min_size, scheme, alpha,
                                              quantity_skew, seed):
    assume(k * min_size <= n)
    y = np.random.default_rng(seed).integers(0, n_classes, size=n)
    kw = {"scheme": scheme, "alpha": alpha, "quantity_skew": quantity_skew, "min_size": min_size,
          "seed": seed}
    shards = partition(y, k, **kw)
    _check_cover(shards, n, k, min_size)
    again = partition(y, k, **kw)
    assert all(np.array_equal(s, t) for s, t in zip(shards, again, strict=True))
