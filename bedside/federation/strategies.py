"""Aggregation rules and server optimizers, each one class registered by name.

An aggregation rule turns the round's accepted updates (deltas ``w_local - w_global``, already
clipped by the devices) into one aggregated delta. A server optimizer applies that delta to the
global weights. Adding a rule is one class with ``@register_rule("name")``; adding an optimizer is
one class with ``@register_optimizer("name")`` (compare Flower's strategy wrappers).

Rules read updates through a callable that yields ``(tensors, weight)`` afresh on each call, so a
rule can stream them from the aggregator's database:

* ``fedavg``: weighted mean with running sums, memory O(model size) whatever the number of
  updates (McMahan et al. 2017);
* ``median``: coordinate-wise median (Yin et al. 2018), robust to a minority of faulty updates;
  it must hold every update of one tensor at once: memory O(updates x largest tensor);
* ``trimmed_mean``: coordinate-wise mean after dropping the ``trim_fraction`` largest and smallest
  values (Yin et al. 2018); same memory as median.

Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization"): ``sgd`` (FedAvg:
``w + lr * delta``), ``fedavgm`` (server momentum, Hsu et al. 2019) and ``fedadam``. Their state
(momentum, moments) is returned as tensors so the aggregator persists it between rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

from bedside.errors import ConfigError, InputError

Tensors = dict[str, np.ndarray]
UpdateSource = Callable[[], Iterator[tuple[Mapping[str, np.ndarray], float]]]


class AggregationRule(Protocol):
    name: ClassVar[str]
    #: True when the rule needs only a running weighted sum of the updates (``RunningSum``):
    #: a driver may then keep the sum instead of every update (disk and memory O(model)).
    incremental: ClassVar[bool]

    def aggregate(self, updates: UpdateSource, shapes: Mapping[str, tuple[int, ...]]) -> Tensors:
        """Aggregated delta with exactly ``shapes``; InputError if there is no update."""


class ServerOptimizer(Protocol):
    name: ClassVar[str]

    def step(self, weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray],
             state: Tensors) -> tuple[Tensors, Tensors]:
        """New global weights and the optimizer's new state."""


RULES: dict[str, Callable[..., AggregationRule]] = {}
OPTIMIZERS: dict[str, Callable[..., ServerOptimizer]] = {}


C = TypeVar("C", bound=type)


def _registrar(table: dict[str, Callable[..., Any]]) -> Callable[[str], Callable[[C], C]]:
    """A class decorator factory that registers classes in ``table`` under a name."""
    def register(name: str) -> Callable[[C], C]:
        def deco(cls: C) -> C:
            cls.name = name  # type: ignore[attr-defined]
            table[name] = cls
            return cls
        return deco
    return register


register_rule = _registrar(RULES)
register_optimizer = _registrar(OPTIMIZERS)


def _construct(table: Mapping[str, Callable[..., Any]], kind: str, name: str,
               params: Mapping[str, Any]) -> Any:
    if name not in table:
        raise ConfigError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(table))}")
    try:
        return table[name](**params)
    except TypeError as exc:
        raise ConfigError(f"{kind} {name!r}: {exc}") from None


def make_rule(name: str, **params: Any) -> AggregationRule:
    return _construct(RULES, "aggregation rule", name, params)


def make_optimizer(name: str, **params: Any) -> ServerOptimizer:
    return _construct(OPTIMIZERS, "server optimizer", name, params)


# -- aggregation rules -----------------------------------------------------------------------------
class RunningSum:
    """The weighted sum of a round's updates (float64), their count and total weight: all FedAvg
    needs, O(model) whatever the number of updates. A driver keeps it durable instead of the
    updates; sums kept apart (workers) are merged with :meth:`merge`."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.sums = {k: np.zeros(s, dtype=np.float64) for k, s in shapes.items()}
        self.count = 0
        self.weight = 0.0

    def add(self, tensors: Mapping[str, np.ndarray], weight: float = 1.0) -> None:
        if not weight > 0:
            raise InputError(f"update weight must be > 0, got {weight}")
        for k, acc in self.sums.items():
            if weight == 1.0:  # no temporary: float32 values are added into the float64 sum
                np.add(acc, tensors[k], out=acc)
            else:
                acc += weight * np.asarray(tensors[k], dtype=np.float64)
        self.count += 1
        self.weight += weight

    def copy(self) -> RunningSum:
        out = RunningSum({})
        out.sums = {k: v.copy() for k, v in self.sums.items()}
        out.count, out.weight = self.count, self.weight
        return out

    def merge(self, other: RunningSum) -> None:
        if other.sums.keys() != self.sums.keys():
            raise InputError("running sums of different models cannot be merged")
        for k, acc in self.sums.items():
            acc += other.sums[k]
        self.count += other.count
        self.weight += other.weight

    def mean(self) -> Tensors:
        if self.count == 0 or self.weight == 0:
            raise InputError("no updates to aggregate: the round is empty")
        return {k: (v / self.weight).astype(np.float32) for k, v in self.sums.items()}

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        return bytes(save(self.sums, metadata={"count": str(self.count),
                                               "weight": repr(self.weight)}))

    @classmethod
    def from_bytes(cls, data: bytes, shapes: Mapping[str, tuple[int, ...]]) -> RunningSum:
        import json

        from safetensors.numpy import load

        out = cls(shapes)
        tensors = load(data)
        if {k: tuple(v.shape) for k, v in tensors.items()} != {k: tuple(v) for k, v in
                                                               shapes.items()}:
            raise InputError("a stored running sum does not match the model's shapes")
        out.sums = {k: np.array(v, dtype=np.float64) for k, v in tensors.items()}
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
        out.count, out.weight = int(meta["count"]), float(meta["weight"])
        return out


@register_rule("fedavg")
@dataclass
class FedAvg:
    """Weighted mean of the updates, computed with running sums (float64)."""

    name: ClassVar[str]
    incremental: ClassVar[bool] = True

    def aggregate(self, updates: UpdateSource, shapes: Mapping[str, tuple[int, ...]]) -> Tensors:
        acc = RunningSum(shapes)
        for tensors, weight in updates():
            acc.add(tensors, weight)
        return acc.mean()


def _stack(updates: UpdateSource, key: str) -> np.ndarray:
    rows = [np.asarray(t[key], dtype=np.float64) for t, _ in updates()]
    if not rows:
        raise InputError("no updates to aggregate: the round is empty")
    return np.stack(rows)


@register_rule("median")
@dataclass
class CoordinateMedian:
    """Coordinate-wise median (unweighted). Tolerates up to half of the updates being faulty."""

    name: ClassVar[str]
    incremental: ClassVar[bool] = False

    def aggregate(self, updates: UpdateSource, shapes: Mapping[str, tuple[int, ...]]) -> Tensors:
        return {k: np.median(_stack(updates, k), axis=0).astype(np.float32) for k in shapes}


@register_rule("trimmed_mean")
@dataclass
class TrimmedMean:
    """Coordinate-wise mean after trimming ``trim_fraction`` of the values at each end."""

    name: ClassVar[str]
    incremental: ClassVar[bool] = False
    trim_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")

    def aggregate(self, updates: UpdateSource, shapes: Mapping[str, tuple[int, ...]]) -> Tensors:
        out = {}
        for k in shapes:
            a = np.sort(_stack(updates, k), axis=0)
            cut = int(np.floor(self.trim_fraction * a.shape[0]))
            kept = a[cut : a.shape[0] - cut] if a.shape[0] - 2 * cut > 0 else a
            out[k] = kept.mean(axis=0).astype(np.float32)
        return out


# -- server optimizers ----------------------------------------------------------------------------
def _check_lr(lr: float) -> None:
    if not lr > 0:
        raise ConfigError(f"server learning rate must be > 0, got {lr}")


@register_optimizer("sgd")
@dataclass
class ServerSGD:
    """FedAvg's server step: ``w + lr * delta`` (lr = 1 is plain FedAvg)."""

    name: ClassVar[str]
    lr: float = 1.0

    def __post_init__(self) -> None:
        _check_lr(self.lr)

    def step(self, weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray],
             state: Tensors) -> tuple[Tensors, Tensors]:
        return {k: (w + self.lr * delta[k]).astype(w.dtype) for k, w in weights.items()}, {}


@register_optimizer("fedavgm")
@dataclass
class FedAvgM:
    """Server momentum: ``m = beta * m + delta``, ``w + lr * m`` (Hsu et al. 2019)."""

    name: ClassVar[str]
    lr: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")

    def step(self, weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray],
             state: Tensors) -> tuple[Tensors, Tensors]:
        new_w, new_s = {}, {}
        for k, w in weights.items():
            m = self.momentum * state.get(f"m.{k}", np.zeros_like(w)) + delta[k]
            new_s[f"m.{k}"] = m.astype(np.float32)
            new_w[k] = (w + self.lr * m).astype(w.dtype)
        return new_w, new_s


@register_optimizer("fedadam")
@dataclass
class FedAdam:
    """FedAdam (Reddi et al. 2021): Adam on the server with the aggregated delta as gradient."""

    name: ClassVar[str]
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.tau > 0):
            raise ConfigError("fedadam needs 0 <= beta1, beta2 < 1 and tau > 0")

    def step(self, weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray],
             state: Tensors) -> tuple[Tensors, Tensors]:
        new_w, new_s = {}, {}
        for k, w in weights.items():
            d = np.asarray(delta[k], dtype=np.float64)
            m = self.beta1 * state.get(f"m.{k}", np.zeros_like(w)) + (1 - self.beta1) * d
            v = self.beta2 * state.get(f"v.{k}", np.zeros_like(w)) + (1 - self.beta2) * d * d
            new_s[f"m.{k}"], new_s[f"v.{k}"] = m.astype(np.float32), v.astype(np.float32)
            new_w[k] = (w + self.lr * m / (np.sqrt(v) + self.tau)).astype(w.dtype)
        return new_w, new_s


def materialize(updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> UpdateSource:
    """An UpdateSource over an in-memory list (tests, benchmarks)."""
    items = list(updates)
    return lambda: iter(items)
