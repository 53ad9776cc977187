"""What a federation is configured with, and what each round announces: declared once.

Two layers, both plain dataclasses read by :mod:`bedside.config`:

* the **federation settings** the data team writes in ``aggregator.toml`` (``[rounds]``,
  ``[training]``, ``[privacy]``, ``[strategy]``): :class:`FederationSettings`;
* the **round settings** the aggregator signs into every announcement and a device relies on:
  :class:`RoundSettings`. :meth:`FederationSettings.announce` derives them (the one place the
  aggregator builds them); :meth:`RoundSettings.to_meta` writes them and
  :meth:`RoundSettings.from_meta` reads them back, field by field, with the bounds declared on the
  fields. A signature proves who sent an announcement, not that its contents are sensible: a
  misconfigured or compromised aggregator must not crash a device, make it divide by zero or burn
  its CPU, so anything out of range is a :class:`ValidationError` ``bad_announcement``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from bedside.config import read_table, setting, to_table
from bedside.constants import (
    NOISE_CENTRAL,
    NOISE_NONE,
    LocalOptimizer,
    NoiseMode,
    Weighting,
)
from bedside.errors import ConfigError, ValidationError
from bedside.federation.fairness import GroupCountSettings
from bedside.federation.statistics import StatisticsSettings

MAX_LOCAL_EPOCHS = 100
MAX_BATCH = 65_536
MAX_ROUNDS = 100_000
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _sha256(value: str, where: str) -> None:
    if not _SHA256.fullmatch(value):
        raise ConfigError(f"{where} is not a sha256 hex digest")


# ---------------------------------------------------------------------------------------------
# What every round announces
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    """Local training a device runs in a round."""

    epochs: int = setting(1, "local epochs per round", min=1, max=MAX_LOCAL_EPOCHS)
    batch_size: int = setting(16, "expected DP-SGD batch (sets the sampling rate)", min=1,
                              max=MAX_BATCH)
    lr: float = setting(0.05, "local learning rate", min=1e-9, max=100.0)
    optimizer: LocalOptimizer = setting("sgd", "local optimizer: sgd or adam")
    weight_decay: float = setting(0.0, "L2 weight decay of local training (it does not look at "
                                  "the records: no privacy cost)", min=0.0, max=10.0)


@dataclass(frozen=True)
class AdaptiveClipping:
    """Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021).

    The clip norm follows the ``target_quantile`` of the devices' update norms: each device also
    releases whether its norm was at most the round's clip norm (one bit, noised with standard
    deviation ``count_noise``), and the next round's clip norm is
    ``C * exp(-learning_rate * (noisy fraction - target_quantile))``. The bit is a release like
    the update and is accounted with it (docs/privacy.md, section 6).
    """

    target_quantile: float = setting(0.5, "quantile of update norms the clip norm tracks",
                                     min=0.01, max=0.99)
    learning_rate: float = setting(0.2, "geometric step of the clip norm per round",
                                   positive=True, max=10.0)
    count_noise: float = setting(1.0, "standard deviation of the noise on the count of "
                                 "unclipped updates (sensitivity 1)", positive=True, max=1e6)


@dataclass(frozen=True)
class RoundSettings:
    """An open round's settings, as a device may rely on them."""

    fleet: str = setting(doc="the federation")
    deadline: float = setting(doc="unix time the round closes", min=0.0, max=1e13)
    model_sha256: str = setting(doc="sha256 of the model version trained", check=_sha256)
    clip_norm: float = setting(doc="L2 bound C of an update", min=1e-12, max=1e6)
    noise: NoiseMode = setting(doc="where device-level noise is added")
    noise_multiplier: float = setting(doc="z: update noise std z*C (sum or each update)",
                                      min=0.0, max=1e6)
    delta: float = setting(1e-5, "delta of the device-level guarantee", positive=True, max=0.1)
    participation_rate: float = setting(1.0, "probability a device takes part", min=1e-9,
                                        max=1.0)
    planned_rounds: int = setting(0, "rounds the federation plans (0: open-ended)", min=0,
                                  max=MAX_ROUNDS)
    min_participants: int = setting(1, "accepted updates a round needs", min=1,
                                    max=1_000_000)
    weighting: Weighting = setting("uniform", "uniform, or by bucketed record counts")
    train: TrainSettings = setting(doc="local training", factory=TrainSettings)
    adaptive: AdaptiveClipping | None = setting(None, "adaptive clipping, if on")
    seeded: bool = setting(False, "the aggregator's noise is seeded (tests and demos only)")
    state: Literal["open"] = setting("open", "an open round (a finished federation announces "
                                     "'done' instead)")
    task: Literal["train", "statistics"] = setting("train", "train the model, or release "
                                                   "feature statistics for its input scaling")
    statistics: StatisticsSettings | None = setting(None, "the statistics release, in a "
                                                     "statistics round")
    group_counts: GroupCountSettings | None = setting(None, "per-group confusion counts of the "
                                                      "round's model (training rounds of a "
                                                      "federation that asks for them)")

    def __post_init__(self) -> None:
        if (self.task == "statistics") != (self.statistics is not None):
            raise ValidationError("bad_announcement", "a statistics round, and only it, carries "
                                  "'statistics' settings")
        if self.group_counts is not None and self.task != "train":
            raise ValidationError("bad_announcement", "only a training round asks for group "
                                  "counts")
        if self.noise != NOISE_NONE and not self.noise_multiplier > 0:
            raise ValidationError("bad_announcement", f"noise {self.noise!r} needs a positive "
                                  "noise_multiplier")
        if self.adaptive is not None:
            if self.noise == NOISE_NONE:
                raise ValidationError("bad_announcement", "adaptive clipping needs device-level "
                                      "noise (its clip-norm estimate is a private release)")
            if not 2.0 * self.adaptive.count_noise > self.noise_multiplier:
                raise ValidationError(
                    "bad_announcement", f"adaptive clipping needs count_noise > noise_multiplier"
                    f" / 2 (got {self.adaptive.count_noise:g} and {self.noise_multiplier:g}): "
                    "the count's share of the round's privacy would exceed the whole")

    @property
    def update_noise_multiplier(self) -> float:
        """The multiplier the *update* is noised with.

        Without adaptive clipping, ``noise_multiplier``. With it, the round releases the noised
        update and the noised count together; Andrew et al. 2021 (Theorem 1) show the pair is one
        Gaussian mechanism of multiplier ``z`` when the update gets
        ``z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2)``. That holds for replace-one adjacency as
        well (sensitivities 2C and 1): the round then costs exactly what ``z`` alone would.
        """
        from bedside.privacy.mechanisms import adaptive_noise_multiplier

        z = self.noise_multiplier
        if self.adaptive is None or z == 0.0:
            return z
        return adaptive_noise_multiplier(z, self.adaptive.count_noise)

    def to_meta(self) -> dict[str, Any]:
        return to_table(self)

    @classmethod
    def from_meta(cls, meta: Any) -> RoundSettings:
        if not isinstance(meta, dict):
            raise ValidationError("bad_announcement", "announcement meta is not an object")
        return read_table(cls, meta, "announcement",
                          error=lambda m: ValidationError("bad_announcement", m))


# ---------------------------------------------------------------------------------------------
# What the data team configures (aggregator.toml)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundsPlan:
    rounds: int = setting(10, "planned rounds; 0 runs until stopped", min=0, max=MAX_ROUNDS)
    min_participants: int = setting(2, "fewer accepted updates: the round fails, the model "
                                    "stays", min=1)
    deadline_seconds: float = setting(120.0, "a round closes at its deadline at the latest",
                                      positive=True)
    participation_rate: float = setting(1.0, "each device takes part with this probability",
                                        positive=True, max=1.0)
    expected_participants: int | None = setting(None, "close early once this many have "
                                                "answered (default: every enrolled device)",
                                                min=1)

    def __post_init__(self) -> None:
        if (self.expected_participants is not None
                and self.expected_participants < self.min_participants):
            raise ConfigError("expected_participants < min_participants")


@dataclass(frozen=True)
class TrainingPlan(TrainSettings):
    lr_decay: float = setting(1.0, "round r announces lr * lr_decay^(r-1)", positive=True,
                              max=1.0)

    def for_round(self, round_id: int) -> TrainSettings:
        """The local training announced for round ``round_id`` (1-based)."""
        return TrainSettings(epochs=self.epochs, batch_size=self.batch_size,
                             lr=self.lr * self.lr_decay ** max(0, round_id - 1),
                             optimizer=self.optimizer, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class PrivacyPlan:
    noise: NoiseMode = setting(NOISE_CENTRAL, "central (the aggregator noises the sum), local "
                               "(devices noise their updates) or none")
    clip_norm: float = setting(1.0, "L2 bound C of an update (the first round's, with "
                               "adaptive clipping)", positive=True)
    noise_multiplier: float = setting(0.5, "z: noise standard deviation z*C", min=0.0)
    delta: float = setting(1e-5, "delta of the device-level report", positive=True, max=0.1)
    weighting: Weighting = setting("uniform", "uniform, or examples (bucketed counts; not with "
                                   "central noise)")
    noise_seed: int | None = setting(None, "seeds the aggregator's noise: tests and "
                                     "reproducible demos only")
    adaptive_clipping: AdaptiveClipping | None = setting(None, "[privacy.adaptive_clipping]: "
                                                         "turn adaptive clipping on")

    def __post_init__(self) -> None:
        if self.noise != NOISE_NONE and self.noise_multiplier <= 0:
            raise ConfigError(f"noise = {self.noise!r} needs noise_multiplier > 0")


@dataclass(frozen=True)
class StrategyPlan:
    rule: str = setting("fedavg", "aggregation rule: fedavg, median, trimmed_mean")
    optimizer: str = setting("sgd", "server optimizer: sgd, fedavgm, fedadam")
    params: dict[str, Any] = setting(doc="passed to the rule, e.g. trim_fraction = 0.2",
                                     factory=dict)
    optimizer_params: dict[str, Any] = setting(doc="passed to the optimizer, e.g. momentum",
                                               factory=dict)

    def __post_init__(self) -> None:
        from bedside.federation.strategies import make_optimizer, make_rule

        make_rule(self.rule, **self.params)
        make_optimizer(self.optimizer, **self.optimizer_params)


@dataclass(frozen=True)
class FederationSettings:
    """The federation part of ``aggregator.toml``; the MQTT service, Flower and the in-process
    simulation all run rounds from it."""

    rounds: RoundsPlan = setting(doc="[rounds]", factory=RoundsPlan)
    training: TrainingPlan = setting(doc="[training]", factory=TrainingPlan)
    privacy: PrivacyPlan = setting(doc="[privacy]", factory=PrivacyPlan)
    strategy: StrategyPlan = setting(doc="[strategy]", factory=StrategyPlan)
    statistics: StatisticsSettings | None = setting(None, "[statistics]: before training, "
                                                     "estimate the model's input scaling from "
                                                     "noised feature statistics")

    def __post_init__(self) -> None:
        p = self.privacy
        if p.noise == NOISE_CENTRAL:
            if self.strategy.rule != "fedavg":
                raise ConfigError(
                    f"noise = 'central' is calibrated to the sum of clipped updates, which is "
                    f"what 'fedavg' averages; rule {self.strategy.rule!r} has another "
                    "sensitivity. Use noise = 'local' with robust rules")
            if p.weighting != "uniform":
                raise ConfigError("noise = 'central' needs weighting = 'uniform' (weighting by "
                                  "example counts would change each device's sensitivity)")
        if p.adaptive_clipping is not None:
            if p.noise == NOISE_NONE:
                raise ConfigError("adaptive clipping needs noise = 'central' or 'local': the "
                                  "clip-norm estimate is a private release")
            if not 2.0 * p.adaptive_clipping.count_noise > p.noise_multiplier:
                raise ConfigError("adaptive_clipping count_noise must be > "
                                  "noise_multiplier / 2 (Andrew et al. 2021: the count and the "
                                  "update share the round's privacy)")
            if self.strategy.rule != "fedavg":
                raise ConfigError("adaptive clipping is defined for 'fedavg' (a mean of "
                                  "clipped updates)")

    def announce(self, fleet: str, round_id: int, *, deadline: float, model_sha256: str,
                 clip_norm: float | None = None,
                 training_round: int | None = None) -> RoundSettings:
        """The settings of round ``round_id``: the one place they are built. ``training_round``
        (default ``round_id``) counts training rounds only, for the learning-rate decay."""
        p, r = self.privacy, self.rounds
        return RoundSettings(
            fleet=fleet, deadline=deadline, model_sha256=model_sha256,
            clip_norm=p.clip_norm if clip_norm is None else clip_norm, noise=p.noise,
            noise_multiplier=p.noise_multiplier, delta=p.delta,
            participation_rate=r.participation_rate, planned_rounds=r.rounds,
            min_participants=r.min_participants, weighting=p.weighting,
            train=self.training.for_round(training_round or round_id),
            adaptive=p.adaptive_clipping,
            seeded=p.noise_seed is not None)

    def announce_statistics(self, fleet: str, round_id: int, *, deadline: float,
                            model_sha256: str) -> RoundSettings:
        """A statistics round (before training; :mod:`bedside.federation.statistics`)."""
        assert self.statistics is not None
        return replace(self.announce(fleet, round_id, deadline=deadline,
                                     model_sha256=model_sha256),
                       task="statistics", statistics=self.statistics)
