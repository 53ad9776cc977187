"""``bedside simulate``: a fleet of many devices in one process, over the real broker, against the
real aggregator service.

Each simulated device has its own records (drawn from the data set's training split), its own
privacy ledger on disk, its own Ed25519 key and TLS certificate, and its own MQTT connection to
Mosquitto (with the configuration ``bedside broker config`` generates: TLS, identity = certificate
CN, the fleet's ACL). They take part in rounds through the round core, exactly as the agent does
(:func:`bedside.edge.participant.participate`: the device's privacy plan, DP-SGD, clipping,
ledger), and publish signed updates. The aggregator is the real service
(``bedside aggregator serve``) in its own process, so its memory is its own.

What the devices share, because it is the same for all of them: one torch, the round's model and
its verification (the same signed bytes reach every device; each device checks the round's
announcement signature itself). The MQTT connections are driven by one thread with one selector,
so a thousand devices cost a thousand sockets, not a thousand threads.

Used by ``benchmarks/README.md``'s fleet figures and ``docs/scaling.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import selectors
import shutil
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bedside.constants import (
    AGGREGATOR_ID,
    KIND_ANNOUNCE,
    KIND_MODEL,
    KIND_RECEIPT,
    KIND_UPDATE,
    topic_model,
    topic_receipt,
    topic_round,
    topic_update,
)
from bedside.errors import BedsideError, InputError, TransportError

log = logging.getLogger("bedside.simulate")

FLEET = "sim"
MARKER = ".bedside-simulate"
#: Records each simulated device holds by default.
DEFAULT_RECORDS = 64
#: Threads that open the devices' connections (TLS handshakes) at the start.
CONNECT_THREADS = 16


@dataclass
class SimConfig:
    devices: int = 1000
    rounds: int = 2
    records: int = DEFAULT_RECORDS
    dataset: str = "wdbc"
    target_epsilon: float = 8.0
    delta: float = 1e-5
    out: Path | None = None
    deadline: float = 900.0
    timeout: float = 1800.0
    seed: int = 0
    quiet: bool = False


@dataclass
class Device:
    id: str
    key: Any
    x: np.ndarray
    y: np.ndarray
    ledger: Any
    client: Any = None
    connected: bool = False
    inbox: list[tuple[str, bytes]] = field(default_factory=list)
    handled: set[int] = field(default_factory=set)
    receipts: dict[str, int] = field(default_factory=dict)
    declines: dict[str, int] = field(default_factory=dict)


def _rss_mb(pid: int | str = "self", field_name: str = "VmRSS") -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Fleet:
    """The simulated fleet: files, broker, aggregator process and devices."""

    def __init__(self, cfg: SimConfig, work: Path) -> None:
        self.cfg, self.work = cfg, work
        self.devices: list[Device] = []
        self.broker: subprocess.Popen[bytes] | None = None
        self.aggregator: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.selector = selectors.DefaultSelector()
        self.models: dict[str, tuple[Any, bytes]] = {}  # release payload digest -> verified model
        self.current: tuple[Any, bytes] | None = None  # the newest verified (manifest, onnx)
        self.aggregator_peak_mb = 0.0
        self.done = False
        self.round_marks: dict[int, dict[str, float]] = {}

    # -- preparation ---------------------------------------------------------------------------
    def prepare(self) -> dict[str, Any]:
        from bedside.demo.run import DemoConfig, export_initial_model, to_toml
        from bedside.models import datasets
        from bedside.privacy.ledger import Budget, Ledger
        from bedside.transport import free_port
        from bedside.transport.mosquitto import config_text
        from bedside.transport.pki import acl_text, create_fleet
        from bedside.wire.signing import SigningKey

        cfg, work = self.cfg, self.work
        t0 = time.perf_counter()
        ds = datasets.load(cfg.dataset)
        train, holdout = datasets.train_test_split(ds, test_fraction=0.2, seed=cfg.seed)
        demo = DemoConfig(dataset=cfg.dataset, seed=cfg.seed,
                          arch="cnn1d" if train.schema.kind == "timeseries" else "logreg")
        export_initial_model(train, holdout, demo, work / "initial-model")
        reference = datasets.to_csv(holdout, work / "aggregator" / "reference.csv",
                                    label_column="label")
        self.rss_model_mb = _rss_mb()  # torch, the exporter and the data: before any device
        ids = [f"sim-{i:05d}" for i in range(cfg.devices)]
        agg_dir = work / "aggregator"
        (agg_dir / "devices").mkdir(parents=True, exist_ok=True)
        agg_key = SigningKey.generate()
        agg_key.save(agg_dir / "aggregator.key")
        self.pinned = agg_key.public
        rng = np.random.default_rng(cfg.seed)
        budgets = {"record": Budget(cfg.target_epsilon, cfg.delta)}
        for d in ids:
            key = SigningKey.generate()
            key.public.save(agg_dir / "devices" / f"{d}.pub")
            rows = rng.integers(0, len(train), size=cfg.records)  # its own patients
            (work / "devices" / d).mkdir(parents=True)
            ledger = Ledger(work / "devices" / d / "ledger.db", budgets)
            self.devices.append(Device(d, key, train.x[rows], train.y[rows], ledger))
        certs = work / "certs"
        create_fleet(certs, ["aggregator", *ids], ["127.0.0.1"])
        (certs / "acl").write_text(acl_text(FLEET, ids) + "\n")
        self.certs = certs
        self.port = free_port()
        conf = config_text(certs, work / "broker", [("127.0.0.1", self.port)])
        if os.geteuid() == 0:  # Mosquitto would drop to its own user, who cannot read these
            conf = "user root\n" + conf
        conf += "\nmax_queued_messages 10000\n"
        (work / "broker").mkdir(exist_ok=True)
        (work / "broker" / "mosquitto.conf").write_text(conf)
        agg_conf = {
            "fleet": FLEET, "data_dir": str(agg_dir / "data"),
            "key": str(agg_dir / "aggregator.key"), "devices": str(agg_dir / "devices"),
            "initial_model": str(work / "initial-model"),
            "mqtt": {"host": "127.0.0.1", "port": self.port, "ca_file": str(certs / "ca.crt"),
                     "cert_file": str(certs / "aggregator.crt"),
                     "key_file": str(certs / "aggregator.key")},
            "rounds": {"rounds": cfg.rounds, "min_participants": max(1, cfg.devices // 2),
                       "deadline_seconds": cfg.deadline,
                       "expected_participants": cfg.devices},
            "training": {"epochs": 1, "batch_size": 16, "lr": 0.5},
            "privacy": {"noise": "central", "clip_norm": 1.0, "noise_multiplier": 1.0,
                        "delta": cfg.delta},
            "evaluation": {"data": str(reference), "label": "label"},
        }
        (agg_dir / "aggregator.toml").write_text(to_toml(agg_conf))
        return {"prepare_s": round(time.perf_counter() - t0, 2), "devices": cfg.devices,
                "records_per_device": cfg.records, "dataset": cfg.dataset}

    # -- processes -----------------------------------------------------------------------------
    def start_services(self) -> None:
        import socket

        log_dir = self.work / "logs"
        log_dir.mkdir(exist_ok=True)
        from bedside.transport.mosquitto import binary

        self._logs = [(log_dir / "mosquitto.log").open("wb"),
                      (log_dir / "aggregator.log").open("wb")]
        self.broker = subprocess.Popen(
            [binary(), "-c", str(self.work / "broker" / "mosquitto.conf")],
            stdout=subprocess.DEVNULL, stderr=self._logs[0])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            time.sleep(0.02)
        else:
            raise TransportError(f"Mosquitto did not start; see {log_dir / 'mosquitto.log'}")
        self.aggregator = subprocess.Popen(
            [sys.executable, "-m", "bedside", "aggregator", "serve", "--config",
             str(self.work / "aggregator" / "aggregator.toml")],
            stdout=subprocess.DEVNULL, stderr=self._logs[1])

    def stop(self) -> None:
        for d in self.devices:
            if d.client is not None:
                with contextlib.suppress(KeyError, ValueError, TypeError):
                    self.selector.unregister(d.client.socket())
                with contextlib.suppress(OSError, RuntimeError):  # closing anyway
                    d.client.disconnect()
                    d.client.loop_write()  # the DISCONNECT goes out, the socket closes
            d.ledger.close()
        self.selector.close()
        for proc in (self.aggregator, self.broker):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for f in getattr(self, "_logs", []):
            f.close()

    # -- MQTT: one thread, one selector ---------------------------------------------------------
    def connect_all(self) -> float:
        """Open every device's TLS connection and session (the TLS handshakes in a few threads:
        OpenSSL works without the GIL); seconds until all are connected."""
        from concurrent.futures import ThreadPoolExecutor

        import paho.mqtt.client as paho

        t0 = time.perf_counter()

        def open_connection(d: Device) -> Any:
            c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=d.id,
                            protocol=paho.MQTTv311, clean_session=False)
            ctx = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
            ctx.load_cert_chain(str(self.certs / f"{d.id}.crt"), str(self.certs / f"{d.id}.key"))
            c.tls_set_context(ctx)
            c.max_inflight_messages_set(64)
            c.user_data_set(d)
            c.connect("127.0.0.1", self.port, keepalive=120)
            return c

        with ThreadPoolExecutor(max_workers=CONNECT_THREADS) as pool:
            futures = [pool.submit(open_connection, d) for d in self.devices]
        for d, f in zip(self.devices, futures, strict=True):  # kept, to be closed by stop()
            if f.exception() is None:
                d.client = f.result()
        failed = [f.exception() for f in futures if f.exception() is not None]
        if failed:
            raise TransportError(f"{len(failed)} device(s) could not connect to Mosquitto: "
                                 f"{failed[0]}")
        for d in self.devices:
            c = d.client

            def on_connect(client: Any, userdata: Device, flags: Any, reason: Any,
                           _properties: Any) -> None:
                if reason.is_failure:
                    raise TransportError(f"{userdata.id}: broker refused the connection: "
                                         f"{reason}")
                userdata.connected = True
                for topic in (topic_model(FLEET), topic_round(FLEET),
                              topic_receipt(FLEET, userdata.id)):
                    client.subscribe(topic, qos=1)

            def on_message(client: Any, userdata: Device, msg: Any) -> None:
                userdata.inbox.append((msg.topic, bytes(msg.payload)))

            c.on_connect, c.on_message = on_connect, on_message
            d.client = c
            sock = c.socket()
            if sock is None:
                raise TransportError(f"{d.id}: no connection to the broker")
            self.selector.register(sock, selectors.EVENT_READ, d)
        deadline = time.monotonic() + 60
        while not all(d.connected for d in self.devices):
            if time.monotonic() > deadline:
                missing = sum(1 for d in self.devices if not d.connected)
                raise TransportError(f"{missing} device(s) did not connect within 60 s")
            self.pump(0.05)
        return time.perf_counter() - t0

    def pump(self, timeout: float) -> None:
        """One turn of the network: read what arrived, write what is queued, keep alive."""
        for key, _ in self.selector.select(timeout):
            key.data.client.loop_read()
        for d in self.devices:
            c = d.client
            if c.want_write():
                c.loop_write()
        now = time.monotonic()
        if now - getattr(self, "_misc_at", 0.0) > 1.0:
            self._misc_at = now
            for d in self.devices:
                d.client.loop_misc()

    # -- devices ----------------------------------------------------------------------------------
    def _model(self, payload: bytes) -> None:
        """A model release reached the devices: verified once (the same signed bytes reach every
        device), kept as the newest version."""
        import hashlib

        from bedside.federation.release import Release
        from bedside.manifest import Manifest, sha256_bytes
        from bedside.wire.envelope import decode
        from bedside.wire.signing import KeyRing

        digest = hashlib.sha256(payload).hexdigest()
        if digest in self.models or not payload:
            return
        ring = KeyRing()
        ring.add(AGGREGATOR_ID, self.pinned)
        env = decode(payload, ring, kinds={KIND_MODEL})
        rel = Release.from_meta(env.header.meta.get("release"))
        m = Manifest.from_dict(env.header.meta["manifest"], "model release manifest")
        onnx = env.tensors["onnx"].tobytes()
        if sha256_bytes(onnx) != rel.sha256 or m.sha256 != rel.sha256:
            raise InputError(f"model release v{rel.version}: the model does not match its "
                             "signed digest")
        self.models[digest] = (m, onnx)
        if self.current is None or m.version > self.current[0].version:
            self.current = (m, onnx)

    def _announcement(self, d: Device, payload: bytes) -> Any:
        from bedside.federation.settings import RoundSettings
        from bedside.wire.envelope import decode
        from bedside.wire.signing import KeyRing

        ring = KeyRing()
        ring.add(AGGREGATOR_ID, self.pinned)
        env = decode(payload, ring, kinds={KIND_ANNOUNCE})  # every device checks the signature
        meta = env.header.meta
        if meta.get("state") == "done":
            self.done = True
            return None
        return env.header.round, env.header.model_version, RoundSettings.from_meta(meta)

    def step(self) -> int:
        """Handle what every device received; returns how many devices took part or declined."""
        from bedside.edge.participant import Contribution, participate
        from bedside.federation.device import DevicePrivacy
        from bedside.privacy.mechanisms import secure_rng
        from bedside.wire.envelope import decode, encode
        from bedside.wire.signing import KeyRing

        privacy = DevicePrivacy(record_epsilon=self.cfg.target_epsilon,
                                record_delta=self.cfg.delta)
        acted = 0
        ring = KeyRing()
        ring.add(AGGREGATOR_ID, self.pinned)
        for d in self.devices:
            inbox, d.inbox = d.inbox, []
            for topic, payload in inbox:
                if topic == topic_model(FLEET):
                    self._model(payload)
                elif topic == topic_receipt(FLEET, d.id):
                    env = decode(payload, ring, kinds={KIND_RECEIPT})
                    status = str(env.header.meta.get("status"))
                    d.receipts[status] = d.receipts.get(status, 0) + 1
                elif topic == topic_round(FLEET) and payload:
                    ann = self._announcement(d, payload)
                    if ann is None:
                        continue
                    round_id, version, settings = ann
                    if round_id in d.handled:
                        continue
                    if self.current is None or self.current[0].version != version:
                        d.inbox.append((topic, payload))  # its model has not arrived yet
                        continue
                    manifest, onnx = self.current
                    d.handled.add(round_id)
                    marks = self.round_marks.setdefault(round_id, {"first": time.monotonic()})
                    out = participate(round_id, settings, manifest, onnx, d.x, d.y,
                                      privacy=privacy, ledger=d.ledger, fleet=FLEET, seed=None,
                                      rng=secure_rng())
                    if isinstance(out, Contribution):
                        msg = encode(KIND_UPDATE, d.id, d.key, out.tensors, round=round_id,
                                     model_version=version, meta=out.meta)
                    else:
                        d.declines[out.reason] = d.declines.get(out.reason, 0) + 1
                        msg = encode(KIND_UPDATE, d.id, d.key, {}, round=round_id,
                                     model_version=version,
                                     meta={"fleet": FLEET, "decline": out.reason})
                    d.client.publish(topic_update(FLEET, d.id), msg, qos=1)
                    marks["last"] = time.monotonic()
                    acted += 1
                    if acted % 25 == 0:
                        self.pump(0)  # keep the sockets moving while devices train
        return acted

    def watch_aggregator(self) -> None:
        if self.aggregator is not None:
            peak = _rss_mb(self.aggregator.pid, "VmHWM")
            if peak is not None:
                self.aggregator_peak_mb = max(self.aggregator_peak_mb, peak)


def run(cfg: SimConfig) -> dict[str, Any]:
    """Prepare, run the federation to its end (or ``cfg.timeout``), report what was measured."""
    if cfg.devices < 2:
        raise InputError("--devices must be at least 2")
    if cfg.rounds < 1:
        raise InputError("--rounds must be at least 1")
    if cfg.records < 4:
        raise InputError("--records must be at least 4")
    _enough_files(cfg.devices)
    work = Path(cfg.out) if cfg.out is not None else Path("simulate-output")
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():  # never delete what this command did not write
            raise InputError(f"--out {work} exists and is not a previous simulation's output; "
                             "choose an empty or new directory")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("created by bedside simulate; replaced by the next run\n")
    fleet = Fleet(cfg, work)
    report: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v)
                                         for k, v in cfg.__dict__.items()}}
    started = time.monotonic()
    import bedside.edge.trainer  # noqa: F401  torch, once, before the baseline is taken
    rss_before = _rss_mb()
    try:
        report["prepare"] = fleet.prepare()
        rss_prepared = _rss_mb()
        fleet.start_services()
        report["connect_s"] = round(fleet.connect_all(), 3)
        rss_connected = _rss_mb()
        _say(cfg, f"{cfg.devices} devices connected over TLS in {report['connect_s']} s")
        deadline = time.monotonic() + cfg.timeout
        while not fleet.done:
            if time.monotonic() > deadline:
                raise TransportError(f"the federation did not finish within {cfg.timeout:g} s; "
                                     f"see {work / 'logs'}")
            if fleet.aggregator is not None and fleet.aggregator.poll() not in (None, 0):
                raise TransportError(f"the aggregator exited with an error; see "
                                     f"{work / 'logs' / 'aggregator.log'}")
            if fleet.broker is not None and fleet.broker.poll() is not None:
                raise TransportError(f"Mosquitto stopped; see {work / 'logs' / 'mosquitto.log'}")
            fleet.pump(0.05)
            if fleet.step():
                _say(cfg, f"  devices answered rounds {sorted(fleet.round_marks)}")
            fleet.watch_aggregator()
        for _ in range(40):  # the last receipts
            fleet.pump(0.05)
            fleet.step()
        report.update(_results(fleet, work))
        report["rss_mb"] = {"with_torch": rss_before, "model_exported": fleet.rss_model_mb,
                            "devices_prepared": rss_prepared,
                            "devices_connected": rss_connected, "after_rounds": _rss_mb()}
    finally:
        fleet.watch_aggregator()
        fleet.stop()
    report["aggregator_peak_rss_mb"] = round(fleet.aggregator_peak_mb, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base = getattr(fleet, "rss_model_mb", None) or rss_before or 0.0
    report["devices_process"] = {
        "peak_rss_mb": round(peak, 1), "before_devices_mb": round(base, 1),
        # what the devices add: records, ledgers, keys, connections, and the peak of training
        "per_device_kb": round((peak - base) * 1024 / cfg.devices, 1)}
    report["seconds"] = round(time.monotonic() - started, 1)
    (work / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    _say(cfg, f"done in {report['seconds']} s: report {work / 'report.json'}")
    return report


def _enough_files(devices: int) -> None:
    """Each device holds a socket and its ledger's files: raise the soft limit of open files to
    what that needs (within the hard limit), or say what to change."""
    need = 4 * devices + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise InputError(f"{devices} simulated devices need about {need} open files; this "
                         f"process may open {hard} at most (ulimit -Hn): simulate fewer devices "
                         "or raise the limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _results(fleet: Fleet, work: Path) -> dict[str, Any]:
    from bedside.aggregator.state import State
    from bedside.models.registry import Registry

    state = State(work / "aggregator" / "data" / "state.db")
    try:
        rounds = [{"round": r.round, "status": r.status,
                   "accepted": (r.result or {}).get("accepted"),
                   "declined": (r.result or {}).get("declined"),
                   "rejected": (r.result or {}).get("rejected"),
                   "seconds": None if r.closed_at is None else round(r.closed_at - r.opened_at,
                                                                     2),
                   "accuracy": ((r.result or {}).get("metrics") or {}).get("accuracy"),
                   "record_epsilon_max": ((r.result or {}).get("record_epsilon") or {}
                                          ).get("max")}
                  for r in state.rounds()]
    finally:
        state.close()
    reg = Registry(work / "aggregator" / "data" / "registry")
    final = reg.manifest(reg.latest())
    receipts: dict[str, int] = {}
    declines: dict[str, int] = {}
    for d in fleet.devices:
        for k, v in d.receipts.items():
            receipts[k] = receipts.get(k, 0) + v
        for k, v in d.declines.items():
            declines[k] = declines.get(k, 0) + v
    db = sum(p.stat().st_size for p in (work / "aggregator" / "data").glob("state.db*"))
    return {"rounds": rounds, "final_model_version": final.version,
            "final_accuracy": (final.metrics.get("holdout") or {}).get("accuracy"),
            "device_epsilon": (final.privacy or {}).get("epsilon"),
            "receipts": receipts, "device_declines": declines,
            "state_db_mb": round(db / 2**20, 2)}


def _say(cfg: SimConfig, text: str) -> None:
    if not cfg.quiet:
        print(text, flush=True)


def main_from_args(ns: Any) -> int:
    from bedside.cli import print_json

    cfg = SimConfig(devices=ns.devices, rounds=ns.rounds, records=ns.records,
                    dataset=ns.dataset, target_epsilon=ns.target_epsilon, out=ns.out,
                    timeout=ns.timeout, quiet=ns.json)
    try:
        report = run(cfg)
    except BedsideError:
        raise
    if ns.json:
        print_json(report)
    else:
        for r in report["rounds"]:
            print(f"round {r['round']}: {r['status']}, {r['accepted']} accepted in "
                  f"{r['seconds']} s, accuracy {r['accuracy']}")
        print(f"aggregator peak RSS {report['aggregator_peak_rss_mb']} MB; the devices' process "
              f"{report['devices_process']['peak_rss_mb']} MB "
              f"({report['devices_process']['per_device_kb']} KB per device)")
    return 0
