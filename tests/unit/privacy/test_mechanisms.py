"""Clipping, Gaussian noise and adaptive clipping (bedside.privacy.mechanisms)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bedside.errors import InputError, PrivacyError
from bedside.privacy.mechanisms import (
    adaptive_noise_multiplier,
    add_gaussian_noise,
    clip_indicator,
    clip_update,
    l2_norm,
    next_clip_norm,
    noised_count,
    secure_rng,
)


# ---------------------------------------------------------------------------------------------
# l2_norm
# ---------------------------------------------------------------------------------------------
def test_l2_norm_is_the_global_norm_over_all_arrays() -> None:
    assert l2_norm([np.array([3.0], np.float32), np.array([[4.0]], np.float64)]) == 5.0
    assert l2_norm([np.array([1.0, 2.0, 2.0]), np.zeros((2, 3))]) == 3.0
    assert l2_norm([np.zeros(0, np.float32), np.array([0.0])]) == 0.0


def test_l2_norm_accumulates_in_float64() -> None:
    # Squares of 300 overflow float16 (max 65504); the norm must not.
    x = np.full(100, 300.0, dtype=np.float16)
    assert l2_norm([x]) == pytest.approx(3000.0, rel=1e-12)
    # Values whose squares overflow float64 still give a finite norm.
    assert l2_norm([np.array([1e200, 1e200])]) == pytest.approx(math.sqrt(2) * 1e200, rel=1e-12)


def test_l2_norm_reports_non_finite_input() -> None:
    assert math.isnan(l2_norm([np.array([1.0, np.nan])]))
    assert math.isinf(l2_norm([np.array([1.0]), np.array([np.inf])]))


@pytest.mark.parametrize("bad", [[], np.zeros(3), [np.array(["a"])], [[1.0, 2.0]]])
def test_l2_norm_rejects_non_updates(bad: object) -> None:
    with pytest.raises(InputError):
        l2_norm(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# clip_update
# ---------------------------------------------------------------------------------------------
def test_clip_scales_the_whole_update_to_the_bound() -> None:
    update: list[np.ndarray] = [
        np.array([3.0, 0.0], np.float32),
        np.array([[0.0], [4.0]], np.float64),
    ]
    clipped, norm = clip_update(update, 1.0)
    assert norm == 5.0
    assert l2_norm(clipped) <= 1.0
    assert l2_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    # One factor for the whole update: the direction is kept.
    np.testing.assert_allclose(clipped[0], [0.6, 0.0], rtol=1e-6)
    # (A few float32 ulps below 0.8: the factor is shrunk so that rounding 0.6 to float32
    # cannot push the norm over the bound.)
    np.testing.assert_allclose(clipped[1], [[0.0], [0.8]], rtol=1e-6)
    assert [a.dtype for a in clipped] == [np.float32, np.float64]
    assert [a.shape for a in clipped] == [(2,), (2, 1)]
    # The input is untouched.
    np.testing.assert_array_equal(update[0], [3.0, 0.0])


def test_clip_below_the_bound_and_zero_update_are_copies() -> None:
    small = [np.array([0.1, 0.2], np.float32)]
    out, norm = clip_update(small, 1.0)
    assert norm == pytest.approx(math.sqrt(0.05), rel=1e-6)
    np.testing.assert_array_equal(out[0], small[0])
    assert out[0] is not small[0]
    zero = [np.zeros((2, 2), np.float32)]
    out, norm = clip_update(zero, 1.0)
    assert norm == 0.0
    np.testing.assert_array_equal(out[0], zero[0])
    out[0][0, 0] = 7.0
    assert zero[0][0, 0] == 0.0  # a copy, not a view


@pytest.mark.parametrize("clip_norm", [0.0, -1.0, math.nan, math.inf, "1.0", None, True])
def test_clip_norm_must_be_finite_and_positive(clip_norm: object) -> None:
    with pytest.raises(InputError, match="clip_norm"):
        clip_update([np.ones(3, np.float32)], clip_norm)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_clip_refuses_non_finite_updates(bad_value: float) -> None:
    update = [np.ones(3, np.float32), np.array([1.0, bad_value], np.float32)]
    with pytest.raises(InputError, match=r"update\[1\] contains NaN or Inf"):
        clip_update(update, 1.0)


def test_clip_refuses_integer_arrays_and_empty_updates() -> None:
    with pytest.raises(InputError, match="floating"):
        clip_update([np.array([1, 2, 3])], 1.0)
    with pytest.raises(InputError, match="empty"):
        clip_update([], 1.0)


_floats = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
_arrays = st.lists(
    st.sampled_from([np.float16, np.float32, np.float64]).flatmap(
        lambda dt: hnp.arrays(
            dt,
            hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
            elements=st.floats(-6e4, 6e4, width=16) if dt == np.float16 else _floats,
        )
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(update=_arrays, clip_norm=st.floats(1e-3, 1e3))
def test_clipping_never_exceeds_the_bound_and_is_identity_below_it(
    update: list[np.ndarray], clip_norm: float
) -> None:
    clipped, norm = clip_update(update, clip_norm)
    assert norm == l2_norm(update)
    # Exact: the bound holds as measured in float64, after rounding to each dtype.
    assert l2_norm(clipped) <= clip_norm
    assert [a.dtype for a in clipped] == [a.dtype for a in update]
    assert [a.shape for a in clipped] == [a.shape for a in update]
    if norm <= clip_norm:
        for a, b in zip(clipped, update, strict=True):
            np.testing.assert_array_equal(a, b)
    else:
        # Scaled, not truncated: close to the bound and in the same direction.
        assert l2_norm(clipped) >= clip_norm * (1 - 1e-2)
        factor = clip_norm / norm
        for a, b in zip(clipped, update, strict=True):
            tol = 4 * float(np.finfo(b.dtype).eps) * max(clip_norm, 1e-30)
            np.testing.assert_allclose(
                a.astype(np.float64), b.astype(np.float64) * factor, rtol=1e-2, atol=tol
            )


# ---------------------------------------------------------------------------------------------
# add_gaussian_noise
# ---------------------------------------------------------------------------------------------
def test_noise_has_the_right_distribution(rng: np.random.Generator) -> None:
    """400k draws: std within 1% of z*C (about 9 standard errors; a wrong scale such as z, z*C^2
    or 2*z*C is far outside), mean near 0, and Gaussian kurtosis 3 (Laplace 6, uniform 1.8)."""
    z, c = 1.3, 0.5
    update = [np.zeros(300_000, np.float64), np.zeros((100, 1000), np.float64)]
    noised = add_gaussian_noise(update, z, c, rng)
    x = np.concatenate([a.ravel() for a in noised])
    n = x.size
    std = float(x.std())
    assert std == pytest.approx(z * c, rel=0.01)
    assert abs(float(x.mean())) < 5 * z * c / math.sqrt(n)
    kurtosis = float(np.mean((x - x.mean()) ** 4) / std**4)
    assert kurtosis == pytest.approx(3.0, abs=0.05)
    # Independent across arrays: the two arrays do not repeat the same draws.
    assert not np.allclose(noised[0][:1000], noised[1][0])
    assert abs(np.corrcoef(noised[0][:100_000], noised[1].ravel())[0, 1]) < 0.02


def test_noise_is_added_to_the_values_and_keeps_dtype(rng: np.random.Generator) -> None:
    base = np.linspace(-1, 1, 50_000).astype(np.float32)
    noised = add_gaussian_noise([base], 2.0, 0.25, rng)[0]
    assert noised.dtype == np.float32 and noised.shape == base.shape
    diff = noised.astype(np.float64) - base.astype(np.float64)
    assert float(diff.std()) == pytest.approx(0.5, rel=0.03)
    np.testing.assert_array_equal(base, np.linspace(-1, 1, 50_000).astype(np.float32))


def test_noise_is_reproducible_with_a_seed_and_zero_multiplier_copies() -> None:
    upd = [np.ones(10, np.float32)]
    a = add_gaussian_noise(upd, 1.0, 1.0, np.random.default_rng(7))
    b = add_gaussian_noise(upd, 1.0, 1.0, np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], upd[0])
    same = add_gaussian_noise(upd, 0.0, 1.0, np.random.default_rng(7))
    np.testing.assert_array_equal(same[0], upd[0])
    assert same[0] is not upd[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"noise_multiplier": math.inf}, "noise_multiplier"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"rng": np.random.RandomState(0)}, "rng"),
        ({"rng": None}, "rng"),
    ],
)
def test_noise_validates_its_arguments(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "update": [np.zeros(3, np.float32)],
        "noise_multiplier": 1.0,
        "clip_norm": 1.0,
        "rng": np.random.default_rng(0),
    }
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        add_gaussian_noise(**args)  # type: ignore[arg-type]


def test_noise_overflowing_a_narrow_dtype_is_an_error(rng: np.random.Generator) -> None:
    with pytest.raises(PrivacyError, match="float16"):
        add_gaussian_noise([np.zeros(1000, np.float16)], 1e5, 1.0, rng)


def test_secure_rng_is_a_fresh_generator_each_time() -> None:
    a, b = secure_rng(), secure_rng()
    assert isinstance(a, np.random.Generator)
    assert not np.array_equal(a.integers(0, 2**63, 4), b.integers(0, 2**63, 4))


def test_importing_mechanisms_does_not_import_dp_accounting_or_scipy() -> None:
    code = (
        "import sys, bedside.privacy, bedside.privacy.mechanisms, bedside.privacy.accountant, "
        "bedside.privacy.ledger, bedside.privacy.cli; bedside.privacy.Ledger; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dp_accounting', 'scipy')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# Adaptive clipping (Andrew et al. 2021)
# ---------------------------------------------------------------------------------------------
def test_clip_indicator() -> None:
    assert clip_indicator(0.5, 1.0) == 1.0
    assert clip_indicator(1.0, 1.0) == 1.0
    assert clip_indicator(1.0001, 1.0) == 0.0
    with pytest.raises(InputError, match="norm"):
        clip_indicator(math.nan, 1.0)


def test_adaptive_noise_multiplier_matches_the_paper() -> None:
    # z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2, e.g. z = 1, sigma_b = 5 -> (1 - 0.01)^-1/2.
    assert adaptive_noise_multiplier(1.0, 5.0) == pytest.approx(0.99**-0.5, rel=1e-12)
    assert adaptive_noise_multiplier(3.0, 5.0) == pytest.approx((1 / 9 - 1 / 100) ** -0.5)
    # More count noise leaves more of the budget for the update sum.
    assert adaptive_noise_multiplier(1.0, 100.0) < adaptive_noise_multiplier(1.0, 1.0)
    with pytest.raises(InputError, match="count_noise_std must be > noise_multiplier / 2"):
        adaptive_noise_multiplier(2.0, 1.0)
    with pytest.raises(InputError, match="noise_multiplier"):
        adaptive_noise_multiplier(0.0, 1.0)


def test_adaptive_split_costs_exactly_one_gaussian_with_multiplier_z() -> None:
    """Theorem 1 of Andrew et al.: sum noised at z_delta plus the bit count (sensitivity 1/2,
    noise sigma_b, i.e. multiplier 2 sigma_b) is a Gaussian with multiplier z. Checked with the
    PLD accountant, which is exact for Gaussians up to discretisation."""
    from bedside.privacy.accountant import compose, epsilon, gaussian

    z, sigma_b = 1.2, 3.0
    z_delta = adaptive_noise_multiplier(z, sigma_b)
    both = compose([gaussian(z_delta, 10), gaussian(2 * sigma_b, 10)])
    single = epsilon(gaussian(z, 10), 1e-5, "pld")
    assert epsilon(both, 1e-5, "pld") == pytest.approx(single, rel=2e-3)


def test_replace_one_split_costs_exactly_one_gaussian_with_multiplier_z_over_2() -> None:
    """Bedside's adjacency is replace-one: the update sum (sensitivity 2C, noise z_delta C) is a
    Gaussian of multiplier z_delta / 2 and the count (sensitivity 1, noise sigma_b) one of sigma_b;
    together exactly the round's Gaussian of multiplier z / 2."""
    from bedside.privacy.accountant import compose, epsilon, gaussian
    from bedside.privacy.federated import device_round_releases
    from bedside.privacy.ledger import releases_event

    z, sigma_b = 0.8, 2.0
    z_delta = adaptive_noise_multiplier(z, sigma_b)
    rel = device_round_releases(3, "central", z_delta, sigma_b)
    assert [r.noise_multiplier for r in rel] == [z_delta / 2, sigma_b]
    both = compose([releases_event(rel)] * 10)
    assert epsilon(both, 1e-5, "pld") == pytest.approx(epsilon(gaussian(z / 2, 10), 1e-5, "pld"),
                                                       rel=2e-3)


def test_next_clip_norm_follows_the_geometric_rule() -> None:
    noisy = noised_count([1.0] * 8 + [0.0] * 2, 2.0, np.random.default_rng(3))
    noise = np.random.default_rng(3).normal(0.0, 2.0)
    assert noisy == pytest.approx(8 + noise)
    expected = 1.5 * math.exp(-0.2 * (min(1.0, max(0.0, noisy / 10)) - 0.5))
    assert next_clip_norm(1.5, noisy, 10, 0.5, 0.2) == pytest.approx(expected)
    # the noisy fraction is clamped to [0, 1]: one round moves C by at most exp(eta)
    assert next_clip_norm(1.0, 1e9, 10, 0.5, 0.2) == pytest.approx(math.exp(-0.1))
    assert next_clip_norm(1.0, -1e9, 10, 0.5, 0.2) == pytest.approx(math.exp(0.1))


def test_clip_norm_moves_towards_the_target_quantile() -> None:
    """Norms drawn from a log-normal with median 2: starting from 0.1 (and from 50) the clip norm
    ends near the median (gamma = 0.5), and near the 90th percentile with gamma = 0.9."""
    gen = np.random.default_rng(11)
    for gamma, quantile in [(0.5, 2.0), (0.9, 2.0 * math.exp(0.5 * 1.2816))]:
        for start in (0.1, 50.0):
            c = start
            history = []
            for _ in range(300):
                norms = np.exp(gen.normal(math.log(2.0), 0.5, size=100))
                noisy = noised_count([clip_indicator(n, c) for n in norms], 1.0, gen)
                c = next_clip_norm(c, noisy, 100, gamma, 0.2)
                history.append(c)
            assert float(np.median(history[-100:])) == pytest.approx(quantile, rel=0.1)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: next_clip_norm(1.0, 5.0, 10, 0.0, 0.2), "target_quantile"),
        (lambda: next_clip_norm(1.0, 5.0, 10, 1.0, 0.2), "target_quantile"),
        (lambda: next_clip_norm(1.0, 5.0, 10, 0.5, 0.0), "learning_rate"),
        (lambda: next_clip_norm(0.0, 5.0, 10, 0.5, 0.2), "clip_norm"),
        (lambda: next_clip_norm(1.0, 5.0, 0, 0.5, 0.2), "devices"),
        (lambda: next_clip_norm(1.0, math.nan, 10, 0.5, 0.2), "noisy_count"),
        (lambda: noised_count([1.0], 0.0, np.random.default_rng(0)), "count_noise"),
        (lambda: noised_count([1.0, 0.5], 1.0, np.random.default_rng(0)),
         r"bits\[1\] must be 0 or 1"),
    ],
)
def test_adaptive_clipping_validates(call, match: str) -> None:
    with pytest.raises(InputError, match=match):
        call()
