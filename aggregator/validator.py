"""Judging update messages and recording them: the part of the aggregator that validator workers
share with the single-process service.

:class:`Validator` holds what judging needs (the enrolled devices' keys, the round's model shapes,
the round store, the signing key for receipts, a transport) and one method that matters,
:meth:`Validator.handle`: a group of messages is judged with the round core
(:func:`~bedside.federation.validate.open_update`, :func:`~bedside.federation.validate.
validate_update`), recorded in one transaction (FedAvg folds accepted updates into this
writer's running sum), then receipted, then acknowledged. A message is acknowledged only once
it is durable; when another writer got there first (:class:`~bedside.aggregator.state.
Contended`: a worker recorded the same update, or the coordinator closed the round), nothing of
the group was written and the group is judged again.

:class:`bedside.aggregator.service.Aggregator` (one process: also opens and closes rounds) and
:class:`bedside.aggregator.worker.Worker` (one of N on a shared subscription) are both
validators.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from bedside.aggregator.config import AggregatorConfig
from bedside.aggregator.state import Batch, Contended, RoundRow, RoundStore, UpdateRow
from bedside.constants import AGGREGATOR_ID, KIND_RECEIPT, topic_receipt
from bedside.errors import BedsideError, ConfigError, StateError, TransportError, WireError
from bedside.federation.settings import RoundSettings
from bedside.federation.statistics import dimension
from bedside.federation.strategies import AggregationRule, RunningSum
from bedside.federation.validate import (
    Accepted,
    Declined,
    Duplicate,
    OpenRound,
    Prior,
    digest,
    max_update_bytes,
    open_update,
    validate_update,
)
from bedside.manifest import Manifest
from bedside.models.registry import Registry
from bedside.transport import Message, Transport
from bedside.wire.envelope import encode
from bedside.wire.signing import KeyRing, SigningKey, validate_device_id

log = logging.getLogger("bedside.aggregator")

#: Messages judged and recorded in one transaction at most (a group also ends when nothing more
#: is waiting, so a lone message is never held back).
GROUP_MAX = 256
#: A group that keeps losing races to other writers is judged at most this many times.
CONTENDED_ATTEMPTS = 8


class Events(Protocol):
    """What a validator reports as it judges (the service's metrics and status page, or a
    worker's counters)."""

    def judged(self, seconds: float) -> None: ...
    def accepted(self) -> None: ...
    def declined(self, reason: str) -> None: ...
    def rejected(self, reason: str, detail: str) -> None: ...
    def error(self, text: str) -> None: ...


class Validator:
    def __init__(self, cfg: AggregatorConfig, key: SigningKey, rounds: RoundStore,
                 registry: Registry, rule: AggregationRule, transport: Transport,
                 monitor: Events, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.key = key
        self.rounds = rounds
        self.registry = registry
        self.rule = rule
        self.transport = transport
        self.monitor = monitor
        self.clock = clock
        self.devices: KeyRing = self._load_devices()
        self._devices_seen = mtime(cfg.devices)
        self._pending: dict[str, tuple[bytes, bool]] = {}
        self._running: tuple[int, RunningSum] | None = None  # this writer's, if incremental
        self._manifest: Manifest | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._max_update = cfg.max_update_bytes

    # -- enrolled devices --------------------------------------------------------------------------
    def _load_devices(self) -> KeyRing:
        if not self.cfg.devices.is_dir():
            raise ConfigError(f"{self.cfg.source}: devices directory {self.cfg.devices} does not "
                              "exist; enroll devices with 'bedside aggregator enroll'")
        ring = KeyRing.from_dir(self.cfg.devices)
        for device in ring:
            try:
                validate_device_id(device)
            except BedsideError as exc:
                raise ConfigError(f"{self.cfg.devices / (device + '.pub')}: {exc}; remove the "
                                  "file") from None
        return ring

    def _refresh_devices(self) -> None:
        """Reload the enrolled devices when their directory changed (a device enrolled or
        revoked while the service runs): a revoked device's next message is rejected. A
        directory that cannot be read enrolls nobody until it is fixed (fail closed)."""
        seen = mtime(self.cfg.devices)
        if seen == self._devices_seen:
            return
        self._devices_seen = seen
        try:
            self.devices = self._load_devices()
        except BedsideError as exc:
            self.devices = KeyRing()
            log.error("enrolled devices unreadable, every update is rejected until it is "
                      "fixed: %s", exc)
            return
        log.info("enrolled devices reloaded: %d", len(self.devices))

    # -- the round's model -------------------------------------------------------------------------
    def _load_version(self, version: int) -> None:
        self._manifest = self.registry.manifest(version)
        self._shapes = {k: tuple(v) for k, v in self._manifest.parameters.items()}
        self._max_update = max_update_bytes(self._shapes, self.cfg.max_update_bytes)

    def _open_round(self, cur: RoundRow | None) -> OpenRound | None:
        if cur is None or cur.status != "open":
            return None
        assert self._manifest is not None
        return OpenRound(round=cur.round, model_version=cur.model_version,
                         settings=cur.settings, shapes=self._round_shapes(cur.settings),
                         classes=len(self._manifest.schema.labels))

    def _round_shapes(self, settings: RoundSettings) -> dict[str, tuple[int, ...]]:
        """What an update of this round carries: the model's parameters, or in a statistics
        round one vector of feature statistics."""
        if settings.statistics is not None:
            assert self._manifest is not None
            return {"stats": (dimension(self._manifest.schema),)}
        return self._shapes

    def _running_sum(self, cur: RoundRow) -> RunningSum | None:
        """This writer's running sum of the open round's accepted updates, when the rule is
        incremental and the round trains (loaded from the store, or rebuilt from updates stored
        by a version that kept them); None when every update is kept."""
        if not self.rule.incremental or cur.settings.task != "train":
            return None
        if self._running is not None and self._running[0] == cur.round:
            return self._running[1]
        stored = self.rounds.running_sum(cur.round)
        if stored is not None:
            acc = RunningSum.from_bytes(stored, self._shapes)
        else:
            acc = RunningSum(self._shapes)
            if not self.cfg.workers.group:  # with workers each would count them: refused at start
                for tensors, weight in self.rounds.iter_updates(cur.round):
                    acc.add(tensors, weight)
        self._running = (cur.round, acc)
        return acc

    # -- publishing --------------------------------------------------------------------------------
    def _publish(self, topic: str, payload: bytes, retain: bool = False,
                 wait: bool = True) -> None:
        try:
            self.transport.publish(topic, payload, qos=1, retain=retain, wait=wait)
            self._pending.pop(topic, None)
        except TransportError as exc:
            if retain:  # retained state is re-sent when the broker is back
                self._pending[topic] = (payload, retain)
            log.warning("publish to %s deferred: %s", topic, exc)

    def _retry_pending(self) -> None:
        if self._pending and self.transport.connected:
            for topic, (payload, retain) in list(self._pending.items()):
                self._publish(topic, payload, retain)

    def _receipt(self, device: str, round_id: int, nonce: str, status: str,
                 reason: str = "") -> None:
        env = encode(KIND_RECEIPT, AGGREGATOR_ID, self.key, {}, round=round_id,
                     model_version=self._manifest.version if self._manifest else 0,
                     meta={"device": device, "fleet": self.cfg.fleet, "for_nonce": nonce,
                           "status": status, "reason": reason})
        # not waited for one by one: a device without its receipt sends again, and the re-send
        # is recognised (a duplicate, receipted again)
        self._publish(topic_receipt(self.cfg.fleet, device), env, wait=False)

    # -- updates -----------------------------------------------------------------------------------
    def _on_report(self, msg: Message, device: str) -> None:
        """A device's release report (only the coordinating service subscribes to them)."""
        log.warning("a report from %s reached a validator that does not handle reports; "
                    "acknowledged and dropped", device)
        msg.ack()

    def _is_report(self, msg: Message, device: str) -> bool:
        from bedside.constants import topic_report

        return msg.topic == topic_report(self.cfg.fleet, device)

    def drain(self, timeout: float) -> int:
        """Handle every message waiting (the first one waited for up to ``timeout`` s) in groups
        of at most GROUP_MAX; the number handled."""
        n = 0
        msg = self.transport.get(timeout)
        while msg is not None:
            group = [msg]
            while len(group) < GROUP_MAX:
                nxt = self.transport.get(0)
                if nxt is None:
                    break
                group.append(nxt)
            self.handle(group)
            n += len(group)
            msg = self.transport.get(0)
        return n

    def handle(self, msgs: list[Message]) -> None:
        """Judge a group of messages, record every verdict in one transaction, then receipt and
        acknowledge them: a message is acknowledged only once it is durable (a crash before lets
        the broker redeliver it; the redelivery is recognised and not counted twice)."""
        self._refresh_devices()
        segment: list[tuple[Message, str]] = []
        for msg in msgs:
            device = msg.topic.rsplit("/", 1)[-1]
            if self._is_report(msg, device):
                self._record(segment)  # reports write on their own: keep the order
                self._on_report(msg, device)
                continue
            segment.append((msg, device))
        self._record(segment)

    def _follow(self, cur: RoundRow | None) -> None:
        """Before judging against ``cur``: have its model loaded (a worker follows the
        coordinator's rounds; the service loads its versions itself)."""

    def _record(self, segment: list[tuple[Message, str]]) -> None:
        if not segment:
            return
        for attempt in range(1, CONTENDED_ATTEMPTS + 1):
            cur = self.rounds.current_round()
            self._follow(cur)
            judge = _Judge(self, cur)
            for msg, device in segment:
                judge.judge(msg, device)
            try:
                judge.commit()
                break
            except Contended as exc:
                # another writer recorded one of these updates first, or the round closed:
                # nothing was written; judge the group again against what the store now holds
                self._running = None
                log.info("%d message(s) judged again (attempt %d): %s", len(segment), attempt,
                         exc)
                if attempt == CONTENDED_ATTEMPTS:
                    self.monitor.error(f"could not record {len(segment)} message(s): {exc}")
                    raise StateError(f"{len(segment)} message(s) lost {attempt} races to other "
                                     f"writers: {exc}") from None
            except (sqlite3.Error, OSError, StateError) as exc:
                # Our own storage failed: acknowledge nothing, so the broker redelivers the
                # messages once the service is restarted with working storage.
                self._running = None
                self.monitor.error(f"could not record {len(segment)} message(s): {exc}")
                log.exception("could not record %d message(s)", len(segment))
                raise
        for event in judge.events:
            event()
        for msg, _ in segment:
            msg.ack()
        segment.clear()


class _Judge:
    """Verdicts on a group of update messages, gathered for one transaction: what the store
    knows about a message is the database plus the group's own verdicts so far (a re-send inside
    the group is a duplicate, a second update of a device in the group is refused). Receipts and
    metrics wait in ``events`` until the group is durable."""

    def __init__(self, v: Validator, cur: RoundRow | None) -> None:
        self.v, self.cur = v, cur
        self.open = v._open_round(cur)
        self.running = v._running_sum(cur) if self.open is not None and cur else None
        # this group's updates, added to the round's sum only once the group is durable
        self.group = RunningSum(v._shapes) if self.running is not None else None
        self.batch = Batch()
        self.events: list[Callable[[], None]] = []
        self.nonces: dict[tuple[str, str], tuple[int, str]] = {}
        self.contributed: set[str] = set()

    def commit(self) -> None:
        if not len(self.batch):
            return
        merged = None
        if (self.running is not None and self.group is not None and self.group.count
                and self.cur is not None):
            merged = self.running.copy()
            merged.merge(self.group)
            self.batch.sums = (self.cur.round, merged.to_bytes(), merged.count)
        self.v.rounds.commit_batch(self.batch)
        if merged is not None and self.cur is not None:  # durable: the cached sum follows
            self.running = merged
            self.v._running = (self.cur.round, merged)

    def _receipt(self, device: str, round_id: int, nonce: str, status: str,
                 reason: str = "") -> None:
        self.events.append(lambda: self.v._receipt(device, round_id, nonce, status, reason))

    def _reject(self, round_id: int | None, device: str | None, reason: str, detail: str) -> None:
        self.batch.rejections.append((round_id, device, reason, detail))
        self.events.append(lambda: self.v.monitor.rejected(reason, f"from {device}: {detail}"))

    def judge(self, msg: Message, device: str) -> None:
        started = time.perf_counter()
        try:
            self._judge(msg, device)
        finally:
            seconds = time.perf_counter() - started
            self.events.append(lambda: self.v.monitor.judged(seconds))

    def _judge(self, msg: Message, device: str) -> None:
        v, cur = self.v, self.cur
        round_id = cur.round if cur else None
        authentic = False
        nonce = ""
        try:
            shapes = v._round_shapes(cur.settings) if cur is not None else v._shapes
            env = open_update(msg.payload, v.devices, shapes, v._max_update)
            authentic, nonce = True, env.header.nonce
            h = env.header
            stored, in_round = v.rounds.seen(h.sender, h.nonce,
                                             self.open.round if self.open else None)
            seen = self.nonces.get((h.sender, h.nonce)) or stored
            d = env.digest
            if seen is not None and seen[1] != d and seen[1] == digest(msg.payload):
                d = seen[1]  # recorded by an earlier version, as the whole message's sha256
            contributed = self.open is not None and (h.sender in self.contributed or in_round)
            prior = Prior(nonce_round=seen[0] if seen else None,
                          nonce_digest=seen[1] if seen else None, contributed=contributed)
            verdict = validate_update(env, topic_sender=device, fleet=v.cfg.fleet,
                                      digest=d, current=self.open, prior=prior)
            assert round_id is not None  # validate_update refuses a message without an open round
            self._record(verdict, round_id)
        except WireError as exc:
            log.warning("round %s: rejected message on %s: %s (%s)", round_id, msg.topic,
                        exc.reason, exc)
            self._reject(round_id, device, exc.reason, str(exc))
            if authentic and round_id is not None:
                self._receipt(device, round_id, nonce, "rejected", f"{exc.reason}: {exc}")
        except StateError:
            raise  # our own storage: nothing of the group is acknowledged
        except BedsideError as exc:  # anything else we raise on bad input: never crash the loop
            log.warning("round %s: rejected message on %s: %s", round_id, msg.topic, exc)
            self._reject(round_id, device, "invalid", str(exc))
        except (sqlite3.Error, OSError):
            raise  # our own storage: nothing of the group is acknowledged
        except Exception as exc:  # a message must never stop the service (or be redelivered
            # forever): reject it, keep the traceback in the log, acknowledge it.
            log.exception("round %s: internal error on a message from %s; rejected", round_id,
                          device)
            self._reject(round_id, device, "internal_error", f"{type(exc).__name__}: {exc}")

    def _record(self, verdict: Accepted | Declined | Duplicate, round_id: int) -> None:
        monitor = self.v.monitor
        if isinstance(verdict, Duplicate):
            # The same message again in the same round: a device's re-send (its receipt was
            # lost), a redelivery, or a verbatim replay. Harmless and not counted again.
            log.info("round %d: duplicate of %s's accepted update (re-send or replay); not "
                     "counted again", round_id, verdict.sender)
            self._reject(round_id, verdict.sender, "duplicate",
                         f"nonce {verdict.nonce[:12]}... already accepted")
            self._receipt(verdict.sender, round_id, verdict.nonce, "accepted",
                          "duplicate delivery")
        elif isinstance(verdict, Declined):
            log.info("round %d: %s declined (%s)", round_id, verdict.sender, verdict.reason)
            self.batch.declines.append((round_id, verdict.sender, verdict.reason))
            reason = verdict.reason
            self.events.append(lambda: monitor.declined(reason))
            self._receipt(verdict.sender, round_id, verdict.nonce, "declined", verdict.reason)
        else:
            tensors: dict[str, np.ndarray] | None = verdict.tensors
            if self.group is not None:
                self.group.add(verdict.tensors, verdict.weight)
                tensors = None  # folded into the round's running sum
            self.batch.updates.append(UpdateRow(
                round_id, verdict.sender, verdict.nonce, verdict.digest, verdict.weight,
                verdict.norm, verdict.info, tensors))
            self.nonces[(verdict.sender, verdict.nonce)] = (round_id, verdict.digest)
            self.contributed.add(verdict.sender)
            self.events.append(monitor.accepted)
            log.info("round %d: accepted update from %s (norm %.3f)", round_id, verdict.sender,
                     verdict.norm)
            self._receipt(verdict.sender, round_id, verdict.nonce, "accepted")


def mtime(path: Any) -> int | None:
    try:
        return int(os.stat(path).st_mtime_ns)
    except OSError:
        return None
