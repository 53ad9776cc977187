"""A federation in one process, on the round core: the same rounds as the services, no network.

:func:`run_federation` drives the core exactly as the MQTT services do, minus the broker, SQLite
state and processes: every round it builds the :class:`RoundSettings` with
:meth:`FederationSettings.announce`; each device runs
:func:`~bedside.edge.participant.participate` (plan, DP-SGD, privatize, its own ledger) and signs
its update; the aggregator side opens and validates every message with
:func:`~bedside.federation.validate.open_update` and
:func:`~bedside.federation.validate.validate_update`, then closes the round with
:func:`~bedside.federation.aggregate.aggregate_round` and writes the weights into the ONNX file.
Seeded alike, it produces the MQTT federation's global weights (up to the order in which a float
sum adds the updates; ``tests/integration/test_core_equivalence.py``).

Used by ``benchmarks/tuning`` studies (hundreds of federations in minutes), by the federation
benchmark (the core's time beside the demo's) and by the tests.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bedside.constants import KIND_UPDATE
from bedside.federation.aggregate import aggregate_round
from bedside.federation.device import DevicePrivacy
from bedside.federation.seeds import round_rng
from bedside.federation.settings import FederationSettings
from bedside.federation.strategies import make_optimizer, make_rule, materialize
from bedside.federation.validate import (
    Accepted,
    OpenRound,
    Prior,
    max_update_bytes,
    open_update,
    validate_update,
)
from bedside.manifest import Manifest, sha256_bytes
from bedside.wire.envelope import encode
from bedside.wire.signing import KeyRing, SigningKey


@dataclass
class Device:
    """One simulated device: its records, its privacy configuration, its own key and ledger."""

    device_id: str
    x: np.ndarray
    y: np.ndarray
    privacy: DevicePrivacy
    seed: int | None = None
    key: SigningKey = field(default_factory=SigningKey.generate)


@dataclass
class RoundRecord:
    round: int
    accepted: int
    declined: dict[str, str]
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    model_sha256: str = ""  # of the model the round produced (or kept)


@dataclass
class FederationRun:
    rounds: list[RoundRecord]
    model_bytes: bytes
    weights: dict[str, np.ndarray]
    manifest: Manifest


def run_federation(federation: FederationSettings, manifest: Manifest, model_bytes: bytes,
                   devices: Sequence[Device], *, fleet: str = "sim",
                   evaluate: Callable[[bytes], dict[str, Any]] | None = None,
                   ledger_dir: Path | None = None) -> FederationRun:
    """Run ``federation.rounds.rounds`` rounds from ``model_bytes`` over ``devices``.

    Each device's ledger lives in ``ledger_dir`` (a temporary directory by default).
    """
    from bedside.edge.participant import Contribution, participate
    from bedside.models.onnx_weights import read_weights, replace_weights
    from bedside.privacy.ledger import Ledger

    if federation.rounds.rounds < 1:
        raise ValueError("an in-process federation needs a planned number of rounds")
    names = list(manifest.parameters)
    shapes = {k: tuple(v) for k, v in manifest.parameters.items()}
    ring = KeyRing({d.device_id: d.key.public for d in devices})
    limit = max_update_bytes(shapes, 64 * 1024 * 1024)
    rule = make_rule(federation.strategy.rule, **federation.strategy.params)
    optimizer = make_optimizer(federation.strategy.optimizer,
                               **federation.strategy.optimizer_params)
    noise_seed = federation.privacy.noise_seed
    with tempfile.TemporaryDirectory(prefix="bedside-sim-") as tmp:
        root = Path(ledger_dir) if ledger_dir is not None else Path(tmp)
        ledgers = [Ledger(root / f"{d.device_id}.ledger.db", d.privacy.budgets())
                   for d in devices]
        state: dict[str, np.ndarray] = {}
        clip = federation.privacy.clip_norm
        version = manifest.version
        records: list[RoundRecord] = []
        first = 1
        try:
            if federation.statistics is not None:
                first = 2
                model_bytes, manifest, rec = _statistics_round(
                    federation, manifest, model_bytes, devices, ledgers, ring, fleet, evaluate)
                records.append(rec)
                version = manifest.version
            for r in range(first, federation.rounds.rounds + first):
                started = time.perf_counter()
                timings: dict[str, float] = {}
                settings = federation.announce(fleet, r, deadline=1e12,
                                               model_sha256=sha256_bytes(model_bytes),
                                               clip_norm=clip, training_round=r - first + 1)
                current = OpenRound(round=r, model_version=version, settings=settings,
                                    shapes=shapes)
                accepted: list[Accepted] = []
                declined: dict[str, str] = {}
                for d, ledger in zip(devices, ledgers, strict=True):
                    t0 = time.perf_counter()
                    out = participate(r, settings, manifest, model_bytes, d.x, d.y,
                                      privacy=d.privacy, ledger=ledger, fleet=fleet, seed=d.seed,
                                      rng=round_rng(d.seed, r))
                    _add(timings, "device", time.perf_counter() - t0)
                    if not isinstance(out, Contribution):
                        declined[d.device_id] = out.reason
                        continue
                    t0 = time.perf_counter()
                    payload = encode(KIND_UPDATE, d.device_id, d.key, out.tensors, round=r,
                                     model_version=version, meta=out.meta)
                    _add(timings, "sign", time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    env = open_update(payload, ring, shapes, limit)
                    verdict = validate_update(env, topic_sender=d.device_id, fleet=fleet,
                                              digest=env.digest, current=current,
                                              prior=Prior())
                    _add(timings, "validate", time.perf_counter() - t0)
                    assert isinstance(verdict, Accepted)
                    accepted.append(verdict)
                rec = RoundRecord(round=r, accepted=len(accepted), declined=declined, seconds=0.0,
                                  timings=timings)
                if len(accepted) >= federation.rounds.min_participants:
                    t0 = time.perf_counter()
                    outcome = aggregate_round(
                        materialize([(a.tensors, a.weight) for a in accepted]),
                        count=len(accepted), settings=settings,
                        weights=read_weights(model_bytes, names), optimizer_state=state,
                        rule=rule, optimizer=optimizer, rng=round_rng(noise_seed, r),
                        clip_bits=[a.info.get("clip_bit", 0.0) for a in accepted]
                        if settings.adaptive else ())
                    timings["aggregate"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    model_bytes = replace_weights(model_bytes, outcome.weights)
                    timings["write_onnx"] = time.perf_counter() - t0
                    state = outcome.optimizer_state
                    version += 1
                    if outcome.next_clip_norm is not None:
                        clip = outcome.next_clip_norm
                    if evaluate is not None:
                        t0 = time.perf_counter()
                        rec.metrics = evaluate(model_bytes)
                        timings["evaluate"] = time.perf_counter() - t0
                rec.seconds = time.perf_counter() - started
                rec.model_sha256 = sha256_bytes(model_bytes)
                records.append(rec)
        finally:
            for ledger in ledgers:
                ledger.close()
    return FederationRun(rounds=records, model_bytes=model_bytes,
                         weights=read_weights(model_bytes, names), manifest=manifest)


def _statistics_round(federation: FederationSettings, manifest: Manifest, model_bytes: bytes,
                      devices: Sequence[Device], ledgers: Sequence[Any], ring: KeyRing,
                      fleet: str, evaluate: Callable[[bytes], dict[str, Any]] | None,
                      ) -> tuple[bytes, Manifest, RoundRecord]:
    """Round 1 with ``[statistics]``: the devices' noised feature sums set the input scaling
    (one attempt: if too few devices answer, training goes on with the model's scaling)."""
    from dataclasses import replace

    from bedside.edge.participant import Contribution, participate_statistics
    from bedside.errors import InputError
    from bedside.federation.statistics import dimension
    from bedside.models.onnx_weights import apply_statistics

    started = time.perf_counter()
    settings = federation.announce_statistics(fleet, 1, deadline=1e12,
                                              model_sha256=sha256_bytes(model_bytes))
    shapes = {"stats": (dimension(manifest.schema),)}
    current = OpenRound(round=1, model_version=manifest.version, settings=settings,
                        shapes=shapes)
    vectors, declined = [], {}
    for d, ledger in zip(devices, ledgers, strict=True):
        out = participate_statistics(1, settings, manifest, d.x, privacy=d.privacy,
                                     ledger=ledger, fleet=fleet, seed=d.seed,
                                     rng=round_rng(d.seed, 1))
        if not isinstance(out, Contribution):
            declined[d.device_id] = out.reason
            continue
        payload = encode(KIND_UPDATE, d.device_id, d.key, out.tensors, round=1,
                         model_version=manifest.version, meta=out.meta)
        env = open_update(payload, ring, shapes, 1 << 20)
        verdict = validate_update(env, topic_sender=d.device_id, fleet=fleet,
                                  digest=env.digest, current=current, prior=Prior())
        assert isinstance(verdict, Accepted)
        vectors.append(verdict.tensors["stats"])
    rec = RoundRecord(round=1, accepted=len(vectors), declined=declined, seconds=0.0)
    if len(vectors) >= federation.rounds.min_participants:
        assert settings.statistics is not None
        try:
            model_bytes, schema, _ = apply_statistics(model_bytes, manifest.schema, vectors,
                                                      settings.statistics)
        except InputError:  # a noised record count below one: the aggregator fails the round
            schema = None
        if schema is not None:
            manifest = replace(manifest, schema=schema, version=manifest.version + 1)
            if evaluate is not None:
                rec.metrics = evaluate(model_bytes)
    rec.seconds = time.perf_counter() - started
    rec.model_sha256 = sha256_bytes(model_bytes)
    return model_bytes, manifest, rec


def _add(timings: dict[str, float], key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds


# -- the demo's federation, in process ------------------------------------------------------------
def demo_federation(cfg: Any) -> FederationSettings:
    """The federation settings ``bedside demo`` writes into ``aggregator.toml`` for ``cfg``."""
    from bedside.config import read_table
    from bedside.demo.run import aggregator_table

    table = aggregator_table(cfg)
    return read_table(FederationSettings, {k: table[k] for k in
                                           ("rounds", "training", "privacy", "strategy",
                                            "statistics")
                                           if k in table}, "demo federation")


def demo_devices(cfg: Any, train: Any, shards: Sequence[np.ndarray]) -> list[Device]:
    """The demo's clinics as simulated devices (their agent.toml privacy and seed)."""
    from bedside.config import read_table
    from bedside.demo.run import agent_table

    out = []
    for i, idx in enumerate(shards, start=1):
        table = agent_table(cfg, i)
        out.append(Device(device_id=table["device_id"], x=train.x[idx], y=train.y[idx],
                          privacy=read_table(DevicePrivacy, table.get("privacy", {}),
                                             f"clinic-{i} [privacy]"),
                          seed=table.get("agent", {}).get("seed")))
    return out


def run_demo_in_process(cfg: Any, train: Any = None, holdout: Any = None,
                        shards: Sequence[np.ndarray] | None = None) -> FederationRun:
    """``bedside demo`` with configuration ``cfg``, in one process on the round core.

    ``train``, ``holdout`` and ``shards`` default to the demo's own split of its data.
    """
    from bedside.demo.run import _load_data, export_initial_model
    from bedside.metrics import evaluate
    from bedside.models.onnx_model import OnnxClassifier

    if train is None or holdout is None or shards is None:
        train, holdout, shards = _load_data(cfg)
    with tempfile.TemporaryDirectory(prefix="bedside-sim-model-") as tmp:
        manifest = export_initial_model(train, holdout, cfg, Path(tmp) / "m")
        model = (Path(tmp) / "m" / "model.onnx").read_bytes()

    def score(onnx_bytes: bytes) -> dict[str, Any]:
        probs = OnnxClassifier(onnx_bytes, manifest.output, manifest.schema.labels).probabilities(
            holdout.x)
        return evaluate(holdout.y, probs)

    return run_federation(demo_federation(cfg), manifest, model,
                          demo_devices(cfg, train, shards), fleet="demo", evaluate=score)
