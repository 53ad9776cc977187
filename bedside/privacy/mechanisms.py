"""Clipping and Gaussian noise for model updates: pure functions over ``list[np.ndarray]``.

An *update* is a list of arrays (one per model parameter). Every function here takes the update as
a sequence of arrays and returns new arrays; inputs are never modified. Randomness always comes
from an explicit :class:`numpy.random.Generator` argument: production passes :func:`secure_rng`,
tests pass a seeded generator.

This module imports numpy only (no dp-accounting, no scipy): the edge inference path may import it
for free. Accounting for what these mechanisms did lives in :mod:`bedside.privacy.accountant`.

Privacy assumptions (read before use)
-------------------------------------
* Sensitivity comes from clipping. After :func:`clip_update` the whole update has L2 norm at most
  ``clip_norm`` (measured in float64 after casting back to the update's dtype), so adding or
  removing one contribution changes a *sum* of clipped updates by at most ``clip_norm`` and
  replacing one changes it by at most ``2 * clip_norm``.
* :func:`add_gaussian_noise` draws i.i.d. ``N(0, (z * C)^2)`` per coordinate. The *noise multiplier*
  ``z`` is the noise standard deviation divided by ``C``. Whether that ``z`` is also the noise
  multiplier *relative to the L2 sensitivity* depends on where the noise is added: see
  ``docs/privacy.md`` (central: sensitivity ``C``, multiplier ``z``; local, one device's own
  update, replace-one: sensitivity ``2C``, multiplier ``z / 2``).
* Noise is sampled with numpy's floating-point normal sampler. Like every floating-point
  implementation of the Gaussian mechanism (Mironov 2012, "On Significance of the Least
  Significant Bits for Differential Privacy") this is not an exact sample of the continuous
  distribution; the usual practice, followed here, is to accept that gap.

Adaptive clipping follows Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private Learning
with Adaptive Clipping", NeurIPS 2021 (arXiv:1905.03871).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np

from bedside.errors import InputError, PrivacyError

__all__ = [
    "adaptive_noise_multiplier",
    "add_gaussian_noise",
    "clip_indicator",
    "clip_update",
    "l2_norm",
    "next_clip_norm",
    "noised_count",
    "secure_rng",
]

# Attempts to bring a clipped update under the bound after rounding to a narrow dtype.
_MAX_SHRINK_STEPS = 8


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------
def _positive_finite(name: str, value: float) -> float:
    v = _as_float(name, value)
    if not (math.isfinite(v) and v > 0):
        raise InputError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _non_negative_finite(name: str, value: float) -> float:
    v = _as_float(name, value)
    if not (math.isfinite(v) and v >= 0):
        raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InputError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise InputError(
            f"rng must be a numpy.random.Generator (use bedside.privacy.secure_rng() in "
            f"production), got {type(rng).__name__}"
        )
    return rng


def _arrays(update: Sequence[np.ndarray], *, floating: bool) -> list[np.ndarray]:
    """Check an update: a non-empty sequence of numeric arrays (floating point if asked)."""
    if isinstance(update, np.ndarray):
        raise InputError("update must be a list of arrays, got a single array; wrap it: [array]")
    arrays = list(update)
    if not arrays:
        raise InputError("update has no arrays: an empty update cannot be clipped or noised")
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray):
            raise InputError(f"update[{i}] must be a numpy array, got {type(a).__name__}")
        kind = a.dtype.kind
        if floating and kind != "f":
            raise InputError(
                f"update[{i}] has dtype {a.dtype}; clipping and noise need floating-point arrays "
                "(cast to float32 first)"
            )
        if kind not in "fiub":
            raise InputError(f"update[{i}] has non-numeric dtype {a.dtype}")
    return arrays


def _sumsq(x: np.ndarray) -> float:
    """Sum of squares of a float64 vector, single-threaded: BLAS (np.dot) starts spinning
    threads for long vectors, which, with several validator processes on a few cores, made
    judging an update 30 times slower (benchmarks/workers.py); einsum stays on this thread."""
    return float(np.einsum("i,i->", x, x))


def _array_norm(a: np.ndarray) -> float:
    """L2 norm of one array in float64, scaled so that large values do not overflow."""
    if a.size == 0:
        return 0.0
    if a.dtype.itemsize <= 4 and a.dtype.kind in "fiu":
        # float32 and narrower: squares and their sum cannot overflow float64 (|x| < 3.5e38,
        # so each square < 1.2e77), so no scaling is needed; inf stays inf, NaN stays NaN
        x = np.asarray(a, dtype=np.float64).ravel()
        return math.sqrt(_sumsq(x))
    x = np.asarray(a, dtype=np.float64).ravel()
    m = float(np.max(np.abs(x)))
    if not math.isfinite(m):
        return math.inf if not np.isnan(x).any() else math.nan
    if m == 0.0:
        return 0.0
    y = x / m
    return m * math.sqrt(_sumsq(y))


# ---------------------------------------------------------------------------------------------
# Norm and clipping
# ---------------------------------------------------------------------------------------------
def l2_norm(update: Sequence[np.ndarray]) -> float:
    """Global L2 norm over all arrays of ``update``, computed in float64.

    The norm is that of the concatenation of all arrays, flattened. It is ``nan`` if any entry is
    NaN and ``inf`` if any entry is infinite (callers that need a finite norm check it).
    """
    total = 0.0
    for a in _arrays(update, floating=False):
        n = _array_norm(a)
        if math.isnan(n):
            return math.nan
        total = math.hypot(total, n)
    return total


def clip_update(
    update: Sequence[np.ndarray], clip_norm: float
) -> tuple[list[np.ndarray], float]:
    """Scale the whole update so that its global L2 norm is at most ``clip_norm``.

    Returns ``(clipped, original_norm)``. ``clipped`` is always a new list of new arrays with the
    same shapes and dtypes as ``update``. If the norm is already ``<= clip_norm`` (including a
    zero update) the arrays are returned unchanged, as copies. Otherwise every array is multiplied
    by the same factor ``clip_norm / norm`` (computed in float64, then cast back).

    Guarantee: ``l2_norm(clipped) <= clip_norm`` holds exactly as measured by :func:`l2_norm`,
    also after rounding to a narrow dtype such as float16 (the factor is shrunk by a few ulps if
    rounding pushed the norm over the bound). This is the sensitivity bound the Gaussian mechanism
    relies on.

    Raises:
        InputError: ``clip_norm`` is not a finite number > 0; the update is empty, not
            floating point, or contains NaN or Inf (a non-finite update is never silently clipped).
    """
    c = _positive_finite("clip_norm", clip_norm)
    arrays = _arrays(update, floating=True)
    norm = l2_norm(arrays)
    if not math.isfinite(norm):
        bad = next((i for i, a in enumerate(arrays) if not np.all(np.isfinite(a))), None)
        where = "the update's norm overflows float64" if bad is None else (
            f"update[{bad}] contains NaN or Inf"
        )
        raise InputError(
            f"{where}; refusing to clip a non-finite update "
            "(check the local training step for divergence)"
        )
    if norm <= c:
        return [a.copy() for a in arrays], norm

    factor = c / norm
    for _ in range(_MAX_SHRINK_STEPS):
        # np.asarray keeps 0-d arrays arrays (arithmetic on them returns numpy scalars).
        clipped = [np.asarray(np.asarray(a, np.float64) * factor, dtype=a.dtype) for a in arrays]
        new_norm = l2_norm(clipped)
        if new_norm <= c:
            return clipped, norm
        # Rounding to a narrow dtype pushed the norm over the bound: shrink a little and retry.
        eps = max(float(np.finfo(a.dtype).eps) for a in arrays)
        factor *= (c / new_norm) * (1.0 - 4.0 * eps)
    raise PrivacyError(  # pragma: no cover - needs a pathological dtype/size combination
        f"could not clip the update under {c} after {_MAX_SHRINK_STEPS} attempts; "
        "use float32 or float64 arrays"
    )


# ---------------------------------------------------------------------------------------------
# Gaussian noise
# ---------------------------------------------------------------------------------------------
def add_gaussian_noise(
    update: Sequence[np.ndarray],
    noise_multiplier: float,
    clip_norm: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Add i.i.d. Gaussian noise ``N(0, (noise_multiplier * clip_norm)^2)`` to every coordinate.

    The noise is drawn in float64 and the sum is cast back to each array's dtype. With
    ``noise_multiplier == 0`` the update is returned as a copy (no noise, no privacy).

    Assumption: ``update`` was clipped to ``clip_norm`` (or is a sum of updates each clipped to
    it). This function does not clip; it cannot know the sensitivity of what it is given.

    Raises:
        InputError: ``noise_multiplier`` < 0 or not finite, ``clip_norm`` not finite and > 0,
            ``rng`` not a ``numpy.random.Generator``, or a bad update.
        PrivacyError: the noised values overflow the update's dtype (e.g. float16 with a large
            noise standard deviation).
    """
    z = _non_negative_finite("noise_multiplier", noise_multiplier)
    c = _positive_finite("clip_norm", clip_norm)
    gen = _check_rng(rng)
    arrays = _arrays(update, floating=True)
    if z == 0.0:
        return [a.copy() for a in arrays]
    std = z * c
    out: list[np.ndarray] = []
    for i, a in enumerate(arrays):
        noise = gen.normal(0.0, std, size=a.shape)
        with np.errstate(over="ignore"):
            noised = np.asarray(np.asarray(a, np.float64) + noise, dtype=a.dtype)
        if not np.all(np.isfinite(noised)) and np.all(np.isfinite(a)):
            raise PrivacyError(
                f"update[{i}] overflowed dtype {a.dtype} after adding noise with std {std:g}; "
                "use float32 arrays"
            )
        out.append(noised)
    return out


def secure_rng() -> np.random.Generator:
    """A fresh generator seeded with 256 bits from the operating system's CSPRNG (``secrets``).

    This is what production code passes to :func:`add_gaussian_noise`. The bit generator is
    PCG64DXSM: fast and statistically strong but not cryptographic, so the privacy of the noise
    rests on its seed and state staying on the device (they are never logged or sent). Create one
    generator per process or per round; never seed production noise with a constant.
    """
    seed = np.random.SeedSequence(secrets.randbits(256))
    return np.random.Generator(np.random.PCG64DXSM(seed))


# ---------------------------------------------------------------------------------------------
# Adaptive clipping (Andrew et al., NeurIPS 2021)
# ---------------------------------------------------------------------------------------------
def clip_indicator(norm: float, clip_norm: float) -> float:
    """The bit ``b_i`` of adaptive clipping: ``1.0`` if a device's update norm is ``<= clip_norm``.

    Each device computes it on its own, unclipped update norm (the second value returned by
    :func:`clip_update`) and sends it along with the update.
    """
    n = _non_negative_finite("norm", norm)
    c = _positive_finite("clip_norm", clip_norm)
    return 1.0 if n <= c else 0.0


def adaptive_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier left for the update sum when a private quantile estimate shares the budget.

    Andrew et al. 2021 (Theorem 1 and Section 3): releasing, in the same round, the noised sum of
    clipped updates with noise multiplier ``z_delta`` and the noised count of clipped-or-not bits
    with standard deviation ``sigma_b`` is, in privacy terms, one Gaussian mechanism with noise
    multiplier ``z`` where ``z^-2 = z_delta^-2 + (2 * sigma_b)^-2``. (A device's bit, centred as
    ``b_i - 1/2``, contributes at most ``1/2``; hence the factor 2.) So to spend exactly what a
    Gaussian with multiplier ``z`` spends, the update sum gets

        z_delta = (z^-2 - (2 * sigma_b)^-2) ^ (-1/2),

    and the ledger records the round with multiplier ``z``. The paper suggests
    ``sigma_b = expected devices per round / 20``.

    Raises:
        InputError: ``noise_multiplier`` or ``count_noise_std`` is not a finite number > 0, or
            ``count_noise_std <= noise_multiplier / 2`` (the count alone would then use up the
            whole budget).
    """
    z = _positive_finite("noise_multiplier", noise_multiplier)
    sb = _positive_finite("count_noise_std", count_noise_std)
    if 2.0 * sb <= z:
        raise InputError(
            f"count_noise_std must be > noise_multiplier / 2 = {z / 2:g} so that some budget is "
            f"left for the update sum, got {sb:g}; increase count_noise_std (the paper suggests "
            "expected devices per round / 20) or lower noise_multiplier"
        )
    return (z**-2 - (2.0 * sb) ** -2) ** -0.5


def noised_count(bits: Sequence[float], count_noise: float, rng: np.random.Generator) -> float:
    """``sum(bits) + N(0, count_noise^2)``: the private count of adaptive clipping.

    Central mode: the aggregator noises the count of the bits devices sent. Local mode: each
    device noises its own bit (a count of one) before it leaves.

    Raises:
        InputError: a bit is not 0 or 1, ``count_noise`` is not finite and > 0, or ``rng`` is
            not a Generator.
    """
    sb = _positive_finite("count_noise", count_noise)
    gen = _check_rng(rng)
    for i, b in enumerate(bits):
        if _as_float(f"bits[{i}]", b) not in (0.0, 1.0):
            raise InputError(f"bits[{i}] must be 0 or 1, got {b!r}")
    return float(sum(bits)) + float(gen.normal(0.0, sb))


def next_clip_norm(clip_norm: float, noisy_count: float, devices: int, target_quantile: float,
                   learning_rate: float) -> float:
    """Andrew et al. 2021, Algorithm 1: ``C * exp(-eta * (b_bar - gamma))``.

    ``b_bar = noisy_count / devices`` is the private estimate of the fraction of updates that
    were within ``C``, clamped to [0, 1] (post-processing: it costs no privacy and keeps one
    round's step within a factor ``exp(eta)``). With ``gamma = 0.5`` the clip norm tracks the
    median update norm.

    Raises:
        InputError: ``clip_norm`` or ``learning_rate`` not finite and > 0, ``target_quantile``
            outside (0, 1), ``devices`` < 1, or ``noisy_count`` not finite.
    """
    c = _positive_finite("clip_norm", clip_norm)
    eta = _positive_finite("learning_rate", learning_rate)
    gamma = _as_float("target_quantile", target_quantile)
    if not 0.0 < gamma < 1.0:
        raise InputError(f"target_quantile must be in (0, 1), got {target_quantile!r}")
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise InputError(f"devices must be an integer >= 1, got {devices!r}")
    count = _as_float("noisy_count", noisy_count)
    if not math.isfinite(count):
        raise InputError(f"noisy_count must be finite, got {noisy_count!r}")
    b_bar = min(1.0, max(0.0, count / devices))
    return c * math.exp(-eta * (b_bar - gamma))
