"""DP-SGD as a plan: how many steps, at which sampling rate, with which noise (no torch).

Record-level DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") runs ``steps``
steps; in each, every record is included independently with probability ``sample_rate`` (Poisson
sampling), each included record's gradient is clipped to L2 norm ``max_grad_norm``, the clipped
gradients are summed and Gaussian noise of standard deviation ``noise_multiplier *
max_grad_norm`` is added. The plan is what the device's ledger records *before* training, and the
trainer (``bedside.models.train``) refuses to run anything else.

The numbers follow Opacus' ``DPDataLoader`` (``make_private(poisson_sampling=True)``), which the
project used before it ran DP-SGD itself, so plans and ledgers written then mean the same now:
``sample_rate = 1 / ceil(rows / batch_size)`` and ``ceil(rows / batch_size)`` steps per epoch;
the noised sum is divided by ``int(rows * sample_rate)`` (the expected batch size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bedside.errors import InputError


def batches_per_epoch(rows: int, batch_size: int) -> int:
    if rows < 1 or batch_size < 1:
        raise InputError(f"DP-SGD needs rows >= 1 and batch_size >= 1, got {rows}, {batch_size}")
    return math.ceil(rows / min(batch_size, rows))


def sample_rate(rows: int, batch_size: int) -> float:
    """Poisson sampling rate of one record in one step: ``1 / ceil(rows / batch_size)``."""
    return 1.0 / batches_per_epoch(rows, batch_size)


def steps(rows: int, batch_size: int, epochs: int) -> int:
    """DP-SGD steps for ``epochs`` passes: ``epochs * ceil(rows / batch_size)``."""
    return epochs * batches_per_epoch(rows, batch_size)


def expected_batch_size(rows: int, batch_size: int) -> int:
    """What the noised gradient sum is divided by: ``int(rows * sample_rate)`` (>= 1)."""
    return max(1, int(rows * sample_rate(rows, batch_size)))


@dataclass(frozen=True)
class DPSGDPlan:
    """One round of record-level DP-SGD, fixed before training and recorded in the ledger."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise InputError(f"DP-SGD noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise InputError(f"DP-SGD max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.sample_rate <= 1:
            raise InputError(f"DP-SGD sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise InputError(f"DP-SGD steps must be >= 0, got {self.steps}")

    @classmethod
    def for_records(cls, rows: int, batch_size: int, epochs: int, noise_multiplier: float,
                    max_grad_norm: float) -> DPSGDPlan:
        return cls(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                   sample_rate=sample_rate(rows, batch_size),
                   steps=steps(rows, batch_size, epochs))
