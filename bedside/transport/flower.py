"""Flower (``flwr``, Deployment Engine) as Bedside's second transport: the pieces both sides share.

Over Flower, the round core is driven exactly as over MQTT: the aggregator service and the edge
agent are the same objects, given a :class:`Mailbox` instead of an MQTT transport. What travels
inside a Flower message is a list of Bedside's own signed envelopes, each with the MQTT topic it
would have had (``bedside/<fleet>/round``, ``.../model``, ``.../update/<device>``, ...), so
signatures, replay protection, receipts and the device's privacy policy are unchanged:

* the **ServerApp** (:mod:`bedside.aggregator.flower`) sends every SuperNode the round's signed
  announcement, the signed model release it lacks and its receipts, and feeds what comes back to
  the aggregator's validation;
* the **ClientApp** (:mod:`bedside.edge.flower`) hands them to the device's
  :class:`~bedside.edge.agent.Agent`, which verifies, plans, trains, privatizes, records in its
  ledger and signs, and returns what the agent published (its update or signed decline, and its
  status).

This module holds the message codec (:func:`pack`, :func:`unpack`), the :class:`Mailbox`
transport, the ``[flower]`` settings of ``aggregator.toml`` and ``agent.toml``, and how the
Flower processes are started (SuperLink, SuperNode, ``flwr run``): on 127.0.0.1, with TLS unless
``insecure = true`` says otherwise (refused beyond loopback), never Flower's simulation engine
(Ray binds beyond loopback), and with Flower's telemetry and update check switched off (nothing
leaves the machine's network but the federation's own traffic). ``flwr`` is imported only by the
functions that build or read Flower messages.
"""

from __future__ import annotations

import collections
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bedside.config import setting
from bedside.constants import DEFAULT_HOST
from bedside.errors import ConfigError, WireError
from bedside.files import atomic_write_bytes
from bedside.transport import Message, is_loopback, topic_matches

#: The SuperLink's one HTTP port in flwr 1.41 (Fleet, Control and Runtime APIs).
DEFAULT_SUPERLINK_PORT = 9093
#: A SuperNode's local Runtime API port (where its ClientApp processes fetch their message).
DEFAULT_SUPERNODE_PORT = 9094
#: The pinned Flower release whose Message API and CLI this module speaks.
FLWR_VERSION = "1.41.0"
#: At most this many envelopes in one Flower message (a round needs three or four).
MAX_ITEMS = 64
#: Keys of the one ConfigRecord a Bedside Flower message carries.
RECORD = "bedside"
#: The node config key (``--node-config``) naming a SuperNode's agent.toml.
NODE_CONFIG_KEY = "agent-config"
#: The environment variable naming the SuperLink's aggregator.toml (read by its ServerApp).
CONFIG_ENV = "BEDSIDE_AGGREGATOR_CONFIG"


def _tls_rule(where: str, host: str, insecure: bool, has_tls: bool, what: str) -> None:
    if insecure and has_tls:
        raise ConfigError(f"[flower] {where}: insecure = true and TLS files are both set; choose "
                          "one")
    if not insecure and not has_tls:
        raise ConfigError(f"[flower] {where}: no TLS files are set; set {what} (a CA and "
                          "certificates: 'bedside broker certs --out DIR --identity NAME "
                          "--broker-host HOST' creates them), or insecure = true on 127.0.0.1 "
                          "for a test")
    if insecure and not is_loopback(host):
        raise ConfigError(f"[flower] {where}: insecure = true with {host!r}: plaintext Flower "
                          "beyond 127.0.0.1 would carry the federation unencrypted; configure "
                          "TLS instead")


@dataclass(frozen=True)
class FlowerServerConfig:
    """``[flower]`` of aggregator.toml: the SuperLink, and how ``bedside flower run`` reaches it."""

    host: str = setting(DEFAULT_HOST, "address the SuperLink binds (Fleet, Control and Runtime "
                        "APIs share one port)")
    port: int = setting(DEFAULT_SUPERLINK_PORT, "the SuperLink's port", min=1, max=65535)
    ca_file: Path | None = setting(None, "TLS: the CA that signed the SuperLink's certificate")
    cert_file: Path | None = setting(None, "TLS: the SuperLink's certificate (its names must "
                                     "include the host SuperNodes dial)")
    key_file: Path | None = setting(None, "TLS: the SuperLink's private key")
    insecure: bool = setting(False, "plaintext HTTP, only on 127.0.0.1 (tests and the demo)")
    expose_all_apis: bool = setting(False, "bind beyond 127.0.0.1 although the SuperLink's "
                                    "Control and Runtime APIs share the port and have no "
                                    "authentication in flwr 1.41 (anyone who reaches them can "
                                    "stop runs or claim the ServerApp's task); instead, keep "
                                    "127.0.0.1 and forward only /v1/fleet/ (docs/flower.md)")
    database: Path | None = setting(None, "the SuperLink's state (default: "
                                    "<data_dir>/flower/superlink.db)")
    home: Path | None = setting(None, "FLWR_HOME of the SuperLink and of 'flwr run': installed "
                                "apps and the connection (default: <data_dir>/flower/home)")
    poll_seconds: float = setting(0.2, "how often the ServerApp polls the SuperLink for replies "
                                  "and for SuperNodes not asked yet in an open round",
                                  positive=True)

    def __post_init__(self) -> None:
        tls = (self.ca_file, self.cert_file, self.key_file)
        if any(tls) and not all(tls):
            raise ConfigError("[flower] ca_file, cert_file and key_file go together")
        _tls_rule("SuperLink", self.host, self.insecure, all(tls), "ca_file, cert_file and "
                  "key_file")
        if not is_loopback(self.host) and not self.expose_all_apis:
            raise ConfigError(
                f"[flower] host = {self.host!r}: the SuperLink's port also serves Flower's "
                "Control and Runtime APIs, which have no authentication in flwr 1.41: anyone "
                "who reaches them can stop the federation or take the ServerApp's place and "
                "receive the devices' updates. Keep host = \"127.0.0.1\" and let devices reach "
                "the Fleet API through a TLS proxy that forwards only /v1/fleet/ "
                "(docs/flower.md), or set expose_all_apis = true if the network itself admits "
                "only the devices and the data team")


@dataclass(frozen=True)
class FlowerNodeConfig:
    """``[flower]`` of agent.toml: the device's SuperNode."""

    superlink: str = setting(f"{DEFAULT_HOST}:{DEFAULT_SUPERLINK_PORT}", "the SuperLink's "
                             "address, host:port")
    ca_file: Path | None = setting(None, "TLS: the CA that signed the SuperLink's certificate")
    insecure: bool = setting(False, "plaintext HTTP, only to 127.0.0.1 (tests and the demo)")
    port: int = setting(DEFAULT_SUPERNODE_PORT, "the SuperNode's local Runtime API port (on "
                        "127.0.0.1; one per SuperNode on a machine)", min=1, max=65535)

    def __post_init__(self) -> None:
        host, sep, port = self.superlink.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"[flower] superlink must be host:port, got {self.superlink!r}")
        _tls_rule("SuperNode", host.strip("[]"), self.insecure, self.ca_file is not None,
                  "ca_file")


# -- messages --------------------------------------------------------------------------------------
def pack(items: list[tuple[str, bytes]]) -> Any:
    """A Flower ``RecordDict`` carrying ``items`` (topic, signed envelope) unchanged."""
    from flwr.app import ConfigRecord, RecordDict

    if len(items) > MAX_ITEMS:
        raise WireError("too_many", f"{len(items)} envelopes in one Flower message (at most "
                        f"{MAX_ITEMS})")
    return RecordDict({RECORD: ConfigRecord({"topics": [t for t, _ in items],
                                             "payloads": [bytes(p) for _, p in items]})})


def unpack(content: Any) -> list[tuple[str, bytes]]:
    """The (topic, envelope) pairs of a Flower message's content; :class:`WireError` when the
    content is not what :func:`pack` writes (nothing else is read from a Flower message)."""
    try:
        record = content.config_records[RECORD]
    except (AttributeError, KeyError, TypeError):
        raise WireError("malformed", f"a Flower message without its {RECORD!r} record") from None
    topics, payloads = record.get("topics", []), record.get("payloads", [])
    if not isinstance(topics, list) or not isinstance(payloads, list) or len(topics) != len(
            payloads):
        raise WireError("malformed", "a Flower message's topics and payloads do not pair up")
    if len(topics) > MAX_ITEMS:
        raise WireError("too_many", f"{len(topics)} envelopes in one Flower message (at most "
                        f"{MAX_ITEMS})")
    if not all(isinstance(t, str) for t in topics) or not all(isinstance(p, bytes)
                                                                for p in payloads):
        raise WireError("malformed", "a Flower message's topics must be strings and its "
                        "payloads bytes")
    return list(zip(topics, payloads, strict=True))


class Mailbox:
    """A :class:`~bedside.transport.Transport` without a network: what is delivered is handed to
    its owner by ``get``; what its owner publishes is collected for the Flower driver to carry.

    A message published with ``retain`` replaces the previous one on its topic in
    :attr:`retained` (the MQTT broker's retained message, which the ServerApp sends to every
    SuperNode that lacks it). Delivery is filtered by the subscriptions, as a broker would.
    """

    def __init__(self) -> None:
        self._inbox: collections.deque[Message] = collections.deque()
        self._filters: set[str] = set()
        self.sent: list[tuple[str, bytes]] = []
        self.retained: dict[str, bytes] = {}

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                wait: bool = True) -> None:
        self.sent.append((topic, bytes(payload)))
        if retain:
            self.retained[topic] = bytes(payload)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._filters.add(topic_filter)

    def wait_subscribed(self, topic_filter: str, timeout: float | None = None) -> bool:
        return topic_filter in self._filters  # a mailbox: in effect at once

    def deliver(self, topic: str, payload: bytes) -> bool:
        """Queue a received message for ``get``; False (dropped) when nothing subscribed."""
        if not any(topic_matches(f, topic) for f in self._filters):
            return False
        self._inbox.append(Message(topic=topic, payload=payload))
        return True

    def get(self, timeout: float | None = None) -> Message | None:
        return self._inbox.popleft() if self._inbox else None

    def take(self) -> list[tuple[str, bytes]]:
        """What was published since the last call, in order."""
        out, self.sent = self.sent, []
        return out

    @property
    def connected(self) -> bool:
        return True

    def close(self) -> None:
        self._inbox.clear()


# -- processes -------------------------------------------------------------------------------------
def start_process(command: tuple[list[str], dict[str, str]], log: Path) -> Any:
    """Start a Flower process (argv, environment, as the ``*_command`` functions return them)
    with its output in ``log``."""
    import subprocess

    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(command[0], env=command[1], stdout=out,
                                stderr=subprocess.STDOUT)


def stop_processes(procs: list[Any], grace: float = 15.0) -> None:
    """Terminate Flower processes (SIGTERM: their SuperExec and app processes exit with them),
    killing any still running after ``grace`` seconds."""
    import subprocess

    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def wait_listening(port: int, timeout: float) -> bool:
    """Whether something listens on 127.0.0.1:``port`` within ``timeout`` seconds."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((DEFAULT_HOST, port)) == 0:
                return True
        time.sleep(0.1)
    return False


def require_flower() -> None:
    """Flower must be installed (the ``flower`` extra) for anything that starts it."""
    import importlib.util

    if importlib.util.find_spec("flwr") is None:
        raise ConfigError(f"Flower is not installed; install it with: pip install "
                          f"'bedside[flower]' (flwr=={FLWR_VERSION})")


def flower_env(home: Path, runtime_bin: Path | None = None) -> dict[str, str]:
    """The environment of every Flower process Bedside starts: Bedside's runtime scripts
    (``runtime_bin``, :func:`write_runtime`) then this interpreter's scripts first on PATH
    (Flower starts ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name),
    ``FLWR_HOME``, and Flower's telemetry and update check off (they would call Flower's
    servers)."""
    dirs = [str(runtime_bin)] if runtime_bin is not None else []
    dirs += [_scripts(), *os.environ.get("PATH", "").split(os.pathsep)]
    path = os.pathsep.join(d for d in dirs if d)  # an empty entry would mean the working dir
    return {**os.environ, "PATH": path, "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1"}


def _scripts() -> str:
    import sysconfig

    return sysconfig.get_path("scripts")


def executable(name: str) -> str:
    """A Flower console script of this environment (its scripts directory, else PATH)."""
    import shutil

    require_flower()
    path = Path(_scripts()) / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} is not installed in {_scripts()} nor on PATH; install "
                          f"Flower with: pip install 'bedside[flower]' (flwr=={FLWR_VERSION})")
    return found


def skip_fab(*_: Any, **__: Any) -> None:
    """Replaces Flower's ``install_from_fab``: a submitted app's files are never installed."""


def refuse_dependencies(*_: Any, **__: Any) -> None:
    """Replaces Flower's ``install_app_dependencies``: Bedside installs nothing at run time."""
    raise ConfigError("Bedside's Flower apps install no dependencies at run time")


def replace_in(module: Any, **replacements: Any) -> None:
    """Replace functions of one of Flower's runtime modules (the pinned release's names). A name
    that is missing fails loudly: a Flower release that renamed it would otherwise run the
    submitted app's code."""
    for name, value in replacements.items():
        if not hasattr(module, name):
            raise ConfigError(f"{module.__name__}.{name} does not exist: this Flower release is "
                              f"not flwr=={FLWR_VERSION}, whose runtime Bedside replaces; install "
                              f"'bedside[flower]'")
        setattr(module, name, value)


def write_runtime(directory: Path, name: str, module: str, function: str) -> Path:
    """Bedside's runtime for one side of Flower, in ``directory`` (put first on the PATH of the
    SuperLink or SuperNode, :func:`flower_env`): a script ``name`` that runs ``module.function()``
    with this interpreter (Bedside's ServerApp or ClientApp process), and, for every other
    program Flower's SuperExec starts by name (``flwr-agentapp``, ``flwr-model``,
    ``flwr-connector``, ``flwr-simulation``, the other side's app), a script that refuses. So
    neither a submitted app nor a task type Bedside does not use ever runs code here."""
    import shlex

    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    directory.mkdir(parents=True, exist_ok=True)
    python = shlex.quote(sys.executable)
    code = shlex.quote(f"import sys; sys.argv[0] = {name!r}; from {module} import {function}; "
                       f"sys.exit({function}())")
    scripts = {name: f"exec {python} -c {code} \"$@\"\n"}
    for other in sorted(set(TASK_TYPE_TO_COMMAND.values()) - {name}):
        refusal = shlex.quote(f"bedside: Flower asked to start {other}; this side runs only "
                              f"{name} (Bedside's)")
        scripts[other] = f"echo {refusal} >&2\nexit 1\n"
    for script, body in scripts.items():
        path = directory / script
        atomic_write_bytes(path, ("#!/bin/sh\n# Written by Bedside: Flower starts programs by "
                                  "name; this one is Bedside's.\n" + body).encode(), mode=0o755)
    return directory


def superlink_argv(cfg: FlowerServerConfig, database: Path) -> list[str]:
    argv = [executable("flower-superlink"), "--host", cfg.host, "--port", str(cfg.port),
            "--isolation", "subprocess", "--database", str(database),
            "--disable-runtime-dependency-installation"]
    if cfg.insecure:
        return [*argv, "--insecure"]
    assert cfg.ca_file and cfg.cert_file and cfg.key_file
    return [*argv, "--ssl-ca-certfile", str(cfg.ca_file), "--ssl-certfile", str(cfg.cert_file),
            "--ssl-keyfile", str(cfg.key_file)]


def supernode_argv(cfg: FlowerNodeConfig, agent_toml: Path) -> list[str]:
    """The SuperNode of one device; its ClientApp reads ``agent_toml`` (node config)."""
    argv = [executable("flower-supernode"), "--superlink", cfg.superlink, "--host", DEFAULT_HOST,
            "--port", str(cfg.port), "--isolation", "subprocess",
            "--node-config", f"{NODE_CONFIG_KEY}={_toml_string(str(agent_toml.resolve()))}"]
    if cfg.insecure:
        return [*argv, "--insecure"]
    assert cfg.ca_file is not None
    return [*argv, "--root-certificates", str(cfg.ca_file)]


def _toml_string(s: str) -> str:
    import json

    return json.dumps(s)  # a JSON string is a valid TOML basic string


def write_app(directory: Path) -> Path:
    """The Flower app (a FAB's ``pyproject.toml``) that ``flwr run`` submits.

    Flower needs one to start a run. Bedside's SuperLink and SuperNodes never install or import
    a submitted app (:func:`write_runtime`): its components name Bedside's ServerApp and
    ClientApp for readers and for Flower's own checks, and it lists no dependencies."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text("""\
# Written by Bedside ('bedside flower run'); the app is the installed bedside package.
[project]
name = "bedside-federation"
version = "1.0.0"
description = "Bedside's federation on Flower: signed, clipped, noised updates; device ledgers"
dependencies = []

[tool.flwr.app]
publisher = "bedside"

[tool.flwr.app.components]
serverapp = "bedside.aggregator.flower_app:app"
clientapp = "bedside.edge.flower_app:app"
""")
    return directory


def write_connection(home: Path, cfg: FlowerServerConfig, name: str = "bedside") -> None:
    """``$FLWR_HOME/config.toml``: how ``flwr run`` reaches the SuperLink's Control API (on
    127.0.0.1 when the SuperLink binds every address: its certificate must name 127.0.0.1)."""
    home.mkdir(parents=True, exist_ok=True)
    host = DEFAULT_HOST if cfg.host in ("0.0.0.0", "::") else cfg.host  # noqa: S104 (a name)
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    lines = ["[superlink]", f"default = {_toml_string(name)}", "",
             f"[superlink.{name}]", f"address = {_toml_string(f'{host}:{cfg.port}')}"]
    if cfg.insecure:
        lines.append("insecure = true")
    else:
        assert cfg.ca_file is not None
        lines.append(f"root-certificates = {_toml_string(str(cfg.ca_file.resolve()))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def run_argv(app_dir: Path, name: str = "bedside", *, stream: bool = True) -> list[str]:
    return [executable("flwr"), "run", str(app_dir), name, *(["--stream"] if stream else [])]
