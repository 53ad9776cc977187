"""Differential privacy for Bedside: clip and noise updates, account for them, enforce budgets.

* :mod:`bedside.privacy.mechanisms`: clipping, Gaussian noise and adaptive clipping; pure
  functions over ``list[np.ndarray]`` with an explicit ``np.random.Generator`` (numpy only).
* :mod:`bedside.privacy.accountant`: describe releases as dp-accounting events, then compute
  epsilon with RDP or PLD; calibrate noise.
* :mod:`bedside.privacy.ledger`: the device's own append-only ledger that refuses to exceed its
  budget.
* :mod:`bedside.privacy.cli`: ``bedside privacy ...``.

Importing this package imports numpy and the mechanisms only. The accountant and ledger names
below are loaded on first access, and dp-accounting (about 0.8 s with scipy) only when something
is actually accounted, so the edge inference path never pays for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:  # pragma: no cover
    from bedside.privacy.accountant import (
        calibrate,
        compose,
        epsilon,
        epsilon_report,
        gaussian,
        gaussian_sigma,
        sampled_gaussian,
    )
    from bedside.privacy.ledger import Budget, Ledger, Release

_LAZY: dict[str, str] = {
    "calibrate": "bedside.privacy.accountant",
    "compose": "bedside.privacy.accountant",
    "epsilon": "bedside.privacy.accountant",
    "epsilon_report": "bedside.privacy.accountant",
    "gaussian": "bedside.privacy.accountant",
    "gaussian_sigma": "bedside.privacy.accountant",
    "sampled_gaussian": "bedside.privacy.accountant",
    "Budget": "bedside.privacy.ledger",
    "Ledger": "bedside.privacy.ledger",
    "Release": "bedside.privacy.ledger",
}

__all__ = [
    "Budget",
    "Ledger",
    "Release",
    "adaptive_noise_multiplier",
    "add_gaussian_noise",
    "calibrate",
    "clip_indicator",
    "clip_update",
    "compose",
    "epsilon",
    "epsilon_report",
    "gaussian",
    "gaussian_sigma",
    "l2_norm",
    "next_clip_norm",
    "noised_count",
    "sampled_gaussian",
    "secure_rng",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bedside.privacy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
