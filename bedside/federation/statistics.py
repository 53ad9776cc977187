"""Federated feature statistics: the model's input scaling from noised, accounted releases.

A model standardises its inputs, ``(x - loc) / scale``, inside its ONNX graph. Those constants
must come from public knowledge or from releases that are privatised and accounted, never from
pooled raw data (and never from rows that are later evaluated). Before training, a federation
with ``[statistics]`` runs one *statistics round*:

1. every device maps each record into a public frame, ``u = (x - c) / h`` (``c``, ``h``: midpoint
   and half-width of the feature's typical range ``[typical_min, typical_max]`` where the schema
   states one, else of its allowed range ``[min, max]``; clamped to [-1, 1]), and sums the
   per-record vectors ``[u, u^2, 1]`` (a time-series window contributes its means over time);
2. it clips each record's vector and the sum (to ``D``, ``device_records`` records' worth: a
   device with many records is down-weighted, its own means and variances unchanged, since
   clipping the sum scales all coordinates alike), and adds Gaussian noise to every coordinate;
3. the aggregator adds the devices' vectors and turns them into ``loc`` and ``scale``
   (:func:`combine`), written into the model's ``Standardize`` initializers and schema
   (:func:`bedside.models.onnx_weights.apply_statistics`). A statistics round that fails (too few
   devices) is retried at most twice; the vectors already received count towards the retry, and
   a device that released its statistics for the model declines the retry
   (``statistics_released``): it pays once.

Privacy, described as releases (``statistics_releases``) and accounted in every device's
ledger, enforced by the device itself (the noise is its own):

* record level, add/remove one record: each record's vector is clipped to L2 norm
  ``b = record_clip * sqrt(2F + 1)`` (``sqrt(2F + 1)`` is the largest it can be) and clipping the
  sum is a projection (1-Lipschitz), so noise of standard deviation ``z b`` makes the release
  one Gaussian mechanism with multiplier ``z``;
* device level, replace one device's data: the clipped sum moves by at most ``2D``
  (``D = device_records * b``), multiplier ``z b / (2 D) = z / (2 device_records)``.

The noisy variance can come out small or negative for a feature whose spread is small against
its public frame; ``scale`` is then floored at the larger of ``min_scale_fraction`` of the
half-width and the noise level of the estimate, and :func:`combine` reports which features were
floored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bedside.config import setting
from bedside.constants import UNIT_DEVICE, UNIT_RECORD
from bedside.errors import InputError
from bedside.privacy.ledger import Release
from bedside.schema import Schema


@dataclass(frozen=True)
class StatisticsSettings:
    """``[statistics]`` of aggregator.toml, and what a statistics round announces."""

    noise_multiplier: float = setting(1.0, "record-level noise multiplier z of the statistics "
                                      "release (noise std z times a record's bound)",
                                      positive=True, max=1e6)
    device_records: int = setting(256, "a device's sum is clipped to this many records' worth "
                                  "(its device-level sensitivity)", min=1, max=10**9)
    min_scale_fraction: float = setting(0.02, "scale is at least this fraction of the feature's "
                                        "public half-range", positive=True, max=1.0)
    record_clip: float = setting(0.8, "each record's vector [u, u^2, 1] is clipped to this fraction"
                                 " of its largest possible norm sqrt(2F + 1) (less: less noise, "
                                 "some bias)", positive=True, max=1.0)


def public_center_halfwidth(schema: Schema) -> tuple[np.ndarray, np.ndarray]:
    """Midpoint and half-width of each feature's frame (public knowledge): its typical range
    ``[typical_min, typical_max]`` where the schema states one, else its allowed range."""
    frames = [(f.typical_min, f.typical_max) if f.typical_min is not None else (f.min, f.max)
              for f in schema.features]
    lo = [a for a, _ in frames]
    hi = [b for _, b in frames]
    missing = [f.name for f, a, b in zip(schema.features, lo, hi, strict=True)
               if a is None or b is None or not b > a]
    if missing:
        raise InputError(f"federated statistics need an allowed range [min, max] (or a typical "
                         f"range) for every feature; these have none: {', '.join(missing[:8])}")
    lo_a, hi_a = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    return (lo_a + hi_a) / 2.0, (hi_a - lo_a) / 2.0


def dimension(schema: Schema) -> int:
    """Length of a statistics vector: F sums, F sums of squares, the count."""
    return 2 * schema.n_features + 1


def record_bound(schema: Schema, settings: StatisticsSettings) -> float:
    """The L2 bound of one record's vector: its record-level sensitivity."""
    return _bound(dimension(schema), settings)


def _bound(dim: int, settings: StatisticsSettings) -> float:
    return settings.record_clip * math.sqrt(dim)


def record_vectors(x: np.ndarray, schema: Schema, bound: float | None = None) -> np.ndarray:
    """``[u, u^2, 1]`` per record (time series: means over the window), shape ``[n, 2F + 1]``,
    each row clipped to L2 norm ``bound`` if given."""
    c, h = public_center_halfwidth(schema)
    a = np.asarray(x, np.float64)
    shape = (1, -1, 1) if schema.kind == "timeseries" else (1, -1)
    u = np.clip((a - c.reshape(shape)) / h.reshape(shape), -1.0, 1.0)
    if schema.kind == "timeseries":
        first, second = u.mean(axis=2), (u * u).mean(axis=2)
    else:
        first, second = u, u * u
    v = np.concatenate([first, second, np.ones((len(a), 1))], axis=1)
    if bound is not None:
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        v = v * np.minimum(1.0, bound / np.maximum(norms, 1e-12))
    return v


def device_bound(schema: Schema, settings: StatisticsSettings) -> float:
    """``D``: the L2 bound of a device's clipped sum."""
    return settings.device_records * record_bound(schema, settings)


def noise_std(schema: Schema, settings: StatisticsSettings) -> float:
    return settings.noise_multiplier * record_bound(schema, settings)


def local_statistics(x: np.ndarray, schema: Schema, settings: StatisticsSettings,
                     rng: np.random.Generator) -> np.ndarray:
    """A device's release: the clipped, noised sum of its records' vectors (float32)."""
    from bedside.privacy.mechanisms import add_gaussian_noise, clip_update

    bound = record_bound(schema, settings)
    s = (record_vectors(x, schema, bound).sum(axis=0) if len(x)
         else np.zeros(dimension(schema)))
    clipped, _ = clip_update([s], device_bound(schema, settings))
    noised = add_gaussian_noise(clipped, settings.noise_multiplier, bound, rng)[0]
    return np.asarray(noised, np.float32)


STATISTICS_NOTE = "feature statistics"
#: A device's default least noise multiplier for a statistics release (``[privacy]
#: min_statistics_noise``).
MIN_STATISTICS_NOISE = 0.5


def _model_tag(model_sha256: str) -> str:
    return f"{STATISTICS_NOTE} of model {model_sha256[:16]}"


def statistics_releases(round_id: int, settings: StatisticsSettings, fleet: str = "",
                        model_sha256: str = "") -> list[Release]:
    """The statistics round's releases, for the ledger (see the module docstring); the note
    names the model whose scaling they are for (:func:`released_for`).

    With a record's bound ``b``, noise ``z b`` and the device clip ``D = device_records * b``:
    record level multiplier ``z``; device level ``z b / (2 D) = z / (2 device_records)``.
    """
    head = _model_tag(model_sha256) if model_sha256 else STATISTICS_NOTE
    note = f"{head} (sums, sums of squares, count), noised on the device"
    return [
        Release(round=round_id, unit=UNIT_RECORD, mechanism="gaussian",
                noise_multiplier=settings.noise_multiplier, sample_rate=1.0, steps=1,
                note=note + "; add/remove one record", fleet=fleet),
        Release(round=round_id, unit=UNIT_DEVICE, mechanism="gaussian",
                noise_multiplier=settings.noise_multiplier / (2.0 * settings.device_records),
                sample_rate=1.0, steps=1, note=note + "; replace-one device, sensitivity 2D",
                fleet=fleet),
    ]


def released_for(ledger: Any, fleet: str, model_sha256: str) -> bool:
    """Whether ``ledger`` already holds this device's statistics release for the model
    ``model_sha256`` in ``fleet``: a device releases them once per model, so a retried
    statistics round never makes it pay twice (the aggregator keeps the earlier vectors)."""
    tag = _model_tag(model_sha256)
    return any(r.fleet == fleet and r.note.startswith(tag)
               for r in ledger.releases(UNIT_RECORD))


def noise_for_budget(record_epsilon: float, delta: float, share: float = 0.5) -> float:
    """The record-level noise multiplier at which the statistics release alone costs
    ``share * record_epsilon`` (at ``delta``), rounded up to 3 decimals. What the demo and the
    benchmarks announce for a fleet whose devices hold that budget: spent together with DP-SGD,
    the composed cost is lower (each device calibrates its DP-SGD noise to the rest of its
    budget, the statistics included)."""
    from bedside.privacy.accountant import calibrate

    if not 0.0 < share < 1.0:
        raise InputError(f"share must be between 0 and 1, got {share!r}")
    z = calibrate(record_epsilon * share, delta, 1.0, 1)
    return math.ceil(z * 1000.0) / 1000.0


def norm_bound(dim: int, settings: StatisticsSettings) -> float:
    """The largest norm an honest device's statistics vector of length ``dim`` has: its clip
    ``D`` plus a 1e-9 tail bound of its noise."""
    from bedside.federation.validate import NOISE_TAIL

    b = _bound(dim, settings)
    return settings.device_records * b + settings.noise_multiplier * b * (math.sqrt(dim) +
                                                                          NOISE_TAIL)


def combine(vectors: Sequence[np.ndarray], schema: Schema,
            settings: StatisticsSettings) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``loc`` and ``scale`` (in the features' own units) from the devices' noised vectors, and
    what was estimated: the effective record count (noised; a record whose vector was clipped
    counts partly, and so does a device whose sum was) and the floored features."""
    if not vectors:
        raise InputError("no statistics to combine: no device answered the statistics round")
    f = schema.n_features
    total = np.sum(np.asarray(vectors, np.float64), axis=0)
    count = float(total[-1])
    c, h = public_center_halfwidth(schema)
    if not count >= 1.0:
        raise InputError(f"the noised record count is {count:.3g}: too little data behind the "
                         "statistics round to estimate the input scaling")
    mean_u = np.clip(total[:f] / count, -1.0, 1.0)
    var_u = total[f:2 * f] / count - mean_u ** 2
    # The variance estimate carries noise of standard deviation about sigma * sqrt(K) / count
    # * (1 + 2 |mean|) (K devices): below that level it cannot be told from zero, so it is floored
    # there (a too-large scale only shrinks inputs; a near-zero one would blow them up).
    noise_var = noise_std(schema, settings) * math.sqrt(len(vectors)) / count * (
        1.0 + 2.0 * np.abs(mean_u))
    floor = np.maximum(settings.min_scale_fraction ** 2, noise_var)
    sd_u = np.sqrt(np.maximum(var_u, floor))
    floored = [schema.features[i].name for i in np.flatnonzero(var_u < floor)]
    loc = c + h * mean_u
    scale = h * sd_u
    return loc, scale, {"records": round(count, 1), "floored": floored,
                        "noise_multiplier": settings.noise_multiplier,
                        "device_records": settings.device_records}
