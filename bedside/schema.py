"""The model schema: what a model takes in and what it puts out.

A schema travels in every manifest, so that the edge can check inputs without the training code.
It states, per input feature, its name, unit, the allowed range (values outside are refused: they
are data-entry errors or a different unit) and the scaling constants ``loc``/``scale`` that the
model applies inside its ONNX graph, ``(x - loc) / scale``. Scaling constants come from public
knowledge (clinical ranges, published data set statistics) or from the central reference set held
by the aggregator's data team, never from pooled clinic records.

Two kinds of input:

``tabular``
    one row per prediction, a column per feature; model input shape ``[batch, n_features]``.
``timeseries``
    a window of ``window`` consecutive rows per prediction, grouped by ``group_column`` and
    ordered by ``order_column`` in CSV form; model input shape ``[batch, n_features, window]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

import numpy as np

from bedside.constants import INPUT_SCHEMA_VERSION
from bedside.errors import SchemaError

Kind = Literal["tabular", "timeseries"]


@dataclass(frozen=True)
class Feature:
    """One input feature. ``min``/``max`` bound what is accepted; ``loc``/``scale`` normalise;
    ``typical_min``/``typical_max`` (optional) is where typical values lie, from public knowledge
    (a published reference interval, a public data set's observed range): the frame federated
    feature statistics are computed in (default: the allowed range)."""

    name: str
    unit: str = ""
    min: float | None = None
    max: float | None = None
    loc: float = 0.0
    scale: float = 1.0
    description: str = ""
    typical_min: float | None = None
    typical_max: float | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise SchemaError("schema: every feature needs a non-empty string 'name'")
        if not (math.isfinite(self.loc) and math.isfinite(self.scale) and self.scale > 0):
            raise SchemaError(
                f"schema: feature {self.name!r} needs a finite 'loc' and a positive 'scale' "
                f"(got loc={self.loc}, scale={self.scale})"
            )
        if self.min is not None and self.max is not None and not self.min <= self.max:
            raise SchemaError(
                f"schema: feature {self.name!r} has min {self.min} > max {self.max}; swap them"
            )
        lo_t, hi_t = self.typical_min, self.typical_max
        if (lo_t is not None or hi_t is not None) and (
                lo_t is None or hi_t is None
                or not (math.isfinite(lo_t) and math.isfinite(hi_t) and lo_t < hi_t)):
            raise SchemaError(
                f"schema: feature {self.name!r}: 'typical_min' and 'typical_max' go together, "
                f"finite, typical_min < typical_max (got {lo_t}, {hi_t})"
            )


@dataclass(frozen=True)
class Schema:
    """Input features (ordered), kind, window and output labels of a classifier."""

    features: tuple[Feature, ...]
    labels: tuple[str, ...]
    kind: Kind = "tabular"
    window: int | None = None
    group_column: str | None = None
    order_column: str | None = None
    dtype: str = "float32"
    version: int = INPUT_SCHEMA_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.features:
            raise SchemaError(
                "schema: 'features' is empty; list the model's input columns in order")
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SchemaError(f"schema: feature names must be unique; repeated: {', '.join(dupes)}")
        if len(self.labels) < 2:
            raise SchemaError("schema: 'labels' needs at least two class labels")
        if len(set(self.labels)) != len(self.labels):
            raise SchemaError("schema: class labels must be unique")
        if self.kind not in ("tabular", "timeseries"):
            raise SchemaError(
                f"schema: 'kind' must be 'tabular' or 'timeseries', not {self.kind!r}")
        if self.kind == "timeseries":
            if not isinstance(self.window, int) or self.window < 2:
                raise SchemaError("schema: a timeseries schema needs an integer 'window' >= 2")
            if not self.group_column:
                raise SchemaError(
                    "schema: a timeseries schema needs 'group_column' (the CSV column naming each "
                    "window)"
                )
        elif self.window is not None:
            raise SchemaError("schema: 'window' is only valid for kind 'timeseries'")
        if self.dtype != "float32":
            raise SchemaError(f"schema: only dtype 'float32' is supported, not {self.dtype!r}")
        if self.version != INPUT_SCHEMA_VERSION:
            raise SchemaError(
                f"schema: version {self.version} is not supported (this Bedside reads version "
                f"{INPUT_SCHEMA_VERSION}); upgrade Bedside"
            )

    # -- shape ------------------------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> list[int | None]:
        """Model input shape with ``None`` for the (dynamic) batch dimension."""
        if self.kind == "timeseries":
            assert self.window is not None
            return [None, self.n_features, self.window]
        return [None, self.n_features]

    def with_scaling(self, loc: Sequence[float] | np.ndarray,
                     scale: Sequence[float] | np.ndarray) -> Schema:
        """This schema with every feature's ``loc``/``scale`` replaced (ranges unchanged)."""
        feats = tuple(replace(f, loc=float(lc), scale=float(sc))
                      for f, lc, sc in zip(self.features, loc, scale, strict=True))
        return replace(self, features=feats)

    def without_typical_range(self) -> Schema:
        """This schema without typical ranges (statistics then use the allowed ranges)."""
        return replace(self, features=tuple(replace(f, typical_min=None, typical_max=None)
                                            for f in self.features))

    def loc_scale(self) -> tuple[np.ndarray, np.ndarray]:
        loc = np.array([f.loc for f in self.features], dtype=np.float32)
        scale = np.array([f.scale for f in self.features], dtype=np.float32)
        return loc, scale

    def reference_rows(self, n: int = 1) -> np.ndarray:
        """``n`` valid inputs at the scaling centre (``loc``), clipped to the allowed range.

        Used for self-tests: a model must turn them into finite probabilities that sum to one.
        """
        loc, _ = self.loc_scale()
        lo = np.array([-np.inf if f.min is None else f.min for f in self.features], np.float32)
        hi = np.array([np.inf if f.max is None else f.max for f in self.features], np.float32)
        row = np.clip(loc, lo, hi).astype(np.float32)
        if self.kind == "timeseries":
            assert self.window is not None
            return np.repeat(np.repeat(row[None, :, None], self.window, axis=2), n, axis=0)
        return np.repeat(row[None, :], n, axis=0)

    # -- validation of arrays (what the predictor checks before every inference) -------------
    @cached_property
    def _feature_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.input_shape[1:] if d is not None)

    @cached_property
    def _bounds(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """Allowed ranges as broadcastable float32 arrays, and whether all are finite."""
        lo = np.array([-np.inf if f.min is None else f.min for f in self.features], np.float32)
        hi = np.array([np.inf if f.max is None else f.max for f in self.features], np.float32)
        bounded = bool(np.isfinite(lo).all() and np.isfinite(hi).all())
        if self.kind == "timeseries":
            lo, hi = lo[None, :, None], hi[None, :, None]
        return lo, hi, bounded

    def within_range(self, x: np.ndarray) -> np.ndarray:
        """Per row (window): whether every value is finite and inside its allowed range."""
        lo, hi, _ = self._bounds
        arr = np.asarray(x, dtype=np.float32)
        ok = np.isfinite(arr) & (arr >= lo) & (arr <= hi)
        return np.asarray(ok.reshape(len(arr), -1).all(axis=1))

    def validate(self, x: np.ndarray, row_names: list[str] | None = None) -> np.ndarray:
        """Check a batch against the schema and return it as contiguous float32.

        Raises :class:`SchemaError` naming the row (by ``row_names`` when given, else its index)
        and the feature for a wrong shape, a non-finite value or a value out of range.
        """
        arr = np.asarray(x)
        if arr.dtype != np.float32 or not arr.flags.c_contiguous:
            if arr.dtype.kind not in "fiu":
                raise SchemaError(f"input: expected numbers, got an array of dtype {arr.dtype}")
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        want = self._feature_shape
        if arr.shape[1:] != want or arr.ndim != len(want) + 1:
            shown = ["batch", *want]
            raise SchemaError(
                f"input: shape {list(arr.shape)} does not match the model's input {shown}"
                + ("; a window needs exactly "
                   f"{self.window} time steps" if self.kind == "timeseries" else "")
            )
        lo, hi, bounded = self._bounds
        # One fused check on the hot path: NaN fails both comparisons; +-inf fails them too when
        # every feature is bounded. The detailed (slower) search runs only when something is bad.
        ok = np.logical_and(arr >= lo, arr <= hi).all()
        if ok and (bounded or np.isfinite(arr).all()):
            return arr
        bad = ~np.isfinite(arr) | (arr < lo) | (arr > hi)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            row, feat = idx[0], self.features[idx[1]]
            value = float(arr[idx])
            who = row_names[row] if row_names else f"row {row}"
            if not math.isfinite(value):
                raise SchemaError(
                    f"input: {who}, column {feat.name!r}: value is {value}; Bedside does not "
                    "impute missing values: fill in or drop the row"
                )
            raise SchemaError(
                f"input: {who}, column {feat.name!r}: value {value:g} is outside the allowed range "
                f"[{feat.min:g}, {feat.max:g}]{' ' + feat.unit if feat.unit else ''}; check the "
                "value and its unit"
            )
        return arr

    def fingerprint(self) -> str:
        """What makes rows of this schema interchangeable: feature names and order, kind,
        window and labels (not ranges or scaling). A device stores its records under it, and a
        model release whose fingerprint differs from the federation's is a new schema."""
        import hashlib
        import json

        d = self.to_dict()
        key = {"features": [f["name"] for f in d["features"]], "kind": d["kind"],
               "window": d.get("window"), "labels": d["labels"]}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": self.version,
            "kind": self.kind,
            "dtype": self.dtype,
            "shape": self.input_shape,
            "features": [
                {k: v for k, v in asdict(f).items() if v not in (None, "")} for f in self.features
            ],
            "labels": list(self.labels),
        }
        if self.kind == "timeseries":
            d["window"] = self.window
            d["group_column"] = self.group_column
            if self.order_column:
                d["order_column"] = self.order_column
        if self.extra:
            d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "schema") -> Schema:
        if not isinstance(d, Mapping):
            raise SchemaError(f"{source}: expected a JSON object with 'features' and 'labels'")
        allowed = {"version", "kind", "dtype", "shape", "features", "labels", "window",
                   "group_column", "order_column", "extra"}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise SchemaError(f"{source}: unknown key(s) {', '.join(unknown)}; allowed: "
                              f"{', '.join(sorted(allowed))}")
        raw_features = d.get("features")
        if not isinstance(raw_features, list) or not raw_features:
            raise SchemaError(f"{source}: 'features' must be a non-empty list")
        feats = []
        for i, f in enumerate(raw_features):
            if isinstance(f, str):
                f = {"name": f}
            if not isinstance(f, Mapping):
                raise SchemaError(f"{source}: features[{i}] must be an object or a name")
            fkeys = {"name", "unit", "min", "max", "loc", "scale", "description", "typical_min",
                     "typical_max"}
            bad = sorted(set(f) - fkeys)
            if bad:
                raise SchemaError(f"{source}: features[{i}] has unknown key(s) {', '.join(bad)}")
            try:
                feats.append(Feature(
                    name=str(f.get("name", "")),
                    unit=str(f.get("unit", "")),
                    min=None if f.get("min") is None else float(f["min"]),
                    max=None if f.get("max") is None else float(f["max"]),
                    loc=float(f.get("loc", 0.0)),
                    scale=float(f.get("scale", 1.0)),
                    description=str(f.get("description", "")),
                    typical_min=None if f.get("typical_min") is None else float(
                        f["typical_min"]),
                    typical_max=None if f.get("typical_max") is None else float(
                        f["typical_max"]),
                ))
            except (TypeError, ValueError) as exc:
                raise SchemaError(f"{source}: features[{i}]: {exc}") from exc
        labels = d.get("labels")
        if not isinstance(labels, list):
            raise SchemaError(f"{source}: 'labels' must be a list of class names")
        window = d.get("window")
        schema = cls(
            features=tuple(feats),
            labels=tuple(str(x) for x in labels),
            kind=d.get("kind", "tabular"),
            window=int(window) if window is not None else None,
            group_column=d.get("group_column"),
            order_column=d.get("order_column"),
            dtype=d.get("dtype", "float32"),
            version=int(d.get("version", INPUT_SCHEMA_VERSION)),
            extra=dict(d.get("extra", {})),
        )
        shape = d.get("shape")
        if shape is not None and list(shape)[1:] != schema.input_shape[1:]:
            raise SchemaError(
                f"{source}: 'shape' {shape} disagrees with the features/window "
                f"{schema.input_shape}; fix or drop 'shape'"
            )
        return schema
