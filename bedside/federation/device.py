"""A device's side of a round, as pure functions: plan the round's privacy, privatize the update.

* :func:`plan_round`: from the announced settings, the device's own privacy configuration and its
  record count, the round's releases (record-level DP-SGD, device-level Gaussian) and the DP-SGD
  plan; the ledger checks them before anything is trained;
* :func:`privatize`: ``delta = w_local - w_global`` clipped to L2 norm ``C``, the adaptive-clipping
  bit, local noise;
* :func:`plan_group_counts`: the releases of per-group counts a round asks for, or why they are
  withheld (:mod:`bedside.federation.fairness`);
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
from bedside.constants import (
    NOISE_CENTRAL,
    NOISE_LOCAL,
    NOISE_NONE,
    UNIT_DEVICE,
    UNIT_RECORD,
    NoiseMode,
)
from bedside.errors import BudgetExceededError, ConfigError, PolicyDeclined, PrivacyError
from bedside.federation.fairness import MIN_GROUP_NOISE
from bedside.federation.settings import RoundSettings
from bedside.federation.statistics import MIN_STATISTICS_NOISE
from bedside.privacy import dpsgd
from bedside.privacy.dpsgd import DPSGDPlan
from bedside.privacy.ledger import Budget, Release

#: Rounds assumed for calibrating DP-SGD when the aggregator plans no end.
ASSUMED_ROUNDS = 100


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
    accept_noise: tuple[NoiseMode, ...] = setting(
        (NOISE_LOCAL, NOISE_CENTRAL), "where the device accepts device-level noise to be added: "
        "local (it adds it itself), central (it trusts the aggregator to), none (no device-level "
        "noise); a round with another mode is declined (reason policy)")
    min_noise_multiplier: float | None = setting(None, "decline rounds announcing less "
                                                 "device-level noise than this", min=0.0)
    max_clip_norm: float | None = setting(None, "decline rounds announcing a larger update clip "
                                          "norm", positive=True)
    max_local_epochs: int | None = setting(None, "decline rounds asking for more local epochs",
                                           min=1)
    max_sample_rate: float | None = setting(None, "decline rounds whose DP-SGD plan samples "
                                            "records at a higher rate (batch / records)",
                                            positive=True, max=1.0)
    min_statistics_noise: float = setting(MIN_STATISTICS_NOISE, "decline feature-statistics "
                                          "rounds whose record-level noise multiplier is below "
                                          "this", min=0.0)
    group_counts: bool = setting(True, "release per-group confusion counts when a round asks "
                                 "for them (noised by the device and accounted); false: never")
    min_group_noise: float = setting(MIN_GROUP_NOISE, "withhold per-group counts when a round "
                                     "asks for less noise on a count than this", min=0.0)

    def __post_init__(self) -> None:
        if self.record_epsilon is None and not self.allow_no_record_dp:
            raise ConfigError("'record_epsilon' is required (the record-level budget "
                              "this device enforces, e.g. 8.0); to train without DP-SGD, set "
                              "allow_no_record_dp = true explicitly")
        if self.record_epsilon is not None and self.allow_no_record_dp:
            raise ConfigError("set either 'record_epsilon' or 'allow_no_record_dp = "
                              "true', not both")
        if not self.accept_noise:
            raise ConfigError("'accept_noise' lists no noise mode: the device would decline "
                              "every round")

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

    def releases(self, unit: str) -> list[Release]: ...


@dataclass(frozen=True)
class RoundPlan:
    releases: tuple[Release, ...]
    dp: DPSGDPlan | None
    counts_withheld: str = ""  # why per-group counts are withheld this federation, if they are


def check_policy(settings: RoundSettings, privacy: DevicePrivacy, records: int) -> None:
    """Raise PolicyDeclined if the round asks for something this device's policy refuses.

    The device decides its own privacy: where noise is added, how much at least, how large an
    update may be and how hard the record-level plan may sample its records. The reason stays on
    the device; the decline it publishes says only ``policy``.
    """
    s, t = settings, settings.train
    why = []
    if s.noise not in privacy.accept_noise:
        why.append(f"noise mode {s.noise!r} is not one this device accepts "
                   f"({', '.join(privacy.accept_noise)})")
    if (privacy.min_noise_multiplier is not None and s.noise != NOISE_NONE
            and s.noise_multiplier < privacy.min_noise_multiplier):
        why.append(f"noise multiplier {s.noise_multiplier:g} < this device's minimum "
                   f"{privacy.min_noise_multiplier:g}")
    if privacy.max_clip_norm is not None and s.clip_norm > privacy.max_clip_norm:
        why.append(f"clip norm {s.clip_norm:g} > this device's maximum {privacy.max_clip_norm:g}")
    if privacy.max_local_epochs is not None and t.epochs > privacy.max_local_epochs:
        why.append(f"{t.epochs} local epochs > this device's maximum {privacy.max_local_epochs}")
    if privacy.max_sample_rate is not None and privacy.record_epsilon is not None:
        q = dpsgd.sample_rate(records, t.batch_size)
        if q > privacy.max_sample_rate:
            why.append(f"the DP-SGD plan would sample records at rate {q:.4g} > this device's "
                       f"maximum {privacy.max_sample_rate:g}")
    if why:
        raise PolicyDeclined("; ".join(why))


def check_statistics_policy(settings: RoundSettings, privacy: DevicePrivacy) -> None:
    """Raise PolicyDeclined if a feature-statistics round asks for less noise than this device's
    policy allows (its budget is checked separately, by the ledger)."""
    st = settings.statistics
    if st is not None and st.noise_multiplier < privacy.min_statistics_noise:
        raise PolicyDeclined(f"statistics noise multiplier {st.noise_multiplier:g} < this "
                             f"device's minimum {privacy.min_statistics_noise:g}")


def record_noise(privacy: DevicePrivacy, settings: RoundSettings, records: int,
                 base: Sequence[Release] = ()) -> DPSGDPlan:
    """DP-SGD for one round: the noise that spreads the rest of the record budget over the
    planned rounds.

    Poisson sampling at ``1 / ceil(n / batch)`` for ``epochs * ceil(n / batch)`` steps a round;
    the noise multiplier is calibrated (dp-accounting) so that ``base`` (what the device released
    before this federation's training: other federations, this one's feature statistics) and
    every planned round together stay within the budget: the planner's
    (:func:`bedside.privacy.planner.plan`, also ``bedside privacy plan``).
    """
    from bedside.privacy.ledger import releases_event
    from bedside.privacy.planner import plan

    assert privacy.record_epsilon is not None
    t = settings.train
    try:
        p = plan(privacy.record_epsilon, privacy.record_delta, records,
                 settings.planned_rounds or ASSUMED_ROUNDS, t.batch_size, t.epochs,
                 privacy.max_grad_norm, base=releases_event(base) if base else None,
                 account=False)
    except PrivacyError as exc:
        raise BudgetExceededError(f"record-level budget: {exc}") from None
    return DPSGDPlan(noise_multiplier=p.noise_multiplier, max_grad_norm=privacy.max_grad_norm,
                     sample_rate=p.sample_rate, steps=p.steps_per_round)


def _none(round_id: int, unit: str, fleet: str, note: str) -> Release:
    return Release(round=round_id, unit=unit, mechanism="none",  # type: ignore[arg-type]
                   noise_multiplier=0.0, sample_rate=1.0, steps=1, note=note, fleet=fleet)


def plan_round(round_id: int, settings: RoundSettings, privacy: DevicePrivacy, records: int,
               ledger: LedgerView) -> RoundPlan:
    """The round's releases and DP-SGD plan, checked against the device's policy and ledger.

    Every release is described, whatever the budgets: record level (DP-SGD, or a release without
    DP when the device trains without it) and device level (local noise: enforced by the device;
    central noise: enforced by the aggregator; none: no guarantee). Raises PolicyDeclined (decline
    ``policy``), BudgetExceededError (decline ``budget``: a budget would be exceeded) or
    LedgerError (the ledger cannot be read: fail closed).
    """
    from bedside.federation import fairness
    from bedside.privacy.federated import device_round_releases

    check_policy(settings, privacy, records)
    fleet = settings.fleet
    releases: list[Release] = []
    dp = None
    withheld = ""
    g = settings.group_counts
    if privacy.record_epsilon is not None:
        past = [r for r in ledger.releases(UNIT_RECORD)
                if not (r.fleet == fleet and r.mechanism == "sampled_gaussian")]
        reserve: list[Release] = []
        if g is not None:
            withheld = counts_refused(settings, privacy, ledger)
            if not withheld:  # keep the budget for the group counts still to come
                reserve = fairness.planned(g, fleet)[:max(0, g.releases
                                                          - fairness.made(past, fleet))]
        try:
            dp = record_noise(privacy, settings, records, [*past, *reserve])
        except BudgetExceededError:
            if not reserve:
                raise
            # the counts would leave too little for training: train, and withhold them
            dp = record_noise(privacy, settings, records, past)
            withheld = ("the record budget cannot cover the group counts the federation plans "
                        "as well as training")
        releases.append(Release(round=round_id, unit=UNIT_RECORD, mechanism="sampled_gaussian",
                                noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate,
                                steps=dp.steps, note="DP-SGD (Poisson sampling)", fleet=fleet))
    else:
        releases.append(_none(round_id, UNIT_RECORD, fleet, "trained without DP-SGD"))
    if settings.noise == NOISE_NONE:
        releases.append(_none(round_id, UNIT_DEVICE, fleet, "no device-level noise"))
    else:
        releases += device_round_releases(
            round_id, settings.noise, settings.update_noise_multiplier,
            settings.adaptive.count_noise if settings.adaptive else None, fleet=fleet)
    ledger.check(releases)
    return RoundPlan(releases=tuple(releases), dp=dp, counts_withheld=withheld)


def counts_refused(settings: RoundSettings, privacy: DevicePrivacy, ledger: LedgerView) -> str:
    """Why this device will not release the group counts its federation asks for, from its own
    policy and ledger alone ("" if it may): its policy, too little noise, or a device-level
    budget that cannot cover one release (a clinic's whole counts are barely hidden by the
    noise: at device level one release costs a large epsilon)."""
    from bedside.federation import fairness

    g = settings.group_counts
    if g is None:
        return "the federation asks for no group counts"
    if not privacy.group_counts:
        return "this device's policy does not release group counts (group_counts = false)"
    if g.noise_multiplier < privacy.min_group_noise:
        return (f"group counts noise multiplier {g.noise_multiplier:g} < this device's minimum "
                f"{privacy.min_group_noise:g}")
    if privacy.device_epsilon is not None:
        device = [r for r in fairness.count_releases(0, g, settings.fleet) if r.unit == UNIT_DEVICE]
        try:
            ledger.check(device)
        except BudgetExceededError:
            return ("the device-level budget cannot cover a release of group counts (at device "
                    "level one costs a large epsilon; see docs/governance.md)")
    return ""


def plan_group_counts(round_id: int, settings: RoundSettings, privacy: DevicePrivacy,
                      ledger: LedgerView, plan: RoundPlan) -> tuple[list[Release], str]:
    """The releases of the group counts this round asks for, checked together with the round's
    own, or ``([], why not)``: the counts are withheld (the device still trains) when the round
    does not ask, the device's policy refuses them (``group_counts = false``, less noise than
    ``min_group_noise``), the federation already had as many as it planned, or the budget would
    not cover them."""
    from bedside.federation import fairness

    g = settings.group_counts
    if g is None or not g.release:
        return [], ""
    why = plan.counts_withheld or counts_refused(settings, privacy, ledger)
    if why:
        return [], why
    if fairness.made(ledger.releases(UNIT_RECORD), settings.fleet) >= g.releases:
        return [], (f"the federation planned {g.releases} release(s) of group counts and this "
                    "device made them all")
    releases = fairness.count_releases(round_id, g, settings.fleet, settings.model_sha256)
    try:
        ledger.check([*plan.releases, *releases])
    except BudgetExceededError as exc:
        return [], f"the group counts would exceed a budget: {exc}"
    return releases, ""


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


def published_privacy(report: Mapping[str, Any]) -> dict[str, Any]:
    """What of a ledger report may leave the device (in its status): each unit's epsilon rounded
    up to 0.01 as in updates (the exact figure reveals the record count), whether it depends on
    the aggregator, its delta and budget. Release counts, remaining budget and the accountant's
    exact output stay local (``bedside edge status`` shows them)."""
    out: dict[str, Any] = {}
    for unit, r in report.items():
        if not isinstance(r, Mapping):
            continue
        eps, own = r.get("epsilon"), r.get("epsilon_device_enforced")
        out[unit] = {
            "epsilon": None if eps is None else rounded_epsilon(float(eps)),
            "epsilon_device_enforced": None if own is None else rounded_epsilon(float(own)),
            "delta": r.get("delta"), "budget_epsilon": r.get("budget_epsilon"),
        }
    return out


def update_meta(fleet: str, settings: RoundSettings, records: int, record_epsilon: float | None,
                record_delta: float, clip_bit: float | None,
                seeded: bool = False, group_counts: np.ndarray | None = None) -> dict[str, Any]:
    """Everything that travels beside the update's tensors (``seeded``: this device's noise was
    seeded, so the update is not private: it says so)."""
    meta: dict[str, Any] = {"fleet": fleet}
    if seeded:
        meta["seeded"] = True
    if settings.task != "train":
        meta["task"] = settings.task
    elif settings.weighting == "examples":  # only when the aggregator weights by it (bucketed)
        meta["weight"] = bucket(records)
    if group_counts is not None:  # noised on the device; 3 decimals are plenty
        meta["group_counts"] = [round(float(v), 3) for v in group_counts]
    if record_epsilon is not None:
        meta["record_epsilon"] = rounded_epsilon(record_epsilon)
        meta["record_delta"] = record_delta
    if clip_bit is not None:
        meta["clip_bit"] = clip_bit
    return meta
