"""MQTT transport over paho-mqtt (protocol 3.1.1, which both Mosquitto and amqtt speak).

* Connects to 127.0.0.1 unless configured otherwise; TLS with a client certificate when
  ``ca_file``/``cert_file``/``key_file`` are set (Mosquitto's ``use_identity_as_username`` then
  makes the certificate's CN the identity its ACL checks).
* Reconnects by itself (paho's loop thread, back-off 0.2 s .. 5 s) and renews subscriptions.
* Network callbacks only enqueue: ``on_message`` puts a :class:`~bedside.transport.Message` on a
  queue, with an ``ack`` bound to paho's manual acknowledgement when ``manual_ack`` is on.
* The queue is bounded (``max_inbox_bytes``: payloads plus a fixed cost per message), so a flood
  on a subscribed topic cannot exhaust memory before anything validates it. When it is full, a new
  message is dropped and, under manual acknowledgement, acknowledged: an unacknowledged message
  would hold one of the broker's in-flight slots (Mosquitto: 20 a client) until the client
  reconnects, and enough of them would stall every delivery. Nothing accepted is lost: a device
  resends from its outbox until it has a signed receipt, and round announcements are retained.
  A message always fits an empty queue, whatever its size (the size limits are the broker's and
  the envelope decoder's).
* ``publish`` refuses when disconnected and waits for the PUBACK of a QoS 1 message; callers
  keep their own durable outbox, so nothing is queued silently in memory.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from bedside.config import setting
from bedside.constants import DEFAULT_HOST, DEFAULT_MQTT_PORT, MQTT_KEEPALIVE_S
from bedside.errors import ConfigError, TransportError
from bedside.transport import Message, is_loopback

log = logging.getLogger(__name__)

#: What a queued message counts besides its payload (topic, objects), so that a flood of empty
#: messages is bounded too.
INBOX_MESSAGE_COST = 512
#: Received messages waiting for the consumer, payloads plus ``INBOX_MESSAGE_COST`` each.
DEFAULT_MAX_INBOX_BYTES = 256 * 1024 * 1024
#: At most one "inbox full" warning in this many seconds (the count is in every line).
DROP_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class MqttConfig:
    """``[mqtt]`` of agent.toml and aggregator.toml."""

    host: str = setting(DEFAULT_HOST, "broker host")
    port: int = setting(DEFAULT_MQTT_PORT, "broker port", min=1, max=65535)
    ca_file: Path | None = setting(None, "TLS: the CA that signed the broker's certificate")
    cert_file: Path | None = setting(None, "TLS: this client's certificate")
    key_file: Path | None = setting(None, "TLS: this client's private key")
    username: str | None = setting(None, "user name (brokers with password files)")
    password: str | None = setting(None, "password (never logged)", secret=True)
    keepalive: int = setting(MQTT_KEEPALIVE_S, "seconds", min=5)
    publish_timeout: float = setting(10.0, "seconds to wait for a PUBACK", positive=True)
    connect_timeout: float = setting(10.0, "seconds to wait for the first connection",
                                     positive=True)
    max_inbox_bytes: int = setting(DEFAULT_MAX_INBOX_BYTES, "received messages waiting to be "
                                   "handled (payload + 512 bytes each); beyond it new ones are "
                                   "dropped and re-sent by their senders",
                                   min=INBOX_MESSAGE_COST)
    allow_insecure: bool = setting(False, "plaintext MQTT (no TLS) to a broker beyond loopback: "
                                   "refused unless true, and then warned about at every start")

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"mqtt port must be 1..65535, got {self.port}")
        if self.max_inbox_bytes < INBOX_MESSAGE_COST:
            raise ConfigError(f"mqtt max_inbox_bytes must be at least {INBOX_MESSAGE_COST}, got "
                              f"{self.max_inbox_bytes}")
        tls = [self.ca_file, self.cert_file, self.key_file]
        if any(tls) and not self.ca_file:
            raise ConfigError("mqtt TLS needs 'ca_file' (the CA that signed the broker's "
                              "certificate)")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("mqtt TLS client authentication needs both 'cert_file' and "
                              "'key_file'")
        for p in tls:
            if p is not None and not Path(p).is_file():
                raise ConfigError(f"mqtt TLS file {p} does not exist")
        if not self.tls and not is_loopback(self.host) and not self.allow_insecure:
            raise ConfigError(
                f"mqtt host {self.host!r} is not this machine and TLS is not configured: updates, "
                "models and keys' signatures would cross the network in plaintext. Configure "
                "ca_file (and cert_file, key_file) for the broker's TLS listener, or set "
                "allow_insecure = true to accept plaintext knowingly")

    @property
    def insecure(self) -> bool:
        """Plaintext to a broker beyond loopback (allowed by ``allow_insecure``)."""
        return not self.tls and not is_loopback(self.host)

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    def describe(self) -> str:
        return f"mqtt{'s' if self.tls else ''}://{self.host}:{self.port}"


def warn_if_insecure(cfg: MqttConfig) -> None:
    """At every start: plaintext beyond loopback was allowed, but is never silent."""
    if cfg.insecure:
        log.warning("MQTT to %s is plaintext (allow_insecure = true): anyone on the network path "
                    "can read and alter what is sent; configure TLS", cfg.describe())


def _no_delay(client: paho.Client, _userdata: Any, sock: Any) -> None:
    """Turn Nagle's algorithm off: an update or model release spans many TCP segments, and with
    Nagle the last one can wait for the peer's delayed ACK (about 40 ms a message on Linux)."""
    # not a TCP socket (e.g. a Unix socket or a test double): nothing to tune
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttTransport:
    """A paho client implementing the :class:`~bedside.transport.Transport` protocol."""

    def __init__(self, cfg: MqttConfig, client_id: str, *, clean_session: bool = False,
                 manual_ack: bool = False, will: tuple[str, bytes] | None = None) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.manual_ack = manual_ack
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._inbox_bytes = 0  # guarded by _lock
        self.dropped = 0  # messages dropped because the inbox was full
        self._last_drop_log = float("-inf")
        self._filters: dict[str, int] = {}
        self._dropped: set[str] = set()
        self._lock = threading.Lock()
        self._connected = threading.Event()
        # subscriptions the broker acknowledged on this connection (SUBACK), by filter; guarded
        # by _lock, _subscribed is notified when one arrives
        self._subacked: set[str] = set()
        self._sub_mids: dict[int, str] = {}  # SUBSCRIBE packet id -> filter, until its SUBACK
        self._early_acks: dict[int, bool] = {}  # SUBACKs that beat the packet id's record
        self._subscribed = threading.Condition(self._lock)
        self.last_error: str | None = None
        self.failed_attempts = 0  # connection attempts that could not reach the broker
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=paho.MQTTv311, clean_session=clean_session)
        c.manual_ack_set(manual_ack)
        c.reconnect_delay_set(min_delay=1, max_delay=5)
        c.max_inflight_messages_set(20)
        if cfg.tls:
            c.tls_set(ca_certs=str(cfg.ca_file),
                      certfile=str(cfg.cert_file) if cfg.cert_file else None,
                      keyfile=str(cfg.key_file) if cfg.key_file else None,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password)
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = _no_delay
        self._client = c
        warn_if_insecure(cfg)
        try:
            c.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot connect to {cfg.describe()}: {exc}") from None
        c.loop_start()

    # -- paho callbacks: they only record state and enqueue -------------------------------------
    def _on_connect(self, client: paho.Client, _userdata: Any, flags: Any, reason: Any,
                    _properties: Any) -> None:
        if reason.is_failure:
            self.last_error = f"broker refused the connection: {reason}"
            log.warning("%s: %s", self.cfg.describe(), self.last_error)
            return
        if self.failed_attempts:
            log.info("%s: connected after %d failed attempt(s)", self.cfg.describe(),
                     self.failed_attempts)
        self.last_error, self.failed_attempts = None, 0
        with self._lock:
            filters = list(self._filters.items())
            dropped = list(self._dropped)
        for f in dropped:  # a persistent session may still hold them from an earlier run
            client.unsubscribe(f)
        for f, qos in filters:
            self._send_subscribe(client, f, qos)
        self._connected.set()
        log.debug("%s connected as %s", self.cfg.describe(), self.client_id)

    def _on_connect_fail(self, client: paho.Client, _userdata: Any) -> None:
        """The broker could not be reached (down, wrong host or port, TLS refused): say so at
        every attempt, so an operator sees it at once rather than a silent agent."""
        attempt = self.failed_attempts + 1
        self.last_error = "cannot reach the broker"
        log.warning("%s: cannot reach the MQTT broker (attempt %d: it is down, the host or port "
                    "is wrong, or TLS was refused); retrying within 5 s", self.cfg.describe(),
                    attempt)
        # counted after the warning is out, so whoever sees the count also finds the message
        self.failed_attempts = attempt

    def _on_disconnect(self, client: paho.Client, _userdata: Any, flags: Any, reason: Any,
                       _properties: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        with self._lock:  # a new connection subscribes (and is acknowledged) again
            self._subacked.clear()
            self._sub_mids.clear()
            self._early_acks.clear()
        if reason is not None and getattr(reason, "is_failure", False):
            self.last_error = f"disconnected: {reason}"
            if was:
                log.warning("%s: connection lost (%s); reconnecting", self.cfg.describe(),
                            reason)

    def _on_message(self, client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        ack: Callable[[], None] | None = None
        if self.manual_ack and msg.qos > 0:
            mid, qos = msg.mid, msg.qos

            def ack() -> None:
                client.ack(mid, qos)
        if msg.retain:
            with self._lock:
                filters = list(self._filters)
            if not any(paho.topic_matches_sub(f, msg.topic) for f in filters):
                # Not ours: amqtt 0.11 sends a connecting client the retained messages of every
                # client's subscriptions. Only retained messages are dropped: a persistent
                # session's queued messages arrive (not retained) right after CONNACK, before
                # this client has re-subscribed, and they must reach the inbox.
                log.debug("%s: dropped a retained message on %s, which matches none of its "
                          "subscriptions", self.client_id, msg.topic)
                if ack is not None:
                    ack()
                return
        cost = len(msg.payload) + INBOX_MESSAGE_COST
        with self._lock:
            full = self._inbox_bytes > 0 and self._inbox_bytes + cost > self.cfg.max_inbox_bytes
            if full:
                self.dropped += 1
                dropped, queued = self.dropped, self._inbox_bytes
            else:
                self._inbox_bytes += cost
        if full:
            if ack is not None:
                ack()  # see the module docstring: an unacknowledged drop would hold a slot
            now = time.monotonic()
            if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
                self._last_drop_log = now
                log.warning("%s: inbox full (%d bytes waiting, limit %d): dropped a message on %s "
                            "(%d dropped so far). Senders resend until they have a receipt. If "
                            "this is no flood, the consumer is too slow or [mqtt] "
                            "max_inbox_bytes too small", self.client_id, queued,
                            self.cfg.max_inbox_bytes, msg.topic, dropped)
            return
        self._inbox.put(Message(topic=msg.topic, payload=bytes(msg.payload), retain=msg.retain,
                                qos=msg.qos, _ack=ack))

    # -- Transport API ---------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(self.cfg.connect_timeout if timeout is None else timeout)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                wait: bool = True) -> None:
        if not self._connected.is_set():
            raise TransportError(f"not connected to {self.cfg.describe()}; cannot publish to "
                                 f"{topic}" + (f" ({self.last_error})" if self.last_error else ""))
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise TransportError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if qos == 0 or not wait:
            return
        try:
            info.wait_for_publish(self.cfg.publish_timeout)
        except (RuntimeError, ValueError) as exc:
            raise TransportError(f"publish to {topic} failed: {exc}") from None
        if not info.is_published():
            raise TransportError(f"the broker did not confirm the message on {topic} within "
                                 f"{self.cfg.publish_timeout:g} s")

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        with self._lock:
            self._filters[topic_filter] = qos
        if self._connected.is_set():
            self._send_subscribe(self._client, topic_filter, qos)

    def wait_subscribed(self, topic_filter: str, timeout: float | None = None) -> bool:
        """Whether the broker acknowledged the subscription to ``topic_filter`` on the current
        connection within ``timeout`` seconds (default: the connect timeout). Until it has,
        messages published to the filter (a shared subscription's share, too) go elsewhere."""
        wait = self.cfg.connect_timeout if timeout is None else timeout
        with self._subscribed:
            return self._subscribed.wait_for(lambda: topic_filter in self._subacked, wait)

    def _send_subscribe(self, client: paho.Client, topic_filter: str, qos: int) -> None:
        rc, mid = client.subscribe(topic_filter, qos)
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            return  # not connected after all: sent again at the next connection
        with self._lock:
            ok = self._early_acks.pop(mid, None)
            if ok is None:
                self._sub_mids[mid] = topic_filter
            elif ok:
                self._subacked.add(topic_filter)
                self._subscribed.notify_all()

    def _on_subscribe(self, client: paho.Client, _userdata: Any, mid: int, reason_codes: Any,
                      _properties: Any) -> None:
        ok = not any(getattr(rc, "is_failure", False) for rc in reason_codes)
        with self._lock:
            topic_filter = self._sub_mids.pop(mid, None)
            if topic_filter is None:
                self._early_acks[mid] = ok
                return
            if ok:
                self._subacked.add(topic_filter)
                self._subscribed.notify_all()
        if not ok:
            log.warning("%s: the broker refused the subscription to %s (its ACL, or a filter it "
                        "does not support)", self.cfg.describe(), topic_filter)

    def unsubscribe(self, topic_filter: str) -> None:
        """Drop ``topic_filter``, also from the broker's persistent session of this client id
        (sent at every connection)."""
        with self._lock:
            self._filters.pop(topic_filter, None)
            self._dropped.add(topic_filter)
        if self._connected.is_set():
            self._client.unsubscribe(topic_filter)

    @property
    def queue_depth(self) -> int:
        """Messages received and not yet taken with :meth:`get`."""
        return self._inbox.qsize()

    def get(self, timeout: float | None = None) -> Message | None:
        try:
            m = self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
        except queue.Empty:
            return None
        with self._lock:
            self._inbox_bytes -= len(m.payload) + INBOX_MESSAGE_COST
        return m

    def close(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self._connected.clear()
