"""An in-memory broker and transport for unit tests (the way Flower tests on an in-memory grid).

It keeps the MQTT semantics the agent and aggregator rely on: retained messages, QoS 1 delivery
with manual acknowledgement (an unacknowledged message is redelivered when the session comes back),
persistent sessions that queue messages while a client is offline (as Mosquitto does), and a
switch to take the broker "down" to test outboxes.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from bedside.errors import TransportError
from bedside.transport import Message, topic_matches


@dataclass
class _Session:
    filters: set[str] = field(default_factory=set)
    offline: list[tuple[str, bytes, bool]] = field(default_factory=list)
    unacked: dict[int, tuple[str, bytes, bool]] = field(default_factory=dict)
    client: MemoryTransport | None = None


class MemoryBroker:
    def __init__(self, *, keep_published: bool = True) -> None:
        """``keep_published``: record every publish in :attr:`published` (tests inspect it;
        long runs such as benchmarks turn it off so memory does not grow with traffic)."""
        self._lock = threading.RLock()
        self.keep_published = keep_published
        self._retained: dict[str, bytes] = {}
        self._sessions: dict[str, _Session] = {}
        self._mid = 0
        self.up = True
        self.published: list[tuple[str, bytes]] = []  # every accepted publish, for assertions

    def connect(self, client_id: str, client: MemoryTransport, clean: bool) -> None:
        with self._lock:
            if not self.up:
                raise TransportError("memory broker is down")
            if clean or client_id not in self._sessions:
                self._sessions[client_id] = _Session()
            s = self._sessions[client_id]
            s.client = client
            pending = list(s.unacked.values()) + s.offline
            s.unacked.clear()
            s.offline.clear()
        for topic, payload, retain in pending:
            self._deliver(client_id, topic, payload, retain)

    def disconnect(self, client_id: str, clean: bool) -> None:
        with self._lock:
            s = self._sessions.get(client_id)
            if s is None:
                return
            s.client = None
            if clean:
                del self._sessions[client_id]

    def subscribe(self, client_id: str, topic_filter: str) -> None:
        with self._lock:
            self._sessions[client_id].filters.add(topic_filter)
            retained = [(t, p) for t, p in self._retained.items() if topic_matches(topic_filter, t)]
        for t, p in retained:
            self._deliver(client_id, t, p, True)

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            if not self.up:
                raise TransportError("memory broker is down")
            if self.keep_published:
                self.published.append((topic, payload))
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            targets = [cid for cid, s in self._sessions.items()
                       if any(topic_matches(f, topic) for f in s.filters)]
        for cid in targets:
            self._deliver(cid, topic, payload, False)

    def _deliver(self, client_id: str, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            s = self._sessions.get(client_id)
            if s is None:
                return
            if s.client is None:
                s.offline.append((topic, payload, retain))
                return
            self._mid += 1
            mid = self._mid
            s.unacked[mid] = (topic, payload, retain)
            client = s.client

        def ack() -> None:
            with self._lock:
                s.unacked.pop(mid, None)

        client._inbox.put(Message(topic=topic, payload=payload, retain=retain, qos=1,
                                  _ack=ack if client.manual_ack else None))
        if not client.manual_ack:
            ack()

    def set_up(self, up: bool) -> None:
        """Take the broker down (every client is disconnected) or bring it back."""
        with self._lock:
            self.up = up
            clients = [s.client for s in self._sessions.values() if s.client is not None]
        if not up:
            for c in clients:
                c._drop()


class MemoryTransport:
    """A client of :class:`MemoryBroker` with the :class:`~bedside.transport.Transport` API."""

    def __init__(self, broker: MemoryBroker, client_id: str, *, clean_session: bool = True,
                 manual_ack: bool = False) -> None:
        self.broker = broker
        self.client_id = client_id
        self.clean_session = clean_session
        self.manual_ack = manual_ack
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._filters: list[str] = []
        self._connected = False
        self.reconnect()

    def reconnect(self) -> bool:
        try:
            self.broker.connect(self.client_id, self, self.clean_session)
        except TransportError:
            return False
        self._connected = True
        for f in self._filters:
            self.broker.subscribe(self.client_id, f)
        return True

    def _drop(self) -> None:
        self._connected = False
        self.broker.disconnect(self.client_id, clean=False)

    @property
    def connected(self) -> bool:
        if not self._connected and self.broker.up:
            self.reconnect()  # the real transport reconnects by itself, too
        return self._connected

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                wait: bool = True) -> None:
        if not self.connected:
            raise TransportError(f"not connected to the broker; cannot publish to {topic}")
        self.broker.publish(topic, bytes(payload), retain)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        if topic_filter not in self._filters:
            self._filters.append(topic_filter)
        if self._connected:
            self.broker.subscribe(self.client_id, topic_filter)

    def wait_subscribed(self, topic_filter: str, timeout: float | None = None) -> bool:
        return self._connected and topic_filter in self._filters  # in effect at once

    @property
    def queue_depth(self) -> int:
        """Messages received and not yet taken with :meth:`get`."""
        return self._inbox.qsize()

    def get(self, timeout: float | None = None) -> Message | None:
        _ = self.connected  # like paho's loop thread: reconnect once the broker is back
        try:
            return self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        self._connected = False
        self.broker.disconnect(self.client_id, clean=self.clean_session)
