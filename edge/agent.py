"""The edge agent: a clinic device's participation in federated training.

:class:`Agent` is the edge's front door for federation. Its loop runs on its own thread; the
transport's network thread only enqueues. For each signed round announcement it:

1. verifies the aggregator's signature with the key pinned at enrollment;
2. waits until it runs the announced model version (model releases are verified, self-tested and
   hot-swapped by :class:`~bedside.edge.updater.ModelManager`);
3. decides whether to take part: the participation coin (probability ``participation_rate``, from
   the OS's entropy), records on hand, and its privacy **ledger**: it describes this round's
   releases (record-level DP-SGD steps; device-level Gaussian on the clipped update) and refuses
   if either budget would be exceeded; an unreadable ledger also refuses (fail closed). A refusal
   is sent as a signed decline, logged, shown in the status, and inference goes on;
4. trains locally (torch, Opacus DP-SGD at the noise multiplier that spreads the record-level
   budget over the planned rounds), computes ``delta = w_local - w_global``, clips it to L2 norm
   ``C`` and, in local mode, adds ``N(0, (z C)^2)``;
5. records the releases in the ledger (before anything leaves the device), signs the update and
   publishes it from the durable outbox, which re-sends until the aggregator's signed receipt
   arrives or the round closes (then the update is dropped as stale, with a log line).

Nothing derived from records leaves the device except the privatized update. The example count
used for weighting is bucketed to a power of two; the reported epsilon is rounded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bedside.constants import (
    AGGREGATOR_ID,
    KIND_ANNOUNCE,
    KIND_MODEL,
    KIND_RECEIPT,
    KIND_UPDATE,
    NOISE_LOCAL,
    UNIT_DEVICE,
    UNIT_RECORD,
    topic_model,
    topic_receipt,
    topic_round,
    topic_status,
    topic_update,
)
from bedside.edge.config import AgentConfig
from bedside.edge.outbox import AgentState
from bedside.edge.store import RecordStore
from bedside.edge.updater import ModelManager
from bedside.errors import (
    BedsideError,
    BudgetExceededError,
    LedgerError,
    PrivacyError,
    TransportError,
    ValidationError,
    WireError,
)
from bedside.rounds import RoundSettings
from bedside.transport import Message, Transport
from bedside.wire.envelope import Envelope, decode, encode, peek
from bedside.wire.signing import KeyRing, SigningKey, VerifyKey

log = logging.getLogger("bedside.edge.agent")
ASSUMED_ROUNDS = 100  # for calibrating DP-SGD when the aggregator plans no end
# DP-SGD is calibrated a hair below the record budget, so rounding never makes the last planned
# round exceed it.
BUDGET_MARGIN = 0.995


def bucket(n: int) -> int:
    """Largest power of two <= n (what leaves the device instead of the exact record count)."""
    return 1 << (max(1, n).bit_length() - 1)


class Agent:
    def __init__(self, cfg: AgentConfig, transport: Transport | None = None, *,
                 clock: Callable[[], float] = time.time,
                 rng: np.random.Generator | None = None) -> None:
        from bedside.privacy.mechanisms import secure_rng

        self.cfg = cfg
        self.clock = clock
        if rng is None:
            rng = secure_rng() if cfg.seed is None else np.random.default_rng(cfg.seed)
        self.rng = rng
        self.key = SigningKey.load(cfg.key)
        self.pinned = KeyRing()
        self.pinned.add(AGGREGATOR_ID, VerifyKey.load(cfg.aggregator_key))
        self.store = RecordStore(cfg.records_path)
        self.state = AgentState(cfg.state_path)
        self.models = ModelManager(cfg.models_path, threads=cfg.threads)
        self._ledger: Any = None
        self.ledger_error: str | None = None
        self._open_ledger()
        if transport is None:
            from bedside.transport.mqtt import MqttTransport

            will = (topic_status(cfg.fleet, cfg.device_id),
                    json.dumps({"device": cfg.device_id, "state": "offline"}).encode())
            transport = MqttTransport(cfg.mqtt, client_id=cfg.device_id, clean_session=False,
                                      will=will)
        self.transport = transport
        self.announce: Envelope | None = None
        self.settings: RoundSettings | None = None
        self.done = False
        self.refusing: str | None = None
        self.last_model_error: str | None = None
        self.refused_versions: set[int] = set()
        self._calibrated: dict[tuple[Any, ...], float] = {}
        self._last_status = 0.0
        self._was_connected = False

    # -- ledger ----------------------------------------------------------------------------------
    def _open_ledger(self) -> None:
        try:
            from bedside.privacy.ledger import Ledger

            # A device that has taken part before must find its ledger: a missing one is never
            # silently re-created (that would reset its budget to zero).
            fresh = self.state.last_round() is None
            self._ledger = Ledger(self.cfg.ledger_path, self.cfg.budgets(), create=fresh)
            self.ledger_error = None
        except (LedgerError, ImportError) as exc:
            self._ledger = None
            self.ledger_error = str(exc)
            log.error("privacy ledger unavailable, contributions refused: %s", exc)

    def privacy_report(self) -> dict[str, Any]:
        if self._ledger is None:
            return {"error": self.ledger_error}
        try:
            return dict(self._ledger.report())
        except LedgerError as exc:
            return {"error": str(exc)}

    # -- loop --------------------------------------------------------------------------------------
    def start(self) -> None:
        f = self.cfg.fleet
        for topic in (topic_model(f), topic_round(f), topic_receipt(f, self.cfg.device_id)):
            self.transport.subscribe(topic, qos=1)
        self.publish_status(force=True)

    def run(self, stop: threading.Event | None = None, poll: float = 0.2) -> None:
        self.start()
        stop = stop or threading.Event()
        while not stop.is_set():
            self.step(poll)
            if self.done and self.cfg.exit_when_done and not self.state.pending():
                break
        self.publish_status(force=True, state="stopped")

    def step(self, timeout: float = 0.2) -> None:
        msg = self.transport.get(timeout)
        while msg is not None:
            self._handle(msg)
            msg = self.transport.get(0)
        self._maybe_participate()
        self._flush_outbox()
        self.publish_status()

    def _handle(self, msg: Message) -> None:
        f = self.cfg.fleet
        try:
            if msg.topic == topic_model(f):
                self._on_model(msg.payload)
            elif msg.topic == topic_round(f):
                self._on_announce(msg.payload)
            elif msg.topic == topic_receipt(f, self.cfg.device_id):
                self._on_receipt(msg.payload)
        except WireError as exc:
            log.warning("ignored message on %s: %s (%s)", msg.topic, exc.reason, exc)
        msg.ack()

    # -- models ----------------------------------------------------------------------------------
    def _on_model(self, payload: bytes) -> None:
        env = decode(payload, self.pinned, kinds={KIND_MODEL})
        onnx = env.tensors.get("onnx")
        version = env.header.model_version
        if onnx is None or onnx.dtype != np.uint8 or onnx.ndim != 1 or len(env.tensors) != 1:
            log.warning("model release v%d malformed: expected one uint8 tensor 'onnx'", version)
            return
        if env.header.meta.get("fleet") != self.cfg.fleet:
            log.warning("model release v%d for fleet %r ignored", version,
                        env.header.meta.get("fleet"))
            return
        latest = self.models.latest_version()
        if (latest is not None and version <= latest) or version in self.refused_versions:
            return  # a retained release we already have (or refused)
        manifest = env.header.meta.get("manifest")
        if not isinstance(manifest, dict):
            log.warning("model release v%d has no manifest; ignored", version)
            return
        records = None
        serving = self.models.manifest()
        if serving is not None and self.cfg.quality_tolerance is not None:
            x, y = self.store.load(serving.schema)
            records = (x, y) if len(x) else None
        try:
            installed = self.models.install(onnx.tobytes(), manifest, version, records,
                                            self.cfg.quality_tolerance)
            self.last_model_error = installed.note or None  # kept local, never published
        except BedsideError as exc:  # integrity or self-test: about the file, not the records
            self.refused_versions.add(version)
            self.last_model_error = f"v{version}: {exc}"
            log.error("model v%d refused: %s", version, exc)
        self.publish_status(force=True)

    # -- rounds ----------------------------------------------------------------------------------
    def _on_announce(self, payload: bytes) -> None:
        env = decode(payload, self.pinned, kinds={KIND_ANNOUNCE})
        meta = env.header.meta
        if meta.get("fleet") != self.cfg.fleet:
            log.warning("announcement for fleet %r ignored", meta.get("fleet"))
            return
        seen = self.state.get_meta("announce_round")
        if seen is not None and env.header.round < int(seen):
            return  # an old announcement replayed: never go back
        if self.announce is not None and env.header.round < self.announce.header.round:
            return
        self.state.set_meta("announce_round", str(env.header.round))
        self.announce, self.settings = env, None
        if meta.get("state") == "done":
            if not self.done:
                log.info("the aggregator announced the federation is done (model v%d)",
                         env.header.model_version)
            self.done = True
            return
        self.done = False
        try:
            self.settings = RoundSettings.from_meta(meta)
        except ValidationError as exc:
            log.error("round %d: announcement refused: %s", env.header.round, exc)
            if not self.state.handled(env.header.round):
                self._decline(env, "bad_announcement", str(exc))

    def _round_open(self, env: Envelope) -> bool:
        s = self.settings
        return (s is not None and env is self.announce and self.clock() < s.deadline)

    def _maybe_participate(self) -> None:
        env, s = self.announce, self.settings
        if env is None or s is None or not self._round_open(env):
            return
        r, version = env.header.round, env.header.model_version
        if self.state.handled(r):
            return
        if version in self.refused_versions or version in self.models.blocked():
            self._decline(env, "model_unavailable", f"model v{version} was refused or blocked")
            return
        manifest = self.models.manifest(version)
        if manifest is None:
            return  # wait for the release (retained) to arrive and install
        if manifest.sha256 != s.model_sha256:
            self._decline(env, "model_mismatch")
            return
        try:
            self._participate(env, s, manifest)
        except Exception as exc:  # never crash-loop on a round: decline it and carry on
            log.exception("round %d: could not take part", r)
            if not self.state.handled(r):
                self._decline(env, "training_failed", f"{type(exc).__name__}: {exc}")

    def _decline(self, env: Envelope, reason: str, detail: str = "") -> None:
        h = env.header
        msg = encode(KIND_UPDATE, self.cfg.device_id, self.key, {}, round=h.round,
                     model_version=h.model_version,
                     meta={"decline": reason, "fleet": self.cfg.fleet})
        self.state.queue(h.round, f"declined:{reason}", detail, peek(msg).nonce, "decline", msg)
        log.info("round %d: declined (%s)%s", h.round, reason, f": {detail}" if detail else "")
        self._flush_outbox()

    def _plan(self, r: int, s: RoundSettings, n: int) -> tuple[list[Any], Any]:
        """This round's releases (for the ledger) and the DP-SGD settings.

        Record level: DP-SGD as Opacus runs it (Poisson sampling at ``dp_sample_rate``, for
        ``dp_steps`` steps; ``fit`` checks both). Device level: the clipped update as a Gaussian
        mechanism under replace-one adjacency (sensitivity 2C, multiplier z / 2) in both modes;
        membership is public, so no amplification by sampling is claimed.
        """
        from bedside.models.train import DPConfig, dp_sample_rate, dp_steps
        from bedside.privacy.ledger import Release

        releases: list[Any] = []
        dp = None
        if self.cfg.record_epsilon is not None:
            batch, epochs = s.train.batch_size, s.train.epochs
            q = dp_sample_rate(n, batch)
            steps = dp_steps(n, batch, epochs)
            sigma = self._calibrate(q, steps * (s.planned_rounds or ASSUMED_ROUNDS))
            releases.append(Release(round=r, unit=UNIT_RECORD, mechanism="sampled_gaussian",
                                    noise_multiplier=sigma, sample_rate=q, steps=steps,
                                    note="DP-SGD (Opacus, Poisson sampling)"))
            dp = DPConfig(noise_multiplier=sigma, max_grad_norm=self.cfg.max_grad_norm)
        if self.cfg.device_epsilon is not None:
            if s.noise == "none":
                raise BudgetExceededError("the round adds no device-level noise but this device "
                                          "has a device-level budget; declining")
            releases.append(Release(round=r, unit=UNIT_DEVICE, mechanism="gaussian",
                                    noise_multiplier=s.noise_multiplier / 2.0, sample_rate=1.0,
                                    steps=1, note=f"{s.noise} noise; replace-one, sensitivity 2C"))
        return releases, dp

    def _calibrate(self, q: float, total_steps: int) -> float:
        from bedside.privacy.accountant import calibrate

        assert self.cfg.record_epsilon is not None
        key = (q, total_steps, self.cfg.record_epsilon, self.cfg.record_delta)
        if key not in self._calibrated:
            self._calibrated[key] = calibrate(self.cfg.record_epsilon * BUDGET_MARGIN,
                                              self.cfg.record_delta, q, total_steps)
            log.info("DP-SGD noise multiplier %.4f spreads record-level epsilon %.3g over %d "
                     "steps at sample rate %.4f", self._calibrated[key], self.cfg.record_epsilon,
                     total_steps, q)
        return self._calibrated[key]

    def _round_rng(self, r: int) -> np.random.Generator:
        """Fresh randomness for round ``r``: from the OS, or (tests, reproducible demos) derived
        from the configured seed *and the round*, so no two rounds ever share noise."""
        return self.rng if self.cfg.seed is None else np.random.default_rng([self.cfg.seed, r])

    def _participate(self, env: Envelope, s: RoundSettings, manifest: Any) -> None:
        r = env.header.round
        if self._ledger is None:
            self._open_ledger()
        if self._ledger is None:
            self.refusing = f"ledger unavailable: {self.ledger_error}"
            self._decline(env, "ledger_unavailable", str(self.ledger_error))
            return
        x, y = self.store.load(manifest.schema)  # one read: n and the data always agree
        if len(x) == 0:
            self._decline(env, "no_records", "ingest records with 'bedside edge ingest'")
            return
        rng = self._round_rng(r)
        if s.participation_rate < 1.0 and rng.random() >= s.participation_rate:
            self._decline(env, "not_sampled")  # nothing released, nothing to account
            return
        try:
            releases, dp = self._plan(r, s, len(x))
            self._ledger.check(releases)
        except (BudgetExceededError, LedgerError) as exc:
            self.refusing = str(exc)
            log.warning("round %d: refusing to contribute: %s (inference continues)", r, exc)
            self._decline(env, "budget" if isinstance(exc, BudgetExceededError) else
                          "ledger_unavailable", str(exc))
            self.publish_status(force=True)
            return
        self.refusing = None
        self._train_and_send(env, s, manifest, releases, dp, x, y, rng)

    def _train_and_send(self, env: Envelope, s: RoundSettings, manifest: Any,
                        releases: list[Any], dp: Any, x: np.ndarray, y: np.ndarray,
                        rng: np.random.Generator) -> None:
        from bedside.privacy.mechanisms import add_gaussian_noise, clip_update

        h = env.header
        started = self.clock()
        self.publish_status(force=True, state="training")
        try:
            from bedside.edge.trainer import local_update
        except ImportError as exc:
            self._decline(env, "cannot_train", f"install bedside[train] to train ({exc})")
            return
        model_bytes = self.models.model_bytes(h.model_version)
        assert model_bytes is not None
        # A configured seed (tests, reproducible demos) is mixed with the round: noise must be
        # fresh in every round, or differencing two releases would cancel it.
        seed = None if self.cfg.seed is None else self.cfg.seed * 1_000_003 + h.round
        delta, fit = local_update(manifest, model_bytes, x, y, s.train.to_dict(), dp, seed)
        record = [rel for rel in releases if rel.unit == UNIT_RECORD]
        if record and (fit.steps != record[0].steps
                       or abs(fit.sample_rate - record[0].sample_rate) > 1e-12):
            raise PrivacyError(f"training ran {fit.steps} steps at sample rate "
                               f"{fit.sample_rate:.6g}, the ledger plan says {record[0].steps} at "
                               f"{record[0].sample_rate:.6g}; nothing is sent")
        names = list(manifest.parameters)
        clipped, norm = clip_update([delta[k] for k in names], s.clip_norm)
        if s.noise == NOISE_LOCAL:
            clipped = add_gaussian_noise(clipped, s.noise_multiplier, s.clip_norm, rng)
        try:
            self._ledger.record(releases)  # before anything leaves the device
        except (BudgetExceededError, LedgerError) as exc:
            self.refusing = str(exc)
            self._decline(env, "budget", str(exc))
            return
        update_meta: dict[str, Any] = {"fleet": self.cfg.fleet}
        if s.weighting == "examples":  # only when the aggregator weights by it (bucketed)
            update_meta["weight"] = bucket(len(x))
        if self.cfg.record_epsilon is not None:
            update_meta["record_epsilon"] = math.ceil(self._ledger.spent(UNIT_RECORD) * 100) / 100
            update_meta["record_delta"] = self.cfg.record_delta
        msg = encode(KIND_UPDATE, self.cfg.device_id, self.key,
                     dict(zip(names, clipped, strict=True)), round=h.round,
                     model_version=h.model_version, meta=update_meta)
        detail = f"trained {fit.steps} steps in {self.clock() - started:.2f} s"
        self.state.queue(h.round, "contributed", detail, peek(msg).nonce, "update", msg)
        log.info("round %d: %s, update norm %.3f (clip %g)", h.round, detail, norm, s.clip_norm)
        self._flush_outbox()
        self.publish_status(force=True)

    # -- outbox and receipts -----------------------------------------------------------------------
    def _flush_outbox(self) -> None:
        pending = self.state.pending()
        if not pending:
            return
        env = self.announce
        now = self.clock()
        for e in pending:
            if env is None:
                return  # after a restart: wait for the retained announcement before judging
            if env.header.round != e.round or not self._round_open(env):
                self.state.resolve(e.nonce, "stale", "round closed before delivery")
                log.warning("round %d: dropped undelivered %s: the round closed before the "
                            "aggregator confirmed it", e.round, e.kind)
                continue
            if e.last_sent_at is not None and now - e.last_sent_at < self.cfg.resend_seconds:
                continue
            if not self.transport.connected:
                return
            try:
                self.transport.publish(topic_update(self.cfg.fleet, self.cfg.device_id),
                                       e.envelope, qos=1)
                self.state.mark_sent(e.nonce)
            except TransportError as exc:
                log.info("round %d: %s kept in the outbox (%s)", e.round, e.kind, exc)
                return

    def _on_receipt(self, payload: bytes) -> None:
        env = decode(payload, self.pinned, kinds={KIND_RECEIPT})
        meta = env.header.meta
        if meta.get("device") != self.cfg.device_id or meta.get("fleet") != self.cfg.fleet:
            return
        nonce, status = str(meta.get("for_nonce", "")), str(meta.get("status", ""))
        if status not in ("accepted", "rejected", "declined"):
            return
        if self.state.resolve(nonce, status, str(meta.get("reason", ""))):
            level = logging.WARNING if status == "rejected" else logging.INFO
            log.log(level, "round %d: aggregator %s our message%s", env.header.round, status,
                    f" ({meta.get('reason')})" if meta.get("reason") else "")

    # -- status ------------------------------------------------------------------------------------
    def status(self, state: str | None = None) -> dict[str, Any]:
        last = self.state.last_round()
        # Published: nothing computed from records. Which version *serves* (the local quality
        # gate's outcome) stays local; 'bedside edge status' shows it on the device.
        return {
            "device": self.cfg.device_id,
            "state": state or ("refusing" if self.refusing else "idle"),
            "model_version": self.models.latest_version(),
            "last_round": last[0] if last else None,
            "last_action": last[1] if last else None,
            "refusing": self.refusing,
            "privacy": self.privacy_report(),
            "outbox": self.state.counts(),
            "connected": self.transport.connected,
            "time": self.clock(),
        }

    def publish_status(self, force: bool = False, state: str | None = None) -> None:
        now = self.clock()
        if not force and now - self._last_status < self.cfg.status_seconds:
            return
        self._last_status = now
        # status is informational: if the broker is away, the next one goes out when connected
        with contextlib.suppress(TransportError):
            self.transport.publish(topic_status(self.cfg.fleet, self.cfg.device_id),
                                   json.dumps(self.status(state), default=float).encode(),
                                   qos=1, retain=True)
