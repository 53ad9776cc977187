"""Split a data set into clinic shards, IID or with label and quantity skew.

Used by the demo and the benchmarks to simulate a federation: each shard is the set of row indices
one clinic holds. Two schemes:

``iid``
    rows shuffled and dealt out; equal sizes, or log-normal sizes when ``quantity_skew`` > 0
    (``sigma = quantity_skew``, as LEAF and FedLab simulate unbalanced clients).
``dirichlet``
    label skew: for each class, the proportions of its rows held by the K clients are drawn from
    a symmetric Dirichlet(``alpha``). Small ``alpha`` (0.1) gives clinics that hold mostly one or
    two classes; large ``alpha`` (100) approaches IID. Hsu, Qi and Brown (2019), "Measuring the
    Effects of Non-Identical Data Distribution for Federated Visual Classification",
    arXiv:1909.06335, introduced Dirichlet label skew; the per-class form used here is the one of
    Yurochkin et al. (2019, ICML, "Bayesian Nonparametric Federated Learning of Neural Networks")
    and Li, Diao, Chen and He (2022, ICDE, "Federated Learning on Non-IID Data Silos: An
    Experimental Study"). With ``quantity_skew`` > 0 the Dirichlet parameters are ``alpha * K *
    q_k`` for log-normal client weights ``q`` (mean ``alpha``), so clinics also differ in size.

Partitions are drawn until every client holds at least ``min_size`` rows (a bounded number of
attempts), then repaired deterministically. Same inputs, same shards.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from bedside.errors import InputError

__all__ = ["MAX_ATTEMPTS", "describe", "label_skew", "partition"]

Scheme = Literal["iid", "dirichlet"]

#: How many Dirichlet draws are tried before the deterministic repair.
MAX_ATTEMPTS = 100


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check(
    y: np.ndarray, n_clients: int, scheme: str, alpha: float, quantity_skew: float, min_size: int
) -> None:
    if y.ndim != 1 or y.dtype.kind not in "iub":
        raise InputError(f"partition: 'y' must be a 1-D array of integer class labels, got "
                         f"shape {list(y.shape)} dtype {y.dtype}")
    if isinstance(n_clients, bool) or not isinstance(n_clients, int | np.integer) or n_clients < 1:
        raise InputError(f"partition: 'n_clients' must be an integer >= 1, got {n_clients!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int | np.integer) or min_size < 0:
        raise InputError(f"partition: 'min_size' must be an integer >= 0, got {min_size!r}")
    if n_clients * min_size > len(y):
        raise InputError(
            f"partition: {len(y)} rows cannot give 'n_clients'={n_clients} clients "
            f"'min_size'={min_size} rows each; use fewer clients or a smaller min_size"
        )
    if scheme not in ("iid", "dirichlet"):
        raise InputError(f"partition: 'scheme' must be 'iid' or 'dirichlet', not {scheme!r}")
    if not (_is_real(alpha) and math.isfinite(alpha) and alpha > 0):
        raise InputError(f"partition: 'alpha' must be a finite number > 0, got {alpha!r}")
    if not (_is_real(quantity_skew) and math.isfinite(quantity_skew) and quantity_skew >= 0):
        raise InputError(
            f"partition: 'quantity_skew' must be a finite number >= 0, got {quantity_skew!r}"
        )


def _client_weights(k: int, quantity_skew: float, rng: np.random.Generator) -> np.ndarray:
    """Relative client sizes: uniform, or log-normal with ``sigma = quantity_skew``."""
    if quantity_skew == 0:
        return np.full(k, 1.0 / k)
    w = rng.lognormal(mean=0.0, sigma=quantity_skew, size=k)
    return w / w.sum()


def _allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder method)."""
    raw = weights * total
    out = np.floor(raw).astype(np.int64)
    rest = total - int(out.sum())
    if rest:
        order = np.argsort(-(raw - out), kind="stable")
        out[order[:rest]] += 1
    return out


def _iid(n: int, k: int, quantity_skew: float, min_size: int,
         rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(n)
    if quantity_skew == 0:
        sizes = np.full(k, n // k, dtype=np.int64)
        sizes[: n % k] += 1
    else:
        weights = _client_weights(k, quantity_skew, rng)
        sizes = min_size + _allocate(n - k * min_size, weights)
    return np.split(perm, np.cumsum(sizes)[:-1])


def _dirichlet_once(y: np.ndarray, classes: np.ndarray, concentration: np.ndarray,
                    rng: np.random.Generator) -> list[np.ndarray]:
    k = len(concentration)
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c in classes:
        members = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(concentration)
        if not np.all(np.isfinite(p)) or p.sum() <= 0:  # tiny concentrations can underflow
            p = np.zeros(k)
            p[rng.integers(k)] = 1.0
        cuts = np.minimum((np.cumsum(p)[:-1] * len(members)).astype(np.int64), len(members))
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
    return [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]


def _repair(shards: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """Move rows from the largest shards to those below ``min_size``; deterministic."""
    out = [np.sort(s) for s in shards]
    while True:
        sizes = np.array([len(s) for s in out])
        short = np.flatnonzero(sizes < min_size)
        if not len(short):
            return out
        needy = int(short[0])
        donor = int(np.argmax(sizes))  # first of the largest; it has > min_size rows
        out[needy] = np.sort(np.append(out[needy], out[donor][-1]))
        out[donor] = out[donor][:-1]


def partition(
    y: np.ndarray | Sequence[int],
    n_clients: int,
    *,
    scheme: Scheme = "iid",
    alpha: float = 0.5,
    quantity_skew: float = 0.0,
    min_size: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split row indices ``0..len(y)-1`` into ``n_clients`` disjoint shards covering all rows.

    ``scheme="iid"``: shuffled, equal sizes (or log-normal sizes with ``sigma = quantity_skew``).
    ``scheme="dirichlet"``: per class, the clients' shares ~ Dirichlet(``alpha``); optionally with
    quantity skew (see the module docstring). Every shard has at least ``min_size`` rows. Each
    shard is a sorted int64 index array; the result is reproducible from ``seed``.

    Raises :class:`~bedside.errors.InputError` naming the parameter for ``n_clients`` < 1,
    ``n_clients * min_size`` > ``len(y)``, ``alpha`` <= 0, a negative ``quantity_skew`` or an
    unknown ``scheme``.
    """
    labels = np.asarray(y)
    _check(labels, n_clients, scheme, alpha, quantity_skew, min_size)
    n, k = len(labels), int(n_clients)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        shards = _iid(n, k, float(quantity_skew), int(min_size), rng)
    else:
        weights = _client_weights(k, float(quantity_skew), rng)
        concentration = float(alpha) * k * weights
        classes = np.unique(labels)
        shards = []
        for _ in range(MAX_ATTEMPTS):
            shards = _dirichlet_once(labels, classes, concentration, rng)
            if min(len(s) for s in shards) >= min_size:
                break
        shards = _repair(shards, int(min_size))
    return [np.sort(s).astype(np.int64) for s in shards]


def describe(
    shards: Sequence[np.ndarray], y: np.ndarray | Sequence[int], labels: Sequence[str]
) -> list[dict[str, Any]]:
    """Per shard: ``{"client": k, "size": rows, "histogram": {label: rows}}``.

    ``y`` holds class indices into ``labels``. This is what the demo prints so that a reader sees
    what each simulated clinic holds.
    """
    yy = np.asarray(y)
    out: list[dict[str, Any]] = []
    for k, shard in enumerate(shards):
        counts = np.bincount(yy[np.asarray(shard, dtype=np.int64)], minlength=len(labels))
        if len(counts) > len(labels):
            raise InputError(f"describe: y holds class index {len(counts) - 1} but only "
                             f"{len(labels)} labels were given")
        out.append({
            "client": k,
            "size": len(shard),
            "histogram": {str(lab): int(c) for lab, c in zip(labels, counts, strict=True)},
        })
    return out


def label_skew(shards: Sequence[np.ndarray], y: np.ndarray | Sequence[int]) -> float:
    """Mean total-variation distance between each shard's label distribution and the global one.

    0 when every shard has the global class mix; a shard holding only class ``c`` is at
    ``1 - p_c`` (``p_c`` the global share of ``c``). Empty shards are skipped. Used to compare
    partition schemes (e.g. Dirichlet with small ``alpha`` against IID).
    """
    yy = np.asarray(y)
    classes, inverse = np.unique(yy, return_inverse=True)
    glob = np.bincount(inverse, minlength=len(classes)) / len(yy)
    distances = []
    for shard in shards:
        idx = np.asarray(shard, dtype=np.int64)
        if len(idx) == 0:
            continue
        local = np.bincount(inverse[idx], minlength=len(classes)) / len(idx)
        distances.append(0.5 * float(np.abs(local - glob).sum()))
    return float(np.mean(distances)) if distances else 0.0
