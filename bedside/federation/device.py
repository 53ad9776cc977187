"""A device's side of a round, as pure functions: plan the round's privacy, privatize the update.

* :func:`plan_round`: from the announced settings, the device's own privacy configuration and its
  record count, the round's releases (record-level DP-SGD, device-level Gaussian) and the DP-SGD
  plan; the ledger checks them before anything is trained;
* :func:`privatize`: ``delta = w_local - w_global`` clipped to L2 norm ``C``, the adaptive-clipping
  bit, local noise;
* :func:`update_meta`: what travels beside the update (nothing else derived from records).

Training itself (torch) is :func:`bedside.edge.trainer.local_update`; signing, the outbox and the
network are the driver's. The MQTT agent, Flower's ClientApp and the in-process simulation call
these same functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from bedside.config import setting
from bedside.constants import NOISE_LOCAL, NOISE_NONE, UNIT_DEVICE, UNIT_RECORD
from bedside.errors import BudgetExceededError, ConfigError
from bedside.federation.settings import RoundSettings
from bedside.privacy.dpsgd import DPSGDPlan
from bedside.privacy.ledger import Budget, Release

#: Rounds assumed for calibrating DP-SGD when the aggregator plans no end.
ASSUMED_ROUNDS = 100
#: DP-SGD is calibrated a hair below the record budget, so rounding never makes the last planned
#: round exceed it.
BUDGET_MARGIN = 0.995


@dataclass(frozen=True)
class DevicePrivacy:
    """``[privacy]`` of ``agent.toml``: the budgets this device enforces itself."""

    record_epsilon: float | None = setting(None, "record-level budget (DP-SGD): required, "
                                           "unless allow_no_record_dp", positive=True)
    allow_no_record_dp: bool = setting(False, "true (instead of record_epsilon) trains without "
                                       "DP-SGD: an explicit choice, never a default")
    record_delta: float = setting(1e-5, "delta of the record-level budget", positive=True,
                                  max=0.1)
    max_grad_norm: float = setting(1.0, "DP-SGD per-example clip", positive=True)
    device_epsilon: float | None = setting(None, "device-level budget; with it, rounds without "
                                           "device-level noise are declined", positive=True)
    device_delta: float = setting(1e-5, "delta of the device-level budget", positive=True,
                                  max=0.1)

    def __post_init__(self) -> None:
        if self.record_epsilon is None and not self.allow_no_record_dp:
            raise ConfigError("'record_epsilon' is required (the record-level budget "
                              "this device enforces, e.g. 8.0); to train without DP-SGD, set "
                              "allow_no_record_dp = true explicitly")
        if self.record_epsilon is not None and self.allow_no_record_dp:
            raise ConfigError("set either 'record_epsilon' or 'allow_no_record_dp = "
                              "true', not both")

    def budgets(self) -> dict[str, Budget]:
        """The ledger budgets this device enforces: one per privacy unit it has configured."""
        b: dict[str, Budget] = {}
        if self.record_epsilon is not None:
            b[UNIT_RECORD] = Budget(self.record_epsilon, self.record_delta)
        if self.device_epsilon is not None:
            b[UNIT_DEVICE] = Budget(self.device_epsilon, self.device_delta)
        return b


class LedgerView(Protocol):
    def check(self, releases: Sequence[Release]) -> None: ...


@dataclass(frozen=True)
class RoundPlan:
    releases: tuple[Release, ...]
    dp: DPSGDPlan | None


def record_noise(privacy: DevicePrivacy, settings: RoundSettings, records: int) -> DPSGDPlan:
    """DP-SGD for one round: the noise that spreads the record budget over the planned rounds.

    Poisson sampling at ``1 / ceil(n / batch)`` for ``epochs * ceil(n / batch)`` steps a round;
    the noise multiplier is calibrated (dp-accounting) so that every planned round together stays
    within ``record_epsilon * BUDGET_MARGIN``.
    """
    from bedside.privacy.accountant import calibrate

    assert privacy.record_epsilon is not None
    t = settings.train
    probe = DPSGDPlan.for_records(records, t.batch_size, t.epochs, 1.0, privacy.max_grad_norm)
    rounds = settings.planned_rounds or ASSUMED_ROUNDS
    sigma = calibrate(privacy.record_epsilon * BUDGET_MARGIN, privacy.record_delta,
                      probe.sample_rate, probe.steps * rounds)
    return DPSGDPlan(noise_multiplier=sigma, max_grad_norm=privacy.max_grad_norm,
                     sample_rate=probe.sample_rate, steps=probe.steps)


def plan_round(round_id: int, settings: RoundSettings, privacy: DevicePrivacy, records: int,
               ledger: LedgerView) -> RoundPlan:
    """The round's releases and DP-SGD plan, checked against the ledger.

    Raises BudgetExceededError (decline the round) if a budget would be exceeded, and LedgerError
    if the ledger cannot be read (fail closed).
    """
    from bedside.privacy.federated import device_round_releases

    releases: list[Release] = []
    dp = None
    if privacy.record_epsilon is not None:
        dp = record_noise(privacy, settings, records)
        releases.append(Release(round=round_id, unit=UNIT_RECORD, mechanism="sampled_gaussian",
                                noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate,
                                steps=dp.steps, note="DP-SGD (Poisson sampling)"))
    if privacy.device_epsilon is not None:
        if settings.noise == NOISE_NONE:
            raise BudgetExceededError("the round adds no device-level noise but this device "
                                      "has a device-level budget; declining")
        releases += device_round_releases(
            round_id, settings.noise, settings.update_noise_multiplier,
            settings.adaptive.count_noise if settings.adaptive else None)
    ledger.check(releases)
    return RoundPlan(releases=tuple(releases), dp=dp)


@dataclass(frozen=True)
class Privatized:
    tensors: dict[str, np.ndarray]
    norm: float  # the update's norm before clipping (stays on the device)
    clip_bit: float | None  # adaptive clipping: 1 if within C (noised in local mode)


def privatize(delta: Mapping[str, np.ndarray], names: Sequence[str], settings: RoundSettings,
              rng: np.random.Generator) -> Privatized:
    """Clip ``delta`` to L2 norm ``C``; with adaptive clipping, compute the bit; in local mode,
    noise the update (and the bit) on the device.

    Draws from ``rng`` in a fixed order: the bit, then the tensors sorted by name (the wire's
    canonical order; a manifest that travelled as canonical JSON lists them sorted too), so every
    driver seeded alike draws the same noise for the same tensor.
    """
    from bedside.privacy.mechanisms import (
        add_gaussian_noise,
        clip_indicator,
        clip_update,
        noised_count,
    )

    names = sorted(names)
    clipped, norm = clip_update([np.asarray(delta[k], np.float32) for k in names],
                                settings.clip_norm)
    bit = None
    if settings.adaptive is not None:
        bit = clip_indicator(norm, settings.clip_norm)
        if settings.noise == NOISE_LOCAL:
            bit = noised_count([bit], settings.adaptive.count_noise, rng)
    if settings.noise == NOISE_LOCAL:
        clipped = add_gaussian_noise(clipped, settings.update_noise_multiplier,
                                     settings.clip_norm, rng)
    return Privatized(dict(zip(names, clipped, strict=True)), norm, bit)


def bucket(n: int) -> int:
    """Largest power of two <= n (what leaves the device instead of the exact record count)."""
    return 1 << (max(1, n).bit_length() - 1)


def rounded_epsilon(epsilon: float) -> float:
    """Epsilon as it may leave the device: rounded up to 0.01."""
    return math.ceil(epsilon * 100) / 100


def update_meta(fleet: str, settings: RoundSettings, records: int, record_epsilon: float | None,
                record_delta: float, clip_bit: float | None) -> dict[str, Any]:
    """Everything that travels beside the update's tensors."""
    meta: dict[str, Any] = {"fleet": fleet}
    if settings.weighting == "examples":  # only when the aggregator weights by it (bucketed)
        meta["weight"] = bucket(records)
    if record_epsilon is not None:
        meta["record_epsilon"] = rounded_epsilon(record_epsilon)
        meta["record_delta"] = record_delta
    if clip_bit is not None:
        meta["clip_bit"] = clip_bit
    return meta
