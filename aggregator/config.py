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
    weight_decay = 0.0         # L2 weight decay of local training (no privacy cost)

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

    [groups]                   # device groups a release can target (--to group:icu)
    icu = ["clinic-1", "clinic-2"]

    [releases]                 # how model versions travel to devices (docs/models.md)
    max_message_bytes = 16777216   # larger models go in hashed chunks over HTTP(S):
    http_port = 8470               # the aggregator's download endpoint (0: none)
    http_host = "127.0.0.1"
    url = "https://aggregator.hospital.example:8470"  # how devices reach it
    cert_file = "certs/aggregator.crt"   # TLS for the endpoint (required off loopback)
    key_file = "certs/aggregator.key"
    ca_file = "certs/ca.crt"             # then devices must present a certificate of this CA

    [enrollment]               # one-step enrollment with tokens (docs/deploy.md)
    port = 8471                # the enrollment endpoint (0: none; offline bundles still work)
    host = "127.0.0.1"
    url = "https://aggregator.hospital.example:8471"  # how devices reach it
    cert_file = "certs/downloads.crt"    # TLS (required off loopback); tokens pin it
    key_file = "certs/downloads.key"
    ca_dir = "certs"           # the broker CA: signs each device's certificate (CN = device id)
    broker = "broker.hospital.example:8883"  # how devices reach the broker
    broker_dir = "/etc/bedside/mosquitto"    # 'bedside broker config --out': ACL kept current
    [enrollment.privacy]       # suggested [privacy] of the agent.toml a device writes
    record_epsilon = 8.0
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bedside.config import load_file, setting
from bedside.constants import DEFAULT_HOST
from bedside.errors import BedsideError, ConfigError
from bedside.federation.release import DEFAULT_CHUNK_BYTES
from bedside.federation.settings import (
    FederationSettings,
)
from bedside.monitoring import MonitorConfig
from bedside.transport import is_loopback
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
    groups: list[str] = setting(doc="patient-attribute columns of the reference set (e.g. "
                                "[\"age_band\", \"sex\"]): every version's manifest then holds "
                                "per-group figures and the largest gap (docs/governance.md)",
                                factory=list)
    fleet_counts: bool = setting(False, "training rounds also ask every device for noised, "
                                 "accounted per-group confusion counts of the round's model on "
                                 "its own records (groups: those of the reference set); the "
                                 "fleet-wide figures go into the next version's manifest")
    fleet_noise_multiplier: float = setting(10.0, "noise standard deviation on every count a "
                                            "device releases (record-level sensitivity 1)",
                                            positive=True, max=1e6)
    fleet_device_records: int = setting(1024, "a device's vector of counts is clipped to this "
                                        "L2 norm (its device-level sensitivity)", min=1,
                                        max=10**9)
    fleet_every: int = setting(0, "ask in every N-th training round and the last; 0: in the "
                               "last planned round only", min=0, max=100_000)
    fleet_min_rows: int = setting(30, "a group with fewer (noised) rows is reported but not "
                                  "judged", min=1)

    def __post_init__(self) -> None:
        if (self.data is None) != (self.label is None):
            raise ConfigError("'data' and 'label' go together")
        if self.fleet_counts and (self.data is None or not self.groups):
            raise ConfigError("fleet_counts needs the reference set ('data', 'label') and its "
                              "'groups': the groups the devices count are the reference set's")


def _groups(value: dict[str, list[str]], where: str) -> None:
    from bedside.federation.release import check_groups

    try:
        check_groups(value, where)
    except BedsideError as exc:
        raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class ReleasesConfig:
    """``[releases]``: how model versions travel to devices."""

    max_message_bytes: int = setting(16 * 1024 * 1024, "a model file larger than this is not "
                                     "sent inside the release message but in hashed chunks "
                                     "from the download endpoint", min=1024)
    chunk_bytes: int = setting(DEFAULT_CHUNK_BYTES, "size of one chunk of a download (what a "
                               "device holds in memory at once while downloading)", min=1024)
    http_port: int = setting(0, "port of the download endpoint (0: no endpoint; then models "
                             "larger than max_message_bytes cannot be released)", min=0,
                             max=65535)
    http_host: str = setting(DEFAULT_HOST, "address the download endpoint binds")
    url: str = setting("", "base URL devices download from (default: http(s)://http_host:"
                       "http_port)")
    cert_file: Path | None = setting(None, "TLS certificate of the download endpoint (required "
                                     "unless it binds a loopback address)")
    key_file: Path | None = setting(None, "its private key")
    ca_file: Path | None = setting(None, "when set, devices must present a client certificate "
                                   "of this CA")
    wave_timeout_seconds: float = setting(600.0, "how long a canary wave (after its probation) "
                                          "waits for its devices' reports; the service also "
                                          "keeps serving a sent release this long for devices "
                                          "that have not reported it done", positive=True)

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("[releases]: cert_file and key_file go together")
        if self.http_port and self.cert_file is None and not is_loopback(self.http_host):
            raise ConfigError(f"[releases]: the download endpoint binds {self.http_host}, not a "
                              "loopback address: give it cert_file and key_file (TLS)")

    @property
    def base_url(self) -> str:
        if self.url:
            return self.url.rstrip("/")
        scheme = "https" if self.cert_file else "http"
        return f"{scheme}://{self.http_host}:{self.http_port}"


@dataclass(frozen=True)
class EnrollmentConfig:
    """``[enrollment]``: devices enrolled with single-use tokens (``bedside aggregator invite``)."""

    port: int = setting(0, "port of the enrollment endpoint (0: none; offline bundles, 'invite "
                        "--offline', still work)", min=0, max=65535)
    host: str = setting(DEFAULT_HOST, "address the enrollment endpoint binds")
    url: str = setting("", "URL devices reach the endpoint at (default: http(s)://host:port)")
    cert_file: Path | None = setting(None, "TLS certificate of the endpoint (required unless it "
                                     "binds a loopback address); tokens pin it")
    key_file: Path | None = setting(None, "its private key")
    ca_dir: Path | None = setting(None, "the broker's CA ('bedside broker certs --out'): signs "
                                  "each enrolled device's certificate (CN = device id) and "
                                  "revokes it with 'aggregator revoke'. Unset: devices get no "
                                  "broker certificate")
    broker: str = setting("", "HOST:PORT devices reach the broker at (default: [mqtt] host and "
                          "port)")
    broker_dir: Path | None = setting(None, "the broker's configuration ('bedside broker config "
                                      "--out'): its ACL and CRL are rewritten at each enrollment "
                                      "and revocation (Mosquitto reloads them on SIGHUP: "
                                      "deploy/systemd/bedside-broker-reload.path does it)")
    token_hours: float = setting(24.0, "default life of a token ('invite --expires'; at most "
                                 "720)", positive=True, max=720.0)
    privacy: dict[str, Any] = setting(doc="[enrollment.privacy]: the [privacy] table suggested "
                                      "to enrolling devices (each device may choose its own)",
                                      factory=dict)

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("[enrollment]: cert_file and key_file go together")
        if self.port and self.cert_file is None and not is_loopback(self.host):
            raise ConfigError(f"[enrollment]: the endpoint binds {self.host}, not a loopback "
                              "address: give it cert_file and key_file (TLS)")
        if self.broker:
            from bedside.transport.mosquitto import parse_listener

            try:
                parse_listener(self.broker)
            except BedsideError:
                raise ConfigError(f"[enrollment] broker {self.broker!r}: expected HOST:PORT") \
                    from None

    @property
    def base_url(self) -> str:
        if self.url:
            return self.url.rstrip("/")
        scheme = "https" if self.cert_file else "http"
        return f"{scheme}://{self.host}:{self.port}"


def _dsn(value: str, where: str) -> None:
    """A libpq connection string without a password: secrets stay out of aggregator.toml."""
    if not value:
        return
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ConfigError(f"{where}: PostgreSQL needs psycopg: pip install 'bedside[postgres]'") \
            from None
    try:
        parts = conninfo_to_dict(value)
    except Exception as exc:  # psycopg.ProgrammingError: a malformed string
        raise ConfigError(f"{where}: not a PostgreSQL connection string ({str(exc).strip()}); "
                          "e.g. "
                          "'host=127.0.0.1 port=5432 dbname=bedside user=bedside'") from None
    if "password" in parts:
        raise ConfigError(f"{where}: holds a password; keep it out of aggregator.toml: put it in "
                          "a password file (PGPASSFILE, or ~/.pgpass of the service user, mode "
                          "0600) and remove it from dsn")


@dataclass(frozen=True)
class StateConfig:
    """``[state]``: where the rounds, updates and running sums live."""

    backend: Literal["sqlite", "postgresql"] = setting(
        "sqlite", "'sqlite': state.db in data_dir, for one process (the default); "
        "'postgresql': a database the coordinator and its validator workers share")
    dsn: str = setting("", "libpq connection string of the PostgreSQL database (e.g. "
                       "'host=127.0.0.1 port=5432 dbname=bedside user=bedside'); the password "
                       "comes from PGPASSFILE or ~/.pgpass, never from this file", check=_dsn)

    def __post_init__(self) -> None:
        if self.backend == "postgresql" and not self.dsn:
            raise ConfigError("[state] backend 'postgresql' needs dsn (a libpq connection "
                              "string)")
        if self.backend == "sqlite" and self.dsn:
            raise ConfigError("[state] dsn is set but backend is 'sqlite': set backend = "
                              "'postgresql' or remove dsn")


def _ids(value: list[str], where: str) -> None:
    for i in value:
        _id(i, where)


@dataclass(frozen=True)
class WorkersConfig:
    """``[workers]``: validator workers (``bedside aggregator worker``) instead of the service
    itself judge the updates."""

    group: str = setting("", "name of the MQTT shared subscription ($share/<group>/...) the "
                         "workers read updates from; set, the service only coordinates (opens "
                         "and closes rounds from the workers' partial sums). Needs [state] "
                         "backend 'postgresql' and Mosquitto (docs/scaling.md)",
                         check=lambda v, where: _id(v, where) if v else None)
    ids: list[str] = setting(doc="the workers' ids: each runs 'bedside aggregator worker --id "
                             "ID' with its own broker certificate (CN aggregator-worker-ID), "
                             "which the generated ACL allows to read updates and write receipts",
                             factory=list,
                             check=_ids)

    def __post_init__(self) -> None:
        if self.group and not self.ids:
            raise ConfigError("[workers] group is set but ids is empty: name the workers (ids = "
                              "[\"1\", \"2\", \"3\"])")
        if len(set(self.ids)) != len(self.ids):
            raise ConfigError("[workers] ids: each worker needs its own id")


def worker_identity(worker_id: str) -> str:
    """A validator worker's MQTT client id and broker certificate CN."""
    return f"aggregator-worker-{worker_id}"


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
    groups: dict[str, list[str]] = setting(doc="[groups]: NAME = [device ids], targets of "
                                           "releases (--to group:NAME)", factory=dict,
                                           check=_groups)
    releases: ReleasesConfig = setting(doc="[releases]", factory=ReleasesConfig)
    enrollment: EnrollmentConfig = setting(doc="[enrollment]", factory=EnrollmentConfig)
    monitor: MonitorConfig = setting(doc="[monitor]: Prometheus /metrics, the status page and "
                                     "/api/status", factory=MonitorConfig)
    state: StateConfig = setting(doc="[state]: where the round state lives", factory=StateConfig)
    workers: WorkersConfig = setting(doc="[workers]: validator workers on an MQTT shared "
                                     "subscription", factory=WorkersConfig)
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
        if self.workers.group and self.state.backend != "postgresql":
            raise ConfigError("[workers] group needs [state] backend = 'postgresql': the workers "
                              "and the coordinator share the round state there")
        if self.workers.group and self.flower is not None:
            raise ConfigError("[workers] validate updates that arrive over MQTT; a federation "
                              "over Flower ([flower]) has none: remove one of the two")

    @property
    def federation(self) -> FederationSettings:
        return self

    @property
    def state_path(self) -> Path:
        return self.data_dir / "state.db"

    @property
    def registry_path(self) -> Path:
        return self.data_dir / "registry"

    @property
    def staged_path(self) -> Path:
        """Models pushed by an operator, waiting for the service to release them."""
        return self.data_dir / "staged"


def load(path: str | Path) -> AggregatorConfig:
    cfg = load_file(AggregatorConfig, path)
    if not cfg.data_dir.is_absolute():
        from dataclasses import replace

        cfg = replace(cfg, data_dir=Path(path).resolve().parent / cfg.data_dir)
    return cfg
