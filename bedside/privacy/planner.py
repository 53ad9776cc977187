"""The DP-SGD planner: what a device's record-level budget buys, and whether another batch size or
number of local epochs would buy more with the same budget (torch-free).

A device's record-level plan (:func:`plan`) is the one the device trains with
(:func:`bedside.federation.device.record_noise` calls it): Poisson sampling at
``q = 1 / ceil(n / batch)``, ``epochs * ceil(n / batch)`` steps a round, and the smallest noise
multiplier ``z`` (dp-accounting, :func:`~bedside.privacy.accountant.calibrate`) whose epsilon
over every planned round, composed with what was released before (``base``), stays within the
budget.

How much noise reaches the model. A step adds Gaussian noise of standard deviation ``z * C`` to
the sum of the batch's clipped per-example gradients (each of L2 norm at most ``C``), then
divides by the expected batch size ``B = int(n * q)``. On the averaged gradient the noise is
``z / B`` times ``C`` on every coordinate (:attr:`Plan.noise_per_coordinate`); over a model of
``P`` parameters its expected L2 norm is about ``z * sqrt(P) / B`` times ``C``
(:meth:`Plan.noise_to_signal`), while the averaged gradient itself is at most ``C``. Above 1, a
step's noise outweighs the largest gradient it can carry.

A better plan (:func:`better`). At a fixed budget, a larger batch needs a larger ``z`` but
``z / B`` still falls (roughly as ``1 / sqrt(B)`` for the moderate privacy regime): fewer,
less noisy steps (De et al. 2022, "Unlocking high-accuracy differentially private image
classification through scale", section 3). The planner tries batch sizes (powers of two up to
the records) and 1 to 3 local epochs (or the asked number) under the same budget, records and
rounds, keeps those with at least ``min(MIN_TOTAL_STEPS, the asked plan's total steps)`` steps
in all, and offers the one with the least noise per coordinate when it cuts the asked plan's by
at least ``BETTER_BY``. A plan is *poor* when such a better plan exists, or when its noise
outweighs the largest gradient (``noise_to_signal > 1``, when the parameter count is known).
Whether a less noisy plan trains a more accurate model depends on the task: the tuning
benchmark measures it (benchmarks/README.md); the planner states the noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from bedside.errors import InputError, PrivacyError
from bedside.privacy.accountant import DpEvent, calibrate, compose, epsilon, sampled_gaussian
from bedside.privacy.dpsgd import expected_batch_size, sample_rate, steps

#: A better plan keeps at least this many DP-SGD steps over the whole federation (or as many as
#: the asked plan, if it has fewer): fewer steps cannot train a model.
MIN_TOTAL_STEPS = 100
#: ... and is offered only if it cuts the noise per coordinate by at least this factor.
BETTER_BY = 1.25
#: Local epochs the search tries (besides the asked number).
EPOCH_CHOICES = (1, 2, 3)
#: Smallest batch size the search tries.
MIN_BATCH = 8
#: Calibrated a hair below the budget, so rounding never makes the last planned round exceed it.
BUDGET_MARGIN = 0.995


@dataclass(frozen=True)
class Plan:
    """A record-level DP-SGD plan for one device over the whole federation."""

    epsilon: float  # the budget planned for (before the margin)
    delta: float
    records: int
    rounds: int
    batch_size: int
    epochs: int
    max_grad_norm: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    expected_batch: int
    achieved_epsilon: float | None = None  # of the base and every planned round, at delta

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.rounds

    @property
    def noise_per_coordinate(self) -> float:
        """Noise standard deviation on each coordinate of a step's averaged gradient, in units
        of the per-example clip norm."""
        return self.noise_multiplier / self.expected_batch

    def noise_to_signal(self, parameters: int) -> float:
        """Expected L2 norm of a step's noise over ``parameters`` coordinates, relative to the
        largest norm the averaged clipped gradient can have (the clip norm)."""
        if parameters < 1:
            raise InputError(f"parameters must be >= 1, got {parameters}")
        return self.noise_per_coordinate * math.sqrt(parameters)

    def to_dict(self, parameters: int | None = None) -> dict[str, Any]:
        out = asdict(self)
        out["total_steps"] = self.total_steps
        out["noise_per_coordinate"] = self.noise_per_coordinate
        if parameters is not None:
            out["parameters"] = parameters
            out["noise_to_signal"] = self.noise_to_signal(parameters)
        return out


def plan(epsilon_budget: float, delta: float, records: int, rounds: int, batch_size: int,
         epochs: int, max_grad_norm: float = 1.0, base: DpEvent | None = None,
         accountant: str = "auto", account: bool = True) -> Plan:
    """The noise that spreads ``epsilon_budget`` (minus what ``base`` already spent) over
    ``rounds`` rounds of ``epochs`` local epochs of DP-SGD at ``batch_size`` on ``records``
    records; ``account``: also state the epsilon the plan achieves (one more accounting).
    Raises PrivacyError when nothing fits (the base alone exhausts the budget)."""
    for name, value in (("records", records), ("rounds", rounds), ("batch size", batch_size),
                        ("epochs", epochs)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise InputError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    q = sample_rate(records, batch_size)
    per_round = steps(records, batch_size, epochs)
    z = calibrate(epsilon_budget * BUDGET_MARGIN, delta, q, per_round * rounds, accountant,
                  base=base)
    achieved = None
    if account:
        event = sampled_gaussian(z, q, per_round * rounds)
        achieved = epsilon(compose([base, event]) if base is not None else event, delta,
                           accountant)
    return Plan(epsilon=epsilon_budget, delta=delta, records=records, rounds=rounds,
                batch_size=min(batch_size, records), epochs=epochs, max_grad_norm=max_grad_norm,
                noise_multiplier=z, sample_rate=q, steps_per_round=per_round,
                expected_batch=expected_batch_size(records, batch_size),
                achieved_epsilon=achieved)


def _batches(records: int) -> list[int]:
    out, b = [], MIN_BATCH
    while b < records:
        out.append(b)
        b *= 2
    return [*out, records]


def better(asked: Plan, parameters: int | None = None, base: DpEvent | None = None,
           accountant: str = "auto") -> Plan | None:
    """A plan within the same budget, records and rounds (another batch size, 1 to 3 local
    epochs or the asked number) with at least ``min(MIN_TOTAL_STEPS, asked.total_steps)``
    steps in all:

    * with ``parameters``, when a step of ``asked`` is noisier than the largest gradient
      (``noise_to_signal > 1``): the plan with the most steps whose steps are not (the least
      change that fixes it), or else the least noisy;
    * with ``parameters`` and a sound ``asked`` plan: None;
    * without ``parameters``: the least noisy per coordinate, if it cuts ``asked``'s noise by
      ``BETTER_BY`` (fewer, larger steps: whether that trains better depends on the task).

    None when no plan qualifies. For a fixed number of epochs, a larger batch is less noisy per
    coordinate and takes fewer steps, so each epoch count is searched by bisection over the
    batch sizes (powers of two, and the full batch)."""
    floor = min(MIN_TOTAL_STEPS, asked.total_steps)
    cache: dict[tuple[int, int], Plan | None] = {}

    def at(b: int, e: int) -> Plan | None:
        if (b, e) not in cache:
            try:
                cache[(b, e)] = plan(asked.epsilon, asked.delta, asked.records, asked.rounds, b,
                                     e, asked.max_grad_norm, base, accountant, account=False)
            except PrivacyError:
                cache[(b, e)] = None
        return cache[(b, e)]

    fix = parameters is not None and asked.noise_to_signal(parameters) > 1
    if parameters is not None and not fix:
        return None  # a sound plan: its steps' noise is below the largest gradient
    found: list[Plan] = []
    for e in sorted(set(EPOCH_CHOICES) | {asked.epochs}):
        sizes = [b for b in _batches(asked.records)
                 if steps(asked.records, b, e) * asked.rounds >= floor]
        if not sizes:
            continue
        if fix:
            assert parameters is not None
            lo, hi = 0, len(sizes) - 1  # the smallest batch whose step noise is below 1
            if (p := at(sizes[hi], e)) is None or p.noise_to_signal(parameters) > 1:
                if p is not None:
                    found.append(p)  # none fixes it with these epochs: the least noisy
                continue
            while lo < hi:
                mid = (lo + hi) // 2
                q = at(sizes[mid], e)
                if q is not None and q.noise_to_signal(parameters) <= 1:
                    hi = mid
                else:
                    lo = mid + 1
            p = at(sizes[lo], e)
        else:
            p = at(sizes[-1], e)  # the largest batch: the least noisy at this epoch count
        if p is not None:
            found.append(p)
    found = [p for p in found if (p.batch_size, p.epochs) != (asked.batch_size, asked.epochs)]
    if not found:
        return None
    if fix:
        assert parameters is not None
        fixed = [p for p in found if p.noise_to_signal(parameters) <= 1]
        best = (max(fixed, key=lambda p: (p.total_steps, -p.noise_per_coordinate)) if fixed
                else min(found, key=lambda p: p.noise_per_coordinate))
        if best.noise_per_coordinate >= asked.noise_per_coordinate:
            return None
    else:
        best = min(found, key=lambda p: p.noise_per_coordinate)
        if best.noise_per_coordinate * BETTER_BY > asked.noise_per_coordinate:
            return None
    return plan(best.epsilon, best.delta, best.records, best.rounds, best.batch_size,
                best.epochs, best.max_grad_norm, base, accountant)  # with its epsilon


def poor(asked: Plan, parameters: int | None = None) -> str:
    """Why ``asked`` is a poor plan ("" when it is not): with the model's parameter count, when
    a step's noise outweighs the largest gradient it can carry (too little data per step for
    the budget)."""
    if parameters is not None and asked.noise_to_signal(parameters) > 1:
        return (f"a step's noise ({asked.noise_to_signal(parameters):.3g} x the clip norm over "
                f"{parameters:,} parameters) outweighs the largest gradient it can carry: too "
                "little data per step for the budget")
    return ""
