"""Federation benchmark: privacy-utility of federated training, aggregator throughput and memory,
round latency over the embedded broker and Mosquitto, the default demo's time and accuracy.

One run writes ``benchmarks/results/federation.json`` and the ``## Federation`` section of
``benchmarks/README.md``. Four parts:

1. **Privacy-utility on WDBC.** The real federation (``bedside.demo.run.run``: embedded broker,
   aggregator and 5 clinic agents as separate processes, non-IID shards, 15 rounds, logistic
   regression) under six privacy settings: non-private; record-level DP-SGD at epsilon 1, 3 and 8
   without device-level noise; device-level central noise only; and the demo's default (record
   epsilon 8 plus central noise). Each setting runs with 3 seeds (the seed picks the held-out split,
   the shards, the initial weights and every noise draw). Beside them, on the same splits:
   centralized training with the demo's local settings for as many epochs as the federation runs
   in total (non-private and DP-SGD at the same epsilons), and the tuned centralized DP-SGD figures
   of ``benchmarks/privacy_utility.py`` (read from its JSON).
2. **Aggregator throughput and memory.** A fresh process per case runs the real ``Aggregator``
   over the in-memory transport for a 50,890-parameter model (digits MLP, hidden 256 x 128) and N
   enrolled devices; each device's update is signed and published, then handled by the aggregator
   (size check, envelope and Ed25519 signature, round, replay, tensor names, shapes, finite
   values, norm bound, durable SQLite record, acknowledgement, signed receipt). Validated updates
   per second = N / time spent in the aggregator. The round is then closed (aggregation, central
   noise, new ONNX version, signature). Peak RSS is measured from after start-up (the kernel's
   peak counter is reset there) to the end, for N = 10, 100 and 1,000, for the streaming FedAvg
   and, for contrast, the coordinate median (which must hold every update).
3. **Round latency.** The aggregator and 3 agents (threads of one process) run 3 rounds over the
   embedded amqtt broker and over Mosquitto (TLS, client certificates and ACL from
   ``deploy/mosquitto``), both on 127.0.0.1: seconds from announcement to the round's close (this
   includes local training), and the one-way delivery time of an update-sized QoS 1 message from a
   device to the aggregator's subscription.
4. **Where a round's time goes** (``--parts rounds``): ``bedside demo`` as ``make demo`` runs it,
   timed beside one ``import torch, opacus`` and beside the same federation in one process on the
   round core (:mod:`bedside.demo.inprocess`), with each round's phases from the services' own
   timing records (train, sign, deliver, validate, aggregate, write ONNX, evaluate, publish).
5. **The default demo** (``bedside demo``, what ``make demo`` runs): wall time and final accuracy,
   seeded (``--noise-seed 0``) and with fresh OS randomness as a clinic would run it.
6. **A round over Flower beside MQTT** (``--parts flower``): ``bedside demo`` with 3 clinics over
   each transport, the rounds' phases, the cost of starting a ClientApp process, and the Flower
   driver over an in-memory Grid.

Run from the repository root: ``.venv/bin/python benchmarks/federation.py`` (about 15 minutes on 2
cores; ``--quick`` for a smoke run of every part). Needs Mosquitto (``make setup`` installs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchlib import README, REPO, RESULTS, load_average, log, machine, write_section

RESULTS_JSON = RESULTS / "federation.json"
PARTS = ("privacy", "aggregator", "mqtt", "fleet", "rounds", "latency", "flower")
#: The keys of the results each part writes (a partial run keeps the others from the last run).
PART_KEYS = {"privacy": ("federated", "centralized_demo_settings", "centralized_tuned",
                         "demo_unseeded"),
             "aggregator": ("big_model", "aggregator"), "mqtt": ("mqtt_rate",),
             "fleet": ("fleet",),
             "rounds": ("rounds",), "latency": ("latency",), "flower": ("flower",)}
PRIVACY_UTILITY_JSON = RESULTS / "privacy_utility.json"
HEADING = "## Federation"
DELTA = 1e-5
FLEET = "bench"
MB = 1_000_000

# -- part 1: the privacy settings of the federated runs -------------------------------------------
NO_RECORD_DP = {"record_epsilon": None, "allow_no_record_dp": True}
ACCEPT_NO_DEVICE_NOISE = {"accept_noise": ["local", "central", "none"]}
NO_DEVICE_BUDGET = {"device_epsilon": None}
SETTINGS: dict[str, dict[str, Any]] = {
    "non-private": {
        "label": "federated, non-private",
        "demo": {}, "aggregator": {"privacy": {"noise": "none"}},
        "agent": {"privacy": {**NO_RECORD_DP, **NO_DEVICE_BUDGET, **ACCEPT_NO_DEVICE_NOISE}}},
    "record-1": {
        "label": "federated, record-level DP-SGD, epsilon 1",
        "demo": {"target_epsilon": 1.0}, "aggregator": {"privacy": {"noise": "none"}},
        "agent": {"privacy": {**NO_DEVICE_BUDGET, **ACCEPT_NO_DEVICE_NOISE}}},
    "record-3": {
        "label": "federated, record-level DP-SGD, epsilon 3",
        "demo": {"target_epsilon": 3.0}, "aggregator": {"privacy": {"noise": "none"}},
        "agent": {"privacy": {**NO_DEVICE_BUDGET, **ACCEPT_NO_DEVICE_NOISE}}},
    "record-8": {
        "label": "federated, record-level DP-SGD, epsilon 8",
        "demo": {"target_epsilon": 8.0}, "aggregator": {"privacy": {"noise": "none"}},
        "agent": {"privacy": {**NO_DEVICE_BUDGET, **ACCEPT_NO_DEVICE_NOISE}}},
    "device-central-1": {
        "label": "federated, device-level central noise z = 1 only",
        "demo": {"noise_multiplier": 1.0}, "aggregator": {},
        "agent": {"privacy": NO_RECORD_DP}},
    "demo-default": {
        "label": "federated, demo default: record epsilon 8 + central noise z = 0.2",
        "demo": {}, "aggregator": {}, "agent": {}},
}
DEVICE_TARGET_EPSILON = 10.0  # a device-level guarantee worth the name, for the last setting
SEEDS = (0, 1, 2)
UNSEEDED_DEMO_RUNS = 10
CENTRAL_EPSILONS = (1.0, 3.0, 8.0)

# -- part 2 ---------------------------------------------------------------------------------------
PROBE_SIZES = (10, 100, 1000)
PROBE_RULES = ("fedavg", "median")
PROBE_BURST = 64  # updates published between two turns of the aggregator's loop
BIG_HIDDEN = [256, 128]  # digits MLP: 64 -> 256 -> 128 -> 10, 50,890 parameters

# -- part 3 ---------------------------------------------------------------------------------------
LATENCY_CLINICS = ("clinic-1", "clinic-2", "clinic-3")
LATENCY_ROUNDS = 3
PINGS = 200
PING_PAYLOADS = {"logreg update (~1 KB)": 1_024, "50k-parameter update (~200 KB)": 204_800}


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": round(statistics.fmean(vals), 4),
            "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0,
            "min": round(min(vals), 4), "max": round(max(vals), 4), "n": len(vals)}


def quantiles(values: Sequence[float]) -> dict[str, float]:
    vals = sorted(values)

    def pick(q: float) -> float:
        return vals[min(len(vals) - 1, int(q * len(vals)))]

    return {"p50": pick(0.5), "p95": pick(0.95), "max": vals[-1], "n": len(vals)}


# ==================================================================================================
# part 1: privacy-utility
# ==================================================================================================
def demo_config(seed: int | None, noise_seed: int | None, setting: Mapping[str, Any],
                out: Path, quick: bool) -> Any:
    from bedside.demo.run import DemoConfig

    cfg = DemoConfig(seed=seed if seed is not None else 0, noise_seed=noise_seed, out=out,
                     quiet=True, extra={"aggregator": setting["aggregator"],
                                        "agent": setting["agent"]}, **setting["demo"])
    if quick:
        cfg.rounds = 3
    return cfg


def run_demo(cfg: Any) -> dict[str, Any]:
    """One federation; the figures the tables need (the work directory is removed after)."""
    from bedside.demo.run import run

    started = time.perf_counter()
    try:
        report = run(cfg)
    finally:
        shutil.rmtree(cfg.out, ignore_errors=True)
    rounds = report["rounds"]
    return {
        "accuracy": report["final"]["accuracy"], "auc": report["final"]["auc"],
        "record_epsilon": report["privacy"]["record"]["epsilon_max"],
        "device_epsilon": report["privacy"]["device"]["epsilon"],
        "wall_s": round(time.perf_counter() - started, 2), "demo_seconds": report["seconds"],
        "accepted": [r.get("accepted") for r in rounds],
        "accuracy_by_round": [r.get("accuracy") for r in rounds],
        "round_s": [r.get("round_seconds") for r in rounds],
    }


def device_level_z(target: float, rounds: int) -> float:
    """The central noise multiplier z at which ``rounds`` released models cost a device
    ``target`` epsilon (replace-one: each round is a Gaussian mechanism with multiplier z / 2)."""
    from bedside.privacy.accountant import calibrate

    return 2.0 * calibrate(target, DELTA, 1.0, rounds)


def all_settings(rounds: int) -> dict[str, dict[str, Any]]:
    """SETTINGS plus central noise calibrated to DEVICE_TARGET_EPSILON over ``rounds`` rounds."""
    z = round(device_level_z(DEVICE_TARGET_EPSILON, rounds), 3)
    return {**SETTINGS, "device-central-target": {
        "label": f"federated, device-level central noise z = {z:g} only (device epsilon "
                 f"{DEVICE_TARGET_EPSILON:g})",
        "demo": {"noise_multiplier": z}, "aggregator": {}, "agent": {"privacy": NO_RECORD_DP},
        "z": z}}


def federated_settings(seeds: Sequence[int], work: Path, quick: bool) -> dict[str, Any]:
    from bedside.demo.run import DemoConfig

    out: dict[str, Any] = {}
    for key, setting in all_settings(3 if quick else DemoConfig().rounds).items():
        runs = []
        for seed in seeds:
            cfg = demo_config(seed, seed, setting, work / f"{key}-{seed}", quick)
            r = run_demo(cfg)
            r["seed"] = seed
            runs.append(r)
            log(f"{key} seed {seed}: accuracy {r['accuracy']}, record eps {r['record_epsilon']}, "
                f"device eps {r['device_epsilon']}, {r['wall_s']:.1f} s")
        out[key] = {"label": setting["label"], "runs": runs,
                    "noise_multiplier": setting["demo"].get("noise_multiplier",
                                                            DemoConfig().noise_multiplier),
                    "accuracy": mean_std([r["accuracy"] for r in runs]),
                    "auc": mean_std([r["auc"] for r in runs]),
                    "record_epsilon_max": max((r["record_epsilon"] for r in runs
                                               if r["record_epsilon"] is not None), default=None),
                    "device_epsilon_max": max((r["device_epsilon"] for r in runs
                                               if r["device_epsilon"] is not None), default=None),
                    "wall_s": mean_std([r["wall_s"] for r in runs])}
    return out


def centralized_same_split(seeds: Sequence[int], quick: bool) -> dict[str, Any]:
    """Centralized logreg on each seed's demo split, trained with the demo's local settings for
    rounds x local epochs epochs (non-private, and DP-SGD at each epsilon)."""
    from privacy_utility import HyperParams, train_eval

    from bedside.demo.run import DemoConfig
    from bedside.models import datasets

    d = DemoConfig()
    rounds = 3 if quick else d.rounds
    out: dict[str, Any] = {"settings": {"epochs": rounds * d.epochs, "optimizer": d.optimizer,
                                        "lr": d.lr, "batch_size": d.batch_size,
                                        "max_grad_norm": 1.0}}
    ds = datasets.load("wdbc")
    for level in (None, *CENTRAL_EPSILONS):
        accs, aucs = [], []
        for seed in seeds:
            train, test = datasets.train_test_split(ds, test_fraction=d.holdout, seed=seed)
            hp = HyperParams(epochs=rounds * d.epochs, optimizer=d.optimizer, lr=d.lr,
                             max_grad_norm=None if level is None else 1.0,
                             batch_size=d.batch_size)
            r = train_eval("logreg", train, test, hp, level, seed=seed)
            accs.append(r["accuracy"])
            aucs.append(r["auc"])
        key = "non-private" if level is None else f"{level:g}"
        out[key] = {"accuracy": mean_std(accs), "auc": mean_std(aucs)}
        log(f"centralized (demo settings) {key}: {out[key]['accuracy']['mean']}")
    return out


def centralized_tuned() -> dict[str, Any] | None:
    """Tuned centralized DP-SGD from benchmarks/privacy_utility.py, if it has been run."""
    if not PRIVACY_UTILITY_JSON.exists():
        return None
    data = json.loads(PRIVACY_UTILITY_JSON.read_text())
    wdbc = data.get("datasets", {}).get("wdbc")
    if wdbc is None or wdbc["arch"] != "logreg":
        return None
    return {"date": data["environment"]["date"], "seeds": len(data["config"]["seeds"]),
            "levels": {k: {"accuracy": v["centralized"]["accuracy"],
                           "auc": v["centralized"]["auc"]}
                       for k, v in wdbc["levels"].items()}}


def demo_default(seeds: Sequence[int], unseeded: int, work: Path, quick: bool) -> dict[str, Any]:
    """``bedside demo`` as ``make demo`` runs it: fresh OS randomness for every noise draw."""
    runs = []
    for i in range(unseeded):
        r = run_demo(demo_config(None, None, SETTINGS["demo-default"], work / f"unseeded-{i}",
                                 quick))
        runs.append(r)
        log(f"default demo, unseeded run {i + 1}: accuracy {r['accuracy']}, "
            f"{r['wall_s']:.1f} s")
    accs = [r["accuracy"] for r in runs]
    return {"runs": runs, "accuracy": mean_std(accs),
            "below_0_95": sum(1 for a in accs if a is not None and a < 0.95),
            "wall_s": mean_std([r["wall_s"] for r in runs])}


# ==================================================================================================
# part 2: aggregator throughput and memory (a fresh process per case)
# ==================================================================================================
def prepare_big_model(root: Path) -> dict[str, Any]:
    """Export the 50k-parameter model (needs torch: done once, in the parent process)."""
    from bedside.demo.run import DemoConfig, export_initial_model
    from bedside.models import datasets

    cfg = DemoConfig(dataset="digits", arch="mlp", arch_params={"hidden": BIG_HIDDEN}, seed=0)
    train, holdout = datasets.train_test_split(datasets.load("digits"), 0.2, seed=0)
    m = export_initial_model(train, holdout, cfg, root / "model")
    params = sum(math.prod(s) for s in m.parameters.values())
    return {"dir": str(root / "model"), "parameters": params, "name": m.name,
            "tensors": len(m.parameters)}


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def unavoidable_seconds(payloads: Sequence[bytes], keys: Mapping[str, Any]) -> float:
    """What no validation of these messages can skip: the Ed25519 check of each signed header
    and the sha256 of each body (timed alone, with the frame parsed beforehand)."""
    import hashlib

    from bedside.wire.envelope import SIGNATURE_BYTES, parse_frame

    parts = []
    for p in payloads:
        view = memoryview(p)
        header, end = parse_frame(view)
        parts.append((keys[header.sender], bytes(view[end:end + SIGNATURE_BYTES]), view[:end],
                      view[end + SIGNATURE_BYTES:]))
    t0 = time.perf_counter()
    for key, sig, signed, body in parts:
        key.verify(sig, signed)
        hashlib.sha256(body).digest()
    return time.perf_counter() - t0


def probe(n: int, rule: str, model_dir: Path, work: Path) -> dict[str, Any]:
    """Child process: N signed updates through a real Aggregator, then close the round."""
    import numpy as np

    from bedside.aggregator.config import load
    from bedside.aggregator.service import Aggregator
    from bedside.constants import KIND_UPDATE, topic_update
    from bedside.demo.run import to_toml
    from bedside.manifest import load_manifest
    from bedside.transport.memory import MemoryBroker, MemoryTransport
    from bedside.wire.envelope import encode
    from bedside.wire.signing import SigningKey

    work.mkdir(parents=True, exist_ok=True)
    (work / "devices").mkdir()
    SigningKey.generate().save(work / "aggregator.key")
    ids = [f"dev-{i:04d}" for i in range(n)]
    keys = []
    for d in ids:
        k = SigningKey.generate()
        k.public.save(work / "devices" / f"{d}.pub")
        keys.append(k)
    central = rule == "fedavg"  # robust rules do not take central noise (see the config checks)
    conf = {
        "fleet": FLEET, "data_dir": str(work / "data"), "key": str(work / "aggregator.key"),
        "devices": str(work / "devices"), "initial_model": str(model_dir),
        "mqtt": {"host": "127.0.0.1", "port": 1883},
        "rounds": {"rounds": 1, "min_participants": 1, "deadline_seconds": 3600.0,
                   "expected_participants": n + 1},  # closed below, on the clock, and timed
        "privacy": {"noise": "central" if central else "none", "clip_norm": 1.0,
                    "noise_multiplier": 1.0, "delta": DELTA, "noise_seed": 0},
        "testing": True,
        "strategy": {"rule": rule, "optimizer": "sgd"},
    }
    (work / "aggregator.toml").write_text(to_toml(conf))

    now = [1_000_000.0]
    broker = MemoryBroker(keep_published=False)
    agg = Aggregator(load(work / "aggregator.toml"),
                     MemoryTransport(broker, "aggregator", clean_session=False, manual_ack=True),
                     clock=lambda: now[0])
    agg.start()
    devices = MemoryTransport(broker, "bench-devices", clean_session=True)
    shapes = {k: tuple(v) for k, v in load_manifest(model_dir).parameters.items()}
    rng = np.random.default_rng(1)

    def update(i: int) -> bytes:
        t = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in t.values()))
        scale = 0.9 / norm  # inside the clip norm, as a device's clipped update is
        t = {k: (v * scale).astype(np.float32) for k, v in t.items()}
        return encode(KIND_UPDATE, ids[i], keys[i], t, round=1, model_version=1,
                      meta={"fleet": FLEET, "record_epsilon": 1.0, "record_delta": DELTA})

    agg.step(0.0)  # warm-up: the open round's announcement and model release
    # Import what closing a round needs (onnx, the accountant) before the peak counter is reset,
    # so that the growth below is data, not modules loaded once per process.
    from bedside.models.onnx_weights import read_weights

    read_weights(agg.registry.model_bytes(1), list(shapes))
    agg.privacy_report()
    from bedside.privacy.accountant import _dp_accounting

    _dp_accounting()  # the accountant's library, which the first round's close imports
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS counter (VmHWM)
    except OSError:
        reset = False
    base_kib = vm_kib("VmRSS")
    handle_s, make_s, floor_s, size = 0.0, 0.0, 0.0, 0
    keyring = {ids[i]: keys[i].public for i in range(n)}
    for start in range(0, n, PROBE_BURST):  # updates arrive in bursts, as from a fleet
        burst = range(start, min(n, start + PROBE_BURST))
        t0 = time.perf_counter()
        payloads = [update(i) for i in burst]
        make_s += time.perf_counter() - t0
        floor_s += unavoidable_seconds(payloads, keyring)
        size = len(payloads[-1])
        for i, payload in zip(burst, payloads, strict=True):
            devices.publish(topic_update(FLEET, ids[i]), payload, qos=1)
        t1 = time.perf_counter()
        agg.step(0.0)  # drains the burst: judge, record in groups, receipt, acknowledge
        handle_s += time.perf_counter() - t1
    handling_kib = vm_kib("VmHWM") if reset else 0
    accepted = len(agg.rounds.accepted(1))
    rejected = agg.rounds.rejections(1)
    now[0] += 7200.0
    t0 = time.perf_counter()
    agg.step(0.0)
    close_s = time.perf_counter() - t0
    peak_kib = vm_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = agg.rounds.get_round(1)
    db = sum(p.stat().st_size for p in (work / "data").glob("state.db*"))
    return {
        "updates": n, "rule": rule, "noise": conf["privacy"]["noise"], "accepted": accepted,
        "rejected": rejected, "round_status": r.status, "update_bytes": size,
        "handle_s": round(handle_s, 4), "updates_per_s": round(n / handle_s, 1),
        "handle_ms_per_update": round(1000 * handle_s / n, 3),
        "signature_and_hash_ms_per_update": round(1000 * floor_s / n, 3),
        "ratio_to_signature_and_hash": round(handle_s / floor_s, 2), "burst": PROBE_BURST,
        "make_ms_per_update": round(1000 * make_s / n, 3), "close_s": round(close_s, 4),
        "rss_base_mb": round(base_kib * 1024 / MB, 1),
        "peak_rss_growth_mb": round((peak_kib - base_kib) * 1024 / MB, 1),
        "peak_rss_growth_handling_mb": (round((handling_kib - base_kib) * 1024 / MB, 1)
                                        if reset else None),
        "peak_rss_mb": round(peak_kib * 1024 / MB, 1), "peak_counter_reset": reset,
        "state_db_mb": round(db / MB, 1), "torch_imported": "torch" in sys.modules,
    }


def aggregator_probes(model: Mapping[str, Any], sizes: Sequence[int], work: Path) -> list[Any]:
    results = []
    for rule in PROBE_RULES:
        for n in sizes:
            out = subprocess.run(
                [sys.executable, __file__, "--probe", str(n), rule, model["dir"],
                 str(work / f"probe-{rule}-{n}")],
                capture_output=True, text=True, cwd=REPO, env={**os.environ,
                                                               "OMP_NUM_THREADS": "1"})
            if out.returncode != 0:
                raise RuntimeError(f"probe {rule} {n} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            log(f"aggregator {rule} x {n}: {r['updates_per_s']} updates/s, close "
                f"{r['close_s']} s, peak RSS growth {r['peak_rss_growth_mb']} MB")
    return results


# ==================================================================================================
# part 3: round latency over the two brokers
# ==================================================================================================
def start_broker(kind: str, work: Path) -> Any:
    sys.path.insert(0, str(REPO))
    from bedside.transport.pki import acl_text
    from tests.brokers import start_embedded, start_mosquitto

    if kind == "mosquitto":  # the demo fleet's ACL, and the ping fleet's
        return start_mosquitto(work / "mosquitto", ["bench-device", *LATENCY_CLINICS],
                               acl_extra=acl_text(FLEET, ["bench-device"]))
    return start_embedded()


def ping(broker: Any, size: int, count: int) -> dict[str, Any]:
    """One-way delivery of an update-sized QoS 1 message, device -> aggregator subscription."""
    from bedside.constants import topic_update, topic_updates_all
    from bedside.transport.mqtt import MqttTransport

    sub = MqttTransport(broker.config("aggregator"), client_id="bench-aggregator",
                        clean_session=True)
    pub = MqttTransport(broker.config("bench-device"), client_id="bench-device",
                        clean_session=True)
    try:
        if not (sub.wait_connected(10) and pub.wait_connected(10)):
            raise RuntimeError("could not connect to the broker")
        sub.subscribe(topic_updates_all(FLEET), qos=1)
        time.sleep(0.3)
        topic = topic_update(FLEET, "bench-device")
        body = os.urandom(size)
        times = []
        for i in range(count + 10):
            t0 = time.perf_counter()
            pub.publish(topic, body, qos=1)
            msg = sub.get(10)
            if msg is None:
                raise RuntimeError("a message was not delivered within 10 s")
            msg.ack()
            if i >= 10:  # after warm-up
                times.append(1000 * (time.perf_counter() - t0))
        return {k: round(v, 3) if isinstance(v, float) else v
                for k, v in quantiles(times).items()}
    finally:
        sub.close()
        pub.close()


MQTT_RATE_MESSAGES = 1000
MQTT_RATE_REPEATS = 3


def _paho(broker: Any, identity: str) -> Any:
    """A plain paho client of ``identity`` over the broker's TLS, its network loop started."""
    import paho.mqtt.client as paho

    cfg = broker.config(identity)
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=identity,
                    protocol=paho.MQTTv311, clean_session=True)
    c.tls_set(ca_certs=str(cfg.ca_file), certfile=str(cfg.cert_file), keyfile=str(cfg.key_file))
    c.max_inflight_messages_set(20)  # what Bedside's transport uses
    c.connect("127.0.0.1", broker.port, keepalive=60)
    c.loop_start()
    return c


def _rate_raw(broker: Any, n: int, body: bytes) -> float:
    """Plain paho: a QoS 1 publisher and a QoS 1 subscriber (acknowledged by paho on arrival)."""
    import threading

    from bedside.constants import topic_update, topic_updates_all

    got, done = [0], threading.Event()
    subscribed = threading.Event()
    sub = _paho(broker, "aggregator")

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        got[0] += 1
        if got[0] == n:
            done.set()

    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.subscribe(topic_updates_all(FLEET), qos=1)
    pub = _paho(broker, "bench-device")
    try:
        if not subscribed.wait(10):
            raise RuntimeError("the subscription was not confirmed")
        topic = topic_update(FLEET, "bench-device")
        t0 = time.perf_counter()
        for _ in range(n):
            pub.publish(topic, body, qos=1)
        if not done.wait(120):
            raise RuntimeError(f"only {got[0]} of {n} messages arrived")
        return n / (time.perf_counter() - t0)
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()


def _rate_bedside(broker: Any, n: int, body: bytes) -> float:
    """Bedside's path: the device's transport publishes (QoS 1, not waited for one by one, as
    receipts are) and the aggregator's transport receives with manual acknowledgements, taken
    and acknowledged one by one by the consuming thread."""
    from bedside.constants import topic_update, topic_updates_all
    from bedside.transport.mqtt import MqttTransport

    sub = MqttTransport(broker.config("aggregator"), client_id="aggregator", clean_session=True,
                        manual_ack=True)
    pub = MqttTransport(broker.config("bench-device"), client_id="bench-device",
                        clean_session=True)
    try:
        if not (sub.wait_connected(10) and pub.wait_connected(10)):
            raise RuntimeError("could not connect to the broker")
        sub.subscribe(topic_updates_all(FLEET), qos=1)
        time.sleep(0.3)  # the subscription is made once connected, asynchronously
        topic = topic_update(FLEET, "bench-device")
        t0 = time.perf_counter()
        for _ in range(n):
            pub.publish(topic, body, qos=1, wait=False)
        for _ in range(n):
            msg = sub.get(30)
            if msg is None:
                raise RuntimeError("a message was not delivered within 30 s")
            msg.ack()
        return n / (time.perf_counter() - t0)
    finally:
        sub.close()
        pub.close()


def mqtt_rate(work: Path, n: int) -> dict[str, Any]:
    """Update-sized messages through Mosquitto (TLS): plain paho against Bedside's transport,
    alternating, ``MQTT_RATE_REPEATS`` times each."""
    size = 204_520  # one signed update of the 50k-parameter model
    body = os.urandom(size)
    broker = start_broker("mosquitto", work / "mqtt-rate")
    runs: dict[str, list[float]] = {"raw": [], "bedside": []}
    try:
        for _ in range(MQTT_RATE_REPEATS):
            runs["raw"].append(_rate_raw(broker, n, body))
            runs["bedside"].append(_rate_bedside(broker, n, body))
    finally:
        broker.stop()
    raw, ours = statistics.median(runs["raw"]), statistics.median(runs["bedside"])
    log(f"MQTT, {n} messages of {size:,} bytes: paho {raw:.0f}/s, Bedside {ours:.0f}/s")
    return {"messages": n, "bytes": size, "repeats": MQTT_RATE_REPEATS,
            "raw_per_s": round(raw, 1), "bedside_per_s": round(ours, 1),
            "ratio": round(ours / raw, 3),
            "runs": {k: [round(v, 1) for v in vals] for k, vals in runs.items()}}


FLEET_SIZES = (100, 1000)


def fleet_part(work: Path, sizes: Sequence[int]) -> list[dict[str, Any]]:
    """``bedside simulate`` for each fleet size: connection, rounds, memory (a fresh process
    each, so one size's memory does not carry into the next)."""
    out = []
    for n in sizes:
        done = subprocess.run(
            [sys.executable, "-m", "bedside", "simulate", "--devices", str(n), "--rounds", "2",
             "--out", str(work / f"sim-{n}"), "--json"],
            capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"bedside simulate --devices {n} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout)
        row = {"devices": n, "connect_s": r["connect_s"],
               "rounds": [{"seconds": x["seconds"], "accepted": x["accepted"]}
                          for x in r["rounds"]],
               "aggregator_peak_rss_mb": r["aggregator_peak_rss_mb"],
               "per_device_kb": r["devices_process"]["per_device_kb"],
               "devices_process_peak_mb": r["devices_process"]["peak_rss_mb"],
               "state_db_mb": r["state_db_mb"], "final_accuracy": r["final_accuracy"]}
        log(f"simulate {n} devices: connected in {row['connect_s']} s, rounds "
            f"{[x['seconds'] for x in row['rounds']]} s, aggregator peak "
            f"{row['aggregator_peak_rss_mb']} MB")
        out.append(row)
    return out


def fleet_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    out = ["| devices | all connected (TLS) | rounds closed in | aggregator peak RSS | state.db | "
           "simulating process peak | per device |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for f in rows:
        rounds = " / ".join(f"{x['seconds']:.1f} s" for x in f["rounds"])
        out.append(f"| {f['devices']:,} | {f['connect_s']:.2f} s | {rounds} | "
                   f"{f['aggregator_peak_rss_mb']:.1f} MB | {f['state_db_mb']:.2f} MB | "
                   f"{f['devices_process_peak_mb']:.0f} MB | {f['per_device_kb']:.0f} KB |")
    return out


def round_latency(kind: str, work: Path, rounds: int) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from tests.fleet import make_fleet, start_agent, start_aggregator

    broker = start_broker(kind, work)
    try:
        pings = {label: ping(broker, size, PINGS) for label, size in PING_PAYLOADS.items()}
        fleet = make_fleet(work / "fleet", clients=len(LATENCY_CLINICS), rounds=rounds,
                           broker=broker, noise_seed=0)
        started = time.perf_counter()
        agg, agg_stop, agg_thread = start_aggregator(fleet)
        agents = [start_agent(fleet, i) for i in range(len(LATENCY_CLINICS))]
        try:
            agg_thread.join(600)
            if not agg.finished:
                raise RuntimeError(f"the federation over {kind} did not finish")
            wall = time.perf_counter() - started
            results = [r.result for r in agg.rounds.rounds()]
        finally:
            agg_stop.set()
            for _, stop, _ in agents:
                stop.set()
            for t in fleet.threads:
                t.join(30)
            agg.transport.close()
        secs = [r["round_seconds"] for r in results]
        return {"broker": kind, "pings_ms": pings, "rounds": len(results),
                "accepted": [r["accepted"] for r in results], "round_s": secs,
                "round_s_mean": round(statistics.fmean(secs), 3), "wall_s": round(wall, 2)}
    finally:
        broker.stop()


# ==================================================================================================
# part 4: where a round's time goes; the demo beside the in-process core and one torch import
# ==================================================================================================
ROUND_RUNS = 3  # demos, in-process federations and imports, each timed this many times
#: Phases, in the order a round runs them: (where, key in that service's timings table, label).
PHASES = [
    ("device", "statistics", "device: feature statistics (clip, noise, record in the ledger)"),
    ("device", "plan", "device: plan the round (DP-SGD calibration, ledger check)"),
    ("device", "train", "device: train (DP-SGD)"),
    ("device", "privatize_and_record", "device: clip, noise, record in the ledger"),
    ("device", "sign", "device: sign the update"),
    ("device", "publish", "device: publish (until the broker's PUBACK)"),
    ("deliver", "deliver", "deliver: queued on the device -> received by the aggregator"),
    ("aggregator", "validate_and_record", "aggregator: validate and record the round's updates"),
    ("aggregator", "aggregate", "aggregator: aggregate (FedAvg, central noise, optimizer)"),
    ("aggregator", "write_onnx", "aggregator: write the weights into the ONNX file"),
    ("aggregator", "evaluate", "aggregator: evaluate on the reference set"),
    ("aggregator", "account", "aggregator: device-level privacy report"),
    ("aggregator", "store_and_sign", "aggregator: store the version, sign the release"),
    ("aggregator", "publish_release", "aggregator: publish release, status, next announcement"),
]


def timed_command(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> float:
    started = time.perf_counter()
    out = subprocess.run(list(cmd), capture_output=True, text=True, cwd=REPO,
                         env=None if env is None else dict(env))
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - started


def round_phases(work: Path) -> dict[str, Any]:
    """Per-phase seconds of every round, read from a finished demo's own databases: the agents'
    and the aggregator's ``timings`` tables and the delivery timestamps (outbox -> state.db)."""
    import sqlite3

    from bedside.sqlite import read_timings

    agg_db = sqlite3.connect(work / "aggregator" / "data" / "state.db")
    agg = read_timings(agg_db)
    walls = {r: c - o for r, o, c in agg_db.execute(
        "SELECT round, opened_at, closed_at FROM rounds WHERE closed_at IS NOT NULL")}
    received = {(r, s): t for r, s, t in agg_db.execute(
        "SELECT round, sender, received_at FROM updates")}
    devices: dict[int, list[dict[str, float]]] = {}
    for db_path in sorted(work.glob("clinic-*/data/agent.db")):
        db = sqlite3.connect(db_path)
        device = db_path.parts[-3]
        for r, phases in read_timings(db).items():
            devices.setdefault(r, []).append(phases)
        for r, created in db.execute("SELECT round, created_at FROM outbox WHERE kind = "
                                     "'update'"):
            if (r, device) in received:
                devices.setdefault(r, [])
                agg.setdefault(r, {}).setdefault("_deliver", 0.0)
                agg[r]["_deliver"] = max(agg[r]["_deliver"], received[(r, device)] - created)
    rounds = {}
    for r in sorted(walls):
        row: dict[str, float] = {"round_wall": walls[r]}
        for where, key, _ in PHASES:
            if where == "device":
                values = [d[key] for d in devices.get(r, []) if key in d]
                row[key] = max(values) if values else 0.0  # the slowest device sets the pace
            elif where == "deliver":
                row[key] = agg.get(r, {}).get("_deliver", 0.0)
            else:
                row[key] = agg.get(r, {}).get(key, 0.0)
        rounds[r] = row
    return rounds


def rounds_part(work: Path, quick: bool) -> dict[str, Any]:
    """The demo's wall time, where its rounds' time goes, the in-process core's wall time for
    the same federation, and one ``import torch, opacus``, all measured in this run."""
    runs = 1 if quick else ROUND_RUNS
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    imports = [timed_command([sys.executable, "-c", "import torch, opacus"], env)
               for _ in range(runs)]
    log(f"import torch, opacus: {[round(t, 2) for t in imports]} s")
    bedside = str(Path(sys.executable).parent / "bedside")
    demo_walls, accuracies = [], []
    last = work / "rounds-demo"
    for i in range(runs):
        shutil.rmtree(last, ignore_errors=True)
        demo_walls.append(timed_command([bedside, "demo", "--out", str(last), "--json"], env))
        report = json.loads((last / "report.json").read_text())
        accuracies.append(report["final"]["accuracy"])
        log(f"bedside demo run {i + 1}: {demo_walls[-1]:.2f} s, accuracy {accuracies[-1]}")
    phases = round_phases(last)
    code = ("import json, time; t = time.perf_counter()\n"
            "from bedside.demo.inprocess import run_demo_in_process\n"
            "from bedside.demo.run import DemoConfig\n"
            "r = run_demo_in_process(DemoConfig())\n"
            "print(json.dumps({'rounds_s': sum(x.seconds for x in r.rounds), "
            "'accuracy': r.rounds[-1].metrics['accuracy']}))")
    core_walls = [timed_command([sys.executable, "-c", code], env) for _ in range(runs)]
    log(f"in-process core: {[round(t, 2) for t in core_walls]} s")
    median = statistics.median
    # round 1 releases the feature statistics, round 2 is the first training round
    steady = [phases[r] for r in phases if r > 2]
    return {
        "runs": runs,
        "import_torch_opacus_s": [round(t, 3) for t in imports],
        "demo_wall_s": [round(t, 3) for t in demo_walls],
        "demo_accuracy": accuracies,
        "core_wall_s": [round(t, 3) for t in core_walls],
        "demo_over_import": round(median(demo_walls) / median(imports), 2),
        "demo_over_core": round(median(demo_walls) / median(core_walls), 2),
        "phases_ms": {
            "round_1": {k: round(1000 * v, 1) for k, v in phases.get(1, {}).items()},
            "round_2": {k: round(1000 * v, 1) for k, v in phases.get(2, {}).items()},
            "later_median": {k: round(1000 * median([p[k] for p in steady]), 1)
                             for k in (steady[0] if steady else {})},
        },
    }


# ==================================================================================================
# part 6: a round over Flower beside the same round over MQTT
# ==================================================================================================
FLOWER_CLIENTS = 3
FLOWER_ROUNDS = 3  # training rounds, after the statistics round
#: What a ClientApp process imports before it can act on a message (Flower, the agent, torch).
CLIENTAPP_IMPORTS = "import flwr.clientapp, bedside.edge.flower, bedside.edge.trainer"
#: A SuperNode asks the SuperLink for work every 3 s when it has none (flwr 1.41,
#: flwr/supernode/start_client_internal.py, fixed): on average 1.5 s before a message is seen.
SUPERNODE_POLL_S = 3.0
#: Device and aggregator phases of a round (keys of the services' timing tables), as in PHASES.
DEVICE_WORK = ("plan", "train", "privatize_and_record", "sign")
AGGREGATOR_WORK = ("validate_and_record", "aggregate", "write_onnx", "evaluate", "account",
                   "store_and_sign")


def cold_imports(n: int, env: Mapping[str, str]) -> float:
    """Wall seconds for ``n`` fresh interpreters, started together, to import what a ClientApp
    process imports (the devices of one round start theirs at about the same time)."""
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", CLIENTAPP_IMPORTS], env=dict(env), cwd=REPO)
             for _ in range(n)]
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError(f"{CLIENTAPP_IMPORTS!r} failed")
    return time.perf_counter() - started


def in_memory_flower(work: Path, rounds: int) -> list[float]:
    """The Flower driver and the real ClientApp without Flower's processes or polling (an
    in-memory Grid): what the driver itself costs a round."""
    sys.path.insert(0, str(REPO))
    from bedside.aggregator.config import load as load_agg
    from bedside.aggregator.flower import FlowerDriver
    from bedside.aggregator.service import Aggregator
    from bedside.transport.flower import Mailbox
    from tests.fleet import seeded_fleet
    from tests.flower import MemoryGrid, set_flower

    fleet = seeded_fleet(work, clients=FLOWER_CLIENTS, rounds=rounds, statistics=True)
    set_flower(fleet)
    link = Mailbox()
    agg = Aggregator(load_agg(fleet.aggregator_toml), link)
    FlowerDriver(agg, link, MemoryGrid([fleet.agent_toml(i) for i in range(FLOWER_CLIENTS)]),
                 poll=0.0).run()
    return [r.result["round_seconds"] for r in agg.rounds.rounds()]


def flower_part(work: Path, quick: bool) -> dict[str, Any]:
    """``bedside demo`` over MQTT and over Flower, same seeds and settings, one after the other;
    each round's phases from the services' timing records; the cost of starting a ClientApp
    process; the Flower driver over an in-memory Grid."""
    rounds = 2 if quick else FLOWER_ROUNDS
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bedside = str(Path(sys.executable).parent / "bedside")
    out: dict[str, Any] = {"clients": FLOWER_CLIENTS, "rounds": rounds, "transports": {}}
    for transport in ("mqtt", "flower"):
        d = work / f"flower-part-{transport}"
        wall = timed_command([bedside, "demo", "--transport", transport, "--clients",
                              str(FLOWER_CLIENTS), "--rounds", str(rounds), "--noise-seed", "0",
                              "--out", str(d), "--json"], env)
        report = json.loads((d / "report.json").read_text())
        phases = round_phases(d)
        training = [phases[r] for r in sorted(phases) if r > 1]
        med = statistics.median
        out["transports"][transport] = {
            "wall_s": round(wall, 2),
            "accuracy": report["final"]["accuracy"],
            "round_s": [r["round_seconds"] for r in report["rounds"]],
            "training_round_s_median": round(med([p["round_wall"] for p in training]), 3),
            "device_work_s_median": round(med([sum(p[k] for k in DEVICE_WORK)
                                               for p in training]), 3),
            "device_phases_s_median": {k: round(med([p[k] for p in training]), 3)
                                       for k in DEVICE_WORK},
            "aggregator_work_s_median": round(med([sum(p[k] for k in AGGREGATOR_WORK)
                                                   for p in training]), 3),
        }
        log(f"demo over {transport}: {wall:.1f} s, "
            f"rounds {out['transports'][transport]['round_s']}")
    repeats = 1 if quick else 3
    out["cold_import_s"] = {
        "one": round(statistics.median(cold_imports(1, env) for _ in range(repeats)), 3),
        "together": round(statistics.median(cold_imports(FLOWER_CLIENTS, env)
                                            for _ in range(repeats)), 3)}
    log(f"ClientApp imports: {out['cold_import_s']}")
    memory = in_memory_flower(work / "flower-memory", rounds)
    out["in_memory_round_s_median"] = round(statistics.median(memory[1:]), 3)
    out["supernode_poll_s"] = SUPERNODE_POLL_S
    return out


def flower_section(r: Mapping[str, Any]) -> list[str]:
    mq, fl = r["transports"]["mqtt"], r["transports"]["flower"]
    start = r["cold_import_s"]["together"]
    wait = r["supernode_poll_s"] / 2
    work = fl["device_work_s_median"] + fl["aggregator_work_s_median"]
    rest = fl["training_round_s_median"] - work - start - wait
    return [
        "", "### A round over Flower beside MQTT", "",
        f"`bedside demo --clients {r['clients']} --rounds {r['rounds']} --noise-seed 0` over "
        f"each transport, one after the other in this run (a statistics round, then "
        f"{r['rounds']} training rounds; the same seeds, so the same model: held-out accuracy "
        f"{f4(mq['accuracy'])} over MQTT, {f4(fl['accuracy'])} over Flower). MQTT: the embedded "
        "broker and the services as processes of a fork server. Flower: a SuperLink and one "
        "SuperNode per clinic (Deployment Engine, `--isolation subprocess`, 127.0.0.1), the "
        "federation submitted with `flwr run`.",
        "",
        "| | MQTT | Flower |", "|---|---:|---:|",
        f"| whole demo, s | {mq['wall_s']:.1f} | {fl['wall_s']:.1f} |",
        f"| training round, announcement to close, median s | "
        f"{mq['training_round_s_median']:.2f} | {fl['training_round_s_median']:.2f} |",
        f"| of which device work (plan, DP-SGD, privatize, sign; slowest device), s | "
        f"{mq['device_work_s_median']:.2f} | {fl['device_work_s_median']:.2f} |",
        *[f"| &nbsp;&nbsp;device: {label} | {mq['device_phases_s_median'][key]:.2f} | "
          f"{fl['device_phases_s_median'][key]:.2f} |"
          for key, label in (("plan", "plan (DP-SGD calibration, ledger check)"),
                             ("train", "train (DP-SGD)"))],
        f"| of which aggregator work (validate, aggregate, ONNX, evaluate, account, store), s | "
        f"{mq['aggregator_work_s_median']:.2f} | {fl['aggregator_work_s_median']:.2f} |",
        "",
        "Device work itself costs more over Flower: every message is a fresh ClientApp process, "
        "so the device's caches (the accountant's DP-SGD calibration, torch's first-call set-up) "
        "start cold every round, where the MQTT agent keeps them for the federation.",
        "",
        f"Where a Flower round's {fl['training_round_s_median']:.1f} s go: the same device and "
        f"aggregator work as over MQTT ({work:.2f} s); **starting a ClientApp process on every "
        "device for every message**: "
        f"{r['clients']} fresh interpreters importing Flower, Bedside's agent and torch "
        f"together take {start:.2f} s on this machine ({r['cold_import_s']['one']:.2f} s for "
        f"one); **Flower's SuperNode polling**: a SuperNode without work asks the SuperLink "
        f"every {r['supernode_poll_s']:g} s (fixed in flwr 1.41), {wait:.1f} s on average "
        f"before it sees a round; the remaining {rest:.1f} s are Flower's messaging (pushing "
        "and pulling messages and their objects over HTTP, the ClientApp's start-up handshake "
        "and app installation, the ServerApp's 0.2 s reply polling). The Flower driver itself "
        "costs nothing measurable: the same federation over an in-memory Grid (the real "
        f"ClientApp, no processes, no polling) closes a training round in "
        f"{r['in_memory_round_s_median']:.2f} s.",
    ]


# ==================================================================================================
# reporting
# ==================================================================================================
def f4(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"


def pm(s: Mapping[str, Any] | None) -> str:
    if not s or s.get("mean") is None:
        return "-"
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def eps_text(x: Any) -> str:
    return "none" if x is None else f"{x:.3g}"


def privacy_table(res: Mapping[str, Any]) -> list[str]:
    fed, cen, tuned = res["federated"], res["centralized_demo_settings"], res["centralized_tuned"]
    seeds = len(res["config"]["seeds"])
    rows = [f"| training | record-level epsilon (max) | device-level epsilon (max) | accuracy "
            f"(mean ± std, {seeds} seeds) | min | AUC | wall s |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for s in fed.values():
        rows.append(f"| {s['label']} | {eps_text(s['record_epsilon_max'])} | "
                    f"{eps_text(s['device_epsilon_max'])} | {pm(s['accuracy'])} | "
                    f"{f4(s['accuracy']['min'])} | {pm(s['auc'])} | {s['wall_s']['mean']:.1f} |")
    st = cen["settings"]
    for key, s in cen.items():
        if key == "settings":
            continue
        eps = "none" if key == "non-private" else key
        rows.append(f"| centralized, same splits, demo settings ({st['epochs']} epochs), "
                    f"{'non-private' if key == 'non-private' else 'DP-SGD'} | {eps} | - | "
                    f"{pm(s['accuracy'])} | {f4(s['accuracy']['min'])} | {pm(s['auc'])} | - |")
    if tuned:
        for key, s in tuned["levels"].items():
            eps = "none" if key == "non-private" else key
            rows.append(f"| centralized, tuned (privacy_utility.py, {tuned['seeds']} seeds), "
                        f"{'non-private' if key == 'non-private' else 'DP-SGD'} | {eps} | - | "
                        f"{pm(s['accuracy'])} | - | {pm(s['auc'])} | - |")
    return rows


def probe_table(probes: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = ["| rule | updates | validated updates/s | ms per update | signature + body hash "
            "ms | ratio | round close s | peak RSS growth MB: collecting | whole round | "
            "state.db MB | accepted |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in probes:
        handling = p.get("peak_rss_growth_handling_mb")
        rows.append(f"| {p['rule']} | {p['updates']:,} | {p['updates_per_s']:,.0f} | "
                    f"{p['handle_ms_per_update']:.2f} | "
                    f"{p['signature_and_hash_ms_per_update']:.3f} | "
                    f"{p['ratio_to_signature_and_hash']:.2f} | {p['close_s']:.3f} | "
                    f"{'-' if handling is None else f'{handling:.1f}'} | "
                    f"{p['peak_rss_growth_mb']:.1f} | {p['state_db_mb']:.1f} | "
                    f"{p['accepted']} |")
    return rows


def flat_verdict(probes: Sequence[Mapping[str, Any]]) -> str:
    fed = sorted((p for p in probes if p["rule"] == "fedavg"), key=lambda p: p["updates"])
    if len(fed) < 2:
        return ""
    lo, hi = fed[0], fed[-1]
    grew = hi["peak_rss_growth_mb"] - lo["peak_rss_growth_mb"]
    per_update = hi["update_bytes"] / MB
    flat = grew < 0.1 * per_update * (hi["updates"] - lo["updates"])
    return (f"FedAvg's peak RSS growth went from {lo['peak_rss_growth_mb']:.1f} MB "
            f"({lo['updates']:,} updates) to {hi['peak_rss_growth_mb']:.1f} MB "
            f"({hi['updates']:,} updates): {'flat' if flat else 'NOT flat'} in the number of "
            f"updates (holding them all would take {per_update * hi['updates']:.0f} MB).")


def latency_table(lat: Sequence[Mapping[str, Any]]) -> list[str]:
    labels = list(PING_PAYLOADS)
    rows = ["| broker | " + " | ".join(f"delivery {lb}: p50 / p95 ms" for lb in labels)
            + " | round s (mean) | rounds (accepted) | wall s |",
            "|---|" + "---:|" * (len(labels) + 3)]
    for r in lat:
        pings = " | ".join(f"{r['pings_ms'][lb]['p50']:.2f} / {r['pings_ms'][lb]['p95']:.2f}"
                           for lb in labels)
        rows.append(f"| {r['broker']} | {pings} | {r['round_s_mean']:.2f} | "
                    f"{r['rounds']} ({', '.join(map(str, r['accepted']))}) | {r['wall_s']:.1f} |")
    return rows


def reading(res: Mapping[str, Any]) -> list[str]:
    """What the privacy-utility table says, in sentences computed from its numbers."""
    fed, cen = res["federated"], res["centralized_demo_settings"]

    def acc(s: Mapping[str, Any]) -> float:
        return float(s["accuracy"]["mean"])

    lines = ["", "Reading the table (means over the seeds):", ""]
    gap = 100 * (acc(fed["non-private"]) - acc(cen["non-private"]))
    lines.append(f"- Federation itself: non-private federated training reaches "
                 f"{acc(fed['non-private']):.4f}, centralized training on the same rows "
                 f"{acc(cen['non-private']):.4f} ({gap:+.1f} points).")
    pairs = [(e, fed.get(f"record-{e}"), cen.get(e)) for e in ("1", "3", "8")]
    lines.append("- Record-level DP-SGD, federated vs centralized with the same settings: "
                 + "; ".join(f"epsilon {e}: {acc(f):.4f} vs {acc(c):.4f}"
                             for e, f, c in pairs if f and c) + ".")
    z1, zt = fed.get("device-central-1"), fed.get("device-central-target")
    k = res["demo_settings"]["clients"]
    if z1 and zt:
        lines.append(
            f"- Device-level guarantee: central noise z = 1 (noise std z C / {k} on the mean of "
            f"{k} clipped updates) gives {acc(z1):.4f} (non-private "
            f"{acc(fed['non-private']):.4f}) "
            f"but buys device-level epsilon {z1['device_epsilon_max']:.3g} over "
            f"{res['demo_settings']['rounds']} rounds, which protects no clinic. The noise for "
            f"device-level epsilon {DEVICE_TARGET_EPSILON:g}, z = {zt['noise_multiplier']:.3g}, "
            f"gives {acc(zt):.4f} (min {zt['accuracy']['min']:.4f}). With {k} clinics the noise "
            f"is calibrated to one clinic's whole update and averaged over only {k} of them; "
            "device-level privacy needs many more devices per round.")
    d = fed.get("demo-default")
    if d:
        lines.append(f"- The demo's default buys record-level epsilon <= "
                     f"{d['record_epsilon_max']:.3g} (the guarantee that protects each patient) "
                     f"at {acc(d):.4f}, and states its device-level epsilon "
                     f"({d['device_epsilon_max']:.3g}), which is no guarantee for a fleet of "
                     f"{k}.")
    return lines


def rounds_section(r: Mapping[str, Any]) -> list[str]:
    med = statistics.median
    imp, demo, core = (med(r[k]) for k in ("import_torch_opacus_s", "demo_wall_s", "core_wall_s"))
    first, later = r["phases_ms"]["round_1"], r["phases_ms"]["later_median"]
    second = r["phases_ms"].get("round_2", {})
    rows = ["| phase | round 1 (statistics) ms | round 2 (first training) ms | rounds 3-16, "
            "median ms |", "|---|---:|---:|---:|"]
    for _, key, label in PHASES:
        rows.append(f"| {label} | {first.get(key, 0):.1f} | {second.get(key, 0):.1f} | "
                    f"{later.get(key, 0):.1f} |")
    rows.append(f"| **round, announcement to close** | **{first.get('round_wall', 0):.1f}** | "
                f"**{second.get('round_wall', 0):.1f}** | **{later.get('round_wall', 0):.1f}** |")
    return [
        "", "### Where a round's time goes", "",
        f"`bedside demo` (what `make demo` runs: 5 clinics and the aggregator as separate "
        f"processes, the embedded broker, a statistics round and 15 training rounds, "
        f"record-level DP-SGD at epsilon 8) took "
        f"{', '.join(f'{t:.1f}' for t in r['demo_wall_s'])} s (median {demo:.1f} s, final "
        f"accuracy {', '.join(f'{a:.4f}' for a in r['demo_accuracy'])}); one `python -c "
        f"\"import torch, opacus\"` took "
        f"{', '.join(f'{t:.2f}' for t in r['import_torch_opacus_s'])} s "
        f"(median {imp:.2f} s) on the same machine in the same run: **the demo's wall time is "
        f"{r['demo_over_import']:.1f} times one import of torch and Opacus**. The same "
        f"federation in one process on the round core (`bedside.demo.inprocess`, a fresh "
        f"interpreter, imports included) took {', '.join(f'{t:.1f}' for t in r['core_wall_s'])} "
        f"s (median {core:.1f} s): the demo costs {r['demo_over_core']:.2f} times the core it "
        "drives.",
        "",
        "Phases of the last demo run, from the services' own timing records (`timings` tables of "
        "each agent's `agent.db` and the aggregator's `state.db`; delivery from the outbox "
        "to `state.db` timestamps). Device phases are the slowest device's; the five devices "
        "run in parallel on two cores, so phases overlap and do not add up to the round.",
        "", *rows,
    ]


def markdown(res: Mapping[str, Any]) -> str:
    env, cfg = res["environment"], res["config"]
    model = res.get("big_model", {})
    lines = [
        f"Generated by `benchmarks/federation.py` on {env['date']}"
        + (f" (parts measured: {', '.join(f'{k} {v}' for k, v in res['measured'].items())})"
           if res.get("measured") else "") + f": {env['cpu_model']}, "
        f"{env['usable_cores']} cores, Python {env['python']}; load average "
        f"{env['load_average_start']} at start, {env['load_average_end']} at end. Whole run "
        f"{res['run_seconds']:.0f} s{' (--quick: not for citing)' if cfg['quick'] else ''}. "
        "Full numbers: `benchmarks/results/federation.json`. Rerun: "
        "`.venv/bin/python benchmarks/federation.py`.",
    ]
    if "federated" in res:
        d = res["demo_settings"]
        lines += [
            "", "### Privacy-utility on WDBC", "",
            f"The real federation (`bedside demo` machinery: embedded broker, aggregator and "
            f"{d['clients']} clinic agents as processes) on non-IID shards (Dirichlet alpha "
            f"{d['alpha']:g}), a feature-statistics round then {d['rounds']} training rounds, "
            f"logistic regression, local training "
            f"{d['epochs']} epochs of {d['optimizer']} lr {d['lr']:g}, batch {d['batch_size']}, "
            f"update clip {d['clip_norm']:g}, server optimizer {d['server_optimizer']}; accuracy "
            f"of the final global model on the held-out 20 % that no clinic trains on; delta "
            f"{DELTA:g}. Seeds {cfg['seeds']}: each picks the held-out split, the shards, the "
            "initial weights and every noise draw. Record-level epsilon is what the clinics' "
            "ledgers report (each calibrates DP-SGD to spend its budget over the planned "
            "rounds); device-level epsilon is the aggregator's accountant over the released "
            "models (replace-one adjacency, noise multiplier z / 2 per round, no amplification "
            "claimed). **Scaling without leakage**: every federated run takes its input scaling "
            "from the clinics' noised feature statistics (round 1, noise at which the release "
            "alone would cost half the record budget; the non-private run uses the epsilon-8 "
            "noise), included in the record-level epsilon; centralized non-private runs "
            "standardise on their training rows and centralized DP-SGD runs use the same "
            "statistics release on all training rows, composed with DP-SGD within the target. "
            "No scaling is fitted on a held-out row (WDBC's typical range, the statistics' frame, "
            "is the published Min/Max of the public data set).",
            "", *privacy_table(res), "",
            *reading(res),
        ]
    if "demo_unseeded" in res:
        u, s = res["demo_unseeded"], res["federated"]["demo-default"]
        seeded0 = next((r for r in s["runs"] if r["seed"] == 0), None)
        lines += [
            "", "### The default demo (`make demo`)", "",
            f"`bedside demo` with its defaults draws all noise from the operating system, so "
            f"its final accuracy varies from run to run: over {u['accuracy']['n']} runs, "
            f"{pm(u['accuracy'])} (min {f4(u['accuracy']['min'])}, max "
            f"{f4(u['accuracy']['max'])}); {u['below_0_95']} of {u['accuracy']['n']} below 0.95. "
            f"Wall time {u['wall_s']['mean']:.1f} s on average (max {u['wall_s']['max']:.1f} s; "
            "the acceptance limit is 60 s). "
            + (f"With `--noise-seed 0` (what the test suite runs) it reaches "
               f"{f4(seeded0['accuracy'])} in {seeded0['wall_s']:.1f} s." if seeded0 else ""),
        ]
    if "aggregator" in res:
        lines += [
            "", "### Aggregator throughput and memory", "",
            f"Model: {model.get('name')}, {model.get('parameters', 0):,} parameters in "
            f"{model.get('tensors')} tensors; one signed update is "
            f"{res['aggregator'][0]['update_bytes']:,} bytes. A fresh process per row; the "
            "aggregator runs on one core over the in-memory transport with SQLite state on "
            f"local disk. Updates arrive in bursts of {res['aggregator'][0].get('burst', 1)}; "
            "the aggregator judges what is waiting as one group, records it in one transaction "
            "and only then acknowledges and receipts it. FedAvg runs with central noise and "
            "keeps one durable running sum per round; the median with none (central noise is "
            "calibrated to a sum, which robust rules are not) and keeps every update until the "
            "round closes. 'ms per update' is the aggregator's time per update (validation, "
            "durable record, ack, signed receipt); building and signing the updates is not "
            "counted. 'signature + body hash' is what no validation can skip, timed alone on the "
            "same messages in the same process (an Ed25519 check of the signed header and the "
            "sha256 of the body), and 'ratio' the aggregator's time over it. Peak RSS growth is "
            "from after start-up (modules that closing a round imports, onnx and the "
            "accountant, loaded before) to the end of collecting, and to the end of the round's "
            "close.",
            "", *probe_table(res["aggregator"]), "", flat_verdict(res["aggregator"]),
            "The coordinate median must hold every update at once: its memory and the state "
            "database grow with the number of updates, as they must; use it for small fleets "
            "that may hold faulty devices. FedAvg's state database holds the round's running "
            "sum (the durable record that lets a restarted aggregator resume) and one row of "
            "digest and nonce per update.",
        ]
    if "mqtt_rate" in res:
        q = res["mqtt_rate"]
        lines += [
            "", "### MQTT: Bedside's transport against plain paho", "",
            f"{q['messages']:,} messages of {q['bytes']:,} bytes (one signed update) from one "
            "device identity to the aggregator's subscription through Mosquitto with the "
            "shipped TLS configuration, QoS 1, in the same run, alternating, "
            f"{q['repeats']} times each (medians). Plain paho: a publisher and a subscriber "
            "that paho acknowledges on arrival. Bedside: the device's `MqttTransport` "
            "publishing (not waiting for each broker acknowledgement, as the aggregator's "
            "receipts do) and the aggregator's `MqttTransport` with manual acknowledgements, "
            "each message taken and acknowledged by the consuming thread.",
            "",
            "| path | messages/s | runs |", "|---|---:|---|",
            f"| plain paho | {q['raw_per_s']:,.0f} | "
            f"{', '.join(f'{v:,.0f}' for v in q['runs']['raw'])} |",
            f"| Bedside's transport | {q['bedside_per_s']:,.0f} | "
            f"{', '.join(f'{v:,.0f}' for v in q['runs']['bedside'])} |",
            "", f"Bedside's transport carries {100 * q['ratio']:.0f}% of plain paho's rate.",
        ]
    if "fleet" in res:
        lines += [
            "", "### A fleet on one machine (`bedside simulate`)", "",
            "Each simulated device has its own 64 WDBC records, privacy ledger, key, "
            "certificate and TLS session with Mosquitto (the shipped configuration and ACL); "
            "all of them live in one process (one thread drives every connection, one torch "
            "trains them one after another), against the real aggregator service in its own "
            "process. Two training rounds, DP-SGD at record-level epsilon 8, central noise. "
            "A round's time is mostly the simulator training its devices in turn.",
            "",
            *fleet_table(res["fleet"]),
        ]
    if "rounds" in res:
        lines += rounds_section(res["rounds"])
    if "flower" in res:
        lines += flower_section(res["flower"])
    if "latency" in res:
        lines += [
            "", "### Round latency: embedded broker vs Mosquitto", "",
            f"{len(LATENCY_CLINICS)} agents and the aggregator (threads of one process), "
            f"{res['latency'][0]['rounds']} rounds of the demo's settings (record-level DP-SGD, "
            "central noise) over each broker on 127.0.0.1; Mosquitto with the TLS, client "
            "certificate and ACL configuration of `deploy/mosquitto`. 'round s' is from the "
            "announcement to the close of the round, local training included. Delivery is the "
            f"one-way time of a QoS 1 message from a device to the aggregator's subscription "
            f"({PINGS} messages after 10 warm-up ones). Before Bedside's clients and its "
            "Mosquitto configuration turned Nagle's algorithm off (`TCP_NODELAY`, "
            "`set_tcp_nodelay true`), the ~200 KB message took 43.9 ms p50 through Mosquitto "
            "(measured with this script on 2026-11-24): its last TCP segment waited for a delayed "
            "ACK.",
            "", *latency_table(res["latency"]),
        ]
    return "\n".join(lines)


# ==================================================================================================
# the run
# ==================================================================================================
def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {n: version(n) for n in ("torch", "opacus", "dp-accounting", "onnxruntime",
                                    "paho-mqtt", "amqtt", "bedside")}


def mosquitto_version() -> str:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return "not installed"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import asdict

    from bedside.demo.run import DemoConfig

    quick = args.quick
    seeds = list(SEEDS[:1] if quick else SEEDS)
    env = {**machine(), **versions(), "mosquitto": mosquitto_version()}
    demo_settings = {k: v for k, v in asdict(DemoConfig()).items()
                     if k in ("clients", "rounds", "epochs", "batch_size", "lr", "optimizer",
                              "alpha", "clip_norm", "noise_multiplier", "target_epsilon",
                              "server_optimizer", "holdout")}
    if quick:
        demo_settings["rounds"] = 3
    res: dict[str, Any] = {
        "benchmark": "federation", "environment": env,
        "config": {"seeds": seeds, "quick": quick, "delta": DELTA,
                   "settings": {k: {kk: vv for kk, vv in v.items() if kk != "label"}
                                for k, v in SETTINGS.items()},
                   "probe_sizes": list(PROBE_SIZES[:2] if quick else PROBE_SIZES),
                   "probe_rules": list(PROBE_RULES)},
        "demo_settings": demo_settings,
    }
    with tempfile.TemporaryDirectory(prefix="bedside-bench-fed-") as tmp:
        work = Path(tmp)
        if "privacy" in args.parts:
            res["federated"] = federated_settings(seeds, work, quick)
            res["centralized_demo_settings"] = centralized_same_split(seeds, quick)
            res["centralized_tuned"] = centralized_tuned()
            res["demo_unseeded"] = demo_default(seeds, 1 if quick else UNSEEDED_DEMO_RUNS,
                                                work, quick)
        if "aggregator" in args.parts:
            res["big_model"] = prepare_big_model(work)
            res["aggregator"] = aggregator_probes(res["big_model"], res["config"]["probe_sizes"],
                                                  work)
        if "mqtt" in args.parts:
            res["mqtt_rate"] = mqtt_rate(work, 200 if quick else MQTT_RATE_MESSAGES)
        if "fleet" in args.parts:
            res["fleet"] = fleet_part(work, (20, 100) if quick else FLEET_SIZES)
        if "rounds" in args.parts:
            res["rounds"] = rounds_part(work, quick)
        if "latency" in args.parts:
            res["latency"] = [round_latency(kind, work / kind, 2 if quick else LATENCY_ROUNDS)
                              for kind in ("embedded", "mosquitto")]
            for r in res["latency"]:
                log(f"{r['broker']}: rounds {r['round_s']} s, delivery {r['pings_ms']}")
        if "flower" in args.parts:
            res["flower"] = flower_part(work, quick)
    env["load_average_end"] = load_average()
    return res


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="parts to run; the others keep their figures from the last run")
    p.add_argument("--quick", action="store_true",
                   help="one seed, 3 rounds, fewer updates: a smoke run, not for citing")
    p.add_argument("--no-write", action="store_true", help="print the JSON, write nothing")
    p.add_argument("--probe", nargs=4, metavar=("N", "RULE", "MODEL_DIR", "WORKDIR"),
                   help=argparse.SUPPRESS)  # internal: one aggregator case in a fresh process
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        n, rule, model_dir, workdir = args.probe
        print(json.dumps(probe(int(n), rule, Path(model_dir), Path(workdir))))
        return 0
    start = time.perf_counter()
    try:
        results = run(args)
    except Exception:
        traceback.print_exc()
        return 1
    results["run_seconds"] = round(time.perf_counter() - start, 1)
    if args.no_write:
        print(json.dumps(results, indent=2, default=float))
        return 0
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    if RESULTS_JSON.exists():  # keep what the parts not run this time measured last time
        previous = json.loads(RESULTS_JSON.read_text())
        for part in set(PARTS) - set(args.parts):
            for key in PART_KEYS[part]:
                if key in previous:
                    results[key] = previous[key]
            results.setdefault("measured", {})[part] = previous.get("measured", {}).get(
                part, previous.get("environment", {}).get("date"))
    for part in args.parts:
        results.setdefault("measured", {})[part] = results["environment"]["date"]
    RESULTS_JSON.write_text(json.dumps(results, indent=2, default=float) + "\n")
    write_section("federation", HEADING, markdown(results))
    log(f"wrote {RESULTS_JSON.relative_to(REPO)} and {README.relative_to(REPO)} "
        f"in {results['run_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
