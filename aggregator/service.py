"""The aggregator service: the MQTT driver of the round core.

:class:`Aggregator` is the front door. One thread runs the loop (``run`` or repeated ``step``);
the transport's network thread only enqueues messages. The round logic is the core's
(:mod:`bedside.federation`); this module receives, calls the core, persists and publishes:

1. **announce** (signed, retained) the round's :class:`~bedside.federation.settings.RoundSettings`
   (:meth:`FederationSettings.announce`);
2. **collect** until every expected device has answered (an update or a decline) or the deadline:
   each message goes through :func:`~bedside.federation.validate.open_update` and
   :func:`~bedside.federation.validate.validate_update`; what is waiting is judged as one group
   and recorded durably in one transaction (:mod:`bedside.aggregator.state`; FedAvg folds
   accepted updates into the round's running sum), then receipted, then acknowledged (MQTT
   manual ack). A rejection is logged with its reason, counted, acknowledged, and receipted when
   the sender is authentic. Nothing a device sends can stop a round;
3. **close**: :func:`~bedside.federation.aggregate.aggregate_round` (rule, central noise, server
   optimizer, adaptive clip norm), weights written into the previous ONNX file (no torch),
   evaluation on the reference set, version N+1 stored in the registry *with* the optimizer's
   state (one commit point), signed and published (retained).

Killed at any point and restarted, it resumes the open round from its database: accepted updates
are neither lost nor counted twice, and a version stored before the crash is published, not
recomputed.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import numpy as np

from bedside.aggregator.config import AggregatorConfig
from bedside.aggregator.keys import check_current
from bedside.aggregator.keys import published as published_rotation
from bedside.aggregator.releases import DownloadServer, ReleaseStore
from bedside.aggregator.rollout import Rollouts
from bedside.aggregator.state import RoundRow, State, open_rounds
from bedside.aggregator.validator import Validator, mtime
from bedside.audit import AuditLog
from bedside.constants import (
    AGGREGATOR_ID,
    KIND_ANNOUNCE,
    KIND_KEY,
    KIND_MODEL,
    KIND_RECEIPT,
    NOISE_LOCAL,
    topic_key,
    topic_model,
    topic_receipt,
    topic_reports_all,
    topic_round,
    topic_status,
    topic_updates_all,
)
from bedside.errors import BedsideError, ConfigError, InputError, StateError, WireError
from bedside.federation import fairness
from bedside.federation.aggregate import aggregate_round
from bedside.federation.fairness import GroupCountSettings
from bedside.federation.report import device_privacy
from bedside.federation.seeds import round_rng
from bedside.federation.settings import RoundSettings
from bedside.federation.statistics import public_center_halfwidth
from bedside.federation.strategies import RunningSum, make_optimizer, make_rule
from bedside.manifest import Manifest, load_manifest, verify_model_file
from bedside.models.onnx_weights import apply_statistics, read_weights, replace_weights
from bedside.models.registry import Registry
from bedside.sqlite import add_timings
from bedside.transport import Message, Transport
from bedside.wire.envelope import decode, encode
from bedside.wire.signing import KeyRing, SigningKey, VerifyKey

log = logging.getLogger("bedside.aggregator")
MAX_STATISTICS_ATTEMPTS = 3


class Aggregator(Validator):
    """The service: opens and closes rounds, stores and releases versions, handles reports; and,
    unless validator workers do it (``[workers] group``), judges the updates itself."""

    devices: KeyRing

    def __init__(self, cfg: AggregatorConfig, transport: Transport | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.federation = cfg.federation
        key = SigningKey.load(cfg.key)
        check_current(cfg, key)
        self.state = State(cfg.state_path)
        #: the round tables: state.db itself, or PostgreSQL shared with validator workers
        rounds = open_rounds(cfg, self.state)
        if rounds is not self.state:  # one service per fleet on a shared database
            import socket

            from bedside.aggregator.pgstate import PgRounds

            assert isinstance(rounds, PgRounds)
            rounds.claim(socket.gethostname(), os.getpid())
        if transport is None:
            from bedside.transport.mqtt import MqttTransport

            transport = MqttTransport(cfg.mqtt, client_id=f"aggregator-{cfg.fleet}",
                                      clean_session=False, manual_ack=True)
        from bedside.aggregator.monitor import ServiceMonitor

        self.cfg = cfg  # the monitor reads it
        super().__init__(cfg, key, rounds, Registry(cfg.registry_path),
                         make_rule(cfg.strategy.rule, **cfg.strategy.params), transport,
                         ServiceMonitor(self), clock)
        self.audit = AuditLog(cfg.data_dir / "audit.db", self.key, "aggregator", clock=clock)
        self.rollouts = Rollouts(cfg, ReleaseStore(self.state.db), self.registry, self.key,
                                 lambda t, p, r: self._publish(t, p, retain=r), clock)
        self.rollouts.last_round = lambda: max((r.round for r in self.rounds.rounds()),
                                               default=0)
        self.rollouts.on_refusal = (
            lambda device, reason, detail: self.rounds.add_rejection(None, device,
                                                                     f"release_{reason}", detail))
        self.downloads: DownloadServer | None = None
        self.enrollment: Any = None  # EnrollmentServer, when [enrollment] port is set
        self._round_deferred = False
        self._waiting_for_devices = False
        self._federation_seen = self.rollouts.store.federation_start()
        self.optimizer = make_optimizer(cfg.strategy.optimizer, **cfg.strategy.optimizer_params)
        if cfg.privacy.noise_seed is not None:
            log.warning("the aggregator's noise is seeded (privacy.noise_seed): reproducible, for "
                        "tests and demos only; never set it in production")
        self.finished = False
        self._evaluator: Any = None
        self._group_levels: tuple[str, ...] = ()  # [evaluation] fleet_counts: the groups counted
        self._validate_seconds: dict[int, float] = {}  # per round, until it closes
        self.on_round_closed: Callable[[dict[str, Any]], None] | None = None

    # -- set-up ----------------------------------------------------------------------------------
    def _bootstrap_model(self) -> None:
        self._warn_ignored_initial_model()
        if self.registry.latest() is None:
            src = self.cfg.initial_model
            if src is None:
                raise ConfigError(f"{self.cfg.source}: the registry is empty and 'initial_model' "
                                  "is not set; export a model with 'bedside models export'")
            m = load_manifest(src)
            data = verify_model_file(src, m)
            if not m.trainable:
                raise ConfigError(f"{src}: model {m.name!r} has no architecture spec (imported "
                                  "models are inference-only) and cannot be trained federatedly")
            self.registry.add(data, m)
            log.info("registry: imported %s as version %d from %s", m.name, m.version, src)
        base = self.rollouts.base_version()
        assert base is not None
        self._load_version(base)
        if not self._signed_now(self.registry.release(base)):
            # also after a crash right after storing it (or a release signed before counters)
            self.registry.put_release(base, self.rollouts.release(
                base, round_id=0, origin="initial" if base == self.registry.versions()[0]
                else "round"))
        ev = self.cfg.evaluation
        if ev.data is not None and self._evaluator is None:
            from bedside.aggregator.evaluate import Evaluator

            assert ev.label is not None and self._manifest is not None
            self._evaluator = Evaluator(ev.data, ev.label, self._manifest, ev.groups)
            if ev.fleet_counts:
                if not self.cfg.rounds.rounds and not ev.fleet_every:
                    raise ConfigError(f"{self.cfg.source}: [evaluation] fleet_counts in an "
                                      "open-ended federation (rounds = 0) needs fleet_every "
                                      "(ask every N-th round): there is no last round")
                self._group_levels = self._evaluator.levels()
                try:  # what every training round will announce: refused here, not mid-run
                    self._group_counts(1)
                except BedsideError as exc:
                    raise ConfigError(f"{self.cfg.source}: [evaluation] fleet_counts: the "
                                      f"reference set's groups ({', '.join(ev.groups)}) cannot "
                                      f"be counted on the devices: {exc}") from None

    def _warn_ignored_initial_model(self) -> None:
        """``initial_model`` starts a federation; once the registry holds versions it is not
        read again. Say so when it names another model than the one this federation started
        from (an operator who meant to start over)."""
        src, versions = self.cfg.initial_model, self.registry.versions()
        if src is None or not versions:
            return
        try:
            given = load_manifest(src).sha256
        except BedsideError as exc:
            log.warning("initial_model %s is ignored (the registry holds versions %d..%d) and "
                        "cannot be read: %s", src, versions[0], versions[-1], exc)
            return
        if given != self.registry.manifest(versions[0]).sha256:
            log.warning("initial_model %s is ignored: the registry %s already holds versions "
                        "%d..%d of this federation, which started from another model. To start "
                        "a new federation, give it a new fleet name (here and in every "
                        "agent.toml) and a new data_dir (docs/models.md)", src,
                        self.registry.root, versions[0], versions[-1])

    def start(self) -> None:
        self._bootstrap_model()
        self._check_statistics()
        rc = self.cfg.releases
        if rc.http_port and self.downloads is None:
            self.downloads = DownloadServer(
                self.registry.root / "objects", self.cfg.fleet, rc.http_host, rc.http_port,
                rc.chunk_bytes, cert_file=rc.cert_file, key_file=rc.key_file,
                ca_file=rc.ca_file, allowed=lambda sha: sha in self.rollouts.servable).start()
        if self.cfg.enrollment.port and self.enrollment is None:
            from bedside.aggregator.enrollment import EnrollmentServer

            self.enrollment = EnrollmentServer(self.cfg).start()
        rotation = published_rotation(self.cfg)
        if rotation is not None:  # before anything signed with the new key: devices pin it first
            self._publish(topic_key(self.cfg.fleet), rotation, retain=True)
        if not self.cfg.workers.group:
            self.transport.subscribe(topic_updates_all(self.cfg.fleet), qos=1)
        else:  # validator workers read the updates; a session from a single-process run may
            # still hold the subscription: drop it, or every update is judged twice
            unsubscribe = getattr(self.transport, "unsubscribe", None)
            if unsubscribe is not None:
                unsubscribe(topic_updates_all(self.cfg.fleet))
        self.transport.subscribe(topic_reports_all(self.cfg.fleet), qos=1)
        base = self.rollouts.base_version()
        assert base is not None
        release = self.registry.release(base)
        assert release is not None
        self._publish(topic_model(self.cfg.fleet), release, retain=True)
        cur = self.rounds.current_round()
        if cur is not None and cur.status in ("open", "closing"):
            self._recover(cur)
        else:
            self._open_next()
        self.monitor.start()

    def _check_statistics(self) -> None:
        """``[statistics]`` needs a public frame (typical or allowed range) for every feature of
        the model: say so at start, not after three rounds of declines."""
        if self.federation.statistics is None or self.rounds.rounds():
            return
        assert self._manifest is not None
        try:
            public_center_halfwidth(self._manifest.schema)
        except InputError as exc:
            raise ConfigError(f"{self.cfg.source}: [statistics]: {exc}; remove [statistics], or "
                              "start from a model whose schema states those ranges") from None

    def _signed_now(self, envelope: bytes | None) -> bool:
        """A stored envelope signed with the current key (not one rotated away) that devices of
        this version understand (a release carries its counter)."""
        if envelope is None:
            return False
        ring = KeyRing()
        ring.add(AGGREGATOR_ID, self.key.public)
        try:
            env = decode(envelope, ring)
        except WireError:
            return False
        return env.header.kind != KIND_MODEL or isinstance(env.header.meta.get("release"), dict)

    def close(self) -> None:
        """Stop the download and enrollment endpoints (the transport and databases are the
        owner's)."""
        if self.downloads is not None:
            self.downloads.close()
            self.downloads = None
        if self.enrollment is not None:
            self.enrollment.close()
            self.enrollment = None
        self.monitor.close()
        self.audit.close()

    def _recover(self, cur: RoundRow) -> None:
        """Resume an open round after a restart (or finish one whose version was already stored:
        the version holds the model and the optimizer's state, so nothing is recomputed)."""
        latest = self.rollouts.base_version()
        assert latest is not None
        done = self.registry.manifest(latest)
        if done.training.get("round") == cur.round and latest > cur.model_version:
            log.info("round %d: its model v%d was stored before the restart; closing it", cur.round,
                     latest)
            drop = ([r.round for r in self._rows() if r.settings.task == "statistics"]
                    if cur.settings.statistics is not None else None)
            self._finish_round(cur.round, "closed", done.training.get("result", {}), latest,
                               drop=drop)
            self._open_next()
            return
        if (not self.rule.incremental and cur.settings.task == "train"
                and (self.rounds.partial_sums(cur.round) or self.rounds.folded(cur.round))):
            raise ConfigError(
                f"{self.cfg.source}: round {cur.round} is open and its accepted updates were "
                f"kept as a running sum (rule 'fedavg'); [strategy] rule {self.rule.name!r} "
                "needs every update. Finish the round with the rule it started with, then "
                "change the rule")
        if (self.cfg.workers.group and self.rule.incremental and cur.settings.task == "train"
                and self.rounds.folded(cur.round) < len(self.rounds.accepted(cur.round))):
            raise ConfigError(
                f"{self.cfg.source}: round {cur.round} is open and kept every update (it began "
                f"with another rule or without workers); validator workers keep running sums. "
                "Finish the round as it began, then turn on [workers]")
        accepted = len(self.rounds.accepted(cur.round))
        log.info("resuming open round %d (model v%d): %d update(s) already accepted, deadline in "
                 "%.0f s", cur.round, cur.model_version, accepted, cur.deadline - self.clock())
        announce = cur.announce
        if not self._signed_now(announce):  # signed with a key rotated since: sign it again
            announce = encode(KIND_ANNOUNCE, AGGREGATOR_ID, self.key, {}, round=cur.round,
                              model_version=cur.model_version, meta=cur.settings.to_meta())
        self._publish(topic_round(self.cfg.fleet), announce, retain=True)

    # -- loop --------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, poll: float = 0.2) -> None:
        self.start()
        stop = stop or threading.Event()
        while not stop.is_set() and self.step(poll):
            pass
        log.info("aggregator stopped%s", " (all planned rounds done)" if self.finished else "")

    def step(self, timeout: float = 0.2) -> bool:
        """Handle what arrived, close the round if due; False once all rounds are done."""
        cur = self.rounds.current_round()
        wait = timeout
        if cur is not None and cur.status == "open":  # wake up for the deadline, not later
            wait = max(0.0, min(timeout, cur.deadline - self.clock()))
        self.drain(wait)
        self._retry_pending()
        cur = self.rounds.current_round()
        if not self.finished and cur is not None and (
                cur.status == "closing" or (cur.status == "open" and self._due(cur))):
            self._close(cur)
            t0 = time.perf_counter()
            self._open_next()
            add_timings(self.state.db, cur.round, {"publish_release": time.perf_counter() - t0})
            cur = self.rounds.current_round()
        self._refresh_devices()
        round_open = cur is not None and cur.status == "open"
        if self.rollouts.tick(self.devices, round_open):
            base = self.rollouts.base_version()
            assert base is not None
            self._load_version(base)  # the federation's model is now the released one
            if self.rollouts.store.federation_start() > self._federation_seen:
                self._federation_seen = self.rollouts.store.federation_start()
                log.info("a new federation starts on model v%d (pushed with --new-federation): "
                         "its rounds count from 1", base)
                self.finished, self._round_deferred = False, True
        if (self._round_deferred and not self.finished
                and not self.rollouts.store.blocks_rounds()
                and (not self._waiting_for_devices
                     or len(self.devices) >= self.cfg.rounds.min_participants)):
            self._open_next()
        if self.monitor.server is not None:  # only when someone can look at it
            self.monitor.refresh()
        return not self.finished or self.rollouts.active(sorted(self.devices))

    def handle(self, msgs: list[Message]) -> None:
        started = time.perf_counter()
        cur = self.rounds.current_round()
        super().handle(msgs)
        if cur is not None and cur.status == "open":  # written with the round's other timings
            self._validate_seconds[cur.round] = (self._validate_seconds.get(cur.round, 0.0)
                                                 + time.perf_counter() - started)

    def _due(self, cur: RoundRow) -> bool:
        if self.clock() >= cur.deadline:
            return True
        expected = self.cfg.rounds.expected_participants or len(self.devices)
        return len(self.rounds.answered(cur.round)) >= expected

    # -- publishing --------------------------------------------------------------------------------
    def _status(self, body: dict[str, Any]) -> None:
        self._publish(topic_status(self.cfg.fleet, AGGREGATOR_ID),
                      json.dumps(body, default=float).encode(), retain=True)

    def _on_report(self, msg: Message, device: str) -> None:
        if _kind(msg.payload) == KIND_KEY:
            try:
                self._on_device_key(device, msg.payload)
            except (sqlite3.Error, OSError, StateError):  # our storage: redelivered
                raise
            except Exception:  # whatever a device sends must not stop the service
                log.exception("key rotation on %s's topic could not be handled; dropped", device)
            msg.ack()
            return
        try:
            self.rollouts.on_report(device, msg.payload, self.devices)
        except (sqlite3.Error, OSError, StateError):  # our storage: redelivered
            log.exception("could not record a release report from %s", device)
            raise
        msg.ack()

    def _on_device_key(self, device: str, payload: bytes) -> None:
        """A device rotating its own key ('bedside edge rotate-key'): signed by the key enrolled
        for it, it replaces that key (kept as ``<id>.pub.previous``); a signed receipt confirms
        it, and the device switches only then. The same statement again is confirmed again."""
        from bedside.wire.rotation import device_rotation

        try:
            new = device_rotation(payload, self.devices, device, self.cfg.fleet)
        except WireError as exc:
            if device in self.devices:  # perhaps the rotation is done and this is a re-send
                current = self.devices.get(device).fingerprint
                prev = self.cfg.devices / f"{device}.pub.previous"
                if prev.exists():
                    ring = KeyRing()
                    ring.add(device, VerifyKey.load(prev))
                    try:
                        again = device_rotation(payload, ring, device, self.cfg.fleet)
                    except WireError:
                        again = None
                    if again is not None and again.fingerprint == current:
                        self._key_receipt(device, current)
                        return
            log.warning("key rotation on %s's topic rejected: %s", device, exc)
            self.rounds.add_rejection(None, device, "key_rotation", str(exc))
            return
        path = self.cfg.devices / f"{device}.pub"
        if not path.exists():  # revoked meanwhile: a rotation never enrolls a device again
            log.warning("key rotation from %s ignored: the device is no longer enrolled", device)
            return
        old = self.devices.get(device)
        old.save(self.cfg.devices / f"{device}.pub.previous")
        new.save(path)
        self.devices = self._load_devices()
        self._devices_seen = mtime(self.cfg.devices)
        log.warning("device %s rotated its key: %s in place of %s", device, new.fingerprint,
                    old.fingerprint)
        self.audit.append("device_key_rotated", f"device {device}", old=old.fingerprint,
                          new=new.fingerprint)
        self._key_receipt(device, new.fingerprint)

    def _key_receipt(self, device: str, fingerprint: str) -> None:
        env = encode(KIND_RECEIPT, AGGREGATOR_ID, self.key, {}, round=0, model_version=0,
                     meta={"device": device, "fleet": self.cfg.fleet,
                           "key_rotated": fingerprint})
        self._publish(topic_receipt(self.cfg.fleet, device), env)

    # -- rounds ------------------------------------------------------------------------------------
    def _clip_norm(self) -> float:
        """The next round's clip norm: adaptive clipping's latest estimate, or the configured."""
        latest = self.rollouts.base_version()
        stored = self.registry.manifest(latest).training.get("next_clip_norm") if latest else None
        return float(stored) if stored is not None else self.cfg.privacy.clip_norm

    def _needs_statistics(self, rows: list[RoundRow]) -> bool:
        """A statistics round comes first when ``[statistics]`` is configured and none has
        closed yet: at most MAX_STATISTICS_ATTEMPTS, all before any training round (the vectors
        of a failed one count towards the next; a device releases once). After that, training
        goes on with the scaling the model has, and the log says so."""
        if self.federation.statistics is None:
            return False
        if any(r.settings.task == "train" or r.status == "closed" for r in rows):
            return False  # statistics done, or training already under way
        if len(rows) >= MAX_STATISTICS_ATTEMPTS:
            log.warning("no statistics round succeeded in %d attempts: training goes on with "
                        "the model's own input scaling", len(rows))
            return False
        return True

    def _rows(self) -> list[RoundRow]:
        """The rounds of the current federation (a push with --new-federation starts one)."""
        start = self.rollouts.store.federation_start()
        return [r for r in self.rounds.rounds() if r.round > start]

    def _open_next(self) -> None:
        rows = self._rows()
        last_round = self.rounds.rounds()[-1].round if self.rounds.rounds() else 0
        trained = sum(1 for r in rows if r.settings.task == "train")
        if self.cfg.rounds.rounds and trained >= self.cfg.rounds.rounds:
            self._finish_federation(last_round)
            return
        if self.rollouts.store.blocks_rounds():
            if not self._round_deferred:
                log.info("the next round waits for a fleet-wide model rollout (bedside models "
                         "status)")
            self._round_deferred = True
            return
        self._round_deferred = False
        latest = self.rollouts.base_version()
        assert latest is not None and self._manifest is not None
        if latest != self._manifest.version:
            self._load_version(latest)
        if not self._manifest.trainable:
            log.error("model v%d, released to the fleet, is inference-only (imported): "
                      "federated training stops here; push a trainable model to go on", latest)
            self._finish_federation(last_round)
            return
        self.devices = self._load_devices()  # devices enrolled since the last round join now
        self._devices_seen = mtime(self.cfg.devices)
        need = self.cfg.rounds.min_participants
        if len(self.devices) < need:
            # a round now could only fail at its deadline: wait for devices to enrol instead
            if not self._waiting_for_devices:
                log.info("round %d waits for devices: %d enrolled, min_participants %d (enrol "
                         "them with 'bedside aggregator invite')", last_round + 1,
                         len(self.devices), need)
            self._waiting_for_devices = self._round_deferred = True
            return
        self._waiting_for_devices = False
        round_id = last_round + 1
        deadline = self.clock() + self.cfg.rounds.deadline_seconds
        if self._needs_statistics(rows):
            settings = self.federation.announce_statistics(
                self.cfg.fleet, round_id, deadline=deadline, model_sha256=self._manifest.sha256)
        else:
            settings = self.federation.announce(
                self.cfg.fleet, round_id, deadline=deadline, model_sha256=self._manifest.sha256,
                clip_norm=self._clip_norm(), training_round=trained + 1)
            if self._group_levels:
                settings = replace(settings, group_counts=self._group_counts(trained + 1))
        announce = encode(KIND_ANNOUNCE, AGGREGATOR_ID, self.key, {}, round=round_id,
                          model_version=latest, meta=settings.to_meta())
        self.rounds.open_round(round_id, latest, announce, settings)
        self._publish(topic_round(self.cfg.fleet), announce, retain=True)
        self.audit.append("round_opened", f"round {round_id}", model_version=latest,
                          task=settings.task, enrolled=len(self.devices))
        self._check_workers()
        log.info("round %d open: model v%d, %d enrolled device(s), deadline %.0f s", round_id,
                 latest, len(self.devices), self.cfg.rounds.deadline_seconds)

    def _check_workers(self) -> None:
        """Say which configured validator workers have not been seen lately: Mosquitto keeps
        giving a stopped worker its share of the updates, which wait in its session until it
        is back (devices without a receipt send again, and the others take those)."""
        if not self.cfg.workers.group:
            return
        from bedside.aggregator.pgstate import PgRounds
        from bedside.aggregator.worker import HEARTBEAT_S

        assert isinstance(self.rounds, PgRounds)
        alive = set(self.rounds.workers(within=3 * HEARTBEAT_S))
        missing = [w for w in self.cfg.workers.ids if w not in alive]
        if missing:
            log.warning("validator worker(s) %s not seen in the last %.0f s: the updates the "
                        "broker gives them wait until they run again ('bedside aggregator "
                        "worker --id ID')", ", ".join(missing), 3 * HEARTBEAT_S)
            self.monitor.error(f"validator worker(s) not running: {', '.join(missing)}")

    def _group_counts(self, training_round: int) -> GroupCountSettings:
        """What training round ``training_round`` asks of the devices' per-group counts
        (``[evaluation] fleet_counts``): every ``fleet_every``-th round and the last planned one
        (0: the last only); every round states how many the federation plans, so that devices
        keep their budget for them."""
        ev, planned = self.cfg.evaluation, self.cfg.rounds.rounds
        release, total = fairness.schedule(training_round, planned, ev.fleet_every)
        return GroupCountSettings(
            attributes=tuple(ev.groups), levels=self._group_levels,
            noise_multiplier=ev.fleet_noise_multiplier, device_records=ev.fleet_device_records,
            releases=total, release=release,
            positive=1 if self._manifest is not None and len(self._manifest.schema.labels) == 2
            else 0)

    def _finish_federation(self, last_round: int) -> None:
        latest = self.rollouts.base_version() or 0
        done = encode(KIND_ANNOUNCE, AGGREGATOR_ID, self.key, {}, round=last_round,
                      model_version=latest, meta={"fleet": self.cfg.fleet, "state": "done"})
        self._publish(topic_round(self.cfg.fleet), done, retain=True)
        self._status({"state": "done", "round": last_round, "model_version": latest,
                      "privacy": self.privacy_report(), "time": self.clock()})
        self.finished = True
        log.info("federation done after %d round(s): final model v%d", last_round, latest)

    def _round_sum(self, cur: RoundRow) -> RunningSum | None:
        """The round's running sum: every writer's partial sum merged (the validator workers',
        or this service's own), None when the rule keeps every update."""
        own = self._running_sum(cur)
        if own is None:
            return None
        parts = self.rounds.partial_sums(cur.round)
        if len(parts) <= 1 and not self.cfg.workers.group:
            return own  # one writer, this service: its cached sum is the stored one
        merged = RunningSum(self._shapes)
        for part in parts:
            merged.merge(RunningSum.from_bytes(part, self._shapes))
        return merged

    def _close(self, cur: RoundRow) -> None:
        # no update is recorded into the round from here on (validator workers judge what
        # arrives later as late); with one process this is a no-op
        self.rounds.begin_close(cur.round)
        accepted = self.rounds.accepted(cur.round)
        rejected = self.rounds.rejections(cur.round)
        duplicates = rejected.pop("duplicate", 0)  # re-sends: not rejections, not counted twice
        declined = self.rounds.declines(cur.round)
        result: dict[str, Any] = {
            "round": cur.round, "task": cur.settings.task, "base_version": cur.model_version,
            "participants": len(self.rounds.answered(cur.round)), "accepted": len(accepted),
            "rejected": rejected, "duplicates": duplicates, "declined": declined,
            "record_epsilon": _record_epsilon(accepted), "clip_norm": cur.settings.clip_norm,
        }
        if cur.settings.statistics is not None:
            # this round and the failed attempts before it (their vectors were kept)
            attempts = [r.round for r in self._rows() if r.settings.task == "statistics"]
            vectors = self.rounds.first_tensors(attempts)
            if len(vectors) < self.cfg.rounds.min_participants:
                self._fail(cur, result, f"{len(vectors)} device(s) released statistics < "
                           f"min_participants {self.cfg.rounds.min_participants}", drop=())
                return
            try:
                version = self._aggregate_statistics(cur, [v["stats"] for _, v in vectors],
                                                     result)
            except InputError as exc:  # e.g. a noised record count below one
                self._fail(cur, result, str(exc), drop=())
                return
            result["round_seconds"] = round(self.clock() - cur.opened_at, 3)
            self._finish_round(cur.round, "closed", result, version, drop=attempts)
            return
        if cur.settings.group_counts is not None and cur.settings.group_counts.release:
            # the devices paid for them: reported even if the round fails
            self._fleet_groups(cur, accepted, result)
        if len(accepted) < self.cfg.rounds.min_participants:
            self._fail(cur, result, f"{len(accepted)} accepted update(s) < min_participants "
                       f"{self.cfg.rounds.min_participants}")
            return
        try:
            version = self._aggregate(cur, accepted, result)
        except InputError as exc:
            # the stored sums do not add up to the accepted updates (they never should): fail
            # the round, loudly, rather than publish a wrong model or retry the close for ever
            log.error("round %d cannot be aggregated: %s", cur.round, exc)
            self.monitor.error(f"round {cur.round} cannot be aggregated: {exc}")
            self._fail(cur, result, f"cannot aggregate: {exc}")
            return
        result["round_seconds"] = round(self.clock() - cur.opened_at, 3)
        self._finish_round(cur.round, "closed", result, version)

    def _fleet_groups(self, cur: RoundRow, accepted: list[dict[str, Any]],
                      result: dict[str, Any]) -> None:
        """The devices' noised per-group counts -> fleet-wide figures of the round's model, with
        what they cost (record level, each device, for every release the federation plans)."""
        g = cur.settings.group_counts
        assert g is not None and self._manifest is not None
        vectors = [np.asarray(u["info"]["group_counts"]) for u in accepted
                   if "group_counts" in u["info"]]
        if not vectors:
            result["fleet_groups"] = {"model_version": cur.model_version, "devices": 0,
                                      "note": "no device released group counts (withheld by "
                                              "policy or budget)"}
            return
        figures = fairness.combine(vectors, g, len(self._manifest.schema.labels),
                                   self.cfg.evaluation.fleet_min_rows)
        delta = self.cfg.privacy.delta
        result["fleet_groups"] = {
            "model_version": cur.model_version,
            "source": "the devices' own records: per-group confusion counts, noised on each "
                      "device and accounted in its ledger",
            **figures,
            "record_epsilon": {"one_release": round(fairness.record_epsilon(g, delta, 1), 4),
                               "all_planned": round(fairness.record_epsilon(g, delta), 4),
                               "releases_planned": g.releases, "delta": delta}}

    def _fail(self, cur: RoundRow, result: dict[str, Any], reason: str,
              drop: Iterable[int] | None = None) -> None:
        result["reason"] = reason
        result["round_seconds"] = round(self.clock() - cur.opened_at, 3)
        log.warning("round %d failed: %s; the model stays at v%d", cur.round, reason,
                    cur.model_version)
        self._finish_round(cur.round, "failed", result, None, drop=drop)

    def _next_manifest(self, prev: Manifest, note: str) -> Manifest:
        """Version N+1's manifest, from version N's: what a new version changes, set by the
        caller (schema, metrics, privacy, training)."""
        m = copy.deepcopy(prev)
        m.version, m.parent_version, m.created_at = ((self.registry.latest() or 0) + 1,
                                                      prev.version, self.clock())
        m.parity = {"note": f"{note} version {prev.version}; the graph's parity with torch was "
                    "checked at export"}
        m.extra.pop("quantization", None)
        m.files = {}
        return m

    def _commit(self, cur: RoundRow, m: Manifest, model_bytes: bytes,
                server_state: dict[str, np.ndarray] | None, result: dict[str, Any],
                timing: dict[str, float]) -> int:
        """Evaluate, account and store version N+1 (one commit point: the manifest, written
        after the model and the optimizer's state), sign its release and serve it."""
        t0 = time.perf_counter()
        m.metrics = self._evaluator.metrics(model_bytes, m) if self._evaluator else {}
        timing["evaluate"] = time.perf_counter() - t0
        result["metrics"] = m.metrics.get("holdout", {})
        if "holdout_groups" in m.metrics:
            result["metrics_groups"] = m.metrics["holdout_groups"]
        if "fleet_groups" in result:  # of the round's model: named in it
            m.metrics["fleet_groups"] = result["fleet_groups"]
        t0 = time.perf_counter()
        m.privacy = self.privacy_report(closing=cur)
        timing["account"] = time.perf_counter() - t0
        result["privacy"] = m.privacy
        t0 = time.perf_counter()
        self.registry.add(model_bytes, m, server_state=server_state)
        self.registry.put_release(m.version, self.rollouts.release(m.version, cur.round))
        timing["store_and_sign"] = time.perf_counter() - t0
        self._load_version(m.version)
        add_timings(self.state.db, cur.round, timing)
        return m.version

    def _aggregate(self, cur: RoundRow, accepted: list[dict[str, Any]],
                   result: dict[str, Any]) -> int:
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        prev = self.registry.manifest(cur.model_version)
        prev_bytes = self.registry.model_bytes(cur.model_version)
        running = self._round_sum(cur)
        outcome = aggregate_round(
            running if running is not None else (lambda: self.rounds.iter_updates(cur.round)),
            count=len(accepted),
            settings=cur.settings, weights=read_weights(prev_bytes, list(self._shapes)),
            optimizer_state=self.registry.server_state(cur.model_version), rule=self.rule,
            optimizer=self.optimizer, rng=round_rng(self.cfg.privacy.noise_seed, cur.round),
            clip_bits=[u["info"].get("clip_bit", 0.0) for u in accepted]
            if cur.settings.adaptive else ())
        timing["aggregate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        new_bytes = replace_weights(prev_bytes, outcome.weights)
        timing["write_onnx"] = time.perf_counter() - t0
        m = self._next_manifest(prev, "weights written by the aggregator into the ONNX graph of")
        result["delta_norm"] = round(outcome.delta_norm, 6)
        m.training = {"round": cur.round, "contributors": len(accepted), "rule": self.rule.name,
                      "optimizer": self.optimizer.name, "result": result,
                      "federation": {k: v for k, v in cur.settings.to_meta().items()
                                     if k != "deadline"}}
        if "feature_statistics" in prev.training:  # where the input scaling came from
            m.training["feature_statistics"] = prev.training["feature_statistics"]
        if outcome.next_clip_norm is not None:
            m.training["next_clip_norm"] = outcome.next_clip_norm
            result["next_clip_norm"] = round(outcome.next_clip_norm, 6)
            result["unclipped_fraction"] = round(float(outcome.unclipped_fraction or 0.0), 4)
        version = self._commit(cur, m, new_bytes, outcome.optimizer_state, result, timing)
        acc = result["metrics"].get("accuracy")
        log.info("round %d closed: %d update(s) -> model v%d%s", cur.round, len(accepted), version,
                 f", holdout accuracy {acc:.4f}" if acc is not None else "")
        return version

    def _aggregate_statistics(self, cur: RoundRow, vectors: list[np.ndarray],
                              result: dict[str, Any]) -> int:
        """A statistics round's close: the devices' noised sums -> the model's input scaling,
        written into its ONNX initializers and its schema as version N+1."""
        assert cur.settings.statistics is not None
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        prev = self.registry.manifest(cur.model_version)
        new_bytes, schema, info = apply_statistics(
            self.registry.model_bytes(cur.model_version), prev.schema, vectors,
            cur.settings.statistics)
        timing["aggregate"] = time.perf_counter() - t0
        m = self._next_manifest(prev, "input scaling replaced by federated feature statistics in")
        m.schema = schema
        result["statistics"] = {**info, "devices": len(vectors)}
        m.training = {"round": cur.round, "contributors": len(vectors),
                      "feature_statistics": result["statistics"], "result": result,
                      "federation": {k: v for k, v in cur.settings.to_meta().items()
                                     if k != "deadline"}}
        version = self._commit(cur, m, new_bytes, self.registry.server_state(cur.model_version),
                               result, timing)
        log.info("round %d closed: input scaling from %d device(s)' noised statistics (about %.0f "
                 "records) -> model v%d", cur.round, len(vectors), info["records"], version)
        return version

    def _finish_round(self, round_id: int, status: str, result: dict[str, Any],
                      version: int | None, drop: Iterable[int] | None = None) -> None:
        self.rounds.finish_round(round_id, status, result, drop)
        self.monitor.round_closed(round_id, result)
        if round_id in self._validate_seconds:
            add_timings(self.state.db, round_id,
                        {"validate_and_record": self._validate_seconds.pop(round_id)})
        self.audit.append("round_closed", f"round {round_id}", status=status,
                          model_version=version, accepted=result.get("accepted"))
        t0 = time.perf_counter()
        if version is not None:
            release = self.registry.release(version)
            assert release is not None
            self._publish(topic_model(self.cfg.fleet), release, retain=True)
            self.rollouts.clear_device_topics()
        body = {"state": "round_closed", "status": status, "model_version":
                self.registry.latest(), "time": self.clock(), **result}
        self._status(body)
        add_timings(self.state.db, round_id, {"publish_release": time.perf_counter() - t0})
        if self.on_round_closed is not None:
            self.on_round_closed(body)

    # -- privacy -----------------------------------------------------------------------------------
    def privacy_report(self, closing: RoundRow | None = None) -> dict[str, Any]:
        """Device-level guarantee of everything released so far (the core's
        :func:`~bedside.federation.report.device_privacy`). Central mode counts the rounds that
        released a model; local mode every round in which the (untrusted) aggregator received
        updates. ``closing`` is the round being closed."""
        counted: list[RoundSettings] = []
        seeded = False
        for r in self.rounds.rounds():
            accepted = self.rounds.accepted(r.round)
            seeded = seeded or any(u["info"].get("seeded") for u in accepted)
            if closing is not None and r.round == closing.round:
                continue
            # a device's own noise (local mode, statistics): every round it sent something in;
            # the aggregator's: every round that released a model
            local = r.settings.noise == NOISE_LOCAL or r.settings.statistics is not None
            if (local and accepted) or (not local and r.status == "closed"):
                counted.append(r.settings)
        if closing is not None:
            counted.append(closing.settings)
        return device_privacy(counted, self.cfg.privacy.delta, seeded_devices=seeded)


def _record_epsilon(accepted: list[dict[str, Any]]) -> dict[str, Any]:
    """Record-level epsilon the round's contributors reported (each device accounts its own with
    its ledger; the aggregator only relays the figures, it cannot verify them)."""
    values = [u["info"]["record_epsilon"] for u in accepted if "record_epsilon" in u["info"]]
    if not values:
        return {}
    return {"max": max(values), "min": min(values), "devices": len(values),
            "delta": accepted[0]["info"].get("record_delta")}




def _kind(payload: bytes) -> str | None:
    from bedside.wire.envelope import peek

    try:
        return peek(payload).kind
    except WireError:
        return None


