"""The aggregator service: rounds, validation, aggregation, new model versions.

:class:`Aggregator` is the front door. One thread runs the loop (``run`` or repeated ``step``);
the transport's network thread only enqueues messages. A round goes:

1. **announce** (signed, retained): round id, model version and sha256, clip norm, noise mode and
   multiplier, participation rate, local training settings, deadline, minimum participants;
2. **collect** until every expected device has answered (an update or a decline) or the deadline;
   each update is validated, in this order: topic matches the signed sender; size; envelope and
   signature of an enrolled device; kind; round and model version; one update per device per
   round and no replayed nonce; tensor names, dtypes and shapes; finite values; L2 norm within
   the clip bound (central mode; in local mode within the bound plus a 1e-9 tail bound of the
   noise); weight. Accepted updates are recorded durably, then acknowledged (MQTT manual ack),
   then receipted to the device. A rejection is logged with its reason, counted, acknowledged,
   and receipted when the sender is authentic. Nothing a device sends can stop a round;
3. **aggregate** with the configured rule, add central noise ``N(0, (z C / n)^2)`` to the mean
   (the sum's noise ``N(0, (z C)^2)`` divided by the n contributors), apply the server optimizer,
   write the new weights into the previous ONNX file (no torch), evaluate on the reference set,
   store version N+1 in the registry with its manifest, sign and publish it (retained).

Killed at any point and restarted, it resumes the open round from its database: accepted updates
are neither lost nor counted twice (see :mod:`bedside.aggregator.state`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bedside.aggregator.config import AggregatorConfig
from bedside.aggregator.state import State
from bedside.aggregator.strategies import make_optimizer, make_rule
from bedside.constants import (
    AGGREGATOR_ID,
    KIND_ANNOUNCE,
    KIND_MODEL,
    KIND_RECEIPT,
    KIND_UPDATE,
    NOISE_CENTRAL,
    NOISE_LOCAL,
    topic_model,
    topic_receipt,
    topic_round,
    topic_status,
    topic_updates_all,
)
from bedside.errors import BedsideError, ConfigError, TransportError, ValidationError, WireError
from bedside.manifest import Manifest, load_manifest, verify_model_file
from bedside.models.onnx_weights import read_weights, replace_weights
from bedside.models.registry import Registry
from bedside.privacy.mechanisms import add_gaussian_noise, clip_update, l2_norm, secure_rng
from bedside.rounds import bounded_number
from bedside.transport import Message, Transport
from bedside.wire.envelope import decode, encode, peek
from bedside.wire.signing import KeyRing, SigningKey

log = logging.getLogger("bedside.aggregator")

MAX_WEIGHT = float(2**20)
NOISE_TAIL = math.sqrt(2.0 * math.log(1e9))  # P(||N(0, s^2 I_d)|| > s (sqrt d + t)) <= 1e-9


class Aggregator:
    def __init__(self, cfg: AggregatorConfig, transport: Transport | None = None, *,
                 clock: Callable[[], float] = time.time,
                 rng: np.random.Generator | None = None) -> None:
        self.cfg = cfg
        self.key = SigningKey.load(cfg.key)
        self.state = State(cfg.state_path)
        self.registry = Registry(cfg.registry_path)
        self.rule = make_rule(cfg.strategy.rule, **cfg.strategy.params)
        self.optimizer = make_optimizer(cfg.strategy.optimizer, **cfg.strategy.optimizer_params)
        self.clock = clock
        if rng is None and cfg.privacy.noise_seed is not None:
            log.warning("central noise is seeded (privacy.noise_seed): reproducible, for tests and "
                        "demos only; never set it in production")
            rng = np.random.default_rng(cfg.privacy.noise_seed)
        self.rng = rng if rng is not None else secure_rng()
        self.devices = self._load_devices()
        if transport is None:
            from bedside.transport.mqtt import MqttTransport

            transport = MqttTransport(cfg.mqtt, client_id=f"aggregator-{cfg.fleet}",
                                      clean_session=False, manual_ack=True)
        self.transport = transport
        self.finished = False
        self._pending: dict[str, tuple[bytes, bool]] = {}
        self._evaluator: Any = None
        self._manifest: Manifest | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._max_update = cfg.max_update_bytes
        self.on_round_closed: Callable[[dict[str, Any]], None] | None = None

    # -- set-up ----------------------------------------------------------------------------------
    def _load_devices(self) -> KeyRing:
        if not self.cfg.devices.is_dir():
            raise ConfigError(f"{self.cfg.source}: devices directory {self.cfg.devices} does not "
                              "exist; enroll devices with 'bedside aggregator enroll'")
        return KeyRing.from_dir(self.cfg.devices)

    def _bootstrap_model(self) -> None:
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
        latest = self.registry.latest()
        assert latest is not None
        self._load_version(latest)
        if self.registry.release(latest) is None:
            self.registry.put_release(latest, self._release(latest, round_id=0))
        if self.cfg.eval_data is not None and self._evaluator is None:
            from bedside.aggregator.evaluate import Evaluator

            assert self.cfg.eval_label is not None and self._manifest is not None
            self._evaluator = Evaluator(self.cfg.eval_data, self.cfg.eval_label, self._manifest)

    def _load_version(self, version: int) -> None:
        self._manifest = self.registry.manifest(version)
        self._shapes = {k: tuple(v) for k, v in self._manifest.parameters.items()}
        # An update is the parameters in float32 plus a header: refuse anything much larger
        # before parsing it (the configured limit is an upper cap).
        expected = 4 * sum(int(np.prod(s)) for s in self._shapes.values())
        self._max_update = min(self.cfg.max_update_bytes, 2 * expected + 256 * 1024)

    def _release(self, version: int, round_id: int) -> bytes:
        data = self.registry.model_bytes(version)
        m = self.registry.manifest(version)
        return encode(KIND_MODEL, AGGREGATOR_ID, self.key,
                      {"onnx": np.frombuffer(data, dtype=np.uint8)}, round=round_id,
                      model_version=version, meta={"fleet": self.cfg.fleet,
                                                   "manifest": m.to_dict()})

    def start(self) -> None:
        self._bootstrap_model()
        self.transport.subscribe(topic_updates_all(self.cfg.fleet), qos=1)
        latest = self.registry.latest()
        assert latest is not None
        release = self.registry.release(latest)
        assert release is not None
        self._publish(topic_model(self.cfg.fleet), release, retain=True)
        cur = self.state.current_round()
        if cur is not None and cur.status == "open":
            self._recover(cur)
        else:
            self._open_next()

    def _recover(self, cur: Any) -> None:
        """Resume an open round after a restart (or finish one whose model was already stored)."""
        latest = self.registry.latest()
        assert latest is not None
        done = self.registry.manifest(latest)
        if done.training.get("round") == cur.round and latest > cur.model_version:
            log.info("round %d: its model v%d was stored before the restart; closing it", cur.round,
                     latest)
            self._finish_round(cur.round, "closed", done.training.get("result", {}), latest)
            self._open_next()
            return
        accepted = len(self.state.accepted(cur.round))
        log.info("resuming open round %d (model v%d): %d update(s) already accepted, deadline in "
                 "%.0f s", cur.round, cur.model_version, accepted, cur.deadline - self.clock())
        self._publish(topic_round(self.cfg.fleet), cur.announce, retain=True)

    # -- loop --------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, poll: float = 0.2) -> None:
        self.start()
        stop = stop or threading.Event()
        while not stop.is_set() and self.step(poll):
            pass
        log.info("aggregator stopped%s", " (all planned rounds done)" if self.finished else "")

    def step(self, timeout: float = 0.2) -> bool:
        """Handle what arrived, close the round if due; False once all rounds are done."""
        msg = self.transport.get(timeout)
        while msg is not None:
            self._handle(msg)
            msg = self.transport.get(0)
        self._retry_pending()
        cur = self.state.current_round()
        if not self.finished and cur is not None and cur.status == "open" and self._due(cur):
            self._close(cur)
            self._open_next()
        return not self.finished

    def _due(self, cur: Any) -> bool:
        if self.clock() >= cur.deadline:
            return True
        expected = self.cfg.rounds.expected_participants or len(self.devices)
        return len(self.state.answered(cur.round)) >= expected

    # -- publishing --------------------------------------------------------------------------------
    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        try:
            self.transport.publish(topic, payload, qos=1, retain=retain)
            self._pending.pop(topic, None)
        except TransportError as exc:
            if retain:  # retained state is re-sent when the broker is back
                self._pending[topic] = (payload, retain)
            log.warning("publish to %s deferred: %s", topic, exc)

    def _retry_pending(self) -> None:
        if self._pending and self.transport.connected:
            for topic, (payload, retain) in list(self._pending.items()):
                self._publish(topic, payload, retain)

    def _status(self, body: dict[str, Any]) -> None:
        self._publish(topic_status(self.cfg.fleet, AGGREGATOR_ID),
                      json.dumps(body, default=float).encode(), retain=True)

    def _receipt(self, device: str, round_id: int, nonce: str, status: str,
                 reason: str = "") -> None:
        env = encode(KIND_RECEIPT, AGGREGATOR_ID, self.key, {}, round=round_id,
                     model_version=self._manifest.version if self._manifest else 0,
                     meta={"device": device, "fleet": self.cfg.fleet, "for_nonce": nonce,
                           "status": status, "reason": reason})
        self._publish(topic_receipt(self.cfg.fleet, device), env)

    # -- updates -----------------------------------------------------------------------------------
    def _handle(self, msg: Message) -> None:
        device = msg.topic.rsplit("/", 1)[-1]
        cur = self.state.current_round()
        round_id = cur.round if cur else None
        authentic = False
        nonce = ""
        try:
            if len(msg.payload) > self._max_update:
                raise ValidationError("too_large", f"{len(msg.payload)} bytes > limit "
                                      f"{self._max_update} for this model")
            declared = peek(msg.payload, max_bytes=self._max_update)  # untrusted: routing only
            expected = {} if not declared.tensors else {
                k: ("float32", s) for k, s in self._shapes.items()}
            env = decode(msg.payload, self.devices, kinds={KIND_UPDATE}, expected=expected,
                         max_bytes=self._max_update)
            authentic, nonce = True, env.header.nonce
            if env.header.sender != device:
                raise ValidationError("topic_mismatch", f"signed by {env.header.sender!r} but "
                                      f"published on {device!r}'s topic")
            self._accept(cur, env, msg.payload)
        except WireError as exc:
            log.warning("round %s: rejected message on %s: %s (%s)", round_id, msg.topic,
                        exc.reason, exc)
            self.state.add_rejection(round_id, device, exc.reason, str(exc))
            if authentic and round_id is not None:
                self._receipt(device, round_id, nonce, "rejected", f"{exc.reason}: {exc}")
        except BedsideError as exc:  # anything else we raise on bad input: never crash the loop
            log.warning("round %s: rejected message on %s: %s", round_id, msg.topic, exc)
            self.state.add_rejection(round_id, device, "invalid", str(exc))
        except (sqlite3.Error, OSError):
            # Our own storage failed: do not acknowledge, so the broker redelivers the message
            # once the service is restarted with working storage.
            log.exception("round %s: could not record the message on %s", round_id, msg.topic)
            raise
        except Exception as exc:  # a message must never stop the service (or be redelivered
            # forever): reject it, keep the traceback in the log, acknowledge it.
            log.exception("round %s: internal error on a message from %s; rejected", round_id,
                          device)
            self.state.add_rejection(round_id, device, "internal_error",
                                     f"{type(exc).__name__}: {exc}")
        msg.ack()

    def _accept(self, cur: Any, env: Any, payload: bytes) -> None:
        h = env.header
        digest = hashlib.sha256(payload).hexdigest()
        seen = self.state.nonce_seen(h.sender, h.nonce)
        if seen is not None:
            first_round, first_digest = seen
            if first_digest == digest and cur is not None and first_round == cur.round:
                # The same message again in the same round: a device's re-send (its receipt was
                # lost) or a verbatim replay. Either way it is harmless and not counted again.
                log.info("round %d: duplicate of %s's accepted update (re-send or replay); not "
                         "counted again", cur.round, h.sender)
                self.state.add_rejection(cur.round, h.sender, "duplicate",
                                         f"nonce {h.nonce[:12]}... already accepted")
                self._receipt(h.sender, h.round, h.nonce, "accepted", "duplicate delivery")
                return
            raise ValidationError("replay", f"nonce {h.nonce[:12]}... from {h.sender} was already "
                                  f"used in round {first_round}; not counted again")
        if cur is None or cur.status != "open":
            raise ValidationError("no_open_round", "no round is open")
        if h.round != cur.round:
            raise ValidationError("wrong_round", f"update is for round {h.round}; the open round "
                                  f"is {cur.round} (stale or early)")
        if h.meta.get("fleet") != self.cfg.fleet:
            raise ValidationError("wrong_fleet", f"update is for fleet {h.meta.get('fleet')!r}, "
                                  f"this aggregator serves {self.cfg.fleet!r}")
        if h.model_version != cur.model_version:
            raise ValidationError("wrong_model_version", f"update is based on model v"
                                  f"{h.model_version}; round {cur.round} trains v"
                                  f"{cur.model_version}")
        prior = self.state.find_update(cur.round, h.sender)
        if prior is not None:
            raise ValidationError("already_contributed", f"{h.sender} already has an accepted "
                                  f"update in round {cur.round}")
        meta = h.meta
        if not env.tensors:
            reason = meta.get("decline")
            if not isinstance(reason, str) or not reason:
                raise ValidationError("empty_update", "an update without tensors must carry a "
                                      "'decline' reason")
            if self.state.add_decline(cur.round, h.sender, reason[:64]):
                log.info("round %d: %s declined (%s)", cur.round, h.sender, reason[:64])
            self._receipt(h.sender, h.round, h.nonce, "declined", reason[:64])
            return
        weight = 1.0
        if self.cfg.privacy.weighting == "examples":
            w = bounded_number(meta.get("weight"), 1.0, MAX_WEIGHT)
            if w is None:
                raise ValidationError("bad_weight", f"weight must be a number in [1, "
                                      f"{MAX_WEIGHT:g}]")
            weight = w
        tensors = {k: np.asarray(v, dtype=np.float32) for k, v in env.tensors.items()}
        norm = l2_norm(list(tensors.values()))
        bound = self._norm_bound(cur)
        if norm > bound:
            raise ValidationError("norm_bound", f"update L2 norm {norm:.4g} exceeds the bound "
                                  f"{bound:.4g} for clip norm {cur.settings['clip_norm']:g}")
        if cur.settings["noise"] != NOISE_LOCAL:
            # accepted within float tolerance of C; clip exactly so the accounted bound holds
            names = list(tensors)
            clipped, _ = clip_update([tensors[k] for k in names], float(cur.settings["clip_norm"]))
            tensors = dict(zip(names, clipped, strict=True))
        self.state.add_update(cur.round, h.sender, h.nonce, digest, weight, norm, tensors,
                              _reported_privacy(meta))
        log.info("round %d: accepted update from %s (norm %.3f)", cur.round, h.sender, norm)
        self._receipt(h.sender, h.round, h.nonce, "accepted")

    def _norm_bound(self, cur: Any) -> float:
        c = float(cur.settings["clip_norm"])
        if cur.settings["noise"] == NOISE_LOCAL:
            d = sum(int(np.prod(s)) for s in self._shapes.values())
            return c + float(cur.settings["noise_multiplier"]) * c * (math.sqrt(d) + NOISE_TAIL)
        return c * (1.0 + 1e-5)

    # -- rounds ------------------------------------------------------------------------------------
    def _settings(self, round_id: int) -> dict[str, Any]:
        p, r = self.cfg.privacy, self.cfg.rounds
        return {"fleet": self.cfg.fleet, "state": "open", "clip_norm": p.clip_norm,
                "noise": p.noise, "noise_multiplier": p.noise_multiplier, "delta": p.delta,
                "participation_rate": r.participation_rate, "planned_rounds": r.rounds,
                "min_participants": r.min_participants, "weighting": p.weighting,
                "train": self.cfg.training.for_round(round_id)}

    def _open_next(self) -> None:
        rows = self.state.rounds()
        if self.cfg.rounds.rounds and len(rows) >= self.cfg.rounds.rounds:
            self._finish_federation(rows[-1].round if rows else 0)
            return
        self.devices = self._load_devices()  # devices enrolled since the last round join now
        latest = self.registry.latest()
        assert latest is not None and self._manifest is not None
        round_id = (rows[-1].round if rows else 0) + 1
        settings = self._settings(round_id)
        deadline = self.clock() + self.cfg.rounds.deadline_seconds
        settings["deadline"] = deadline
        settings["model_sha256"] = self._manifest.sha256
        announce = encode(KIND_ANNOUNCE, AGGREGATOR_ID, self.key, {}, round=round_id,
                          model_version=latest, meta=settings)
        self.state.open_round(round_id, latest, deadline, announce, settings)
        self._publish(topic_round(self.cfg.fleet), announce, retain=True)
        log.info("round %d open: model v%d, %d enrolled device(s), deadline %.0f s", round_id,
                 latest, len(self.devices), self.cfg.rounds.deadline_seconds)

    def _finish_federation(self, last_round: int) -> None:
        latest = self.registry.latest() or 0
        done = encode(KIND_ANNOUNCE, AGGREGATOR_ID, self.key, {}, round=last_round,
                      model_version=latest, meta={"fleet": self.cfg.fleet, "state": "done"})
        self._publish(topic_round(self.cfg.fleet), done, retain=True)
        self._status({"state": "done", "round": last_round, "model_version": latest,
                      "privacy": self.privacy_report(), "time": self.clock()})
        self.finished = True
        log.info("federation done after %d round(s): final model v%d", last_round, latest)

    def _close(self, cur: Any) -> None:
        started = cur.opened_at
        accepted = self.state.accepted(cur.round)
        rejected = self.state.rejections(cur.round)
        duplicates = rejected.pop("duplicate", 0)  # re-sends: not rejections, not counted twice
        declined = self.state.declines(cur.round)
        result: dict[str, Any] = {
            "round": cur.round, "base_version": cur.model_version,
            "participants": len(self.state.answered(cur.round)), "accepted": len(accepted),
            "rejected": rejected, "duplicates": duplicates, "declined": declined,
            "record_epsilon": self._record_epsilon(cur.round),
        }
        if len(accepted) < self.cfg.rounds.min_participants:
            result["reason"] = (f"{len(accepted)} accepted update(s) < min_participants "
                                f"{self.cfg.rounds.min_participants}")
            result["round_seconds"] = round(self.clock() - started, 3)
            log.warning("round %d failed: %s; the model stays at v%d", cur.round, result["reason"],
                        cur.model_version)
            self._finish_round(cur.round, "failed", result, None)
            return
        version = self._aggregate(cur, accepted, result)
        result["round_seconds"] = round(self.clock() - started, 3)
        self._finish_round(cur.round, "closed", result, version)

    def _aggregate(self, cur: Any, accepted: list[dict[str, Any]],
                   result: dict[str, Any]) -> int:
        assert self._manifest is not None
        prev = self.registry.manifest(cur.model_version)
        prev_bytes = self.registry.model_bytes(cur.model_version)
        delta = self.rule.aggregate(lambda: self.state.iter_updates(cur.round), self._shapes)
        n = len(accepted)
        if cur.settings["noise"] == NOISE_CENTRAL:
            names = list(delta)
            # N(0, (z C)^2) on the sum of clipped updates == N(0, (z C / n)^2) on their mean.
            noised = add_gaussian_noise([delta[k] for k in names],
                                        float(cur.settings["noise_multiplier"]),
                                        float(cur.settings["clip_norm"]) / n, self.rng)
            delta = dict(zip(names, noised, strict=True))
        weights = read_weights(prev_bytes, list(self._shapes))
        new_w, opt_state = self.optimizer.step(weights, delta, self.state.load_server_state())
        new_bytes = replace_weights(prev_bytes, new_w)
        version = (self.registry.latest() or 0) + 1
        m = copy.deepcopy(prev)
        m.version, m.parent_version, m.created_at = version, prev.version, self.clock()
        m.parity = {"note": "weights written by the aggregator into the ONNX graph of version "
                    f"{prev.version}; the graph's parity with torch was checked at export"}
        m.extra.pop("quantization", None)
        m.files = {}
        result["delta_norm"] = round(l2_norm(list(delta.values())), 6)
        m.metrics = {"holdout": self._evaluator(new_bytes, m)} if self._evaluator else {}
        result["metrics"] = m.metrics.get("holdout", {})
        m.privacy = self.privacy_report(closing=cur)
        result["privacy"] = m.privacy
        m.training = {"round": cur.round, "contributors": n, "rule": self.rule.name,
                      "optimizer": self.optimizer.name, "result": result,
                      "federation": {k: v for k, v in cur.settings.items() if k != "deadline"}}
        self.registry.add(new_bytes, m)
        self.registry.put_release(version, self._release(version, cur.round))
        self.state.save_server_state(opt_state)
        self._load_version(version)
        acc = result["metrics"].get("accuracy")
        log.info("round %d closed: %d update(s) -> model v%d%s", cur.round, n, version,
                 f", holdout accuracy {acc:.4f}" if acc is not None else "")
        return version

    def _finish_round(self, round_id: int, status: str, result: dict[str, Any],
                      version: int | None) -> None:
        self.state.finish_round(round_id, status, result)
        if version is not None:
            release = self.registry.release(version)
            assert release is not None
            self._publish(topic_model(self.cfg.fleet), release, retain=True)
        body = {"state": "round_closed", "status": status, "model_version":
                self.registry.latest(), "time": self.clock(), **result}
        self._status(body)
        if self.on_round_closed is not None:
            self.on_round_closed(body)

    # -- privacy -----------------------------------------------------------------------------------
    def _record_epsilon(self, round_id: int) -> dict[str, Any]:
        """Record-level epsilon the round's contributors reported (each device accounts its own
        with its ledger; the aggregator only relays the figures, it cannot verify them)."""
        values = [u["info"]["record_epsilon"] for u in self.state.accepted(round_id)
                  if "record_epsilon" in u["info"]]
        if not values:
            return {}
        return {"max": max(values), "min": min(values), "devices": len(values),
                "delta": self.state.accepted(round_id)[0]["info"].get("record_delta")}

    def privacy_report(self, closing: Any | None = None) -> dict[str, Any]:
        """Device-level guarantee of everything released so far, from the accountant.

        Each round is accounted with the settings it ran under. Membership is public in Bedside
        (the aggregator publishes how many devices contributed, and devices that do not take part
        send a signed decline), so the honest adjacency is *replace one device's data*: a clipped
        update can move by 2C, the L2 sensitivity of the sum is 2C and a round is a Gaussian
        mechanism with noise multiplier z / 2. No amplification by sampling is claimed. Central
        mode counts the rounds that released a model; local mode every round in which the
        (untrusted) aggregator received updates. ``closing`` is the round being closed.
        """
        from collections import Counter

        from bedside.privacy import accountant as acct

        counted: list[dict[str, Any]] = []
        for r in self.state.rounds():
            if closing is not None and r.round == closing.round:
                continue
            local = r.settings["noise"] == NOISE_LOCAL
            if (local and self.state.accepted(r.round)) or (not local and r.status == "closed"):
                counted.append(r.settings)
        if closing is not None:
            counted.append(closing.settings)
        p = self.cfg.privacy
        out: dict[str, Any] = {"unit": "device", "noise": p.noise, "rounds": len(counted),
                               "delta": p.delta, "noise_multiplier": p.noise_multiplier,
                               "clip_norm": p.clip_norm,
                               "adjacency": "replace one device's data (membership is public)"}
        if any(s["noise"] == "none" or float(s["noise_multiplier"]) <= 0 for s in counted):
            # null, not infinity: the report travels in signed JSON, which carries finite numbers
            out["epsilon"] = None
            out["note"] = "a round without device-level noise: no device-level guarantee"
            return out
        by_z = Counter(float(s["noise_multiplier"]) for s in counted)
        event = acct.compose([acct.gaussian(z / 2.0, k) for z, k in sorted(by_z.items())])
        out["epsilon"] = acct.epsilon(event, p.delta) if counted else 0.0
        out["trust"] = ("assumes the aggregator adds the announced noise (central DP)"
                        if p.noise == NOISE_CENTRAL else
                        "holds against the aggregator (local DP); bound for a device in every "
                        "round")
        return out


def _reported_privacy(meta: dict[str, Any]) -> dict[str, Any]:
    """The record-level epsilon a device reports with its update, if well-formed."""
    out: dict[str, Any] = {}
    eps = bounded_number(meta.get("record_epsilon"), 0.0, 1e6)
    if eps is not None:
        out["record_epsilon"] = round(eps, 4)
        delta = bounded_number(meta.get("record_delta"), 1e-300, 0.5)
        if delta is not None:
            out["record_delta"] = delta
    return out
