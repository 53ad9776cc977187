"""The edge agent: the MQTT driver of a clinic device's part in federated training.

:class:`Agent` is the edge's front door for federation. Its loop runs on its own thread; the
transport's network thread only enqueues. The round logic is the core's
(:mod:`bedside.federation.device`, through :func:`bedside.edge.participant.participate`); the
agent receives, calls it, persists and publishes. For each signed round announcement it:

1. verifies the aggregator's signature with the key pinned at enrollment;
2. waits until it runs the announced model version (model releases are verified, self-tested and
   hot-swapped by :class:`~bedside.edge.updater.ModelManager`);
3. decides whether to take part: the participation coin (probability ``participation_rate``, from
   the OS's entropy), records on hand, and its privacy **ledger**: it describes this round's
   releases (record-level DP-SGD steps; device-level Gaussian on the clipped update) and refuses
   if either budget would be exceeded; an unreadable ledger also refuses (fail closed). A refusal
   is sent as a signed decline, logged, shown in the status, and inference goes on;
4. trains locally (torch, DP-SGD at the noise multiplier that spreads the record-level budget
   over the planned rounds), computes ``delta = w_local - w_global``, clips it to L2 norm ``C``
   and, in local mode, adds ``N(0, (z C)^2)``;
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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bedside import __version__
from bedside.audit import AuditLog
from bedside.constants import (
    AGGREGATOR_ID,
    KIND_ANNOUNCE,
    KIND_MODEL,
    KIND_RECEIPT,
    KIND_REPORT,
    KIND_UPDATE,
    topic_key,
    topic_model,
    topic_receipt,
    topic_release,
    topic_report,
    topic_round,
    topic_status,
    topic_update,
)
from bedside.edge.config import AgentConfig
from bedside.edge.outbox import AgentState
from bedside.edge.participant import (
    Contribution,
    Decline,
    participate,
    participate_statistics,
)
from bedside.edge.releases import Probation as ReleaseProbation
from bedside.edge.releases import ReleaseLog
from bedside.edge.store import RecordStore
from bedside.edge.updater import ModelManager, Refused, run_golden
from bedside.errors import (
    BedsideError,
    IntegrityError,
    LedgerError,
    TransportError,
    ValidationError,
    WireError,
)
from bedside.federation.device import published_privacy
from bedside.federation.release import Release, judge_release
from bedside.federation.seeds import round_rng
from bedside.federation.settings import RoundSettings
from bedside.manifest import Manifest
from bedside.sqlite import add_timings
from bedside.transport import Message, Transport
from bedside.wire.envelope import Envelope, decode, encode, peek
from bedside.wire.signing import KeyRing, SigningKey, VerifyKey

log = logging.getLogger("bedside.edge.agent")


class Agent:
    def __init__(self, cfg: AgentConfig, transport: Transport | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        if cfg.agent.seed is not None:
            log.warning("this device's training and noise are seeded ([agent] seed): "
                        "reproducible, for tests and demos only; never set it in production")
        self.key = SigningKey.load(cfg.key)
        self.pinned = KeyRing()
        self.pinned.add(AGGREGATOR_ID, VerifyKey.load(cfg.aggregator_key))
        self.audit = AuditLog(cfg.data / "audit.db", self.key, f"device:{cfg.device_id}",
                              clock=clock)
        key = cfg.store_key()
        self.store = RecordStore(cfg.records_path, key)
        self.state = AgentState(cfg.state_path, cfg.fleet, key)
        self.models = ModelManager(cfg.models_path, threads=cfg.agent.threads)
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
        self.refusing: str | None = None  # why this device declines rounds (kept local)
        self.refusing_reason = ""  # the reason code, which may be published
        self.refused_versions: set[int] = set()
        self._last_status = 0.0
        self.releases = ReleaseLog(self.state.db, cfg.fleet)
        self._download: tuple[Any, dict[str, Any]] | None = None
        self._probation: ReleaseProbation | None = None
        self._refused_old: set[tuple[int, str, str]] = set()
        self._notices: dict[tuple[int, str], float] = {}
        self._key_sent_at = -1e18
        self.metrics: Any = None  # AgentMetrics, with [monitor] port
        self.monitor: Any = None
        if cfg.monitor.port:
            from bedside.monitoring import AgentMetrics

            self.metrics = AgentMetrics()


    # -- ledger ----------------------------------------------------------------------------------
    def _open_ledger(self) -> None:
        try:
            from bedside.privacy.ledger import Ledger

            # A device that has taken part before must find its ledger: a missing one is never
            # silently re-created (that would reset its budget to zero).
            contributed = self.state.contributed()
            ledger = Ledger(self.cfg.ledger_path, self.cfg.budgets(), create=not contributed)
            missing = _unrecorded(contributed, ledger.rounds())
            if missing:
                ledger.close()
                shown = ", ".join(f"{f or '?'} round {r}" for f, r in sorted(missing)[:5])
                raise LedgerError(
                    f"the privacy ledger at {self.cfg.ledger_path} lacks {len(missing)} round(s) "
                    f"this device contributed to ({shown}{' ...' if len(missing) > 5 else ''}): "
                    "it was restored from an older backup or replaced, and would under-count what "
                    "was released. Refusing to take part; restore the most recent ledger (the one "
                    "that matches agent.db), or ask your privacy officer before starting over")
            self._ledger = ledger
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
        except BedsideError as exc:  # a broken ledger, or no accountant (the slim edge install)
            return {"error": str(exc)}

    def close(self) -> None:
        """Stop a download and close the device's databases (the transport is its owner's)."""
        if self._download is not None:
            self._download[0].stop()
            self._download = None
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        for db in (self._ledger, self.store, self.state, self.audit):
            if db is not None:
                db.close()
        self._ledger = None

    # -- loop --------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.metrics is not None and self.monitor is None:
            from bedside.monitoring import MonitorServer

            self.monitor = MonitorServer(self.cfg.monitor, self.metrics.registry,
                                         f"device {self.cfg.device_id}")
        f = self.cfg.fleet
        # the key topic first: a rotated key is pinned before what it signed is judged
        for topic in (topic_key(f), topic_model(f), topic_release(f, self.cfg.device_id),
                      topic_round(f), topic_receipt(f, self.cfg.device_id)):
            self.transport.subscribe(topic, qos=1)
        self.publish_status(force=True)

    def run(self, stop: threading.Event | None = None, poll: float = 0.2) -> None:
        self.start()
        stop = stop or threading.Event()
        while not stop.is_set():
            self.step(poll)
            if self.done and self.cfg.agent.exit_when_done and not self.state.pending():
                break
        self.publish_status(force=True, state="stopped")

    def step(self, timeout: float = 0.2) -> None:
        msg = self.transport.get(timeout)
        while msg is not None:
            self._handle(msg)
            msg = self.transport.get(0)
        self._advance_download()
        self._check_probation()
        self._maybe_participate()
        self._flush_outbox()
        self._report_releases()
        self._send_key_rotation()
        self.publish_status()

    def _handle(self, msg: Message) -> None:
        f = self.cfg.fleet
        try:
            if msg.topic == topic_key(f):
                self._on_key(msg.payload)
            elif msg.topic in (topic_model(f), topic_release(f, self.cfg.device_id)):
                self._on_model(msg.payload)
            elif msg.topic == topic_round(f):
                self._on_announce(msg.payload)
            elif msg.topic == topic_receipt(f, self.cfg.device_id):
                self._on_receipt(msg.payload)
        except WireError as exc:
            log.warning("ignored message on %s: %s (%s)", msg.topic, exc.reason, exc)
            if msg.topic in (topic_model(f), topic_release(f, self.cfg.device_id)):
                self._refusal_notice(0, 0, exc.reason, f"a model release that failed "
                                     f"verification: {exc}")
        except Exception:  # a retained message must not crash the agent at every start
            log.exception("message on %s could not be handled; ignored", msg.topic)
        msg.ack()

    # -- the aggregator's key ----------------------------------------------------------------------
    def _on_key(self, payload: bytes) -> None:
        """A key rotation: pin the new key if a chain of signatures leads to it from the pinned
        one (:mod:`bedside.wire.rotation`), then fetch the retained messages again (they may
        have arrived signed with the new key before this statement)."""
        from bedside.wire.rotation import follow

        if not payload:
            return
        pinned = self.pinned.get(AGGREGATOR_ID)
        step = follow(payload, pinned, self.cfg.fleet)  # WireError: logged by _handle
        if step is None:
            return
        new, sequence = step
        path = self.cfg.aggregator_key
        with contextlib.suppress(OSError):
            path.with_name(path.name + ".previous").write_text(pinned.to_text() + "\n")
        new.save(path)
        self.pinned = KeyRing()
        self.pinned.add(AGGREGATOR_ID, new)
        log.warning("the aggregator's key was rotated (rotation %d): pinned %s in place of %s",
                    sequence, new.fingerprint, pinned.fingerprint)
        f = self.cfg.fleet
        for topic in (topic_model(f), topic_release(f, self.cfg.device_id), topic_round(f)):
            self.transport.subscribe(topic, qos=1)  # retained messages are delivered again

    # -- models ----------------------------------------------------------------------------------
    def _on_model(self, payload: bytes) -> None:
        """A signed model release, for the fleet (``model``) or this device (``release/<id>``):
        judge it (target, counter, agent version), then install it, or start its download."""
        if not payload:
            return  # a retained release cleared by the aggregator
        env = decode(payload, self.pinned, kinds={KIND_MODEL})
        meta, version = env.header.meta, env.header.model_version
        try:
            rel = Release.from_meta(meta.get("release"))
        except ValidationError as exc:
            log.warning("model release v%d refused: %s", version, exc)
            return
        last = self.releases.last()
        verdict, detail = judge_release(
            rel, device_id=self.cfg.device_id, fleet=self.cfg.fleet,
            release_fleet=meta.get("fleet"), last_counter=last.counter if last else None,
            last_sha256=last.sha256 if last else None, agent_version=__version__,
            blocked=self.models.blocked())
        if verdict == "ignore":
            if last is not None and last.state == "downloading" and self._download is None:
                self._start_download(rel, meta)  # after a restart: resume where it stopped
            elif (last is not None and last.state == "verified" and self._probation is None
                  and last.until is not None):
                self._probation = ReleaseProbation(rel, last.until)  # after a restart
            else:
                log.debug("model release %d (v%d) ignored: %s", rel.counter, rel.version, detail)
            return
        if verdict in ("not_targeted", "fleet"):
            log.info("model release %d (v%d) ignored: %s", rel.counter, rel.version, detail)
            return
        if verdict in ("older_counter", "replay"):
            self._refuse_old(rel, verdict, detail)
            return
        if verdict:
            self._release_state(rel, "rejected", verdict, detail)
            return
        manifest = meta.get("manifest")
        problem = self._check_release(rel, version, manifest)
        if problem:
            self._release_state(rel, "rejected", *problem)
            return
        have = self.models.manifest(rel.version)
        if have is not None and have.sha256 == rel.sha256:
            # the version it has (a canary re-signed for the whole target, or an install that
            # a crash interrupted before it was recorded): nothing to fetch
            self._release_state(rel, "active", "", "installed already")
            return
        assert isinstance(manifest, dict)
        onnx = env.tensors.get("onnx")
        if rel.inline_ok:
            if onnx is None or onnx.dtype != np.uint8 or onnx.ndim != 1 or len(env.tensors) != 1:
                self._release_state(rel, "rejected", "malformed",
                                    "an inline release needs one uint8 tensor 'onnx'")
                return
            self._install(rel, manifest, onnx.tobytes())
        else:
            self._start_download(rel, meta)

    def _refuse_old(self, rel: Release, reason: str, detail: str) -> None:
        """A release at or below the newest counter handled: refused, logged and reported (once
        per run and release), without touching the record of the release it replays."""
        key = (rel.counter, rel.sha256, reason)
        if key in self._refused_old:
            return
        self._refused_old.add(key)
        log.warning("model release %d (v%d): rejected (%s: %s)", rel.counter, rel.version, reason,
                    detail)
        self._refusal_notice(rel.counter, rel.version, reason, detail)

    def _refusal_notice(self, counter: int, version: int, reason: str, detail: str) -> None:
        """Tell the aggregator that a release was refused before it was judged on its merits
        (bad signature, old or replayed): a security notice, best effort, at most one a minute
        per release and reason (a flood of forgeries does not become a flood of notices)."""
        now = self.clock()
        if now - self._notices.get((counter, reason), -1e18) < 60.0:
            return
        self._notices[(counter, reason)] = now
        msg = encode(KIND_REPORT, self.cfg.device_id, self.key, {}, round=0,
                     model_version=version,
                     meta={"fleet": self.cfg.fleet, "counter": counter, "state": "rejected",
                           "reason": reason, "detail": detail[:300], "refusal": True})
        with contextlib.suppress(TransportError):
            self.transport.publish(topic_report(self.cfg.fleet, self.cfg.device_id), msg, qos=1)

    def _check_release(self, rel: Release, version: int, manifest: Any) -> tuple[str, str] | None:
        if not isinstance(manifest, dict):
            return "malformed", "the release has no manifest"
        try:
            m = Manifest.from_dict(manifest, "model release manifest")
        except BedsideError as exc:
            return "malformed", str(exc)
        if not (m.version == rel.version == version) or m.sha256 != rel.sha256:
            return "integrity", "the release, its header and its manifest disagree on the model"
        serving = self.models.manifest()
        if (serving is not None and not rel.new_schema
                and m.schema.fingerprint() != serving.schema.fingerprint()):
            return "schema", (f"model v{m.version} expects another input schema than the records "
                              f"this device holds (those of v{serving.version})")
        return None

    def _start_download(self, rel: Release, meta: dict[str, Any]) -> None:
        import ssl

        from bedside.edge.releases import Download, check_url, client_context

        if self._download is not None:
            old = self._download[0]
            if old.rel.counter == rel.counter:
                return
            old.stop()
            self._download = None
            self._release_state(old.rel, "rejected", "superseded",
                                f"release {rel.counter} arrived before the download finished")
        m = self.cfg.mqtt
        try:
            check_url(rel.url)
        except TransportError as exc:  # where the release says to download from: refused
            self._release_state(rel, "rejected", "download", str(exc))
            return
        try:
            ctx = (client_context(m.ca_file, m.cert_file, m.key_file)
                   if rel.url.startswith("https:") else None)
            dl = Download(self.models.root / ".downloads", rel, self.cfg.fleet, ctx)
        except (BedsideError, OSError, ssl.SSLError) as exc:
            # e.g. an unreadable certificate or a full disk: not the release's fault; the
            # retained release is delivered again at the next (re)connection
            log.error("release %d: cannot start its download: %s", rel.counter, exc)
            return
        self._download = (dl.start(), dict(meta["manifest"]))
        if self.releases.get(rel.counter) is None:
            self._release_state(rel, "downloading", "",
                                f"{rel.size} bytes in {dl.total} chunk(s)")

    def settle_download(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a download in progress to finish (for a caller
        that lives for one message, as a Flower ClientApp does); True if one did."""
        if self._download is None:
            return False
        dl = self._download[0]
        deadline = time.monotonic() + timeout
        while not dl.finished and time.monotonic() < deadline:
            time.sleep(0.05)
        return dl.finished

    def _advance_download(self) -> None:
        if self._download is None:
            return
        dl, manifest = self._download
        if not dl.finished:
            return
        try:
            if dl.error is not None:
                raise dl.error
            path = dl.verified_file()
        except IntegrityError as exc:
            self._download = None
            dl.discard()
            self._release_state(dl.rel, "rejected", "integrity", str(exc))
            return
        self._download = None
        self._install(dl.rel, manifest, path)  # the file moves into the model's directory
        dl.discard()  # (if it is still there: a refused install)

    def _install(self, rel: Release, manifest: dict[str, Any], data: bytes | Path) -> None:
        records = None
        serving = self.models.manifest()
        if serving is not None and self.cfg.agent.quality_tolerance is not None:
            x, y = self.store.load(serving.schema)
            records = (x, y) if len(x) else None
        try:
            self.models.install(data, manifest, rel.version, records,
                                self.cfg.agent.quality_tolerance, golden=rel.golden)
        except BedsideError as exc:  # about the file and the golden rows, never the records
            reason = (exc.reason if isinstance(exc, Refused)
                      else "integrity" if isinstance(exc, IntegrityError) else "self_test")
            self.refused_versions.add(rel.version)
            self._release_state(rel, "rejected", reason, str(exc))
            return
        if rel.probation.seconds > 0:
            until = self.clock() + rel.probation.seconds
            self._probation = ReleaseProbation(rel, until)
            self._release_state(rel, "verified", "", "in probation", until=until)
        else:
            self._release_state(rel, "active")

    def _check_probation(self) -> None:
        p = self._probation
        now = self.clock()
        if p is None or now < p.next_check:
            return
        from bedside.edge.predictor import Predictor

        version = p.release.version
        t0 = time.perf_counter()
        try:
            if p.predictor is None:
                p.predictor = Predictor(self.models.root / f"v{version}",
                                        threads=self.cfg.agent.threads)
            predictor = p.predictor
            if p.release.golden is not None:
                why, ms = run_golden(predictor, p.release.golden)
            else:  # no golden rows: the self-test on the schema's reference rows
                predictor.self_test()
                why, ms = "", (time.perf_counter() - t0) * 1000
        except Exception as exc:
            why, ms = f"the model failed: {exc}", (time.perf_counter() - t0) * 1000
        reason = p.record(not why, ms)
        p.next_check = now + max(p.release.probation.interval, 0.05)
        if reason:
            self._probation = None
            self.models.withdraw(version, reason)
            self.refused_versions.add(version)
            self._release_state(p.release, "rolled_back", "probation",
                                f"{reason}{f' ({why})' if why else ''}")
        elif now >= p.until:
            self._probation = None
            self._release_state(p.release, "active", "",
                                f"probation passed: {p.checks} check(s), worst {p.worst_ms:.1f} ms")

    def _release_state(self, rel: Release, state: str, reason: str = "", detail: str = "",
                       until: float | None = None) -> None:
        self.releases.set(rel, state, reason, detail, until=until, now=self.clock())
        self.audit.append(f"release_{state}", f"model v{rel.version}", counter=rel.counter,
                          sha256=rel.sha256, reason=reason)
        level = logging.WARNING if state in ("rejected", "rolled_back") else logging.INFO
        log.log(level, "model release %d (v%d): %s%s", rel.counter, rel.version, state,
                f" ({reason}: {detail})" if reason else f" ({detail})" if detail else "")
        self._report_releases()
        self.publish_status(force=True)

    def _report_releases(self) -> None:
        """Send each state not yet reported, signed (re-tried while the broker is away)."""
        if not self.transport.connected:
            return
        for h in self.releases.unreported():
            msg = encode(KIND_REPORT, self.cfg.device_id, self.key, {}, round=0,
                         model_version=h.version,
                         meta={"fleet": self.cfg.fleet, "counter": h.counter, "state": h.state,
                               "reason": h.reason, "detail": h.detail})
            try:
                self.transport.publish(topic_report(self.cfg.fleet, self.cfg.device_id), msg,
                                       qos=1)
            except TransportError:
                return
            self.releases.mark_reported(h.counter, h.state)

    # -- rounds ----------------------------------------------------------------------------------
    def _on_announce(self, payload: bytes) -> None:
        env = decode(payload, self.pinned, kinds={KIND_ANNOUNCE})
        meta = env.header.meta
        if meta.get("fleet") != self.cfg.fleet:
            log.warning("announcement for fleet %r ignored", meta.get("fleet"))
            return
        seen = self.state.announced_round()
        if self.announce is not None:
            seen = max(seen or 0, self.announce.header.round)
        if seen is not None and env.header.round < seen:
            # never go back: an old announcement replayed, or an aggregator that started over
            log.warning("round %d announcement of fleet %r ignored: this device has seen round "
                        "%d, and announcements never go back (a replay, or an aggregator that "
                        "started over: a new federation needs a new fleet name, docs/models.md)",
                        env.header.round, self.cfg.fleet, seen)
            return
        self.state.set_announced_round(env.header.round)
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
        self.audit.append("round_declined", f"round {h.round}", fleet=self.cfg.fleet,
                          reason=reason, model_version=h.model_version)
        if self.metrics is not None:
            self.metrics.rounds.labels(f"declined:{reason}").inc()
        log.info("round %d: declined (%s)%s", h.round, reason, f": {detail}" if detail else "")
        self._flush_outbox()

    def _participate(self, env: Envelope, s: RoundSettings, manifest: Any) -> None:
        r = env.header.round
        if self._ledger is None:
            self._open_ledger()
        if self._ledger is None:
            self.refusing = f"ledger unavailable: {self.ledger_error}"
            self.refusing_reason = "ledger_unavailable"
            self._decline(env, "ledger_unavailable", str(self.ledger_error))
            self.publish_status(force=True)
            return
        # one read: n, the data and their groups always agree
        x, y, attributes = self.store.load_with_attributes(manifest.schema)
        model_bytes = self.models.model_bytes(env.header.model_version)
        assert model_bytes is not None
        self.publish_status(force=True, state="training")
        started = time.perf_counter()
        rng = round_rng(self.cfg.agent.seed, r)
        if s.task == "statistics":
            outcome: Contribution | Decline = participate_statistics(
                r, s, manifest, x, privacy=self.cfg.privacy, ledger=self._ledger,
                fleet=self.cfg.fleet, seed=self.cfg.agent.seed, rng=rng)
        else:
            outcome = participate(r, s, manifest, model_bytes, x, y, privacy=self.cfg.privacy,
                                  ledger=self._ledger, fleet=self.cfg.fleet,
                                  seed=self.cfg.agent.seed, rng=rng, attributes=attributes)
        if not isinstance(outcome, Contribution):
            if outcome.reason in ("budget", "ledger_unavailable", "policy"):
                self.refusing, self.refusing_reason = outcome.detail, outcome.reason
                log.warning("round %d: refusing to contribute: %s (inference continues)", r,
                            outcome.detail)
            self._decline(env, outcome.reason, outcome.detail)
            self.publish_status(force=True)
            return
        self.refusing = None
        t0 = time.perf_counter()
        msg = encode(KIND_UPDATE, self.cfg.device_id, self.key, outcome.tensors, round=r,
                     model_version=env.header.model_version, meta=outcome.meta)
        timings = {**outcome.timings, "sign": time.perf_counter() - t0}
        detail = f"trained {outcome.steps} steps in {time.perf_counter() - started:.2f} s"
        self.state.queue(r, "contributed", detail, peek(msg).nonce, "update", msg)
        self.audit.append("round_contributed", f"round {r}", fleet=self.cfg.fleet,
                          nonce=peek(msg).nonce)
        if self.metrics is not None:
            self.metrics.rounds.labels("contributed").inc()
        log.info("round %d: %s, update norm %.3f (clip %g)", r, detail, outcome.norm,
                 s.clip_norm)
        t0 = time.perf_counter()
        self._flush_outbox()
        timings["publish"] = time.perf_counter() - t0
        add_timings(self.state.db, r, timings)  # kept on the device, never published
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
            if e.last_sent_at is not None and now - e.last_sent_at < self.cfg.agent.resend_seconds:
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

    # -- this device's own key --------------------------------------------------------------------
    @property
    def next_key_path(self) -> Any:
        return self.cfg.key.with_name(self.cfg.key.name + ".next")

    def _send_key_rotation(self) -> None:
        """A rotation started with 'bedside edge rotate-key': the current key signs the next
        one; sent until the aggregator's signed receipt confirms it (then the key is swapped)."""
        nxt = self.next_key_path
        if not nxt.exists() or not self.transport.connected:
            return
        now = self.clock()
        if now - self._key_sent_at < self.cfg.agent.resend_seconds:
            return
        from bedside.wire.rotation import make_statement

        self._key_sent_at = now
        try:
            new = SigningKey.load(nxt)
        except BedsideError as exc:  # e.g. a key file others can read: say so, do not stop
            log.error("the pending key rotation cannot be sent: %s", exc)
            return
        statement = make_statement(self.key, new.public, self.cfg.fleet, 1, [],
                                   sender=self.cfg.device_id)
        with contextlib.suppress(TransportError):  # sent again after resend_seconds
            self.transport.publish(topic_report(self.cfg.fleet, self.cfg.device_id), statement,
                                   qos=1)

    def _key_confirmed(self, fingerprint: str) -> None:
        nxt = self.next_key_path
        if not nxt.exists():
            return
        new = SigningKey.load(nxt)
        if new.public.fingerprint != fingerprint:
            return
        import os

        from bedside.files import atomic_write_bytes, fsync_dir

        retired = self.cfg.key.with_name(self.cfg.key.name + ".retired")
        atomic_write_bytes(retired, self.cfg.key.read_bytes(), mode=0o600)
        os.replace(nxt, self.cfg.key)
        fsync_dir(self.cfg.key.parent)
        new.public.save(self.cfg.key.with_suffix(".pub"))
        # signed by the old key: it hands the audit trail over to the new one
        self.audit.append("key_rotated", f"device {self.cfg.device_id}",
                          old=self.key.public.fingerprint, new=new.public.fingerprint)
        old, self.key = self.key.public.fingerprint, new
        self.audit.key = new
        log.warning("this device's key was rotated: %s in place of %s (the aggregator confirmed "
                    "it)", new.public.fingerprint, old)

    def _on_receipt(self, payload: bytes) -> None:
        env = decode(payload, self.pinned, kinds={KIND_RECEIPT})
        meta = env.header.meta
        if meta.get("device") != self.cfg.device_id or meta.get("fleet") != self.cfg.fleet:
            return
        if isinstance(meta.get("key_rotated"), str):
            self._key_confirmed(meta["key_rotated"])
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
        report = self.privacy_report()
        return {
            "device": self.cfg.device_id,
            "state": state or ("refusing" if self.refusing else "idle"),
            "model_version": self.models.latest_version(),
            "last_round": last[0] if last else None,
            "last_action": last[1] if last else None,
            # why, as a reason code; the message (with exact figures) stays in the local log
            "refusing": self.refusing_reason if self.refusing else None,
            "privacy": ({"error": "ledger unavailable"} if "error" in report
                        else published_privacy(report)),
            "outbox": self.state.counts(),
            # the newest release and its state: from the release and the golden rows only
            "release": last.to_dict() if (last := self.releases.last()) else None,
            "connected": self.transport.connected,
            "time": self.clock(),
        }

    def publish_status(self, force: bool = False, state: str | None = None) -> None:
        now = self.clock()
        if not force and now - self._last_status < self.cfg.agent.status_seconds:
            return
        self._last_status = now
        # status is informational: if the broker is away, the next one goes out when connected
        status = self.status(state)
        if self.metrics is not None:  # what the status says, nothing more
            self.metrics.update(status, getattr(self.transport, "queue_depth", None))
        with contextlib.suppress(TransportError):
            self.transport.publish(topic_status(self.cfg.fleet, self.cfg.device_id),
                                   json.dumps(status, default=float).encode(),
                                   qos=1, retain=True)


def _unrecorded(contributed: set[tuple[str, int]],
                recorded: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """Rounds the device contributed to that its ledger has no release for (a ledger written
    before releases named their fleet records them under fleet '')."""
    legacy = {r for f, r in recorded if f == ""}
    return {(f, r) for f, r in contributed if (f, r) not in recorded and r not in legacy}
