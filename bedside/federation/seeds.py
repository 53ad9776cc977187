"""Where a round's randomness comes from: the OS, or (tests and demos only) a seed and the round.

Every driver (the MQTT agent and aggregator, Flower, the in-process simulation) derives its
randomness here, so that runs seeded alike draw the same numbers, and so that a seed never makes
two rounds share noise (differencing two releases would cancel it).
"""

from __future__ import annotations

import numpy as np

from bedside.privacy.mechanisms import secure_rng


def round_rng(seed: int | None, round_id: int) -> np.random.Generator:
    """Fresh randomness for one round: from the OS (``seed`` None), or from the seed and round."""
    return secure_rng() if seed is None else np.random.default_rng([seed, round_id])


def training_seed(seed: int | None, round_id: int) -> int | None:
    """The seed of a device's local training (batch sampling and DP-SGD noise) in a round."""
    return None if seed is None else seed * 1_000_003 + round_id
