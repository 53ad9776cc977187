"""What an operator watches: Prometheus metrics, and on the aggregator a status page.

``[monitor] port`` (0: off) in ``aggregator.toml`` or ``agent.toml`` starts one small HTTP
server, bound to 127.0.0.1 unless ``host`` says otherwise, that answers:

* ``GET /metrics``: the component's metrics in the Prometheus text format (prometheus-client,
  one registry per component, so several in one process never mix);
* ``GET /api/status`` (aggregator): the status page's data, as JSON;
* ``GET /`` (aggregator): the status page, one self-contained HTML file (no external assets)
  that reads ``/api/status`` every few seconds.

The component's own loop thread updates the metrics and the status snapshot; the HTTP threads
only read them, so a scrape never touches the component's databases. A device's metrics carry
what its published status carries (nothing computed from its records) and the counts of its
own rounds; the endpoint is local by default.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from importlib import resources
from typing import Any

from bedside.config import setting
from bedside.errors import ConfigError

log = logging.getLogger("bedside.monitoring")

#: Buckets of the validation-time histogram (seconds per message).
VALIDATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)
#: Buckets of the round-duration histogram (seconds).
ROUND_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0, 14400.0)


@dataclass(frozen=True)
class MonitorConfig:
    """``[monitor]``: the metrics (and, on the aggregator, status page) endpoint."""

    port: int = setting(0, "HTTP port of /metrics (and the aggregator's status page and "
                        "/api/status); 0: off", min=0, max=65535)
    host: str = setting("127.0.0.1", "address to bind; anything but loopback exposes the "
                        "fleet's figures to the network: put it behind your monitoring's "
                        "authentication")


def _registry() -> Any:
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise ConfigError("[monitor] needs prometheus-client, which is not installed; install "
                          "bedside[edge] or bedside[aggregator]") from None
    return CollectorRegistry(auto_describe=True)


class AggregatorMetrics:
    """The aggregator's metrics (names are Prometheus conventions: ``_total`` counters)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        r = self.registry = _registry()
        self.received = Counter("bedside_updates_received_total", "update-topic messages "
                                "judged (updates, declines and rejected messages)", registry=r)
        self.accepted = Counter("bedside_updates_accepted_total", "updates accepted into a "
                                "round", registry=r)
        self.rejected = Counter("bedside_updates_rejected_total", "messages rejected, by reason "
                                "(duplicate: a re-send, not counted again)", ["reason"],
                                registry=r)
        self.declined = Counter("bedside_updates_declined_total", "rounds devices declined, by "
                                "reason", ["reason"], registry=r)
        self.validation = Histogram("bedside_validation_seconds", "time to judge one message "
                                    "(decode, signature, checks)", buckets=VALIDATION_BUCKETS,
                                    registry=r)
        self.round_duration = Histogram("bedside_round_duration_seconds", "from a round's "
                                        "opening to its close", buckets=ROUND_BUCKETS,
                                        registry=r)
        self.round = Gauge("bedside_round", "the current (or last) round", registry=r)
        self.round_open = Gauge("bedside_round_open", "1 while a round is open", registry=r)
        self.participants = Gauge("bedside_round_participants", "devices that answered the "
                                  "current round (updates and declines)", registry=r)
        self.round_accepted = Gauge("bedside_round_accepted", "updates accepted in the current "
                                    "round", registry=r)
        self.model_version = Gauge("bedside_model_version", "the federation's model version",
                                   registry=r)
        self.devices = Gauge("bedside_devices_enrolled", "devices enrolled in the fleet",
                             registry=r)
        self.epsilon = Gauge("bedside_epsilon_spent", "epsilon spent so far, by privacy unit "
                             "(device: the aggregator's accountant; record: the largest a "
                             "device reported)", ["unit"], registry=r)
        self.epsilon_planned = Gauge("bedside_epsilon_planned", "device-level epsilon once "
                                     "every planned round has run (the federation's budget)",
                                     registry=r)
        self.queue = Gauge("bedside_queue_depth", "messages received and waiting to be judged",
                           registry=r)
        self.connected = Gauge("bedside_broker_connected", "1 while connected to the broker",
                               registry=r)


class AgentMetrics:
    """A device's metrics: what its published status says, and its own rounds' outcomes."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        r = self.registry = _registry()
        self.rounds = Counter("bedside_agent_rounds_total", "rounds this device answered, by "
                              "outcome (contributed, or declined:REASON)", ["outcome"],
                              registry=r)
        self.model_version = Gauge("bedside_model_version", "the newest model version this "
                                   "device verified", registry=r)
        self.epsilon = Gauge("bedside_epsilon_spent", "epsilon spent by this device, by "
                             "privacy unit (rounded up to 0.01, as published)", ["unit"],
                             registry=r)
        self.budget = Gauge("bedside_epsilon_budget", "this device's budget, by privacy unit",
                            ["unit"], registry=r)
        self.refusing = Gauge("bedside_agent_refusing", "1 while the device refuses rounds "
                              "(budget, policy, ledger)", registry=r)
        self.outbox = Gauge("bedside_outbox_messages", "messages in the outbox, by state",
                            ["state"], registry=r)
        self.queue = Gauge("bedside_queue_depth", "messages received and waiting to be handled",
                           registry=r)
        self.connected = Gauge("bedside_broker_connected", "1 while connected to the broker",
                               registry=r)

    def update(self, status: dict[str, Any], queue_depth: int | None) -> None:
        """Set the gauges from the device's published status."""
        if status.get("model_version") is not None:
            self.model_version.set(status["model_version"])
        for unit, figures in (status.get("privacy") or {}).items():
            if not isinstance(figures, dict):
                continue
            if figures.get("epsilon") is not None:
                self.epsilon.labels(unit).set(figures["epsilon"])
            if figures.get("budget_epsilon") is not None:
                self.budget.labels(unit).set(figures["budget_epsilon"])
        self.refusing.set(1 if status.get("refusing") else 0)
        for state, n in (status.get("outbox") or {}).items():
            self.outbox.labels(state).set(n)
        if queue_depth is not None:
            self.queue.set(queue_depth)
        self.connected.set(1 if status.get("connected") else 0)


def _host_name(host: str) -> str:
    """The name of a Host header, without its port (``[::1]:9464`` -> ``::1``)."""
    host = host.strip()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def status_page() -> bytes:
    """The aggregator's status page (package data)."""
    return resources.files("bedside").joinpath("status.html").read_bytes()


class MonitorServer:
    """The HTTP endpoint: ``/metrics`` from ``registry``; with ``status`` (a callable returning
    the latest snapshot), ``/api/status`` and the status page at ``/``."""

    def __init__(self, cfg: MonitorConfig, registry: Any, what: str,
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from bedside.httpd import CONNECTION_TIMEOUT_S, bounded_server

        page = status_page() if status is not None else b""
        from bedside.transport import is_loopback

        # Bound to loopback, only requests addressed to loopback are answered: a web page in a
        # browser on this machine cannot read the figures through a name it points here
        # (DNS rebinding).
        local_names = ({"127.0.0.1", "localhost", "::1", cfg.host}
                       if is_loopback(cfg.host) else None)

        class Handler(BaseHTTPRequestHandler):
            server_version = "bedside"
            sys_version = ""
            timeout = CONNECTION_TIMEOUT_S

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if local_names is not None and _host_name(self.headers.get("Host", "")) \
                        not in local_names:
                    self._send(403, "text/plain; charset=utf-8", b"forbidden\n")
                elif path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif path == "/api/status" and status is not None:
                    self._send(200, "application/json",
                               json.dumps(status(), default=float).encode())
                elif path in ("/", "/index.html") and status is not None:
                    self._send(200, "text/html; charset=utf-8", page)
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                # the page is self-contained: no script, style or image from anywhere else
                self.send_header("Content-Security-Policy", "default-src 'self'; script-src "
                                 "'unsafe-inline'; style-src 'unsafe-inline'")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("monitor: " + format, *args)

        self.httpd, self.port = bounded_server(cfg.host, cfg.port, Handler)
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                        name=f"{what}-monitor")
        self._thread.start()
        log.info("%s: metrics on http://%s:%d/metrics%s", what, cfg.host, self.port,
                 " and the status page on /" if status is not None else "")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
