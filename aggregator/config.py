"""``aggregator.toml``: what the aggregator service reads. See docs/configuration.md.

Example::

    fleet = "north-clinics"
    data_dir = "aggregator-data"          # state.db and registry/ live here
    key = "keys/aggregator.key"           # Ed25519 signing key (mode 0600)
    devices = "keys/devices"              # enrolled devices: <device_id>.pub
    initial_model = "models/wdbc-mlp"     # version 1 if the registry is empty

    [mqtt]
    host = "127.0.0.1"
    port = 1883

    [rounds]
    rounds = 10                # planned rounds (0: keep going until stopped)
    min_participants = 3       # a round with fewer accepted updates produces no new model
    deadline_seconds = 120
    participation_rate = 1.0   # each device takes part with this probability (it flips the coin)

    [training]                 # sent to devices in every announcement
    epochs = 1
    batch_size = 16
    lr = 0.05
    optimizer = "sgd"
    lr_decay = 1.0             # round r trains with lr * lr_decay^(r - 1): less noise at the end

    [privacy]
    noise = "central"          # central | local | none
    clip_norm = 1.0            # L2 bound of a device's update
    noise_multiplier = 0.5     # noise std = noise_multiplier * clip_norm
    delta = 1e-5
    weighting = "uniform"      # uniform | examples (bucketed counts; not with central noise)

    [strategy]
    rule = "fedavg"            # fedavg | median | trimmed_mean
    optimizer = "sgd"          # sgd | fedavgm | fedadam
    [strategy.params]          # passed to the rule, e.g. trim_fraction = 0.2
    [strategy.optimizer_params]  # passed to the optimizer, e.g. lr = 1.0, momentum = 0.9

    [evaluation]               # optional: a labelled CSV held centrally by the data team
    data = "holdout.csv"
    label = "label"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bedside import config as cfgmod
from bedside.constants import NOISE_CENTRAL, NOISE_MODES
from bedside.errors import ConfigError
from bedside.transport.mqtt import MqttConfig


@dataclass(frozen=True)
class RoundsConfig:
    rounds: int = 10
    min_participants: int = 2
    deadline_seconds: float = 120.0
    participation_rate: float = 1.0
    expected_participants: int | None = None  # close early once this many answered (default: all)


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    optimizer: str = "sgd"
    lr_decay: float = 1.0  # round r trains with lr * lr_decay ** (r - 1)

    def for_round(self, round_id: int) -> dict[str, Any]:
        """The local training settings announced for round ``round_id`` (1-based)."""
        return {"epochs": self.epochs, "batch_size": self.batch_size,
                "lr": self.lr * self.lr_decay ** max(0, round_id - 1),
                "optimizer": self.optimizer}


@dataclass(frozen=True)
class PrivacyConfig:
    noise: str = NOISE_CENTRAL
    clip_norm: float = 1.0
    noise_multiplier: float = 0.5
    delta: float = 1e-5
    weighting: str = "uniform"
    noise_seed: int | None = None  # tests and reproducible demos only; production draws from the OS


@dataclass(frozen=True)
class StrategyConfig:
    rule: str = "fedavg"
    optimizer: str = "sgd"
    params: dict[str, Any] = field(default_factory=dict)
    optimizer_params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AggregatorConfig:
    fleet: str
    data_dir: Path
    key: Path
    devices: Path
    mqtt: MqttConfig
    initial_model: Path | None = None
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    eval_data: Path | None = None
    eval_label: str | None = None
    max_update_bytes: int = 64 * 1024 * 1024
    source: str = "aggregator.toml"

    @property
    def state_path(self) -> Path:
        return self.data_dir / "state.db"

    @property
    def registry_path(self) -> Path:
        return self.data_dir / "registry"


def load(path: str | Path) -> AggregatorConfig:
    from bedside.wire.signing import validate_id

    s = cfgmod.load(path)
    fleet = s.text("fleet", required=True)
    validate_id(fleet, what="fleet")
    r = s.section("rounds")
    rounds = RoundsConfig(
        rounds=r.integer("rounds", 10, min=0),
        min_participants=r.integer("min_participants", 2, min=1),
        deadline_seconds=r.number("deadline_seconds", 120.0, positive=True),
        participation_rate=r.number("participation_rate", 1.0, positive=True, max=1.0),
        expected_participants=r.integer("expected_participants", None, min=1),
    )
    r.done()
    t = s.section("training")
    training = TrainingConfig(
        epochs=t.integer("epochs", 1, min=1), batch_size=t.integer("batch_size", 16, min=1),
        lr=t.number("lr", 0.05, positive=True), optimizer=t.choice("optimizer", ("sgd", "adam"),
                                                                   "sgd"),
        lr_decay=t.number("lr_decay", 1.0, positive=True, max=1.0))
    t.done()
    p = s.section("privacy")
    privacy = PrivacyConfig(
        noise=p.choice("noise", NOISE_MODES, NOISE_CENTRAL),
        clip_norm=p.number("clip_norm", 1.0, positive=True),
        noise_multiplier=p.number("noise_multiplier", 0.5, min=0.0),
        delta=p.number("delta", 1e-5, positive=True, max=0.1),
        weighting=p.choice("weighting", ("uniform", "examples"), "uniform"),
        noise_seed=p.integer("noise_seed", None),
    )
    p.done()
    st = s.section("strategy")
    strategy = StrategyConfig(rule=st.text("rule", "fedavg"), optimizer=st.text("optimizer", "sgd"),
                              params=st.table("params"),
                              optimizer_params=st.table("optimizer_params"))
    st.done()
    e = s.section("evaluation")
    eval_data, eval_label = e.path("data"), e.text("label")
    e.done()
    if (eval_data is None) != (eval_label is None):
        raise ConfigError(f"{path} [evaluation]: 'data' and 'label' go together")
    mqtt = cfgmod.mqtt_section(s.section("mqtt"))
    cfg = AggregatorConfig(
        fleet=fleet,
        data_dir=s.path("data_dir", "aggregator-data"),
        key=s.path("key", required=True),
        devices=s.path("devices", required=True),
        initial_model=s.path("initial_model"),
        mqtt=mqtt, rounds=rounds, training=training, privacy=privacy, strategy=strategy,
        eval_data=eval_data, eval_label=eval_label,
        max_update_bytes=s.integer("max_update_bytes", 64 * 1024 * 1024, min=1024),
        source=str(path),
    )
    s.done()
    validate(cfg)
    return cfg


def validate(cfg: AggregatorConfig) -> None:
    """Cross-checks that keep the privacy claims sound. Raises ConfigError naming the keys."""
    from bedside.aggregator.strategies import OPTIMIZERS, RULES, make_optimizer, make_rule

    src = cfg.source
    if cfg.strategy.rule not in RULES:
        raise ConfigError(f"{src} [strategy]: unknown rule {cfg.strategy.rule!r}; choose one of "
                          f"{', '.join(sorted(RULES))}")
    if cfg.strategy.optimizer not in OPTIMIZERS:
        raise ConfigError(f"{src} [strategy]: unknown optimizer {cfg.strategy.optimizer!r}; "
                          f"choose one of {', '.join(sorted(OPTIMIZERS))}")
    make_rule(cfg.strategy.rule, **cfg.strategy.params)
    make_optimizer(cfg.strategy.optimizer, **cfg.strategy.optimizer_params)
    p = cfg.privacy
    if p.noise == NOISE_CENTRAL:
        if cfg.strategy.rule != "fedavg":
            raise ConfigError(
                f"{src}: noise = 'central' is calibrated to the sum of clipped updates, which is "
                f"what 'fedavg' averages; rule {cfg.strategy.rule!r} has another sensitivity. Use "
                "noise = 'local' with robust rules"
            )
        if p.weighting != "uniform":
            raise ConfigError(
                f"{src}: noise = 'central' needs weighting = 'uniform' (weighting by example "
                "counts would change each device's sensitivity)"
            )
    if p.noise != "none" and p.noise_multiplier <= 0:
        raise ConfigError(f"{src} [privacy]: noise = {p.noise!r} needs noise_multiplier > 0")
    if cfg.rounds.expected_participants is not None and (
            cfg.rounds.expected_participants < cfg.rounds.min_participants):
        raise ConfigError(f"{src} [rounds]: expected_participants < min_participants")
