"""Small HTTP servers of Bedside's services (downloads, enrollment, metrics and status): threads,
a bounded number of connections, each cut after a deadline, TLS 1.2+ when given a certificate."""

from __future__ import annotations

import contextlib
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def bounded_server(host: str, port: int, handler: type[BaseHTTPRequestHandler],
                   cert_file: Path | None = None, key_file: Path | None = None,
                   ca_file: Path | None = None,
                   per_client: int | None = None) -> tuple[ThreadingHTTPServer, int]:
    """An HTTP server in threads, at most MAX_CONNECTIONS at once (``per_client`` per address);
    TLS 1.2+ with ``cert_file`` (and client certificates of ``ca_file`` required when given).
    Returns it and its port."""
    httpd = _BoundedServer((host, port), handler, per_client=per_client)
    httpd.daemon_threads = True
    if cert_file is not None and key_file is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(cert_file), str(key_file))
        if ca_file is not None:
            ctx.load_verify_locations(str(ca_file))
            ctx.verify_mode = ssl.CERT_REQUIRED
        # the handshake happens in the connection's own thread (on its first read, under its
        # timeout), never in accept(): a client that never speaks stalls nobody else
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True,
                                       do_handshake_on_connect=False)
    return httpd, int(httpd.server_address[1])


CONNECTION_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 64
#: The enrollment endpoint (unauthenticated): one address holds at most this many connections,
#: so a single client cannot take them all. The download endpoint has no such cap (a clinic's
#: devices behind one NAT download at once).
MAX_PER_CLIENT = 8
#: A connection is cut after this long, whatever it does (one byte every 29 s included).
CONNECTION_DEADLINE_S = 120.0


class _BoundedServer(ThreadingHTTPServer):
    """At most MAX_CONNECTIONS connections served at once (``per_client`` per address when
    set), each for at most CONNECTION_DEADLINE_S; more are closed at once."""

    def __init__(self, *args: Any, per_client: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.per_client = per_client
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._lock = threading.Lock()
        self._per_client: dict[str, int] = {}

    def process_request(self, request: Any, client_address: Any) -> None:
        who = str(client_address[0])
        with self._lock:
            if ((self.per_client is not None
                 and self._per_client.get(who, 0) >= self.per_client)
                    or not self._slots.acquire(blocking=False)):
                self.shutdown_request(request)
                return
            self._per_client[who] = self._per_client.get(who, 0) + 1
        try:
            super().process_request(request, client_address)
        except Exception:
            self._release(who)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        timer = threading.Timer(CONNECTION_DEADLINE_S, _cut, (request,))
        timer.daemon = True
        timer.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            timer.cancel()
            self._release(str(client_address[0]))

    def _release(self, who: str) -> None:
        with self._lock:
            n = self._per_client.get(who, 1) - 1
            if n:
                self._per_client[who] = n
            else:
                self._per_client.pop(who, None)
            self._slots.release()


def _cut(request: Any) -> None:
    import socket

    with contextlib.suppress(OSError):
        request.shutdown(socket.SHUT_RDWR)
