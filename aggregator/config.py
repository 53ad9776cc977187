"""``aggregator.toml``: what the aggregator service reads. See docs/configuration.md.

Every key is declared once, on the dataclasses (here and in :mod:`bedside.federation.settings`,
which holds the ``[rounds]``, ``[training]``, ``[privacy]`` and ``[strategy]`` sections every
driver shares); the loader is derived from them (:mod:`bedside.config`). Example::

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
    [privacy.adaptive_clipping]  # optional: the clip norm follows a quantile of update norms
    target_quantile = 0.5

    [strategy]
    rule = "fedavg"            # fedavg | median | trimmed_mean
    optimizer = "sgd"          # sgd | fedavgm | fedadam
    [strategy.params]          # passed to the rule, e.g. trim_fraction = 0.2
    [strategy.optimizer_params]  # passed to the optimizer, e.g. lr = 1.0, momentum = 0.9

    [flower]                   # optional: run over Flower instead (docs/flower.md)
    port = 9093
    ca_file = "certs/ca.crt"   # TLS (or insecure = true, on 127.0.0.1 only)
    cert_file = "certs/superlink.crt"
    key_file = "certs/superlink.key"

    [evaluation]               # optional: a labelled CSV held centrally by the data team
    data = "holdout.csv"
    label = "label"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bedside.config import load_file, setting
from bedside.errors import ConfigError
from bedside.federation.settings import (
    FederationSettings,
)
from bedside.transport.flower import FlowerServerConfig
from bedside.transport.mqtt import MqttConfig
from bedside.wire.signing import validate_id

DEFAULT_MAX_UPDATE_BYTES = 64 * 1024 * 1024


def _id(value: str, where: str) -> None:
    validate_id(value, what=where)


@dataclass(frozen=True)
class EvaluationConfig:
    data: Path | None = setting(None, "the data team's labelled reference CSV, evaluated for "
                                "every new version")
    label: str | None = setting(None, "its label column")

    def __post_init__(self) -> None:
        if (self.data is None) != (self.label is None):
            raise ConfigError("'data' and 'label' go together")


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig(FederationSettings):
    """``aggregator.toml``: the federation (``[rounds]``, ``[training]``, ``[privacy]``,
    ``[strategy]``, ``[statistics]``, declared once in :class:`FederationSettings`) and the
    service around it."""

    fleet: str = setting(doc="name of the federation (part of every topic)", check=_id)
    key: Path = setting(doc="the aggregator's Ed25519 private key (mode 0600)")
    devices: Path = setting(doc="directory of enrolled devices' public keys, <device_id>.pub")
    data_dir: Path = setting(Path("aggregator-data"), "holds state.db and registry/")
    initial_model: Path | None = setting(None, "model directory imported as the first version "
                                         "when the registry is empty")
    max_update_bytes: int = setting(DEFAULT_MAX_UPDATE_BYTES, "larger updates are rejected "
                                    "before parsing", min=1024)
    mqtt: MqttConfig = setting(doc="[mqtt]", factory=MqttConfig)
    flower: FlowerServerConfig | None = setting(None, "[flower]: the SuperLink, when the "
                                                "federation runs over Flower (docs/flower.md)")
    evaluation: EvaluationConfig = setting(doc="[evaluation]", factory=EvaluationConfig)
    testing: bool = setting(False, "allows [privacy] noise_seed (reproducible noise: NOT private);"
                            " every announcement, model and report then says so. Tests and "
                            "demos only")
    source: str = setting("aggregator.toml", internal=True)

    def __post_init__(self) -> None:
        super().__post_init__()  # the federation's cross-section checks (noise, rule, ...)
        if self.privacy.noise_seed is not None and not self.testing:
            raise ConfigError(
                "[privacy] noise_seed makes the aggregator's noise reproducible, which removes "
                "its privacy: it is for tests and demos only. Remove it, or set testing = true "
                "to say in writing that this federation protects nobody")

    @property
    def federation(self) -> FederationSettings:
        return self

    @property
    def state_path(self) -> Path:
        return self.data_dir / "state.db"

    @property
    def registry_path(self) -> Path:
        return self.data_dir / "registry"


def load(path: str | Path) -> AggregatorConfig:
    cfg = load_file(AggregatorConfig, path)
    if not cfg.data_dir.is_absolute():
        from dataclasses import replace

        cfg = replace(cfg, data_dir=Path(path).resolve().parent / cfg.data_dir)
    return cfg
