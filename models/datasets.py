"""Reference data sets, a user's own CSV, and the splits used to train and test on them.

Three built-in data sets, each returned as a :class:`Dataset` whose :class:`~bedside.schema.Schema`
carries public scaling constants and allowed ranges (see ``docs/datasets.md``):

``wdbc``
    Wisconsin Diagnostic Breast Cancer (scikit-learn copy of the UCI set): 569 x 30, binary.
``digits``
    scikit-learn's 8x8 hand-written digits (UCI Optical Recognition of Handwritten Digits):
    1797 x 64, ten classes.
``vitals``
    synthetic bedside vital-sign windows (heart rate, respiratory rate, SpO2, systolic blood
    pressure, temperature) labelled stable or deteriorating; generated, seeded.

The schemas' scaling constants (``loc``/``scale``) need no data: the midpoint and half-width of
the published or clinical range (``digits``, ``wdbc``) or typical adult values (``vitals``); a
user's CSV gets ``loc`` 0 and ``scale`` 1. A model gets its real scaling from rows it may use:
``bedside models export`` standardises on its training split, a federation on its noised,
accounted feature statistics (:mod:`bedside.federation.statistics`); :func:`fit_scaling` does
the former. Never from rows that are later evaluated.

This module imports neither torch nor (except inside the two scikit-learn loaders) scikit-learn:
the aggregator and the demo use it without the ``train`` extra.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bedside.errors import DataError, InputError
from bedside.schema import Feature, Schema
from bedside.tabular import read_csv, read_rows, write_csv

log = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "VITALS_CHANNELS",
    "WDBC_SUMMARY_STATISTICS",
    "Dataset",
    "digits_schema",
    "fit_scaling",
    "infer_ranges",
    "load",
    "load_csv",
    "load_digits",
    "load_wdbc",
    "make_vitals",
    "parse_summary_statistics",
    "to_csv",
    "train_test_split",
    "vitals_schema",
    "wdbc_schema",
]

#: Names accepted by :func:`load`.
DATASETS: tuple[str, ...] = ("wdbc", "digits", "vitals")


# -------------------------------------------------------------------------------------------------
# The container
# -------------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """Inputs ``x`` (float32, the schema's input shape), labels ``y`` (int64 class indices).

    ``schema`` describes the columns (units, allowed range, scaling) and the class labels;
    ``description`` and ``source`` say what the data is and where it comes from.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    schema: Schema
    description: str = ""
    source: str = ""
    #: patient attributes per example (not model inputs): the groups a fairness check compares,
    #: e.g. {"age_band": [...], "sex": [...]}
    attributes: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.x = np.ascontiguousarray(self.x, dtype=np.float32)
        self.y = np.ascontiguousarray(self.y, dtype=np.int64)
        want = self.schema.input_shape[1:]
        if self.x.ndim != len(want) + 1 or list(self.x.shape[1:]) != want:
            raise InputError(
                f"data set {self.name!r}: x has shape {list(self.x.shape)} but the schema "
                f"expects {['n', *want]}"
            )
        if self.y.ndim != 1 or len(self.y) != len(self.x):
            raise InputError(
                f"data set {self.name!r}: y has shape {list(self.y.shape)}; expected one label "
                f"per row of x ({len(self.x)})"
            )
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= self.schema.n_classes):
            raise InputError(
                f"data set {self.name!r}: labels must be class indices "
                f"0..{self.schema.n_classes - 1}"
            )

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Dataset:
        """The rows ``indices`` (in that order) as a new :class:`Dataset` with the same schema."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise InputError(
                f"data set {self.name!r}: subset index out of range 0..{len(self) - 1}"
            )
        return replace(self, x=self.x[idx], y=self.y[idx],
                       attributes={k: v[idx] for k, v in self.attributes.items()})


def _half_range(lo: float, hi: float) -> tuple[float, float]:
    """``loc = (lo + hi) / 2``, ``scale = (hi - lo) / 2``; a zero-width range gets scale 1."""
    width = (hi - lo) / 2.0
    return (lo + hi) / 2.0, (width if width > 0 else 1.0)


# -------------------------------------------------------------------------------------------------
# WDBC
# -------------------------------------------------------------------------------------------------
#: The published summary statistics of WDBC (min, max per feature), as printed in the data set's
#: documentation (UCI ``wdbc.names`` via scikit-learn's ``load_breast_cancer().DESCR``, table
#: "Summary Statistics"). They are the minimum and maximum over the whole public data set, rounded
#: as published. Keyed by scikit-learn's feature names; a test checks this copy against the
#: ``DESCR`` of the installed scikit-learn.
WDBC_SUMMARY_STATISTICS: dict[str, tuple[float, float]] = {
    "mean radius": (6.981, 28.11),
    "mean texture": (9.71, 39.28),
    "mean perimeter": (43.79, 188.5),
    "mean area": (143.5, 2501.0),
    "mean smoothness": (0.053, 0.163),
    "mean compactness": (0.019, 0.345),
    "mean concavity": (0.0, 0.427),
    "mean concave points": (0.0, 0.201),
    "mean symmetry": (0.106, 0.304),
    "mean fractal dimension": (0.05, 0.097),
    "radius error": (0.112, 2.873),
    "texture error": (0.36, 4.885),
    "perimeter error": (0.757, 21.98),
    "area error": (6.802, 542.2),
    "smoothness error": (0.002, 0.031),
    "compactness error": (0.002, 0.135),
    "concavity error": (0.0, 0.396),
    "concave points error": (0.0, 0.053),
    "symmetry error": (0.008, 0.079),
    "fractal dimension error": (0.001, 0.03),
    "worst radius": (7.93, 36.04),
    "worst texture": (12.02, 49.54),
    "worst perimeter": (50.41, 251.2),
    "worst area": (185.2, 4254.0),
    "worst smoothness": (0.071, 0.223),
    "worst compactness": (0.027, 1.058),
    "worst concavity": (0.0, 1.252),
    "worst concave points": (0.0, 0.291),
    "worst symmetry": (0.156, 0.664),
    "worst fractal dimension": (0.055, 0.208),
}

# Base measurement -> (unit, what it is). The UCI documentation gives no units; the features are
# computed from a digitised image of a fine needle aspirate (FNA), so lengths are in pixels.
_WDBC_BASE: dict[str, tuple[str, str]] = {
    "radius": ("px", "radius: mean of distances from the centre to points on the perimeter"),
    "texture": ("gray level", "texture: standard deviation of gray-scale values"),
    "perimeter": ("px", "perimeter of the nucleus contour"),
    "area": ("px^2", "area of the nucleus"),
    "smoothness": ("", "smoothness: local variation in radius lengths"),
    "compactness": ("", "compactness: perimeter^2 / area - 1.0"),
    "concavity": ("", "concavity: severity of concave portions of the contour"),
    "concave points": ("", "concave points: number of concave portions of the contour"),
    "symmetry": ("", "symmetry of the nucleus"),
    "fractal dimension": ("", 'fractal dimension: "coastline approximation" - 1'),
}
_WDBC_STATS = {
    "mean": "mean over the cell nuclei in the image of the {}",
    "error": "standard error over the cell nuclei in the image of the {}",
    "worst": "mean of the three largest values over the cell nuclei in the image of the {}",
}
_WDBC_UNITS_NOTE = (
    "Computed from a digitised image of a fine needle aspirate of a breast mass; the UCI "
    "documentation gives no units, so lengths are image pixels (px), areas px^2, texture gray "
    "levels, the rest dimensionless."
)
_DESCR_ROW = re.compile(
    r"^\s*(?P<base>[a-z ]+?) \((?P<stat>mean|standard error|worst)\):\s+"
    r"(?P<min>[-+0-9.eE]+)\s+(?P<max>[-+0-9.eE]+)\s*$"
)


def parse_summary_statistics(descr: str) -> dict[str, tuple[float, float]]:
    """Parse the "Summary Statistics" Min/Max table of ``load_breast_cancer().DESCR``.

    Returns ``{scikit-learn feature name: (min, max)}``, e.g. ``"radius (standard error)"`` is
    returned as ``"radius error"``.
    """
    out: dict[str, tuple[float, float]] = {}
    for line in descr.splitlines():
        m = _DESCR_ROW.match(line)
        if not m:
            continue
        base, stat = m["base"], m["stat"]
        name = {"mean": f"mean {base}", "standard error": f"{base} error",
                "worst": f"worst {base}"}[stat]
        out[name] = (float(m["min"]), float(m["max"]))
    return out


def _wdbc_feature(name: str) -> Feature:
    if name.startswith("mean "):
        stat, base = "mean", name[len("mean "):]
    elif name.startswith("worst "):
        stat, base = "worst", name[len("worst "):]
    else:
        stat, base = "error", name[: -len(" error")]
    unit, what = _WDBC_BASE[base]
    lo, hi = WDBC_SUMMARY_STATISTICS[name]
    loc, scale = _half_range(lo, hi)
    return Feature(
        name=name, unit=unit, min=0.0, max=2.0 * hi, loc=loc, scale=scale, typical_min=lo,
        typical_max=hi,
        description=f"{_WDBC_STATS[stat].format(what)}. {_WDBC_UNITS_NOTE}",
    )


def wdbc_schema() -> Schema:
    """The WDBC input schema, built from stored summary statistics (no data needed).

    The allowed range is ``[0, 2 * published max]``: every feature is a non-negative
    measurement, and a value beyond twice the largest in the reference set is most likely a unit
    or data-entry error. The typical range is the published ``[min, max]``, and ``loc``/``scale``
    map it to [-1, 1]: a placeholder that needs no data. A model trained on these features gets
    its scaling from rows it may use: the training split of the one engineer exporting it
    (``bedside models export``), or the federation's noised, accounted feature statistics
    (:mod:`bedside.federation.statistics`).
    Statistics computed over all 569 rows would include every test row.
    """
    return Schema(
        features=tuple(_wdbc_feature(n) for n in WDBC_SUMMARY_STATISTICS),
        labels=("malignant", "benign"),
    )


def load_wdbc() -> Dataset:
    """Wisconsin Diagnostic Breast Cancer from scikit-learn: 569 x 30, 0 = malignant, 1 = benign."""
    from sklearn.datasets import load_breast_cancer  # the `train` extra; imported only here

    raw = load_breast_cancer()
    schema = wdbc_schema()
    names = [str(n) for n in raw.feature_names]
    if names != schema.feature_names:
        raise DataError(
            "wdbc: the installed scikit-learn names the features differently from Bedside's "
            f"published table ({names[:3]}...); upgrade or report this"
        )
    if [str(t) for t in raw.target_names] != list(schema.labels):
        raise DataError(f"wdbc: unexpected class names {list(raw.target_names)}")
    return Dataset(
        name="wdbc",
        x=np.asarray(raw.data, dtype=np.float32),
        y=np.asarray(raw.target, dtype=np.int64),
        schema=schema,
        description=(
            "Wisconsin Diagnostic Breast Cancer: 30 features of the cell nuclei in a digitised "
            "image of a fine needle aspirate of a breast mass (mean, standard error and worst of "
            "10 measurements); 212 malignant, 357 benign."
        ),
        source=(
            "scikit-learn load_breast_cancer (copy of UCI ML Breast Cancer Wisconsin (Diagnostic), "
            "Wolberg, Street, Mangasarian 1995; https://doi.org/10.24432/C5DW2B)"
        ),
    )


# -------------------------------------------------------------------------------------------------
# digits
# -------------------------------------------------------------------------------------------------
def digits_schema() -> Schema:
    """64 pixel intensities 0..16 (row-major 8x8), loc 8, scale 8, allowed [0, 16]."""
    feats = tuple(
        Feature(
            name=f"pixel_r{r}_c{c}", unit="", min=0.0, max=16.0, loc=8.0, scale=8.0,
            description=f"count of set pixels (0..16) in the 4x4 block at row {r}, column {c} of "
                        "the 32x32 bitmap, downsampled to 8x8",
        )
        for r in range(8) for c in range(8)
    )
    return Schema(features=feats, labels=tuple(str(d) for d in range(10)))


def load_digits() -> Dataset:
    """scikit-learn's hand-written digits: 1797 x 64 (8x8 images, values 0..16), classes 0..9."""
    from sklearn.datasets import load_digits as _sk_digits  # the `train` extra; imported only here

    raw = _sk_digits()
    return Dataset(
        name="digits",
        x=np.asarray(raw.data, dtype=np.float32),
        y=np.asarray(raw.target, dtype=np.int64),
        schema=digits_schema(),
        description=(
            "8x8 images of hand-written digits: each pixel counts the set pixels (0..16) of a 4x4 "
            "block of a 32x32 bitmap; 1797 images, 10 classes."
        ),
        source=(
            "scikit-learn load_digits (test part of UCI Optical Recognition of Handwritten Digits, "
            "Alpaydin and Kaynak 1998; https://doi.org/10.24432/C50P49)"
        ),
    )


# -------------------------------------------------------------------------------------------------
# vitals (synthetic)
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Channel:
    name: str
    unit: str
    lo: float  # allowed range (clinically possible values)
    hi: float
    loc: float  # public scaling constants (typical adult value, typical spread)
    scale: float
    description: str


#: The five channels of the vitals data set, in input order.
VITALS_CHANNELS: tuple[_Channel, ...] = (
    _Channel("heart_rate", "bpm", 20, 250, 80, 40, "heart rate"),
    _Channel("resp_rate", "breaths/min", 4, 60, 16, 8, "respiratory rate"),
    _Channel("spo2", "%", 50, 100, 95, 5, "peripheral oxygen saturation (pulse oximetry)"),
    _Channel("sbp", "mmHg", 50, 250, 120, 30, "systolic blood pressure"),
    _Channel("temp", "degC", 30, 43, 37, 1, "body temperature"),
)

# Generator parameters, per channel in VITALS_CHANNELS order (see docs/datasets.md).
_BASE_MEAN = np.array([80.0, 16.0, 96.5, 125.0, 36.9])  # per-patient baseline: mean
_BASE_SD = np.array([12.0, 2.5, 1.5, 17.0, 0.4])        # ... and spread between patients
_BASE_LO = np.array([45.0, 9.0, 88.0, 85.0, 35.6])      # baselines are drawn inside these
_BASE_HI = np.array([125.0, 26.0, 100.0, 190.0, 38.4])
_AR_PHI = 0.98                                          # AR(1) coefficient per one-minute step
_AR_SD = np.array([3.0, 1.2, 0.8, 5.0, 0.08])           # stationary sd of the AR(1) fluctuation
_DRIFT_SD = np.array([8.0, 2.0, 1.2, 10.0, 0.3])        # benign linear drift over a window
_NOISE_SD = np.array([0.5, 0.5, 0.3, 2.0, 0.03])        # measurement noise
_RESOLUTION = np.array([1.0, 1.0, 1.0, 1.0, 0.1])       # the monitor's display resolution
# Deterioration: the full change at severity 1, in the direction of an early warning score
# (NEWS2): heart rate and respiratory rate up, SpO2 and SBP down, temperature away from normal
# (up in 75% of cases, down otherwise). It ramps linearly from the onset over the duration.
_DETERIORATION = np.array([45.0, 13.0, -9.0, -45.0, 2.2])
_ONSET_LATEST = 0.6        # onset minute is uniform over the first 60% of the window
_DURATION = (10.0, 40.0)   # minutes from onset to the full change, uniform
_SEVERITY = (0.3, 1.0)     # fraction of the full change, uniform
_P_INVOLVED = 0.7          # each channel takes part with this probability (at least one does)
_P_COPD = 0.10             # patients with a chronically low SpO2 baseline
_P_DROPOUT = 0.10          # windows with an SpO2 probe dropout (2-6 minutes reading 70-88%)
_P_MOTION = 0.05           # windows with a heart-rate motion artefact (1-3 minutes, +20-50 bpm)


AGE_BANDS = ("18-44", "45-64", "65-79", "80+")


def _vitals_attributes(x: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Each window's patient's age band and sex, for fairness checks (not model inputs).

    Drawn from their own random stream, after the windows, so the windows and labels are the
    same as without them. Age leans on the window's mean systolic pressure (which rises with age
    in adults), so that groups differ in their inputs as real patient groups do."""
    rng = np.random.default_rng([seed, 0xA6E])
    sbp = x[:, 3, :].mean(axis=1)
    score = (sbp - 125.0) / 17.0 + rng.normal(0.0, 1.0, len(x))
    band = np.digitize(score, [-0.8, 0.3, 1.2])
    sex = np.where(rng.random(len(x)) < 0.5, "F", "M")
    return {"age_band": np.array([AGE_BANDS[b] for b in band]), "sex": sex}


def _as_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def vitals_schema(window: int = 60) -> Schema:
    """Schema of :func:`make_vitals`: five channels, a window of ``window`` one-minute steps."""
    feats = tuple(
        Feature(name=c.name, unit=c.unit, min=float(c.lo), max=float(c.hi), loc=float(c.loc),
                scale=float(c.scale),
                description=f"{c.description} ({c.unit}), one reading per minute")
        for c in VITALS_CHANNELS
    )
    return Schema(
        features=feats, labels=("stable", "deteriorating"), kind="timeseries", window=window,
        group_column="window_id", order_column="t",
    )


def make_vitals(
    n_windows: int = 2000, window: int = 60, seed: int = 0, positive_rate: float = 0.2
) -> Dataset:
    """Synthetic bedside vital signs: ``n_windows`` windows of ``window`` one-minute readings.

    Each window is a different patient. The model (details in ``docs/datasets.md``):

    * a per-patient baseline per channel from a clinical distribution (some patients have a
      chronically low SpO2, as in COPD);
    * an AR(1) physiological fluctuation (phi 0.98 per minute) plus a benign linear drift of random
      sign, plus measurement noise, rounded to the monitor's display resolution;
    * artefacts independent of the label: SpO2 probe dropouts (a few minutes of implausibly low
      readings, clipped to a possible value, never NaN) and motion spikes in heart rate;
    * exactly ``round(n_windows * positive_rate)`` deteriorating windows carry a trend that starts
      at a random minute and grows at a random rate in the direction of an early-warning score, on
      a random non-empty subset of the channels.

    All values lie inside the schema's allowed ranges. Same arguments, same data.
    """
    n_windows = _as_int("n_windows", n_windows, 1)
    window = _as_int("window", window, 2)
    if not 0.0 <= positive_rate <= 1.0:
        raise InputError(f"positive_rate must be in [0, 1], got {positive_rate!r}")
    rng = np.random.default_rng(seed)
    n, w, c = n_windows, window, len(VITALS_CHANNELS)
    t = np.arange(w, dtype=np.float64)

    n_pos = round(n * positive_rate)
    y = np.zeros(n, dtype=np.int64)
    y[rng.permutation(n)[:n_pos]] = 1

    # Per-patient baselines; 10% of patients have a chronically low SpO2 (e.g. COPD).
    base = np.clip(rng.normal(_BASE_MEAN, _BASE_SD, size=(n, c)), _BASE_LO, _BASE_HI)
    copd = rng.random(n) < _P_COPD
    base[copd, 2] = np.clip(rng.normal(91.0, 1.5, size=int(copd.sum())), 86.0, 95.0)

    # AR(1) fluctuation, started from its stationary distribution.
    innov_sd = _AR_SD * math.sqrt(1.0 - _AR_PHI**2)
    ar = np.empty((n, c, w))
    ar[:, :, 0] = rng.normal(0.0, _AR_SD, size=(n, c))
    eps = rng.normal(0.0, 1.0, size=(n, c, w)) * innov_sd[None, :, None]
    for k in range(1, w):
        ar[:, :, k] = _AR_PHI * ar[:, :, k - 1] + eps[:, :, k]

    # Benign drift: every patient's vitals wander a little, in any direction.
    drift = rng.normal(0.0, _DRIFT_SD, size=(n, c))[:, :, None] * (t / w)[None, None, :]

    # Deterioration: onset, severity, which channels, direction of temperature.
    onset = rng.uniform(0.0, _ONSET_LATEST * w, size=n)
    severity = rng.uniform(*_SEVERITY, size=n)
    involved = rng.random((n, c)) < _P_INVOLVED
    none = ~involved.any(axis=1)
    involved[none, rng.integers(0, c, size=int(none.sum()))] = True
    direction = np.ones((n, c))
    direction[:, 4] = np.where(rng.random(n) < 0.75, 1.0, -1.0)
    duration = rng.uniform(*_DURATION, size=n)
    ramp = np.clip((t[None, :] - onset[:, None]) / duration[:, None], 0.0, 1.0)  # [n, w]
    amp = _DETERIORATION[None, :] * direction * involved * severity[:, None] * y[:, None]
    trend = amp[:, :, None] * ramp[:, None, :]

    noise = rng.normal(0.0, 1.0, size=(n, c, w)) * _NOISE_SD[None, :, None]
    x = base[:, :, None] + ar + drift + trend + noise

    # Artefacts, independent of the label.
    dropout = np.flatnonzero(rng.random(n) < _P_DROPOUT)
    for i in dropout:
        length = int(rng.integers(2, 7))
        start = int(rng.integers(0, max(1, w - length + 1)))
        x[i, 2, start:start + length] = rng.uniform(70.0, 88.0, size=min(length, w - start))
    motion = np.flatnonzero(rng.random(n) < _P_MOTION)
    for i in motion:
        length = int(rng.integers(1, 4))
        start = int(rng.integers(0, max(1, w - length + 1)))
        x[i, 0, start:start + length] += rng.uniform(20.0, 50.0)

    x = np.round(x / _RESOLUTION[None, :, None]) * _RESOLUTION[None, :, None]
    lo = np.array([ch.lo for ch in VITALS_CHANNELS])[None, :, None]
    hi = np.array([ch.hi for ch in VITALS_CHANNELS])[None, :, None]
    x = np.clip(x, lo, hi).astype(np.float32)
    return Dataset(
        name="vitals",
        x=x,
        y=y,
        attributes=_vitals_attributes(x, seed),
        schema=vitals_schema(window),
        description=(
            f"Synthetic bedside vital signs: {n} windows of {w} one-minute readings of heart rate, "
            "respiratory rate, SpO2, systolic blood pressure and temperature; label "
            "'deteriorating' when an early-warning-score trend starts in the window "
            f"({n_pos} of {n}, seed {seed})."
        ),
        source=f"generated by bedside.models.datasets.make_vitals(seed={seed})",
    )


# -------------------------------------------------------------------------------------------------
# by name
# -------------------------------------------------------------------------------------------------
_LOADERS: dict[str, Callable[..., Dataset]] = {
    "wdbc": load_wdbc,
    "digits": load_digits,
    "vitals": make_vitals,
}


_SCHEMAS: dict[str, Callable[[], Schema]] = {
    "wdbc": wdbc_schema,
    "digits": digits_schema,
    "vitals": vitals_schema,
}


def schema_of(name: str) -> Schema:
    """The schema of built-in data set ``name`` with its default options, without loading (or
    generating) its rows: no scikit-learn, nothing slow."""
    if name not in _SCHEMAS:
        raise InputError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    return _SCHEMAS[name]()


def load(name: str, **kwargs: Any) -> Dataset:
    """Load a built-in data set by name (:data:`DATASETS`); ``kwargs`` go to its loader."""
    loader = _LOADERS.get(name)
    if loader is None:
        raise InputError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    params = inspect.signature(loader).parameters
    bad = sorted(set(kwargs) - set(params))
    if bad:
        allowed = ", ".join(params) or "none"
        raise InputError(
            f"data set {name!r} does not take option(s) {', '.join(bad)}; it takes: {allowed}"
        )
    return loader(**kwargs)


# -------------------------------------------------------------------------------------------------
# a user's own CSV
# -------------------------------------------------------------------------------------------------
def _label_order(values: set[str]) -> list[str]:
    """Distinct labels, sorted: numerically when they are all integers, else as strings."""
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


def _infer_schema(path: Path, label_column: str) -> Schema:
    header, rows = read_rows(path)
    if label_column not in header:
        shown = ", ".join(header[:12]) + (" ..." if len(header) > 12 else "")
        raise DataError(
            f"{path}: label column {label_column!r} is missing; the header has: {shown}. "
            "Columns are matched by exact name."
        )
    for j, name in enumerate(header):
        if not name:
            raise DataError(f"{path}: column {j + 1} has an empty name in the header; name it")
    width = len(header)
    for i, r in enumerate(rows, start=1):
        if len(r) != width:
            raise DataError(
                f"{path}: row {i} (line {i + 1}) has {len(r)} fields but the header has {width}; "
                "check for a stray or missing comma"
            )
    label_idx = header.index(label_column)
    features = [(j, name) for j, name in enumerate(header) if j != label_idx]
    if not features:
        raise DataError(f"{path}: no feature columns besides the label column {label_column!r}")
    for j, name in features:
        for i, r in enumerate(rows, start=1):
            text = r[j].strip()
            try:
                float(text)
            except ValueError:
                what = "is empty" if not text else f"{text[:40]!r} is not a number"
                raise DataError(
                    f"{path}: row {i} (line {i + 1}), column {name!r}: {what}. Every column "
                    f"except the label {label_column!r} must be a numeric feature: drop "
                    f"identifier and free-text columns (such as {name!r}) from the file, and fill "
                    "in or drop rows with missing values (Bedside does not impute)"
                ) from None
    raw_labels = [r[label_idx].strip() for r in rows]
    for i, v in enumerate(raw_labels, start=1):
        if not v:
            raise DataError(
                f"{path}: row {i} (line {i + 1}), column {label_column!r}: the label is empty; "
                "fill it in or drop the row"
            )
    labels = _label_order(set(raw_labels))
    counts = {lab: raw_labels.count(lab) for lab in labels}
    if len(labels) < 2:
        raise DataError(
            f"{path}: column {label_column!r} holds only one class ({labels[0]!r}); a classifier "
            "needs at least two"
        )
    rare = [f"{lab!r} ({counts[lab]} row)" for lab in labels if counts[lab] < 2]
    if rare:
        raise DataError(
            f"{path}: column {label_column!r}: every class needs at least 2 rows (one to train, "
            f"one to test); too few: {', '.join(rare)}. Merge or drop the rare classes"
        )
    for j, name in features:
        column = {r[j].strip() for r in rows}
        if len(column) == 1:
            log.warning("%s: column %r is constant (%s); it carries no information", path, name,
                        next(iter(column)))
        if re.search(r"(^|[_\s-])id$", name.lower()):
            log.warning("%s: column %r looks like an identifier; drop it unless it is a genuine "
                        "feature", path, name)
    return Schema(
        features=tuple(Feature(name=name) for _, name in features),
        labels=tuple(labels),
    )


def load_csv(path: str | Path, label_column: str, schema: Schema | None = None) -> Dataset:
    """A user's own CSV (the demo's ``--data FILE.csv --label COLUMN``) as a :class:`Dataset`.

    With ``schema``, the file is read according to it (tabular or long-format timeseries).
    Without, a tabular schema is inferred: every column except ``label_column`` is a numeric
    feature (a non-numeric cell is a :class:`~bedside.errors.DataError` naming row and column:
    drop id and free-text columns first), the labels are the distinct values of the label column
    (sorted numerically if all are integers, else as text; at least two classes of at least two
    rows each). The inferred schema has no allowed range and ``loc`` 0 / ``scale`` 1: scaling
    constants must not be fitted on data that may later be split for testing or that belongs to
    a clinic; fit them with :func:`fit_scaling` on a reference array the caller may use.
    """
    path = Path(path)
    if schema is None:
        schema = _infer_schema(path, label_column)
    table = read_csv(path, schema, label_column)
    assert table.y is not None
    return Dataset(
        name=re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem) or "data",
        x=table.x,
        y=table.y,
        schema=schema,
        description=f"user data from {path.name} (label column {label_column!r}, "
                    f"{len(table.y)} {'windows' if schema.kind == 'timeseries' else 'rows'})",
        source=str(path),
    )


def _reference(schema: Schema, x_reference: np.ndarray, who: str) -> tuple[np.ndarray,
                                                                             tuple[int, ...]]:
    """``x_reference`` as float64 after the checks every fit needs, and the axes to reduce."""
    x = np.asarray(x_reference, dtype=np.float64)
    want = schema.input_shape[1:]
    if x.ndim != len(want) + 1 or list(x.shape[1:]) != want or len(x) == 0:
        raise InputError(f"{who}: the reference has shape {list(x.shape)}; expected at least one "
                         f"row of {want}")
    if not np.isfinite(x).all():
        raise InputError(f"{who}: the reference holds NaN or infinite values")
    return x, ((0, 2) if schema.kind == "timeseries" else (0,))


def fit_scaling(
    schema: Schema, x_reference: np.ndarray, *, method: Literal["range", "standard"] = "range"
) -> Schema:
    """Return ``schema`` with ``loc``/``scale`` fitted on ``x_reference``; ranges unchanged.

    ``method="range"``: ``loc`` is the mid-range and ``scale`` the half-range, so the reference
    maps to [-1, 1]. ``"standard"``: mean and standard deviation. A constant feature gets
    ``scale`` 1.

    Which data is a legitimate reference is the caller's decision, and it matters: the constants
    travel inside the model to every device. Use rows that are never evaluated and that the
    caller may use, such as the training split of the file an engineer exports a starting model
    from on their own machine; never pooled clinic records. Fitting on a test split leaks it
    into the model.
    """
    x, axes = _reference(schema, x_reference, "fit_scaling")
    if method == "range":
        lo, hi = x.min(axis=axes), x.max(axis=axes)
        pairs = [_half_range(float(a), float(b)) for a, b in zip(lo, hi, strict=True)]
    elif method == "standard":
        mean, sd = x.mean(axis=axes), x.std(axis=axes)
        pairs = [(float(m), float(s) if s > 0 else 1.0) for m, s in zip(mean, sd, strict=True)]
    else:
        raise InputError(f"fit_scaling: method must be 'range' or 'standard', not {method!r}")
    return schema.with_scaling([p[0] for p in pairs], [p[1] for p in pairs])


def _coarse(value: float, exponent: int, up: bool) -> float:
    """``value`` rounded outward (``up``: to +inf) to a multiple of ``10 ** exponent``."""
    k = value / 10.0 ** exponent
    return round((math.ceil(k) if up else math.floor(k)) * 10.0 ** exponent, max(0, -exponent))


def infer_ranges(schema: Schema, x_reference: np.ndarray, margin: float = 0.5) -> Schema:
    """``schema`` with an allowed range for every feature that has none, and ``loc``/``scale``
    of those features set to the range's midpoint and half-width (a placeholder that needs no
    statistics).

    A real deployment writes its features' plausible ranges into its schema from clinical
    knowledge; this stands in for that knowledge when a user brings a CSV: the reference's
    observed ``[lo, hi]`` widened by ``margin`` times its span on each side and rounded outward
    to the span's order of magnitude (a power of ten), so that the range does not carry the
    exact extreme values (a feature never negative in the reference keeps a lower bound of at
    least 0; a constant feature gets ``[v - 1, v + 1]``). The ranges travel inside the model,
    and a record outside them is refused: use rows that are never evaluated.
    """
    x, axes = _reference(schema, x_reference, "infer_ranges")
    if not margin >= 0:
        raise InputError(f"infer_ranges: margin must be >= 0, got {margin!r}")
    lo_all, hi_all = x.min(axis=axes), x.max(axis=axes)
    feats = []
    for f, lo, hi in zip(schema.features, lo_all, hi_all, strict=True):
        if f.min is not None and f.max is not None:
            feats.append(f)
            continue
        span = float(hi - lo)
        if span > 0:
            e = math.floor(math.log10(span))
            a = _coarse(float(lo) - margin * span, e, up=False)
            b = _coarse(float(hi) + margin * span, e, up=True)
            if lo >= 0:
                a = max(a, 0.0)
        else:
            a, b = float(lo) - 1.0, float(hi) + 1.0
        a = a if f.min is None else f.min
        b = b if f.max is None else f.max
        c, h = _half_range(a, b)
        feats.append(replace(f, min=a, max=b, loc=c, scale=h))
    return replace(schema, features=tuple(feats))


# -------------------------------------------------------------------------------------------------
# splits and CSV output
# -------------------------------------------------------------------------------------------------
def train_test_split(
    ds: Dataset, test_fraction: float = 0.2, seed: int = 0, stratify: bool = True
) -> tuple[Dataset, Dataset]:
    """Split ``ds`` into (train, test), seeded; numpy only.

    Stratified: each class contributes ``round(test_fraction * class size)`` rows to the test set,
    at least one and at most all but one when the class has two or more rows. Rows keep their
    original order within each part.
    """
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction must be between 0 and 1, got {test_fraction!r}")
    n = len(ds)
    if n < 2:
        raise DataError(f"data set {ds.name!r} has {n} row(s); a train/test split needs 2 or more")
    rng = np.random.default_rng(seed)

    def take(count: int, size: int) -> int:
        return min(max(count, 1), size - 1) if size >= 2 else count

    if stratify:
        test_parts = []
        for cls in np.unique(ds.y):
            members = rng.permutation(np.flatnonzero(ds.y == cls))
            k = take(round(test_fraction * len(members)), len(members))
            test_parts.append(members[:k])
        test_idx = np.concatenate(test_parts)
    else:
        test_idx = rng.permutation(n)[: take(round(test_fraction * n), n)]
    mask = np.zeros(n, dtype=bool)
    mask[test_idx] = True
    return ds.subset(np.flatnonzero(~mask)), ds.subset(np.flatnonzero(mask))


def _fmt(v: np.float32) -> str:
    """Shortest text that reads back as the same float32 (e.g. ``36.9``, not ``36.900001...``)."""
    return str(np.float32(v))


def to_csv(ds: Dataset, path: str | Path, label_column: str = "label") -> Path:
    """Write ``ds`` as CSV readable by ``bedside.tabular.read_csv(path, ds.schema, label_column)``.

    Tabular: one row per example, the feature columns then the label (as its class name).
    Timeseries: long format, one row per time step: ``window_id``, ``t`` (the schema's group and
    order columns), the features, the label (repeated on each row of a window).
    """
    path = Path(path)
    schema = ds.schema
    names = schema.feature_names
    reserved = set(names)
    if schema.kind == "timeseries":
        reserved |= {schema.group_column or "", schema.order_column or ""}
    if label_column in reserved:
        raise InputError(f"to_csv: label column {label_column!r} clashes with another column")
    labels = [schema.labels[k] for k in ds.y]
    rows: list[list[object]] = []
    if schema.kind == "tabular":
        extra = list(ds.attributes)
        header = [*names, label_column, *extra]
        for i, (xi, lab) in enumerate(zip(ds.x, labels, strict=True)):
            rows.append([*(_fmt(v) for v in xi), lab, *(str(ds.attributes[a][i]) for a in extra)])
    else:
        assert schema.group_column is not None
        order = [schema.order_column] if schema.order_column else []
        extra = list(ds.attributes)
        header = [schema.group_column, *order, *names, label_column, *extra]
        for w, (xi, lab) in enumerate(zip(ds.x, labels, strict=True)):
            attrs = [str(ds.attributes[a][w]) for a in extra]
            for step in range(xi.shape[1]):
                rows.append([w, *([step] if order else []), *(_fmt(v) for v in xi[:, step]), lab,
                             *attrs])
    write_csv(path, header, rows)
    return path

