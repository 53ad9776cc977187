"""The device's side of model releases: what it has handled, downloads, probation.

* :class:`ReleaseLog` (in ``agent.db``): every release the device handled, its state
  (``downloading``, ``verified``, ``active``, ``rejected``, ``rolled_back``) and reason, and
  whether its signed report reached the aggregator. The highest handled counter is what later
  releases are judged against (:func:`bedside.federation.release.judge_release`).
* :class:`Download`: a model too large for one message, fetched chunk by chunk from the URL in
  its signed release into ``models/<fleet>/.downloads/<counter>-<sha>.part``; every chunk is
  checked against the release's digests before it is kept, so a cut download resumes from the
  last good chunk and memory never holds more than one chunk. One partial download at a time:
  starting one removes any other.
* :class:`Probation`: after the swap, the new model is run on the release's golden rows every
  ``interval`` seconds; errors or slow answers beyond the release's limits roll it back.

Nothing here reads patient records: reports and their details come from the release itself, the
model files and the golden rows.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bedside.errors import IntegrityError, TransportError
from bedside.federation.release import Release, n_chunks
from bedside.files import private_dir
from bedside.manifest import sha256_file
from bedside.sqlite import transaction
from bedside.transport import is_loopback

log = logging.getLogger("bedside.edge.releases")

_DDL = ("CREATE TABLE IF NOT EXISTS releases (fleet TEXT NOT NULL, counter INTEGER NOT NULL, "
        "version INTEGER NOT NULL, sha256 TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT "
        "NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '', at REAL NOT NULL, until REAL, "
        "reported INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (fleet, counter))")
MAX_BAD_CHUNKS = 3


@dataclass(frozen=True)
class Handled:
    counter: int
    version: int
    sha256: str
    state: str
    reason: str
    detail: str
    at: float
    until: float | None
    reported: bool

    def to_dict(self) -> dict[str, Any]:
        return {"counter": self.counter, "version": self.version, "state": self.state,
                "reason": self.reason}


class ReleaseLog:
    def __init__(self, db: Any, fleet: str) -> None:
        self.db, self.fleet = db, fleet
        with transaction(db):
            db.execute(_DDL)

    def set(self, rel: Release, state: str, reason: str = "", detail: str = "",
            until: float | None = None, now: float | None = None) -> None:
        with transaction(self.db):
            self.db.execute(
                "INSERT INTO releases (fleet, counter, version, sha256, state, reason, detail, at,"
                " until, reported) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0) ON CONFLICT (fleet, "
                "counter) DO UPDATE SET state = excluded.state, reason = excluded.reason, "
                "detail = excluded.detail, at = excluded.at, until = excluded.until, "
                "reported = 0", (self.fleet, rel.counter, rel.version, rel.sha256, state, reason,
                                 detail[:300], time.time() if now is None else now, until))

    def get(self, counter: int) -> Handled | None:
        row = self.db.execute("SELECT counter, version, sha256, state, reason, detail, at, until,"
                              " reported FROM releases WHERE fleet = ? AND counter = ?",
                              (self.fleet, counter)).fetchone()
        if row is None:
            return None
        c, v, sha, state, reason, detail, at, until, reported = row
        return Handled(int(c), int(v), str(sha), str(state), str(reason), str(detail), float(at),
                       None if until is None else float(until), bool(reported))

    def last(self) -> Handled | None:
        """The newest release this device handled (any state)."""
        row = self.db.execute("SELECT MAX(counter) FROM releases WHERE fleet = ?",
                              (self.fleet,)).fetchone()
        return self.get(int(row[0])) if row and row[0] is not None else None

    def unreported(self) -> list[Handled]:
        rows = self.db.execute("SELECT counter FROM releases WHERE fleet = ? AND reported = 0 "
                               "ORDER BY counter", (self.fleet,)).fetchall()
        out = [self.get(int(r[0])) for r in rows]
        return [h for h in out if h is not None]

    def mark_reported(self, counter: int, state: str) -> None:
        with transaction(self.db):
            self.db.execute("UPDATE releases SET reported = 1 WHERE fleet = ? AND counter = ? AND "
                            "state = ?", (self.fleet, counter, state))

# -- downloads -------------------------------------------------------------------------------------
def check_url(url: str) -> None:
    """Chunks come over HTTPS, or plain HTTP from this machine only."""
    u = urllib.parse.urlsplit(url)
    if u.scheme == "https" or (u.scheme == "http" and is_loopback(u.hostname or "")):
        return
    raise TransportError(f"release download URL {url!r} is neither https nor on this machine; "
                         "refused (set [releases] cert_file and url on the aggregator)")


def client_context(ca_file: Path | None, cert_file: Path | None,
                   key_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Chunks come from the URL the release names, never from where a response redirects."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Download:
    """One release's chunked download (resumable; memory bounded by one chunk), fetched on its
    own thread (:meth:`start`) so that a slow or stalled endpoint never holds up the agent."""

    def __init__(self, directory: Path, rel: Release, fleet: str,
                 context: ssl.SSLContext | None = None, timeout: float = 30.0) -> None:
        check_url(rel.url)
        self.rel, self.fleet, self.context, self.timeout = rel, fleet, context, timeout
        self.dir = private_dir(directory)
        self.path = self.dir / f"{rel.counter}-{rel.sha256[:16]}.part"
        for other in self.dir.glob("*.part"):  # one partial download at a time
            if other != self.path:
                other.unlink(missing_ok=True)
        self.total = n_chunks(rel.size, rel.chunk_bytes)
        self.bad = 0  # digest failures of the chunk being fetched
        self.next_attempt = 0.0
        self.done = self._resume()
        self.error: IntegrityError | None = None  # set by the background thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        handlers: list[Any] = [_NoRedirect()]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    # -- in the background (the agent's loop only looks at the outcome) ---------------------------
    def start(self) -> Download:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"download-{self.rel.counter}")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set() and not self.complete:
            try:
                self.step(budget_seconds=5.0)
            except IntegrityError as exc:
                self.error = exc
                return
            wait = self.next_attempt - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)

    @property
    def finished(self) -> bool:
        """Complete, or failed for good (``error``): the agent may take over."""
        return self.error is not None or (self.complete and (
            self._thread is None or not self._thread.is_alive()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 5)

    def _resume(self) -> int:
        """Keep the verified whole chunks of an earlier attempt; cut the rest."""
        if not self.path.exists():
            self.path.touch(mode=0o600)
            return 0
        good = 0
        with open(self.path, "r+b") as f:
            while good < self.total:
                data = f.read(self.rel.chunk_bytes)
                if not data or hashlib.sha256(data).hexdigest() != self.rel.chunks[good]:
                    break
                good += 1
            f.truncate(good * self.rel.chunk_bytes if good < self.total else self.rel.size)
        if good:
            log.info("release %d: resuming its download at chunk %d of %d", self.rel.counter,
                     good + 1, self.total)
        return good

    @property
    def complete(self) -> bool:
        return self.done >= self.total

    def chunk_url(self, index: int) -> str:
        return f"{self.rel.url.rstrip('/')}/v1/{self.fleet}/objects/{self.rel.sha256}/{index}"

    def step(self, budget_seconds: float = 0.5, now: float | None = None,
             max_chunks: int | None = None) -> bool:
        """Fetch chunks for up to ``budget_seconds``; True once complete. Network errors are
        retried later (backing off); a chunk that fails its digest MAX_BAD_CHUNKS times raises
        IntegrityError."""
        now = time.monotonic() if now is None else now
        if self.complete or now < self.next_attempt:
            return self.complete
        started, fetched = time.monotonic(), 0
        while (not self.complete and time.monotonic() - started < budget_seconds
               and (max_chunks is None or fetched < max_chunks)):
            fetched += 1
            try:
                data = self._fetch(self.done)
            except TransportError as exc:
                self.next_attempt = time.monotonic() + 2.0
                log.warning("release %d: download paused at chunk %d of %d: %s (retrying)",
                            self.rel.counter, self.done + 1, self.total, exc)
                return False
            if hashlib.sha256(data).hexdigest() != self.rel.chunks[self.done]:
                self.bad += 1
                log.warning("release %d: chunk %d does not match its signed digest (%d/%d)",
                            self.rel.counter, self.done + 1, self.bad, MAX_BAD_CHUNKS)
                if self.bad >= MAX_BAD_CHUNKS:
                    raise IntegrityError(f"chunk {self.done + 1} of release {self.rel.counter} "
                                         f"failed its signed digest {self.bad} times")
                self.next_attempt = time.monotonic() + 2.0 * self.bad
                return False
            try:
                with open(self.path, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:  # e.g. a full disk: keep what was verified, try again later
                self.next_attempt = time.monotonic() + 10.0
                log.warning("release %d: cannot write chunk %d (%s); retrying", self.rel.counter,
                            self.done + 1, exc)
                self.done = self._resume()
                return False
            self.done += 1
            self.bad = 0
        return self.complete

    def _fetch(self, index: int) -> bytes:
        want = min(self.rel.chunk_bytes, self.rel.size - index * self.rel.chunk_bytes)
        url = self.chunk_url(index)  # https, or http on loopback: check_url at start
        req = urllib.request.Request(url, method="GET")  # noqa: S310
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                data = bytes(resp.read(self.rel.chunk_bytes + 1))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise TransportError(str(getattr(exc, "reason", exc))) from None
        if len(data) != want:
            raise TransportError(f"chunk {index + 1}: got {len(data)} bytes, expected {want}")
        return data

    def verified_file(self) -> Path:
        """The whole file, after its sha256 matched the release (streamed, chunk by chunk)."""
        if sha256_file(self.path, self.rel.chunk_bytes) != self.rel.sha256:
            self.discard()
            raise IntegrityError(f"release {self.rel.counter}: the downloaded file's sha256 does "
                                 "not match the signed release")
        return self.path

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


# -- probation -------------------------------------------------------------------------------------
@dataclass
class Probation:
    """Checks of a freshly swapped model on its release's golden rows."""

    release: Release
    until: float
    next_check: float = 0.0
    checks: int = 0
    failures: int = 0
    worst_ms: float = 0.0
    predictor: Any = None  # the model under probation, loaded once

    def record(self, ok: bool, ms: float) -> str:
        """Count one check; a reason to roll back, or ""."""
        p = self.release.probation
        self.checks += 1
        self.failures += 0 if ok else 1
        self.worst_ms = max(self.worst_ms, ms)
        if ms > p.max_latency_ms:
            return f"latency {ms:.1f} ms > {p.max_latency_ms:g} ms during probation"
        if self.failures / self.checks > p.max_error_rate:
            return (f"error rate {self.failures}/{self.checks} > {p.max_error_rate:g} during "
                    "probation")
        return ""
