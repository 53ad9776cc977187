"""Classification metrics in plain numpy (the aggregator and edge carry no scikit-learn).

All functions take integer labels ``y`` of shape [n] and class probabilities ``p`` of shape
[n, k]. They are checked against scikit-learn in the tests.
"""

from __future__ import annotations

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
