"""``agent.toml``: what an edge device's agent reads. See docs/configuration.md.

Every key is declared once, on the dataclasses below (name, type, default, bounds, doc); the
loader is derived from them (:mod:`bedside.config`). Example::

    device_id = "clinic-1"
    fleet = "north-clinics"
    data_dir = "/var/lib/bedside"            # records.db, ledger.db, agent.db, models/
    key = "/etc/bedside/clinic-1.key"        # this device's Ed25519 key (mode 0600)
    aggregator_key = "/etc/bedside/aggregator.pub"   # pinned at enrollment

    [mqtt]
    host = "127.0.0.1"
    port = 1883

    [flower]                 # optional: take part over Flower instead (docs/flower.md)
    superlink = "aggregator.hospital.example:9093"
    ca_file = "/etc/bedside/ca.crt"

    [privacy]
    record_epsilon = 8.0     # record-level budget (DP-SGD): required, unless
    # allow_no_record_dp = true  # ... says in writing that this device trains without DP-SGD
    record_delta = 1e-5
    max_grad_norm = 1.0      # DP-SGD per-example clip
    device_epsilon = 200.0   # device-level budget; omit to take part without one
    device_delta = 1e-5

    [storage]                # optional: encrypt records.db and agent.db (SQLCipher)
    key_file = "/etc/bedside/keys/store.key"   # 64 hex digits, mode 0600 (docs/deploy.md)

    [agent]
    seed = 7                 # ONLY for tests and reproducible demos: seeds training and DP noise
    resend_seconds = 5       # re-send an unreceipted update this often while its round is open
    status_seconds = 10
    quality_tolerance = 0.15 # keep the serving model if a new one is this much less accurate
    threads = 1              # onnxruntime threads for inference
    exit_when_done = false   # stop when the aggregator announces the federation is done
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bedside.config import load_file, setting
from bedside.errors import ConfigError
from bedside.federation.device import DevicePrivacy
from bedside.monitoring import MonitorConfig
from bedside.transport.flower import FlowerNodeConfig
from bedside.transport.mqtt import MqttConfig
from bedside.wire.signing import validate_device_id, validate_id


def _id(value: str, where: str) -> None:
    validate_id(value, what=where)


def _device_id(value: str, where: str) -> None:
    validate_device_id(value, what=where)


@dataclass(frozen=True)
class AgentSettings:
    """``[agent]``: how the agent runs."""

    resend_seconds: float = setting(5.0, "re-send an unreceipted update this often while its "
                                    "round is open", positive=True)
    status_seconds: float = setting(10.0, "status publication interval", positive=True)
    quality_tolerance: float | None = setting(0.15, "keep the serving model if a new one is "
                                              "this much less accurate on local records; false "
                                              "turns the gate off", min=0.0, max=1.0,
                                              false_is_none=True)
    threads: int = setting(1, "onnxruntime intra-op threads", min=1)
    exit_when_done: bool = setting(False, "stop when the aggregator announces the end of the "
                                   "federation")
    seed: int | None = setting(None, "seeds local training and DP noise (mixed with the round "
                               "number): tests and reproducible demos only")


@dataclass(frozen=True)
class StorageConfig:
    """``[storage]``: encryption at rest of the device's databases."""

    key_file: Path | None = setting(None, "encrypts records.db and agent.db (the outbox) with "
                                    "SQLCipher (the 'encryption' extra): a file of 64 hex digits "
                                    "only the service user may read ('bedside edge enroll "
                                    "--encrypt-store' writes one; 'bedside edge encrypt-store' "
                                    "encrypts existing files)")


@dataclass(frozen=True)
class DeidentifyConfig:
    """``[deidentify]``: what happens to each column of an ingested file (edge/deidentify.py)."""

    policy: Path | None = setting(None, "the de-identification policy (TOML: a [columns] table "
                                  "naming every column as keep, drop, pseudonymize, "
                                  "top_code_90, consent or consent_date; docs/governance.md). "
                                  "Unset: only the model's features and label are stored, and "
                                  "every row counts as consented to training")
    key_file: Path | None = setting(None, "the pseudonymization key (64 hex digits, mode 0600; "
                                    "created on first use; never leaves the device). Default: "
                                    "pseudonym.key beside the device's signing key")


@dataclass(frozen=True)
class AgentConfig:
    device_id: str = setting(doc="this device's id (its certificate CN on Mosquitto; not a "
                             "service's: aggregator, broker, ca)", check=_device_id)
    fleet: str = setting(doc="the federation it belongs to", check=_id)
    key: Path = setting(doc="this device's Ed25519 private key (mode 0600; 'bedside edge "
                        "enroll' creates it)")
    aggregator_key: Path = setting(doc="the aggregator's public key, pinned at enrollment")
    data_dir: Path | None = setting(None, "records.db, ledger.db, agent.db, models/ (default: "
                                    "<device_id>-data beside this file)")
    mqtt: MqttConfig = setting(doc="[mqtt]: broker and TLS", factory=MqttConfig)
    flower: FlowerNodeConfig | None = setting(None, "[flower]: this device's SuperNode, when "
                                              "the federation runs over Flower "
                                              "(docs/flower.md)")
    privacy: DevicePrivacy = setting(doc="[privacy]", factory=DevicePrivacy)
    agent: AgentSettings = setting(doc="[agent]", factory=AgentSettings)
    storage: StorageConfig = setting(doc="[storage]", factory=StorageConfig)
    deidentify: DeidentifyConfig = setting(doc="[deidentify]", factory=DeidentifyConfig)
    monitor: MonitorConfig = setting(doc="[monitor]: Prometheus /metrics", factory=MonitorConfig)
    testing: bool = setting(False, "allows [agent] seed (reproducible noise: NOT private); every "
                            "update this device sends then says so. Tests and demos only")
    source: str = setting("agent.toml", internal=True)

    def __post_init__(self) -> None:
        if self.agent.seed is not None and not self.testing:
            raise ConfigError(
                "[agent] seed makes this device's training and DP noise reproducible, which "
                "removes their privacy: it is for tests and demos only. Remove it, or set "
                "testing = true to say in writing that this device protects nobody")

    @property
    def data(self) -> Path:
        return self.data_dir if self.data_dir is not None else Path(f"{self.device_id}-data")

    @property
    def records_path(self) -> Path:
        return self.data / "records.db"

    @property
    def ledger_path(self) -> Path:
        return self.data / "ledger.db"

    @property
    def state_path(self) -> Path:
        return self.data / "agent.db"

    @property
    def models_path(self) -> Path:
        """This federation's model versions (versions are numbered per federation, so a device
        that joins another one keeps them apart)."""
        return self.data / "models" / self.fleet

    def pseudonym_key(self, *, create: bool = False) -> bytes:
        from bedside.edge.deidentify import load_key

        return load_key(self.deidentify.key_file or self.key.with_name("pseudonym.key"),
                        create=create)

    def store_key(self) -> bytes | None:
        """The databases' encryption key ([storage] key_file), or None."""
        if self.storage.key_file is None:
            return None
        from bedside.sqlite import read_key

        return read_key(self.storage.key_file)

    def budgets(self) -> dict[str, Any]:
        return dict(self.privacy.budgets())


def load(path: str | Path) -> AgentConfig:
    cfg = load_file(AgentConfig, path)
    if cfg.data_dir is None:  # relative to the config file, like every other path in it
        from dataclasses import replace

        cfg = replace(cfg, data_dir=Path(path).resolve().parent / f"{cfg.device_id}-data")
    return cfg
