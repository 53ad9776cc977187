"""Classification metrics in plain numpy (the aggregator and edge carry no scikit-learn).

All functions take integer labels ``y`` of shape [n] and class probabilities ``p`` of shape
[n, k]. They are checked against scikit-learn in the tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bedside.errors import InputError


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(np.int64, copy=False)
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or y.ndim != 1 or len(y) != len(p):
        raise InputError(f"metrics: need y [n] and p [n, k]; got {y.shape} and {p.shape}")
    if len(y) == 0:
        raise InputError("metrics: no rows to evaluate")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise InputError(f"metrics: labels must lie in 0..{p.shape[1] - 1}")
    return y, p


def accuracy(y: np.ndarray, p: np.ndarray) -> float:
    y, p = _check(y, p)
    return float(np.mean(np.argmax(p, axis=1) == y))


def _binary_auc(pos: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half)."""
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2.0 + 1.0
        i = j + 1
    r = np.empty_like(ranks)
    r[order] = ranks
    u = r[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Binary: AUC of the positive class (index 1). Multi-class: macro one-vs-rest AUC.

    Returns NaN when a class needed for the score has no rows (the score is undefined).
    """
    y, p = _check(y, p)
    if p.shape[1] == 2:
        return _binary_auc(y == 1, p[:, 1])
    aucs = [_binary_auc(y == k, p[:, k]) for k in range(p.shape[1])]
    defined = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(defined)) if defined else float("nan")


def log_loss(y: np.ndarray, p: np.ndarray, eps: float = 1e-12) -> float:
    y, p = _check(y, p)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], eps, 1.0))))


def evaluate(y: np.ndarray, p: np.ndarray) -> dict[str, float | int]:
    """The metrics Bedside reports for a model on a labelled set."""
    return {
        "rows": len(y),
        "accuracy": round(accuracy(y, p), 6),
        "auc": round(roc_auc(y, p), 6),
        "log_loss": round(log_loss(y, p), 6),
    }


def calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10, positive: int = 1) -> float:
    """Expected calibration error: binary, of the ``positive`` class's probability; multi-class,
    of the top class's. The row-weighted mean |observed rate - mean predicted| over ``bins``
    equal-width probability bins."""
    y, p = _check(y, p)
    if p.shape[1] == 2:
        conf, hit = p[:, positive], (y == positive).astype(np.float64)
    else:
        conf, hit = p.max(axis=1), (np.argmax(p, axis=1) == y).astype(np.float64)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    err = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            err += m.sum() * abs(hit[m].mean() - conf[m].mean())
    return float(err / len(y))


def binary_rates(y: np.ndarray, p: np.ndarray, positive: int = 1) -> tuple[float, float]:
    """Sensitivity (recall of the ``positive`` class) and specificity (recall of the other) at
    the argmax decision; NaN where the class has no rows."""
    y, p = _check(y, p)
    pred = np.argmax(p, axis=1)
    pos, neg = y == positive, y != positive
    sens = float(np.mean(pred[pos] == positive)) if pos.any() else float("nan")
    spec = float(np.mean(pred[neg] != positive)) if neg.any() else float("nan")
    return sens, spec


#: A group with fewer rows, or (binary) fewer than MIN_CLASS rows of either class, is reported
#: but not judged: its figures are too noisy to compare.
MIN_GROUP_ROWS = 30
MIN_CLASS_ROWS = 5


def by_group(y: np.ndarray, p: np.ndarray, groups: list[str], min_rows: int = MIN_GROUP_ROWS,
             positive: int = 1) -> dict[str, object]:
    """Accuracy, sensitivity and specificity of the ``positive`` class (binary), AUC and
    calibration error per group, and the largest gap of each metric between the groups large
    enough to judge."""
    y, p = _check(y, p)
    if len(groups) != len(y):
        raise InputError(f"metrics: {len(groups)} group values for {len(y)} rows")
    binary = p.shape[1] == 2
    out: dict[str, dict[str, object]] = {}
    for g in sorted(set(groups)):
        m = np.array([x == g for x in groups])
        yg, pg = y[m], p[m]
        auc = _binary_auc(yg == positive, pg[:, positive]) if binary else roc_auc(yg, pg)
        row: dict[str, object] = {"rows": int(m.sum()), "accuracy": round(accuracy(yg, pg), 4),
                                  "auc": _r(auc), "calibration_error":
                                  round(calibration_error(yg, pg, positive=positive), 4)}
        small = len(yg) < min_rows
        if binary:
            sens, spec = binary_rates(yg, pg, positive)
            n_pos = int((yg == positive).sum())
            row.update(positives=n_pos, sensitivity=_r(sens), specificity=_r(spec))
            small = small or min(n_pos, len(yg) - n_pos) < MIN_CLASS_ROWS
        row["judged"] = not small
        out[g] = row
    metrics = ["accuracy", "auc", "calibration_error"] + (["sensitivity", "specificity"]
                                                          if binary else [])
    gaps, largest = largest_gaps(out, metrics)
    return {"groups": out, "gaps": gaps, "largest_gap": largest,
            "min_rows": min_rows, "small_groups": sorted(g for g, r in out.items()
                                                         if not r["judged"])}


def largest_gaps(groups: Mapping[str, Mapping[str, Any]], metrics: list[str]
                 ) -> tuple[dict[str, dict[str, Any]], str | None]:
    """For each metric, the gap between the lowest and the highest of the groups marked
    ``judged`` (None values left out), and which metric's gap is the largest."""
    gaps: dict[str, dict[str, Any]] = {}
    judged = {g: r for g, r in groups.items() if r["judged"]}
    for k in metrics:
        vals = {g: float(r[k]) for g, r in judged.items() if r.get(k) is not None}
        if len(vals) >= 2:
            lo, hi = min(vals, key=vals.__getitem__), max(vals, key=vals.__getitem__)
            gaps[k] = {"gap": round(vals[hi] - vals[lo], 4), "lowest": lo, "highest": hi}
    return gaps, max(gaps, key=lambda k: gaps[k]["gap"], default=None)


def _r(v: float) -> float | None:
    return None if np.isnan(v) else round(float(v), 4)
