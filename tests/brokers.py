"""Start real brokers for tests: Mosquitto with the project's own config, or the embedded one.

Mosquitto runs the configuration ``bedside broker config`` generates (the generator that also
wrote ``deploy/mosquitto/mosquitto.conf``), for a temporary directory and a free 127.0.0.1 port,
so the tests exercise the TLS, certificate identity, CRL and ACL that production uses.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bedside.transport import free_port
from bedside.transport.broker import EmbeddedBroker
from bedside.transport.mosquitto import config_text
from bedside.transport.mqtt import MqttConfig
from bedside.transport.pki import acl_text, create_fleet, issue


def mosquitto_binary() -> str:
    from bedside.transport.mosquitto import binary

    return binary()


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"broker did not listen on 127.0.0.1:{port} within {timeout} s")


@dataclass
class Broker:
    kind: str
    port: int
    certs: Path | None = None
    proc: subprocess.Popen | None = None
    embedded: EmbeddedBroker | None = None
    log: Path | None = None

    def config(self, identity: str) -> MqttConfig:
        """Client settings for ``identity`` (a device id or 'aggregator')."""
        if self.certs is None:
            return MqttConfig(host="127.0.0.1", port=self.port)
        if not (self.certs / f"{identity}.crt").exists():
            issue(self.certs, identity)
        return MqttConfig(host="127.0.0.1", port=self.port, ca_file=self.certs / "ca.crt",
                          cert_file=self.certs / f"{identity}.crt",
                          key_file=self.certs / f"{identity}.key")

    def table(self, identity: str) -> dict[str, Any]:
        """``identity``'s ``[mqtt]`` table for a config file."""
        c = self.config(identity)
        d: dict[str, Any] = {"host": "127.0.0.1", "port": self.port}
        if c.ca_file:
            d.update(ca_file=str(c.ca_file), cert_file=str(c.cert_file), key_file=str(c.key_file))
        return d

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.embedded is not None:
            self.embedded.stop()

    def kill(self) -> None:
        """Stop abruptly (SIGKILL for Mosquitto) to simulate an outage."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
        else:
            self.stop()

    def restart(self) -> None:
        """Start again on the same port (and, for Mosquitto, the same persistence)."""
        if self.kind == "mosquitto":
            assert self.log is not None
            self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.log.parent /
                                                                        "mosquitto.conf")],
                                         stdout=subprocess.DEVNULL,
                                         stderr=self.log.open("ab"))
        else:
            self.embedded = EmbeddedBroker("127.0.0.1", self.port).start()
        _wait_port(self.port)


def start_mosquitto(workdir: Path, identities: list[str] | None = None, fleet: str = "demo",
                    acl_extra: str = "", workers: list[str] | None = None) -> Broker:
    """Mosquitto with the shipped config and the fleet's generated ACL (``acl_extra`` appended;
    ``workers``: validator worker ids); certificates for the aggregator and ``identities``."""
    workdir.mkdir(parents=True, exist_ok=True)
    certs = workdir / "certs"
    devices = [i for i in identities or [] if i != "aggregator"]
    create_fleet(certs, ["aggregator", *devices], ["127.0.0.1"])
    (certs / "acl").write_text(acl_text(fleet, devices, workers=workers or []) + "\n" + acl_extra)
    port = free_port()
    conf = config_text(certs, workdir, [("127.0.0.1", port)])
    if os.geteuid() == 0:
        # As root, Mosquitto would drop to the 'mosquitto' user, who cannot enter pytest's private
        # temporary directories. Tests only: production runs it as its own user.
        conf = "user root\n" + conf
    (workdir / "mosquitto.conf").write_text(conf)
    log = workdir / "mosquitto.log"
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(workdir / "mosquitto.conf")],
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        _wait_port(port)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"mosquitto failed to start: {log.read_text()[-2000:]}") from None
    return Broker(kind="mosquitto", port=port, certs=certs, proc=proc, log=log)


def start_embedded() -> Broker:
    b = EmbeddedBroker("127.0.0.1", 0).start()
    return Broker(kind="embedded", port=b.port, embedded=b)
