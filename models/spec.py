"""Architecture specs: a small, JSON-able description from which any side rebuilds a network.

A spec is what travels in the manifest's ``arch`` field. The edge trainer rebuilds the torch module
from it and loads the global weights from the ONNX file; the aggregator uses it (and the
manifest's ``parameters``) to know which tensors an update must carry. This module imports no
torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bedside.errors import InputError
from bedside.schema import Schema

# arch name -> (default hyper-parameters, input kinds it accepts)
ARCHS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "logreg": ({}, ("tabular", "timeseries")),
    "mlp": ({"hidden": [32, 16], "dropout": 0.0}, ("tabular", "timeseries")),
    "cnn1d": ({"channels": [16, 32], "kernel_size": 5, "dropout": 0.0}, ("timeseries",)),
}


@dataclass(frozen=True)
class ArchSpec:
    """Architecture name, hyper-parameters and input/output sizes."""

    name: str
    n_features: int
    n_classes: int
    window: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in ARCHS:
            raise InputError(
                f"unknown architecture {self.name!r}; choose one of: {', '.join(ARCHS)}"
            )
        defaults, _ = ARCHS[self.name]
        unknown = sorted(set(self.params) - set(defaults))
        if unknown:
            raise InputError(
                f"architecture {self.name!r} has no parameter(s) {', '.join(unknown)}; "
                f"it takes: {', '.join(defaults) or 'none'}"
            )
        if self.n_features < 1 or self.n_classes < 2:
            raise InputError("an architecture needs n_features >= 1 and n_classes >= 2")
        if self.name == "cnn1d" and not self.window:
            raise InputError("cnn1d needs time-series input (a schema with a 'window')")
        merged = {**defaults, **dict(self.params)}
        hidden = merged.get("hidden")
        if hidden is not None and (
            not isinstance(hidden, list | tuple) or not all(int(h) > 0 for h in hidden)
        ):
            raise InputError(f"'hidden' must be a list of positive layer widths, got {hidden!r}")
        dropout = float(merged.get("dropout", 0.0))
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"'dropout' must be in [0, 1), got {dropout}")
        object.__setattr__(self, "params", merged)

    @classmethod
    def for_schema(cls, name: str, schema: Schema, **params: Any) -> ArchSpec:
        _, kinds = ARCHS.get(name, ({}, ()))
        if kinds and schema.kind not in kinds:
            raise InputError(
                f"architecture {name!r} does not take {schema.kind} input; use one of "
                + ", ".join(a for a, (_, k) in ARCHS.items() if schema.kind in k)
            )
        return cls(name=name, n_features=schema.n_features, n_classes=schema.n_classes,
                   window=schema.window, params=params)

    @property
    def flat_inputs(self) -> int:
        return self.n_features * (self.window or 1)

    @property
    def head_width(self) -> int:
        """Logits of the last layer: one for a binary task (logistic regression proper), else
        one per class."""
        return 1 if self.n_classes == 2 else self.n_classes

    def parameter_count(self) -> int:
        """How many weights the network (:func:`bedside.models.zoo.build`) trains, i.e. a
        federated update carries, computed without torch (a test checks it against the built
        network)."""
        count = 0
        if self.name == "cnn1d":  # Conv1d layers (weights width x c x k, bias c), then Linear
            k, width = int(self.params["kernel_size"]), self.n_features
            for c in (int(c) for c in self.params["channels"]):
                count, width = count + width * c * k + c, c
        else:  # Linear layers over the flattened input
            width = self.flat_inputs
            for h in (int(h) for h in self.params.get("hidden", []) if self.name == "mlp"):
                count, width = count + width * h + h, h
        return count + width * self.head_width + self.head_width

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "n_features": self.n_features, "n_classes": self.n_classes,
                "window": self.window, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArchSpec:
        try:
            return cls(name=str(d["name"]), n_features=int(d["n_features"]),
                       n_classes=int(d["n_classes"]),
                       window=None if d.get("window") is None else int(d["window"]),
                       params=dict(d.get("params", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"architecture spec is malformed ({exc}): {dict(d)!r}") from None
