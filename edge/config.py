"""``agent.toml``: what an edge device's agent reads. See docs/configuration.md.

Example::

    device_id = "clinic-1"
    fleet = "north-clinics"
    data_dir = "/var/lib/bedside"            # records.db, ledger.db, agent.db, models/
    key = "/etc/bedside/clinic-1.key"        # this device's Ed25519 key (mode 0600)
    aggregator_key = "/etc/bedside/aggregator.pub"   # pinned at enrollment

    [mqtt]
    host = "127.0.0.1"
    port = 1883

    [privacy]
    record_epsilon = 8.0     # record-level budget (DP-SGD): required, unless
    # allow_no_record_dp = true  # ... says in writing that this device trains without DP-SGD
    record_delta = 1e-5
    max_grad_norm = 1.0      # DP-SGD per-example clip
    device_epsilon = 200.0   # device-level budget; omit to take part without one
    device_delta = 1e-5

    [agent]
    seed = 7                 # ONLY for tests and reproducible demos: seeds training and DP noise
    resend_seconds = 5       # re-send an unreceipted update this often while its round is open
    status_seconds = 10
    quality_tolerance = 0.15 # refuse a new model this much less accurate on local records
    threads = 1              # onnxruntime threads for inference
    exit_when_done = false   # stop when the aggregator announces the federation is done
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bedside import config as cfgmod
from bedside.errors import ConfigError
from bedside.transport.mqtt import MqttConfig


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    fleet: str
    data_dir: Path
    key: Path
    aggregator_key: Path
    mqtt: MqttConfig
    record_epsilon: float | None = 8.0
    record_delta: float = 1e-5
    max_grad_norm: float = 1.0
    device_epsilon: float | None = None
    device_delta: float = 1e-5
    resend_seconds: float = 5.0
    status_seconds: float = 10.0
    quality_tolerance: float | None = 0.15
    threads: int = 1
    exit_when_done: bool = False
    seed: int | None = None
    source: str = "agent.toml"

    @property
    def records_path(self) -> Path:
        return self.data_dir / "records.db"

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / "ledger.db"

    @property
    def state_path(self) -> Path:
        return self.data_dir / "agent.db"

    @property
    def models_path(self) -> Path:
        return self.data_dir / "models"

    def budgets(self) -> dict[str, Any]:
        """The ledger budgets this device enforces: one per privacy unit it has configured."""
        from bedside.constants import UNIT_DEVICE, UNIT_RECORD
        from bedside.privacy.ledger import Budget

        b: dict[str, Any] = {}
        if self.record_epsilon is not None:
            b[UNIT_RECORD] = Budget(self.record_epsilon, self.record_delta)
        if self.device_epsilon is not None:
            b[UNIT_DEVICE] = Budget(self.device_epsilon, self.device_delta)
        return b


def load(path: str | Path) -> AgentConfig:
    from bedside.wire.signing import validate_id

    s = cfgmod.load(path)
    device_id = s.text("device_id", required=True)
    fleet = s.text("fleet", required=True)
    validate_id(device_id, what="device_id")
    validate_id(fleet, what="fleet")
    p = s.section("privacy")
    record_eps = p.number("record_epsilon", None, positive=True)
    allow_no_dp = p.flag("allow_no_record_dp", False)
    if record_eps is None and not allow_no_dp:
        raise ConfigError(f"{path} [privacy]: 'record_epsilon' is required (the record-level "
                          "budget this device enforces, e.g. 8.0); to train without DP-SGD, set "
                          "allow_no_record_dp = true explicitly")
    if record_eps is not None and allow_no_dp:
        raise ConfigError(f"{path} [privacy]: set either 'record_epsilon' or "
                          "'allow_no_record_dp = true', not both")
    device_eps = p.number("device_epsilon", None, positive=True)
    record_delta = p.number("record_delta", 1e-5, positive=True, max=0.1)
    max_grad_norm = p.number("max_grad_norm", 1.0, positive=True)
    device_delta = p.number("device_delta", 1e-5, positive=True, max=0.1)
    p.done()
    a = s.section("agent")
    if a.data.get("quality_tolerance") is False:  # false turns the quality gate off
        a.used.add("quality_tolerance")
        qt = None
    else:
        qt = a.number("quality_tolerance", 0.15, min=0.0, max=1.0)
    agent = dict(
        resend_seconds=a.number("resend_seconds", 5.0, positive=True),
        status_seconds=a.number("status_seconds", 10.0, positive=True),
        threads=a.integer("threads", 1, min=1),
        exit_when_done=a.flag("exit_when_done", False),
        seed=a.integer("seed", None),
    )
    a.done()
    cfg = AgentConfig(
        device_id=device_id, fleet=fleet,
        data_dir=s.path("data_dir", f"{device_id}-data"),
        key=s.path("key", required=True),
        aggregator_key=s.path("aggregator_key", required=True),
        mqtt=cfgmod.mqtt_section(s.section("mqtt")),
        record_epsilon=record_eps, record_delta=record_delta, max_grad_norm=max_grad_norm,
        device_epsilon=device_eps, device_delta=device_delta, quality_tolerance=qt,
        source=str(path), **agent,
    )
    s.done()
    return cfg
