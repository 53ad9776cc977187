"""A validator worker: one of N processes that judge a fleet's updates for the coordinator.

With ``[workers] group`` set, the service (``bedside aggregator serve``) only coordinates: it
opens rounds, closes them from the workers' partial sums and releases versions. The updates go
to the workers (``bedside aggregator worker --id ID``), each a persistent MQTT session with a
fixed client id (``aggregator-worker-<id>``) on the shared subscription
``$share/<group>/bedside/<fleet>/update/+``: Mosquitto gives each update to one of them. A
worker judges them exactly as the single-process service does (:class:`~bedside.aggregator.
validator.Validator`) and records them in PostgreSQL with its own partial running sum, then
receipts and acknowledges them.

Why nothing is lost or counted twice:

* a message is acknowledged only after its group's transaction committed; a worker killed
  before that leaves it unacknowledged in its persistent session, and the broker redelivers it
  when the worker (same id) comes back;
* the update's row and its share of the partial sum commit together, and ``updates`` is unique
  on (round, sender) and (sender, round, nonce): a redelivered or re-sent update that another
  worker recorded first rolls the group back and is judged again, as a duplicate;
* the coordinator marks a round ``closing`` before it reads the sums; a worker's transaction
  into a closing round fails and its messages are judged again, as late.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from bedside.aggregator.config import AggregatorConfig, worker_identity
from bedside.aggregator.keys import check_current
from bedside.aggregator.state import RoundRow
from bedside.aggregator.validator import Validator
from bedside.constants import topic_updates_all
from bedside.errors import BedsideError, ConfigError, StateError
from bedside.federation.strategies import make_rule
from bedside.models.registry import Registry
from bedside.monitoring import AggregatorMetrics, MonitorConfig, MonitorServer
from bedside.transport import Transport
from bedside.wire.signing import SigningKey

log = logging.getLogger("bedside.aggregator.worker")

#: How often a worker records that it is alive (``workers.seen_at``) and logs its counts.
HEARTBEAT_S = 10.0


class Counts:
    """A worker's own tally of what it judged (logged with every heartbeat) and, with a metrics
    port, the same Prometheus counters the single-process service exports (each worker's
    endpoint is scraped on its own; the coordinator's status page reads the shared database)."""

    def __init__(self, metrics: AggregatorMetrics | None = None) -> None:
        self.counts: Counter[str] = Counter()
        self.metrics = metrics
        self.last_error: str | None = None

    def judged(self, seconds: float) -> None:
        self.counts["judged"] += 1
        if self.metrics is not None:
            self.metrics.received.inc()
            self.metrics.validation.observe(seconds)

    def accepted(self) -> None:
        self.counts["accepted"] += 1
        if self.metrics is not None:
            self.metrics.accepted.inc()

    def declined(self, reason: str) -> None:
        self.counts["declined"] += 1
        if self.metrics is not None:
            from bedside.aggregator.monitor import DECLINE_REASONS

            self.metrics.declined.labels(reason if reason in DECLINE_REASONS else "other").inc()

    def rejected(self, reason: str, detail: str) -> None:
        self.counts[f"rejected:{reason}"] += 1
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()

    def error(self, text: str) -> None:
        self.last_error = text


def shared_topic(cfg: AggregatorConfig) -> str:
    return f"$share/{cfg.workers.group}/{topic_updates_all(cfg.fleet)}"


class Worker(Validator):
    def __init__(self, cfg: AggregatorConfig, worker_id: str, transport: Transport | None = None,
                 *, cert_file: Path | None = None, key_file: Path | None = None,
                 monitor_port: int = 0) -> None:
        if not cfg.workers.group:
            raise ConfigError(f"{cfg.source}: [workers] group is not set: this federation has "
                              "no validator workers (the service judges updates itself)")
        if worker_id not in cfg.workers.ids:
            raise ConfigError(f"{cfg.source}: worker id {worker_id!r} is not in [workers] ids "
                              f"({', '.join(cfg.workers.ids)}); add it (and regenerate the "
                              "broker's ACL) or use one of those")
        key = SigningKey.load(cfg.key)
        check_current(cfg, key)
        from bedside.aggregator.pgstate import PgRounds

        rounds = PgRounds(cfg.state.dsn, cfg.fleet, writer=worker_id)
        try:
            rounds.claim(socket.gethostname(), os.getpid())
        except BaseException:
            rounds.close()
            raise
        self.pg = rounds
        self.worker_id = worker_id
        self.identity = worker_identity(worker_id)
        if transport is None:
            from bedside.transport.mqtt import MqttTransport

            mqtt = cfg.mqtt
            if cert_file is not None or key_file is not None:
                if cert_file is None or key_file is None:
                    raise ConfigError("--cert and --key go together (the worker's broker "
                                      f"certificate, CN {self.identity})")
                mqtt = replace(mqtt, cert_file=cert_file, key_file=key_file)
            transport = MqttTransport(mqtt, client_id=self.identity, clean_session=False,
                                      manual_ack=True)
        self.counts = Counts(AggregatorMetrics() if monitor_port else None)
        self.server: MonitorServer | None = None
        self._monitor = MonitorConfig(port=monitor_port, host=cfg.monitor.host)
        super().__init__(cfg, key, rounds, Registry(cfg.registry_path),
                         make_rule(cfg.strategy.rule, **cfg.strategy.params), transport,
                         self.counts)
        self._beat = 0.0

    def start(self) -> None:
        if self.counts.metrics is not None and self.server is None:
            self.server = MonitorServer(self._monitor, self.counts.metrics.registry,
                                        f"worker {self.worker_id}")
        topic = shared_topic(self.cfg)
        self.transport.subscribe(topic, qos=1)
        # only once the broker has acknowledged it does this worker get its share of the updates
        if not self.transport.wait_subscribed(topic):
            log.warning("worker %s: the broker has not confirmed the subscription to %s yet; "
                        "this worker gets its share of the updates once it does",
                        self.worker_id, topic)
        log.info("worker %s: validating updates of fleet %s from %s", self.worker_id,
                 self.cfg.fleet, topic)

    def _follow(self, cur: RoundRow | None) -> None:
        if cur is None or (self._manifest is not None
                           and cur.model_version == self._manifest.version):
            return
        try:
            self._load_version(cur.model_version)
        except (BedsideError, OSError) as exc:
            # judging without the round's model is impossible: stop with every message
            # unacknowledged (the broker redelivers them to the restarted worker)
            raise StateError(f"round {cur.round} trains model v{cur.model_version}, which this "
                             f"worker cannot read from {self.registry.root} ({exc}): workers "
                             "need the coordinator's data directory (a shared volume)") from None

    def step(self, timeout: float = 0.5) -> int:
        """Follow the coordinator's round (its model's shapes), judge what arrived; the number of
        messages handled."""
        self._follow(self.rounds.current_round())
        n = self.drain(timeout)
        self._retry_pending()
        m = self.counts.metrics
        if m is not None:
            m.connected.set(1 if self.transport.connected else 0)
            depth = getattr(self.transport, "queue_depth", None)
            if depth is not None:
                m.queue.set(depth)
        now = time.monotonic()
        if now - self._beat >= HEARTBEAT_S:
            self._beat = now
            self.pg.heartbeat()
            if self.counts.counts:
                log.info("worker %s: %s", self.worker_id,
                         ", ".join(f"{k} {v}" for k, v in sorted(self.counts.counts.items())))
        return n

    def run(self, stop: threading.Event | None = None, poll: float = 0.5) -> None:
        self.start()
        stop = stop or threading.Event()
        while not stop.is_set():
            self.step(poll)
        log.info("worker %s stopped", self.worker_id)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        self.rounds.close()
