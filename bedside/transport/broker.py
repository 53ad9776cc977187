"""The embedded MQTT broker (amqtt): the zero-setup default for one machine and the demo.

It binds 127.0.0.1 only, unless a host is given explicitly. It has no TLS and no per-device
identity, so it is for a single machine; production uses Mosquitto with TLS and ACLs
(``deploy/mosquitto/``).

Known difference from Mosquitto, which Bedside's protocol absorbs: amqtt 0.11 does not queue QoS 1
messages for a persistent session while its client is offline. Devices therefore keep an update in
their durable outbox until the aggregator's signed receipt arrives, and resend it, instead of
relying on the broker's queue (see docs/mqtt.md).

Known amqtt 0.11 race, worked around here: when a client connects, amqtt iterates its table of
subscriptions with ``await`` inside the loop; another client subscribing at that moment raised
``RuntimeError: dictionary changed size during iteration``, killed the first client's session and
forced a reconnect (seen when the demo's processes connect together). The broker's table is
replaced by :class:`SnapshotDict`, whose iteration walks a copy. In the same place amqtt sends a
connecting client the retained messages of *every* client's subscriptions; Bedside's MQTT client
drops retained messages that match none of its own subscriptions (``MqttTransport``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from bedside.constants import DEFAULT_HOST
from bedside.errors import ConfigError, TransportError
from bedside.transport import free_port, is_loopback

log = logging.getLogger(__name__)


class SnapshotDict(dict[Any, Any]):
    """A dict whose iteration (``for k in d``, ``keys``, ``values``, ``items``) walks a snapshot,
    so that coroutines may add or remove entries while another one iterates across an await."""

    def __iter__(self) -> Any:
        return iter(list(super().keys()))

    def keys(self) -> Any:
        return list(super().keys())

    def values(self) -> Any:
        return list(super().values())

    def items(self) -> Any:
        return list(super().items())


class EmbeddedBroker:
    """amqtt in a background thread with its own event loop. ``port=0`` picks a free port."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = 0) -> None:
        if not host:
            raise ConfigError("broker host is empty; use 127.0.0.1")
        if not is_loopback(host):
            log.warning("the embedded broker is binding %s, beyond loopback; it has no TLS and no "
                        "per-device identity: use Mosquitto (deploy/mosquitto) in production",
                        host)
        self.host = host
        self.port = port or free_port(host)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}",
                                      "max_connections": 200}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        }

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def main() -> None:
            from amqtt.broker import Broker

            self._stop = asyncio.Event()
            broker = Broker(self._config())
            subs = getattr(broker, "_subscriptions", None)
            if isinstance(subs, dict):  # amqtt 0.11: see the module docstring
                broker._subscriptions = SnapshotDict(subs)
            try:
                await broker.start()
            except BaseException as exc:  # amqtt raises BrokerError and OSError here
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            try:
                await broker.shutdown()
            except asyncio.CancelledError:
                # amqtt cancels its client handlers on shutdown and one of them can surface
                # here, before amqtt closed its listeners: close them, so that the port is
                # released and late clients are refused rather than left waiting.
                log.debug("embedded broker: a client task was cancelled during shutdown")
                for server in getattr(broker, "_servers", {}).values():
                    instance = getattr(server, "instance", None)
                    if instance is not None:
                        instance.close()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TransportError(f"the embedded broker did not start within {timeout:g} s")
        if self._error is not None:
            raise TransportError(f"the embedded broker cannot listen on {self.host}:{self.port}: "
                                 f"{self._error}")
        log.info("embedded MQTT broker listening on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
