"""``bedside demo``: a whole federation on one machine, from nothing to a report.

What it does, as clinic IT and a hospital data team would, in one place:

1. splits the data: a held-out reference set for the aggregator's data team (no clinic trains on
   it) and K clinic shards (non-IID: Dirichlet over labels), each written only into its own
   clinic's directory;
2. exports version 1 of the model (untrained; its input scaling a placeholder from the schema's
   allowed ranges, which for a user's CSV are inferred from the training rows); round 1 of the
   federation replaces that scaling with the clinics' noised feature statistics
   (``[statistics]``, :mod:`bedside.federation.statistics`);
3. creates keys, enrolls every clinic with the aggregator and pins the aggregator's key on every
   clinic, writes ``aggregator.toml`` and one ``agent.toml`` per clinic, ingests each shard into
   its clinic's record store;
4. starts the embedded MQTT broker on 127.0.0.1, the aggregator and K agents as separate
   processes, prints one table row per round (participants, rejected, held-out accuracy and AUC,
   epsilon by device and by record, round time);
5. writes ``report.json`` and ``report.png`` (accuracy and epsilon by round).
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bedside.config import to_toml
from bedside.constants import (
    AGGREGATOR_ID,
    NOISE_CENTRAL,
    NOISE_LOCAL,
    topic_status,
    topic_status_all,
)
from bedside.errors import InputError, TransportError
from bedside.models.defaults import DEMO_DEVICE_EPSILON

log = logging.getLogger("bedside.demo")


@dataclass
class DemoConfig:
    clients: int = 5
    rounds: int = 15
    mode: str = "central"
    target_epsilon: float = 8.0
    delta: float = 1e-5
    dataset: str = "wdbc"
    data: Path | None = None
    label: str | None = None
    arch: str = "logreg"
    arch_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"hidden": [64, 32]}
    alpha: float = 1.0
    clip_norm: float = 1.0
    noise_multiplier: float = 0.2
    epochs: int = 3
    batch_size: int = 32
    lr: float = 0.5
    optimizer: str = "sgd"
    lr_decay: float = 1.0  # round r trains with lr * lr_decay^(r-1)
    weight_decay: float = 0.0  # L2 weight decay of local training
    max_grad_norm: float = 1.0  # DP-SGD's per-example clip on every clinic
    server_optimizer: str = "sgd"  # plain FedAvg: momentum amplified DP noise (docs/datasets.md)
    server_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"momentum": 0.9}
    statistics_share: float = 0.5  # of the record budget, what the statistics release alone costs
    device_noise_to_clip: float = 0.25  # the device-level noise rule (models/defaults.device_noise)
    holdout: float = 0.2
    seed: int = 0
    out: Path | None = None
    deadline: float = 60.0
    noise_seed: int | None = None  # seeds every DP noise draw: reproducible runs, never production
    timeout: float | None = None  # default: DEFAULT_TIMEOUT of the transport
    quiet: bool = False
    transport: str = "mqtt"  # mqtt (embedded broker) | flower (Deployment Engine processes)
    defaults: str = ""  # where the training settings came from (for_task), for the report
    # Overrides merged into the generated configs: {"aggregator": {...}, "agent": {...}} (every
    # clinic). Tables merge key by key; a value of None removes the key. For tests and benchmarks
    # (e.g. a non-private baseline); not a command-line option.
    extra: dict[str, Any] = field(default_factory=dict)


def merge_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Merge ``overrides`` into ``config`` in place (tables key by key; None removes a key)."""
    for k, v in overrides.items():
        if v is None:
            config.pop(k, None)
        elif isinstance(v, dict):
            if not isinstance(config.get(k), dict):
                config[k] = {}
            merge_overrides(config[k], v)
        else:
            config[k] = copy.deepcopy(v)


def for_task(chosen: dict[str, Any], **settings: Any) -> DemoConfig:
    """The demo's configuration for a task: its training settings (``models/defaults.py``) are the
    tuned defaults of the built-in ``dataset``, or, for a user's CSV (``data``), those of the
    built-in task of the same shape with the DP-SGD batch and local epochs the privacy planner
    prefers for the smallest clinic; then ``chosen`` (what the user set) overrides them. The
    device-level noise multiplier, unless chosen, follows
    :func:`bedside.models.defaults.device_noise` for the model's size, the number of clinics and
    rounds, and the task's fraction of the update clip.
    ``settings`` are the other DemoConfig fields."""
    from bedside.models import datasets, defaults

    cfg = DemoConfig(**settings)
    arch = chosen.get("arch")
    if cfg.data is None:
        task = defaults.for_dataset(cfg.dataset, arch)
        source = f"tuned for {cfg.dataset}"
        schema = datasets.schema_of(cfg.dataset)
    else:
        train, _holdout, shards = _load_data(cfg)
        schema = train.schema
        smallest = min(len(s) for s in shards)
        like = defaults.like(schema.kind, schema.n_classes)
        base = defaults.for_dataset(like, arch)
        task = defaults.for_shape(base, smallest, cfg.target_epsilon, cfg.delta,
                                  _parameters(base.arch, base.arch_params, schema))
        source = (f"those tuned for {like} (a task of the same shape), DP-SGD batch "
                  f"{task.batch_size} and {task.epochs} local epoch(s) from the privacy planner "
                  f"for the smallest clinic ({smallest} records)")
    cfg = replace(cfg, **{**task.fields(), **chosen}, defaults=source)
    if "noise_multiplier" not in chosen:
        cfg = replace(cfg, noise_multiplier=defaults.device_noise(
            _parameters(cfg.arch, cfg.arch_params, schema), cfg.clients,
            cfg.device_noise_to_clip, cfg.rounds, cfg.delta))
    return cfg


def _parameters(arch: str, arch_params: dict[str, Any], schema: Any) -> int:
    """How many weights a federated update of this model carries (without importing torch: the
    demo's own process never does, see :mod:`bedside.demo.processes`)."""
    from bedside.models.spec import ArchSpec

    return ArchSpec.for_schema(arch, schema, **arch_params).parameter_count()


#: The fewest rows a demo clinic holds (the non-IID split's floor; the same for every setting, so
#: that tuning never changes the split it is scored on).
MIN_CLINIC_ROWS = 16


# -- preparation ----------------------------------------------------------------------------------
def _load_data(cfg: DemoConfig) -> tuple[Any, Any, list[np.ndarray]]:
    from bedside.models import datasets
    from bedside.models.partition import partition

    if cfg.data is not None:
        if not cfg.label:
            raise InputError("--data needs --label COLUMN")
        ds = datasets.load_csv(cfg.data, cfg.label)
    else:
        ds = datasets.load(cfg.dataset)
    train, holdout = datasets.train_test_split(ds, test_fraction=cfg.holdout, seed=cfg.seed)
    if cfg.data is not None:
        # A user's CSV has no allowed ranges: the clinics' training rows stand in for the
        # clinical knowledge a real schema states (never the held-out rows, which are evaluated).
        # The scaling itself comes from the federated statistics round (round 1).
        schema = datasets.infer_ranges(ds.schema, train.x)
        inside = schema.within_range(holdout.x)
        if not inside.all():
            log.warning("%d held-out row(s) lie outside the allowed ranges inferred from the "
                        "training rows and are left out of the evaluation, as a device would "
                        "refuse them", int((~inside).sum()))
        train = replace(train, schema=schema)
        holdout = replace(holdout.subset(np.flatnonzero(inside)), schema=schema)
    if len(train) < cfg.clients * MIN_CLINIC_ROWS:
        raise InputError(f"{len(train)} training rows cannot make {cfg.clients} clinics of at "
                         f"least {MIN_CLINIC_ROWS} rows; use fewer --clients or more data")
    shards = partition(train.y, cfg.clients, scheme="dirichlet", alpha=cfg.alpha,
                       min_size=MIN_CLINIC_ROWS, seed=cfg.seed)
    return train, holdout, shards


def export_initial_model(train: Any, holdout: Any, cfg: DemoConfig, out: Path) -> Any:
    """Version 1 of the federated model: untrained, seeded, exported and parity-checked."""
    from bedside.constants import ONNX_INPUT, ONNX_OPSET, ONNX_OUTPUT
    from bedside.manifest import Manifest, write_model_dir
    from bedside.metrics import evaluate
    from bedside.models.export import (
        check_parameter_names,
        check_parity,
        onnx_probabilities,
        to_onnx_bytes,
    )
    from bedside.models.spec import ArchSpec
    from bedside.models.zoo import build

    spec = ArchSpec.for_schema(cfg.arch, train.schema, **cfg.arch_params)
    net = build(spec, train.schema, seed=cfg.seed)
    data = to_onnx_bytes(net, train.schema)
    params = check_parameter_names(net, data)
    parity = check_parity(net, data, holdout.x)
    m = Manifest(
        name=f"{train.name}-{cfg.arch}-federated", version=1, schema=train.schema, sha256="",
        opset=ONNX_OPSET, arch=spec.to_dict(), parameters=params, parity=parity,
        output={"probabilities": ONNX_OUTPUT, "input": ONNX_INPUT,
                "labels": list(train.schema.labels), "format": "tensor"},
        metrics={"holdout": evaluate(holdout.y, onnx_probabilities(data, holdout.x,
                                                                train.schema.labels))},
        training={"note": "untrained starting point (seeded initialisation) for federation",
                  "seed": cfg.seed},
    )
    write_model_dir(out, data, m)
    return m


FLEET = "demo"
#: The share of the clinics' record budget the demo's per-group counts cost (datasets with
#: patient attributes).
FLEET_COUNTS_SHARE = 0.1


def agent_table(cfg: DemoConfig, i: int, fleet: str = FLEET) -> dict[str, Any]:
    """``agent.toml`` of clinic ``i`` (1-based), overrides merged: the MQTT demo writes it, the
    in-process simulation reads its ``[privacy]`` and seed."""
    cid = f"clinic-{i}"
    agent: dict[str, Any] = {
        "device_id": cid, "fleet": fleet, "data_dir": "data", "key": f"keys/{cid}.key",
        "aggregator_key": "keys/aggregator.pub",
        "mqtt": {"host": "127.0.0.1", "port": 0},
        "privacy": {"record_epsilon": cfg.target_epsilon, "record_delta": cfg.delta,
                    "max_grad_norm": cfg.max_grad_norm, "device_epsilon": DEMO_DEVICE_EPSILON,
                    "device_delta": cfg.delta},
        "agent": {"resend_seconds": 2.0, "status_seconds": 5.0, "exit_when_done": True,
                  "quality_tolerance": 0.25},
    }
    if cfg.noise_seed is not None:  # reproducible, so not private: the configs say so
        agent["agent"]["seed"] = cfg.noise_seed * 1000 + i
        agent["testing"] = True
    merge_overrides(agent, cfg.extra.get("agent", {}))
    return agent


def aggregator_table(cfg: DemoConfig, fleet: str = FLEET, initial_model: Path | None = None,
                     reference_csv: Path | None = None,
                     groups: list[str] | None = None) -> dict[str, Any]:
    """``aggregator.toml`` of the demo, overrides merged (its ``[rounds]``, ``[training]``,
    ``[privacy]``, ``[strategy]`` and ``[statistics]`` are the federation the in-process
    simulation runs too)."""
    from bedside.federation.fairness import MIN_GROUP_NOISE
    from bedside.federation.fairness import noise_for_budget as group_noise_for_budget
    from bedside.federation.statistics import MIN_STATISTICS_NOISE, noise_for_budget

    aggregator: dict[str, Any] = {
        "fleet": fleet, "data_dir": "data", "key": "keys/aggregator.key",
        "devices": "keys/devices", "mqtt": {"host": "127.0.0.1", "port": 0},
        "rounds": {"rounds": cfg.rounds, "min_participants": max(1, cfg.clients // 2),
                   "deadline_seconds": cfg.deadline, "participation_rate": 1.0},
        "training": {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
                     "optimizer": cfg.optimizer, "lr_decay": cfg.lr_decay,
                     "weight_decay": cfg.weight_decay},
        "privacy": {"noise": cfg.mode, "clip_norm": cfg.clip_norm,
                    "noise_multiplier": cfg.noise_multiplier, "delta": cfg.delta,
                    **({"noise_seed": cfg.noise_seed} if cfg.noise_seed is not None else {})},
        "strategy": {"rule": "fedavg", "optimizer": cfg.server_optimizer,
                     "optimizer_params": dict(cfg.server_params)},
        # round 1: the input scaling from noised, accounted feature statistics, whose release
        # alone would cost statistics_share of the clinics' record budget (never less noise than
        # a device accepts by default)
        "statistics": {"noise_multiplier": max(noise_for_budget(cfg.target_epsilon, cfg.delta,
                                                                cfg.statistics_share),
                                               MIN_STATISTICS_NOISE)},
    }
    if cfg.noise_seed is not None:
        aggregator["testing"] = True
    if initial_model is not None:
        aggregator["initial_model"] = str(initial_model)
    if reference_csv is not None:
        aggregator["evaluation"] = {"data": str(reference_csv), "label": "label",
                                    **({"groups": groups} if groups else {})}
        if groups:
            # the clinics' own per-group counts of the last round's model, noised so that they
            # cost a tenth of the clinics' record budget (docs/governance.md)
            aggregator["evaluation"].update(
                fleet_counts=True, fleet_noise_multiplier=max(
                    group_noise_for_budget(FLEET_COUNTS_SHARE * cfg.target_epsilon, cfg.delta),
                    MIN_GROUP_NOISE))
    merge_overrides(aggregator, cfg.extra.get("aggregator", {}))
    return aggregator


def prepare(cfg: DemoConfig, work: Path) -> dict[str, Any]:
    """Write everything the processes need into ``work``; return a description of it."""
    from bedside.edge.deidentify import group_attributes
    from bedside.edge.store import RecordStore
    from bedside.models import datasets
    from bedside.models.partition import describe
    from bedside.tabular import read_rows, table_from_rows
    from bedside.wire.signing import SigningKey

    train, holdout, shards = _load_data(cfg)
    agg_dir = work / "aggregator"
    (agg_dir / "keys" / "devices").mkdir(parents=True, exist_ok=True)
    model_v1 = export_initial_model(train, holdout, cfg, work / "initial-model")
    holdout_csv = datasets.to_csv(holdout, agg_dir / "reference.csv", label_column="label")
    agg_key = SigningKey.generate()
    agg_key.save(agg_dir / "keys" / "aggregator.key")
    agg_key.public.save(agg_dir / "keys" / "aggregator.pub")
    fleet = FLEET
    clinics = []
    shard_info = describe(shards, train.y, list(train.schema.labels))
    for i, idx in enumerate(shards, start=1):
        cid = f"clinic-{i}"
        cdir = work / cid
        (cdir / "keys").mkdir(parents=True, exist_ok=True)
        shard = train.subset(idx)
        csv_path = datasets.to_csv(shard, cdir / "records.csv", label_column="label")
        key = SigningKey.generate()
        key.save(cdir / "keys" / f"{cid}.key")
        key.public.save(agg_dir / "keys" / "devices" / f"{cid}.pub")  # enrollment
        agg_key.public.save(cdir / "keys" / "aggregator.pub")  # pinning
        agent = agent_table(cfg, i, fleet)
        header, rows = read_rows(csv_path)
        table = table_from_rows(csv_path, header, rows, train.schema, "label")
        attributes = (group_attributes(csv_path, header, rows, list(shard.attributes))
                      if shard.attributes else None)
        store = RecordStore(cdir / "data" / "records.db")
        store.ingest(table, train.schema, csv_path.name, attributes=attributes)
        store.close()
        clinics.append({"id": cid, "dir": cdir, "config": agent, "rows": len(idx),
                        "labels": shard_info[i - 1]})
    aggregator = aggregator_table(cfg, fleet, work / "initial-model", holdout_csv,
                                  groups=list(holdout.attributes))
    return {"fleet": fleet, "aggregator_dir": agg_dir, "aggregator": aggregator,
            "clinics": clinics, "model_v1": model_v1, "holdout_rows": len(holdout),
            "train_rows": len(train), "dataset": train.name}


def prepare_json(cfg: DemoConfig, work: Path) -> dict[str, Any]:
    """:func:`prepare`, with a JSON-able result (it runs in a child process of the fork server)."""
    plan = prepare(cfg, work)
    return {**plan, "aggregator_dir": str(plan["aggregator_dir"]),
            "clinics": [{**c, "dir": str(c["dir"])} for c in plan["clinics"]],
            "model_v1": plan["model_v1"].to_dict()}


def plan_from_json(d: dict[str, Any]) -> dict[str, Any]:
    from bedside.manifest import Manifest

    return {**d, "aggregator_dir": Path(d["aggregator_dir"]),
            "clinics": [{**c, "dir": Path(c["dir"])} for c in d["clinics"]],
            "model_v1": Manifest.from_dict(d["model_v1"], "the starting model's manifest")}


def _write_configs(plan: dict[str, Any], port: int) -> None:
    plan["aggregator"]["mqtt"]["port"] = port
    (plan["aggregator_dir"] / "aggregator.toml").write_text(to_toml(plan["aggregator"]))
    for c in plan["clinics"]:
        c["config"]["mqtt"]["port"] = port
        (c["dir"] / "agent.toml").write_text(to_toml(c["config"]))


# -- running ---------------------------------------------------------------------------------------
TRANSPORTS = ("mqtt", "flower")
#: Where the demo adds its device-level update noise (``--mode``).
MODES = (NOISE_CENTRAL, NOISE_LOCAL)


def run(cfg: DemoConfig) -> dict[str, Any]:
    if cfg.mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)}, not {cfg.mode!r}")
    if cfg.transport not in TRANSPORTS:
        raise InputError(f"--transport must be one of {', '.join(TRANSPORTS)}, not "
                         f"{cfg.transport!r}")
    if cfg.clients < 2:
        raise InputError("--clients must be at least 2")
    if cfg.rounds < 1:
        raise InputError("--rounds must be at least 1")
    if not cfg.target_epsilon > 0:
        raise InputError("--target-epsilon must be > 0")
    for name, value in (("--epochs", cfg.epochs), ("--batch-size", cfg.batch_size)):
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    if not cfg.lr > 0:
        raise InputError(f"--lr must be > 0, got {cfg.lr}")
    started = time.monotonic()
    from bedside.demo import processes

    processes.warm_up()  # the services' imports, once, on the other core while we prepare
    work = _workdir(cfg.out)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    plan = plan_from_json(processes.call(prepare_json, cfg, work))
    ui = _Table(cfg, plan)
    ui.intro(work)
    timeline = {"prepared": time.monotonic() - started}
    fleet: _MqttFleet | _FlowerFleet = (_MqttFleet() if cfg.transport == "mqtt"
                                        else _FlowerFleet())
    rows: list[dict[str, Any]] = []
    devices: dict[str, dict[str, Any]] = {}
    final: dict[str, Any] | None = None
    groups: dict[str, Any] | None = None  # per-group figures of the newest version
    fleet_groups: dict[str, Any] | None = None  # and from the clinics' noised counts
    timeout = cfg.timeout if cfg.timeout is not None else DEFAULT_TIMEOUT[cfg.transport]
    try:
        fleet.start(plan, logs)
        deadline = time.monotonic() + timeout
        seen_rounds: set[int] = set()
        while final is None:
            if time.monotonic() > deadline:
                raise TransportError(f"the federation did not finish within {timeout:g} s; "
                                     f"see the logs in {logs}")
            dead = fleet.failed()
            if dead:
                raise TransportError(f"{', '.join(dead)} exited with an error; see {logs}")
            for who, body in fleet.events(0.5):
                if who != AGGREGATOR_ID:
                    devices[who] = body
                elif body.get("state") == "round_closed" and body["round"] not in seen_rounds:
                    seen_rounds.add(body["round"])
                    row = _row(body, devices)
                    rows.append(row)
                    ui.row(row)
                    groups = body.get("metrics_groups") or groups
                    fleet_groups = body.get("fleet_groups") or fleet_groups
                elif body.get("state") == "done":
                    final = body
                    timeline["federation_done"] = time.monotonic() - started
        devices.update(fleet.finish())
    finally:
        fleet.stop()
    report = _report(cfg, plan, rows, devices, final, work, time.monotonic() - started)
    if groups is not None or fleet_groups is not None:
        report["fairness"] = fairness_report(groups, fleet_groups)
    report["timeline_s"] = {k: round(v, 2) for k, v in timeline.items()}
    (work / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    _plot(rows, work / "report.png")
    report["files"] = {"report": str(work / "report.json"), "plot": str(work / "report.png"),
                       "logs": str(logs)}
    ui.outro(report)
    return report


def fairness_report(reference: dict[str, Any] | None, fleet: dict[str, Any] | None
                    ) -> dict[str, Any]:
    """The report's per-group figures: on the data team's reference rows (no device record:
    epsilon 0) and from the clinics' noised counts (their record-level epsilon, part of every
    clinic's total)."""
    out: dict[str, Any] = {}
    if reference is not None:
        out["reference"] = {**reference, "epsilon": 0.0}
    if fleet is not None:
        eps = fleet.get("record_epsilon", {})
        out["fleet"] = {**fleet, "epsilon": eps.get("all_planned"), "delta": eps.get("delta")}
    return out


#: How long a whole demo may take by default (a Flower round costs a ClientApp process per
#: device and Flower's polling; benchmarks/README.md, section Federation).
DEFAULT_TIMEOUT = {"mqtt": 300.0, "flower": 1200.0}


class _MqttFleet:
    """The embedded broker on 127.0.0.1, the aggregator and the agents as processes of the fork
    server, and an observer of the status topics."""

    def __init__(self) -> None:
        self.broker: Any = None
        self.watcher: Any = None
        self.procs: dict[str, Any] = {}
        self.fleet = FLEET

    def start(self, plan: dict[str, Any], logs: Path) -> None:
        from bedside.demo import processes
        from bedside.transport.broker import EmbeddedBroker
        from bedside.transport.mqtt import MqttConfig, MqttTransport

        self.fleet = plan["fleet"]
        self.broker = EmbeddedBroker("127.0.0.1", 0).start()
        _write_configs(plan, self.broker.port)
        self.watcher = MqttTransport(MqttConfig(port=self.broker.port),
                                     client_id="demo-observer", clean_session=True)
        if not self.watcher.wait_connected(10):
            raise TransportError("the demo could not connect to its embedded broker")
        self.watcher.subscribe(topic_status_all(plan["fleet"]))
        self.procs["aggregator"] = processes.start(
            ["aggregator", "serve", "--config", "aggregator.toml"], logs / "aggregator.log",
            plan["aggregator_dir"], "aggregator")
        for c in plan["clinics"]:
            self.procs[c["id"]] = processes.start(["edge", "run", "--config", "agent.toml"],
                                                  logs / f"{c['id']}.log", c["dir"], c["id"])

    def failed(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.exitcode not in (None, 0)]

    def events(self, timeout: float) -> list[tuple[str, dict[str, Any]]]:
        msg = self.watcher.get(timeout)
        if msg is None:
            return []
        body = _json_object(msg.payload)
        if body is None:
            return []
        who = AGGREGATOR_ID if msg.topic == topic_status(self.fleet, AGGREGATOR_ID) else \
            msg.topic.rsplit("/", 1)[-1]
        return [(who, body)]

    def finish(self) -> dict[str, dict[str, Any]]:
        for name, p in self.procs.items():  # the agents exit once the federation is done
            p.join(timeout=30 if name != "aggregator" else 10)
        return {}

    def stop(self) -> None:
        _stop_processes(list(self.procs.values()))
        if self.watcher is not None:
            self.watcher.close()
        if self.broker is not None:
            self.broker.stop()


class _FlowerFleet:
    """A Flower SuperLink and one SuperNode per clinic on 127.0.0.1 (plaintext, loopback only),
    the federation submitted with ``flwr run``; the ServerApp's status files are observed."""

    def __init__(self) -> None:
        self.procs: dict[str, Any] = {}
        self.status: Path | None = None
        self._offset = 0

    def start(self, plan: dict[str, Any], logs: Path) -> None:

        from bedside.aggregator.config import load as load_aggregator
        from bedside.aggregator.flower import run_command, status_dir, superlink_command
        from bedside.edge.config import load as load_agent
        from bedside.edge.flower import supernode_command
        from bedside.transport.flower import require_flower, start_process, wait_listening

        require_flower()
        _write_flower_configs(plan)
        agg_toml = plan["aggregator_dir"] / "aggregator.toml"
        agg = load_aggregator(agg_toml)
        self.status = status_dir(agg)

        def start(name: str, command: tuple[list[str], dict[str, str]]) -> None:
            self.procs[name] = start_process(command, logs / f"{name}.log")

        start("superlink", superlink_command(agg))
        if not wait_listening(agg.flower.port, 60):
            raise TransportError(f"the Flower SuperLink did not listen on 127.0.0.1:"
                                 f"{agg.flower.port} within 60 s; see {logs / 'superlink.log'}")
        for c in plan["clinics"]:
            path = c["dir"] / "agent.toml"
            start(c["id"], supernode_command(load_agent(path), path))
        start("aggregator", run_command(agg))

    def failed(self) -> list[str]:
        """Processes that exited with an error, and the run if it ended before the federation
        was done (``flwr run`` exits 0 whatever the ServerApp did) and every status it wrote
        has been read."""
        dead = [n for n, p in self.procs.items() if p.poll() not in (None, 0)]
        run = self.procs.get("aggregator")
        if run is not None and run.poll() == 0 and not self._unread():
            dead.append("the Flower run (flwr run: it ended before the federation was done)")
        return dead

    def _unread(self) -> bool:
        assert self.status is not None
        path = self.status / f"{AGGREGATOR_ID}.jsonl"
        return path.exists() and path.stat().st_size > self._offset

    def events(self, timeout: float) -> list[tuple[str, dict[str, Any]]]:
        """New lines of the ServerApp's ``aggregator.jsonl`` (every status, in order)."""
        assert self.status is not None
        path = self.status / f"{AGGREGATOR_ID}.jsonl"
        if not path.exists():
            time.sleep(timeout)
            return []
        with path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        out = [(AGGREGATOR_ID, b) for b in map(_json_object, data[:end].splitlines())
               if b is not None]
        if not out:
            time.sleep(timeout)
        return out

    def finish(self) -> dict[str, dict[str, Any]]:
        """The devices' last statuses (written by the ServerApp from their replies)."""
        import subprocess

        assert self.status is not None
        p = self.procs.get("aggregator")
        if p is not None:
            try:  # the ServerApp sends every device the final model before it ends
                p.wait(120)
            except subprocess.TimeoutExpired:
                log.warning("the Flower run did not end within 120 s after the federation was "
                            "done; stopping it")
        out = {}
        for f in sorted(self.status.glob("*.json")):
            body = _json_object(f.read_bytes())
            if f.stem != AGGREGATOR_ID and body is not None:
                out[f.stem] = body
        return out

    def stop(self) -> None:
        from bedside.transport.flower import stop_processes

        stop_processes(list(self.procs.values()))


def _json_object(payload: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _stop_processes(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _write_flower_configs(plan: dict[str, Any]) -> None:
    """``[flower]`` in every config: the demo's SuperLink on a free loopback port, plaintext
    (loopback only: a real deployment uses TLS, docs/flower.md); ``[mqtt]`` is not used."""
    from bedside.transport import free_port

    port = free_port()
    plan["aggregator"].pop("mqtt", None)
    plan["aggregator"]["flower"] = {"port": port, "insecure": True}
    (plan["aggregator_dir"] / "aggregator.toml").write_text(to_toml(plan["aggregator"]))
    for c in plan["clinics"]:
        c["config"].pop("mqtt", None)
        c["config"]["flower"] = {"superlink": f"127.0.0.1:{port}", "insecure": True,
                                 "port": free_port()}
        (c["dir"] / "agent.toml").write_text(to_toml(c["config"]))


MARKER = ".bedside-demo"


def _workdir(out: Path | None) -> Path:
    """A fresh working directory. A previous demo's output is replaced; anything else is kept."""
    if out is None:
        work = Path(tempfile.mkdtemp(prefix="bedside-demo-"))
    else:
        work = out
        if work.exists() and any(work.iterdir()):
            if not (work / MARKER).exists():
                raise InputError(f"--out {work} exists and is not a previous demo's output; "
                                 "choose an empty or new directory")
            import shutil

            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("created by bedside demo; replaced by the next run\n")
    return work.resolve()  # configs written below refer to it from other directories


def _row(body: dict[str, Any], devices: dict[str, dict[str, Any]]) -> dict[str, Any]:
    metrics = body.get("metrics") or {}
    privacy = body.get("privacy") or {}
    rec = body.get("record_epsilon") or {}
    return {
        "round": body["round"], "task": body.get("task", "train"), "status": body.get("status"),
        "model_version": body.get("model_version"),
        "participants": body.get("participants", 0),
        "accepted": body.get("accepted", 0),
        "rejected": sum((body.get("rejected") or {}).values()),
        "declined": len(body.get("declined") or {}),
        "accuracy": metrics.get("accuracy"), "auc": metrics.get("auc"),
        "epsilon_device": privacy.get("epsilon"), "epsilon_record": rec.get("max"),
        "round_seconds": body.get("round_seconds"),
    }


def _weak_device_statement(eps: float | None, clients: int, mode: str,
                           delta: float = 1e-5) -> str:
    if eps is None or not np.isfinite(eps):
        return "no device-level guarantee was recorded"
    from bedside.federation.report import strength

    who = {NOISE_CENTRAL: "central noise, added by the aggregator: it holds only if the "
                          "aggregator is honest",
           NOISE_LOCAL: "local noise, added by each clinic itself"}.get(mode, f"{mode} noise")
    text = (f"device-level epsilon {eps:.3g} (delta {delta:g}, {who}) over the released "
            f"models: {'this is ' if eps > 10 else ''}{strength(eps)}")
    if eps > 10:
        text += (f". A fleet of {clients} clinics cannot hide one clinic's "
                 "whole contribution without drowning the model in noise; device-level privacy "
                 "needs hundreds of devices per round. The record-level guarantee (DP-SGD on each "
                 "clinic) is the one that protects each patient here.")
    else:
        text += "."
    return text


def configured_privacy(plan: dict[str, Any]) -> dict[str, Any]:
    """The privacy settings the generated configs really hold (overrides included)."""
    agg = plan["aggregator"].get("privacy", {})
    budgets = [c["config"].get("privacy", {}).get("record_epsilon") for c in plan["clinics"]]
    known = [b for b in budgets if b is not None]
    return {
        "record_budget": max(known) if known else None,
        "record_dp_everywhere": len(known) == len(budgets),
        "record_delta": max((c["config"].get("privacy", {}).get("record_delta", 1e-5)
                             for c in plan["clinics"]), default=1e-5),
        "noise": agg.get("noise", "central"), "noise_multiplier": agg.get("noise_multiplier"),
        "clip_norm": agg.get("clip_norm"), "delta": agg.get("delta", 1e-5),
    }


def _report(cfg: DemoConfig, plan: dict[str, Any], rows: list[dict[str, Any]],
            devices: dict[str, dict[str, Any]], final: dict[str, Any] | None, work: Path,
            seconds: float) -> dict[str, Any]:
    last = next((r for r in reversed(rows) if r["accuracy"] is not None), None)
    priv = configured_privacy(plan)
    record_budget = priv["record_budget"]
    eps_device = final.get("privacy", {}).get("epsilon") if final else None
    record_eps = [d.get("privacy", {}).get("record", {}).get("epsilon")
                  for d in devices.values()]
    record_eps = [e for e in record_eps if isinstance(e, int | float)]
    record_eps += [r["epsilon_record"] for r in rows if r["epsilon_record"] is not None]
    cfg_out = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()
               if k not in ("extra", "quiet")}
    if cfg.extra:
        cfg_out["overrides"] = cfg.extra
    return {
        "config": cfg_out,
        "data": {"dataset": plan["dataset"], "train_rows": plan["train_rows"],
                 "holdout_rows": plan["holdout_rows"],
                 "clinics": [{"id": c["id"], "rows": c["rows"], "labels": c["labels"]}
                             for c in plan["clinics"]]},
        "initial_model": plan["model_v1"].metrics.get("holdout"),
        "rounds": rows,
        "final": {"model_version": final.get("model_version") if final else None,
                  "accuracy": last["accuracy"] if last else None,
                  "auc": last["auc"] if last else None},
        "privacy": {
            "seeded_noise": cfg.noise_seed is not None,
            **({"warning": "every noise draw was seeded (--noise-seed): this run is reproducible "
                           "and therefore NOT private, whatever the epsilons say"}
               if cfg.noise_seed is not None else {}),
            "record": {"epsilon_max": max(record_eps) if record_eps else None,
                       "budget": record_budget, "delta": priv["record_delta"],
                       "mechanism": "DP-SGD on every clinic (Opacus, Poisson sampling), "
                                    "accounted by each clinic's own ledger"
                                    if record_budget is not None else
                                    "none: the clinics train without DP-SGD"},
            "device": {"epsilon": eps_device, "delta": priv["delta"], "noise": priv["noise"],
                       "noise_multiplier": priv["noise_multiplier"],
                       "clip_norm": priv["clip_norm"],
                       "statement": _weak_device_statement(eps_device, cfg.clients,
                                                           priv["noise"], priv["delta"])},
        },
        "devices": devices,
        "seconds": round(seconds, 2),
        "workdir": str(work),
    }


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = [x["round"] for x in rows]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(r, [x["accuracy"] if x["accuracy"] is not None else np.nan for x in rows], "o-",
             label="held-out accuracy", color="tab:blue")
    ax1.plot(r, [x["auc"] if x["auc"] is not None else np.nan for x in rows], "s--",
             label="held-out AUC", color="tab:cyan")
    ax1.set_xlabel("round")
    ax1.set_ylabel("accuracy / AUC")
    ax1.set_ylim(0, 1.02)
    ax2 = ax1.twinx()
    ax2.plot(r, [x["epsilon_record"] if x["epsilon_record"] is not None else np.nan
                 for x in rows], "^-", color="tab:red", label="epsilon (record, max)")
    ax2.set_ylabel("record-level epsilon spent")
    ax2.set_ylim(bottom=0)
    lines = [*ax1.get_lines(), *ax2.get_lines()]
    ax1.legend(lines, [str(ln.get_label()) for ln in lines], loc="lower right")
    ax1.set_title("Bedside federation: global model and privacy spent by round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Table:
    """One printed row per round (works in a terminal and in CI logs)."""

    cols: ClassVar[list[tuple[str, int]]] = [
        ("round", 5), ("model", 5), ("answered", 8), ("accepted", 8), ("rejected", 8),
        ("declined", 8),
        ("accuracy", 8), ("AUC", 6), ("eps dev", 8), ("eps rec", 7), ("time s", 6)]

    def __init__(self, cfg: DemoConfig, plan: dict[str, Any]) -> None:
        from rich.console import Console

        self.cfg, self.plan = cfg, plan
        self.console = Console(stderr=False, highlight=False)
        self.quiet = cfg.quiet

    def _print(self, text: str = "") -> None:
        if not self.quiet:
            self.console.print(text, soft_wrap=True)

    def intro(self, work: Path) -> None:
        c = self.cfg
        self._print(f"[bold]Bedside demo[/bold]: {len(self.plan['clinics'])} clinics, "
                    f"{c.rounds} rounds, {self.plan['dataset']} ({self.plan['train_rows']} rows "
                    f"across clinics, {self.plan['holdout_rows']} held out by the data team), "
                    f"model {c.arch}")
        p = configured_privacy(self.plan)
        record = (f"record-level DP-SGD budget epsilon {p['record_budget']:g} per clinic (delta "
                  f"{p['record_delta']:g})" if p["record_budget"] is not None else
                  "no record-level DP-SGD")
        if p["record_budget"] is not None and not p["record_dp_everywhere"]:
            record += " (some clinics train without it)"
        device = (f"updates clipped to L2 {p['clip_norm']:g} with {p['noise']} noise multiplier "
                  f"{p['noise_multiplier']:g}" if p["noise"] != "none" else
                  f"updates clipped to L2 {p['clip_norm']:g}, no device-level noise")
        self._print(f"privacy: {record}; {device}")
        if c.defaults:
            self._print(f"training: {c.epochs} local epoch(s) of {c.optimizer} lr {c.lr:g} at "
                        f"DP-SGD batch {c.batch_size}, server {c.server_optimizer}; defaults "
                        f"{c.defaults}")
        if "statistics" in self.plan["aggregator"]:
            self._print("round 1*: the clinics release noised feature statistics (accounted in "
                        "their ledgers); the model's input scaling comes from them")
        for cl in self.plan["clinics"]:
            self._print(f"  {cl['id']}: {cl['rows']} records, labels {cl['labels']['histogram']}")
        self._print(f"working directory: {work}")
        self._print("  ".join(f"{n:>{w}}" for n, w in self.cols))

    def row(self, r: dict[str, Any]) -> None:
        def f(v: Any, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        label = f"{r['round']}{'*' if r.get('task') == 'statistics' else ''}"
        vals = [label, f"v{r['model_version']}", str(r["participants"]),
                str(r["accepted"]), str(r["rejected"]), str(r["declined"]), f(r["accuracy"], ".4f"),
                f(r["auc"], ".4f"), f(r["epsilon_device"], ".3g"), f(r["epsilon_record"], ".3g"),
                f(r["round_seconds"], ".2f")]
        self._print("  ".join(f"{v:>{w}}" for v, (_, w) in zip(vals, self.cols, strict=True)))

    def outro(self, report: dict[str, Any]) -> None:
        fin, p = report["final"], report["privacy"]
        self._print(f"final model v{fin['model_version']}: held-out accuracy "
                    f"{fin['accuracy']:.4f}, AUC {fin['auc']:.4f} (starting point: accuracy "
                    f"{report['initial_model']['accuracy']:.4f})"
                    if fin["accuracy"] is not None else "no model was produced")
        rec = p["record"]["epsilon_max"]
        self._print(f"record-level: epsilon <= {rec:.3g} (delta {p['record']['delta']:g}) per "
                    f"clinic, budget {p['record']['budget']:g}" if rec is not None else
                    "record-level: not reported")
        self._print(f"device-level: {p['device']['statement']}")
        fair = report.get("fairness") or {}
        for part, where in (("reference", "on the data team's reference rows, epsilon 0"),
                            ("fleet", "the clinics' noised counts of model v{v}, record-level "
                                      "epsilon {eps} each")):
            f = fair.get(part)
            if not f or not f.get("largest_gap"):
                continue
            k = f["largest_gap"]
            g = f["gaps"][k]
            small = (f"; too small to judge: {', '.join(f['small_groups'])}"
                     if f["small_groups"] else "")
            where = where.format(v=f.get("model_version"), eps=f"{f.get('epsilon') or 0:.3g}")
            self._print(f"per group ({'/'.join(f['group_by'])}, {where}): largest gap {k} "
                        f"{g['gap']:.3f} ({g['lowest']} lowest, {g['highest']} highest){small}")
        if p.get("warning"):
            self._print(f"[bold]warning[/bold]: {p['warning']}")
        self._print(f"report: {report['files']['report']}  plot: {report['files']['plot']}  "
                    f"({report['seconds']:.1f} s)")
