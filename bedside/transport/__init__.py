"""Transport: a small protocol for publish/subscribe, with MQTT and in-memory implementations.

The agent and the aggregator talk to a :class:`Transport` and never to paho directly:

* ``publish(topic, payload, qos=1, retain=False)`` blocks until the broker confirms a QoS 1
  message (PUBACK) or raises :class:`~bedside.errors.TransportError`; it never queues silently,
  because the callers keep their own durable outbox;
* ``subscribe(topic_filter, qos=1)`` is remembered and renewed after every reconnect;
* incoming messages are only *enqueued* by the network thread (paho's rule: no training or disk
  work in a callback); the owner drains them with ``get(timeout)`` on its own thread and calls
  ``message.ack()`` once the message is durably handled (manual acknowledgement).

Implementations: :class:`~bedside.transport.memory.MemoryBroker` /
:class:`~bedside.transport.memory.MemoryTransport` for unit tests, and
:class:`~bedside.transport.mqtt.MqttTransport` (paho-mqtt, MQTT 3.1.1) for Mosquitto and the
embedded amqtt broker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class Message:
    """A received message. Call :meth:`ack` once it is durably handled (QoS 1 manual ack)."""

    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 1
    _ack: Callable[[], None] | None = field(default=None, repr=False)

    def ack(self) -> None:
        if self._ack is not None:
            ack, self._ack = self._ack, None
            ack()


@runtime_checkable
class Transport(Protocol):
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                wait: bool = True) -> None:
        """Send and wait for the broker's confirmation (QoS 1); raise TransportError otherwise.
        ``wait=False`` hands a QoS 1 message to the session without waiting for it (delivered in
        the background, retried on reconnect): for many small best-effort messages such as
        receipts, which would otherwise cost a round trip each."""

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now and after every reconnect."""

    def wait_subscribed(self, topic_filter: str, timeout: float | None = None) -> bool:
        """Whether the subscription to ``topic_filter`` is in effect (the broker acknowledged it
        on the current session) within ``timeout`` seconds; until then messages to it go
        elsewhere."""

    def get(self, timeout: float | None = None) -> Message | None:
        """The next received message, or None after ``timeout`` seconds."""

    @property
    def connected(self) -> bool:
        """Whether the transport currently has a session with the broker."""

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine's loopback (``localhost`` or a loopback address)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of ``host`` (loopback by default) that is free now (tests, the demo)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching with ``+`` (one level) and ``#`` (the rest)."""
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, f in enumerate(f_parts):
        if f == "#":
            return True
        if i >= len(t_parts):
            return False
        if f != "+" and f != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


__all__ = ["Message", "Transport", "free_port", "is_loopback", "topic_matches"]
