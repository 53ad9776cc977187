"""Model releases on the aggregator: signing, staged rollouts, device reports, downloads.

Every model version reaches devices as a signed *release* (:mod:`bedside.federation.release`):
versions produced by federated rounds (to every device at once) and versions an operator pushes
(``bedside models push``) or rolls back to (``bedside models rollback``), which are *rollouts*:

``staged``   written by the CLI into ``state.db`` (the model copied under ``<data_dir>/staged``);
             the running service is the only writer of the registry, so it picks the row up,
             stores the model as the next version of the one version line, gives the release
             the next counter and signs it;
``canary``   the release went to the canary devices only (their own retained topic,
             ``release/<device>``) and the service waits for their signed reports: every canary
             device done (``active``, ``rejected``, ``rolled_back``) or the wave's timeout;
``aborted``  the canary's failure rate was above ``--abort-on-failure-rate`` (or no canary
             device reported): the rest of the target never sees the release;
``complete`` the release went to the whole target (a fleet-wide one also on the fleet's retained
             ``model`` topic, so devices enrolled later get it).

A fleet-wide rollout waits until no round is open, and no round opens while one is staged or in
canary: a round never trains on a version still in canary. Rounds train on the *base* version:
the newest version produced by a round, or released to every device by a completed rollout.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import numpy as np

from bedside.constants import AGGREGATOR_ID, KIND_MODEL
from bedside.errors import InputError, ModelError
from bedside.federation.release import (
    STATES,
    Golden,
    Probation,
    Release,
    Target,
    chunk_digests,
)
from bedside.httpd import CONNECTION_TIMEOUT_S, bounded_server
from bedside.manifest import Manifest, sha256_bytes
from bedside.sqlite import transaction
from bedside.wire.envelope import encode
from bedside.wire.signing import SigningKey

log = logging.getLogger("bedside.aggregator.releases")

DDL = """
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    status TEXT NOT NULL CHECK (status IN ('staged', 'canary', 'complete', 'aborted')),
    origin TEXT NOT NULL,
    target TEXT NOT NULL,
    devices TEXT,
    params TEXT NOT NULL,
    counter INTEGER,
    version INTEGER,
    canary TEXT NOT NULL DEFAULT '[]',
    wave_started_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS release_reports (
    device TEXT NOT NULL, counter INTEGER NOT NULL, version INTEGER NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (device, counter)
);
CREATE TABLE IF NOT EXISTS release_counter (
    id INTEGER PRIMARY KEY CHECK (id = 1), counter INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS federations (
    started_after_round INTEGER PRIMARY KEY, rollout INTEGER NOT NULL, at REAL NOT NULL
);
"""
#: A later report of a release never replaces a later state with an earlier one.
_RANK = {"downloading": 0, "verified": 1, "active": 2, "rejected": 2, "rolled_back": 3}
FAILED = ("rejected", "rolled_back")
DONE = ("active", *FAILED)
GOLDEN_ROWS = 8
#: Golden vectors travel in the release's signed header (at most 256 KiB with the manifest):
#: rows are dropped to keep them within this many bytes of JSON (about 20 per value).
GOLDEN_BUDGET = 64 * 1024
GOLDEN_BYTES_PER_VALUE = 20
_UPDATABLE = frozenset({"status", "counter", "version", "canary", "wave_started_at", "reason"})


@dataclass(frozen=True)
class Rollout:
    id: int
    status: str
    origin: str
    target: Target
    params: dict[str, Any]
    counter: int | None
    version: int | None
    canary: tuple[str, ...]
    wave_started_at: float | None
    created_at: float
    updated_at: float
    reason: str

    @property
    def everyone(self) -> bool:
        return self.target.everyone

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "origin": self.origin,
                "target": self.target.spec, "devices": self.target.devices,
                "counter": self.counter, "version": self.version, "canary": list(self.canary),
                "created_at": self.created_at, "updated_at": self.updated_at,
                "reason": self.reason, **{k: v for k, v in self.params.items()
                                          if k not in ("golden", "staged")}}


class ReleaseStore:
    """Rollouts, device reports and the release counter, in the aggregator's ``state.db``."""

    def __init__(self, db: Any) -> None:
        self.db = db
        with transaction(db):
            for statement in _statements(DDL):
                db.execute(statement)

    # -- counter -------------------------------------------------------------------------------
    def current_counter(self) -> int:
        """The newest counter signed so far (0: none)."""
        row = self.db.execute("SELECT counter FROM release_counter WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    def next_counter(self) -> int:
        with transaction(self.db):
            row = self.db.execute("SELECT counter FROM release_counter WHERE id = 1").fetchone()
            value = (row[0] if row else 0) + 1
            self.db.execute("INSERT INTO release_counter (id, counter) VALUES (1, ?) ON CONFLICT "
                            "(id) DO UPDATE SET counter = excluded.counter", (value,))
        return int(value)

    # -- federations ---------------------------------------------------------------------------
    def federation_start(self) -> int:
        """Rounds up to this one belong to earlier federations (0: there was one only)."""
        row = self.db.execute("SELECT MAX(started_after_round) FROM federations").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def start_federation(self, after_round: int, rollout_id: int, now: float) -> None:
        with transaction(self.db):
            self.db.execute("INSERT OR IGNORE INTO federations VALUES (?, ?, ?)",
                            (after_round, rollout_id, now))

    # -- rollouts ------------------------------------------------------------------------------
    def stage(self, origin: str, target: Target, params: dict[str, Any],
              now: float | None = None) -> int:
        now = time.time() if now is None else now
        with transaction(self.db):
            cur = self.db.execute(
                "INSERT INTO rollouts (status, origin, target, devices, params, created_at, "
                "updated_at) VALUES ('staged', ?, ?, ?, ?, ?, ?)",
                (origin, target.spec, None if target.devices is None
                 else json.dumps(list(target.devices)), json.dumps(params), now, now))
        return int(cur.lastrowid or 0)

    def rollouts(self, status: tuple[str, ...] | None = None) -> list[Rollout]:
        q = "SELECT * FROM rollouts"
        args: tuple[Any, ...] = ()
        if status:
            q += f" WHERE status IN ({', '.join('?' * len(status))})"
            args = status
        return [_rollout(r) for r in self.db.execute(q + " ORDER BY id", args).fetchall()]

    def get(self, rollout_id: int) -> Rollout | None:
        row = self.db.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        return _rollout(row) if row else None

    def update(self, rollout_id: int, now: float, **fields: Any) -> None:
        for k in ("canary",):
            if k in fields:
                fields[k] = json.dumps(list(fields[k]))
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"rollouts: not updatable: {sorted(unknown)}")  # a programming error
        sets = ", ".join(f"{k} = ?" for k in fields)  # names from the allow-list above
        sql = f"UPDATE rollouts SET {sets}, updated_at = ? WHERE id = ?"  # noqa: S608
        with transaction(self.db):
            self.db.execute(sql, (*fields.values(), now, rollout_id))

    def held_back(self) -> set[int]:
        """Versions that are not the federation's: stored but not yet released (a crash between
        the two), in canary, aborted, or for some devices only."""
        out = set()
        for r in self.rollouts():
            if r.version is not None and (r.status != "complete" or not r.everyone):
                out.add(r.version)
        return out

    def blocks_rounds(self) -> bool:
        """A fleet-wide rollout is staged or in canary: no new round opens until it is done."""
        return any(r.everyone for r in self.rollouts(("staged", "canary")))

    # -- reports -------------------------------------------------------------------------------
    def report(self, device: str, counter: int, version: int, state: str, reason: str,
               detail: str, at: float) -> bool:
        """Record a device's report; False if it is older than what is known."""
        if state not in STATES:
            return False
        with transaction(self.db):
            row = self.db.execute("SELECT state FROM release_reports WHERE device = ? AND "
                                  "counter = ?", (device, counter)).fetchone()
            if row is not None and _RANK.get(row[0], 0) > _RANK[state]:
                return False
            self.db.execute(
                "INSERT INTO release_reports VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device, "
                "counter) DO UPDATE SET version = excluded.version, state = excluded.state, "
                "reason = excluded.reason, detail = excluded.detail, at = excluded.at",
                (device, counter, version, state, reason, detail[:300], at))
        return True

    def reports(self, counter: int | None = None) -> list[dict[str, Any]]:
        q = "SELECT device, counter, version, state, reason, detail, at FROM release_reports"
        rows = (self.db.execute(q + " WHERE counter = ? ORDER BY device", (counter,))
                if counter is not None else self.db.execute(q + " ORDER BY device, counter"))
        return [dict(zip(("device", "counter", "version", "state", "reason", "detail", "at"), r,
                         strict=True)) for r in rows.fetchall()]

    def devices(self) -> dict[str, dict[str, Any]]:
        """Each device's latest report (highest counter), by device."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.reports():
            out[r["device"]] = r  # ordered by counter within a device
        return out


def _statements(ddl: str) -> Iterator[str]:
    for s in ddl.split(";"):
        if s.strip():
            yield s


def _rollout(row: Any) -> Rollout:
    (rid, status, origin, target, devices, params, counter, version, canary, wave, created,
     updated, reason) = row
    return Rollout(id=rid, status=status, origin=origin,
                   target=Target(target, None if devices is None else tuple(json.loads(devices))),
                   params=json.loads(params), counter=counter, version=version,
                   canary=tuple(json.loads(canary)), wave_started_at=wave, created_at=created,
                   updated_at=updated, reason=reason)


# -- building releases -----------------------------------------------------------------------------
def golden_vectors(model_bytes: bytes, manifest: Manifest, n: int = GOLDEN_ROWS,
                   tolerance: float = 1e-4) -> Golden:
    """Inputs from the schema alone (its reference row, and rows spread over its scaling, inside
    the allowed ranges; never records) and the outputs this model gives on them."""
    from bedside.models.onnx_model import OnnxClassifier

    schema = manifest.schema
    values = int(np.prod(schema.reference_rows(1).shape))  # per row (a window: features x steps)
    n = max(1, min(n, GOLDEN_BUDGET // (GOLDEN_BYTES_PER_VALUE * values)))
    if GOLDEN_BYTES_PER_VALUE * values > GOLDEN_BUDGET * 2:
        raise ModelError(f"one input row has {values} values: too large for golden vectors in a "
                         "release header")
    rows = schema.reference_rows(n)
    loc, scale = schema.loc_scale()
    lo = np.array([-np.inf if f.min is None else f.min for f in schema.features], np.float32)
    hi = np.array([np.inf if f.max is None else f.max for f in schema.features], np.float32)
    z = np.random.default_rng(0).standard_normal((n - 1, len(loc))).astype(np.float32)
    spread = np.clip(loc + z * scale, lo, hi).astype(np.float32)[: n - 1]
    if rows.ndim == 3:  # time series: one value per feature, held over the window
        spread = np.repeat(spread[:, :, None], rows.shape[2], axis=2)
    rows[1:] = spread
    clf = OnnxClassifier(model_bytes, manifest.output, schema.labels, where="golden vectors")
    return Golden(rows, clf.probabilities(schema.validate(rows)), tolerance)


def read_golden(path: Path, tolerance: float | None) -> Golden:
    """A golden-vector file: JSON ``{"inputs": [[...]], "outputs": [[...]], "tolerance": t}``
    (outputs in the schema's label order)."""
    try:
        d = json.loads(Path(path).read_text())
        g = Golden.from_meta(d)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read golden vectors ({exc}); expected JSON with "
                         "'inputs', 'outputs' and optionally 'tolerance'") from None
    except Exception as exc:  # ValidationError from Golden
        raise InputError(f"{path}: {exc}") from None
    return g if tolerance is None else Golden(g.inputs, g.outputs, tolerance)


def sign_release(key: SigningKey, fleet: str, rel: Release, manifest: Manifest,
                 model_bytes: bytes | None, round_id: int = 0) -> bytes:
    """The signed model envelope: the release and manifest in its header; the ONNX bytes in its
    body when the release is inline, none when devices download its chunks."""
    tensors = ({"onnx": np.frombuffer(model_bytes, dtype=np.uint8)}
               if model_bytes is not None and rel.inline_ok else {})
    return encode(KIND_MODEL, AGGREGATOR_ID, key, tensors, round=round_id,
                  model_version=rel.version,
                  meta={"fleet": fleet, "manifest": manifest.to_dict(), "release": rel.to_meta()})


def make_release(*, counter: int, manifest: Manifest, model_bytes: bytes, origin: str,
                 target: Target, max_message_bytes: int, chunk_bytes: int, url: str,
                 golden: Golden | None, probation: Probation | None = None,
                 min_agent_version: str = "", new_schema: bool = False,
                 pushed_by: str = "") -> Release:
    """The release of ``manifest``'s version: inline when the file fits in one message, else in
    chunks from ``url`` (refused when there is no download endpoint)."""
    size = len(model_bytes)
    chunks: tuple[str, ...] = ()
    if size > max_message_bytes:
        if not url:
            raise ModelError(f"model v{manifest.version} is {size} bytes, more than [releases] "
                             f"max_message_bytes ({max_message_bytes}), and the aggregator has no "
                             "download endpoint: set [releases] http_port in aggregator.toml")
        chunks = chunk_digests(model_bytes, chunk_bytes)
    return Release(counter=counter, version=manifest.version, sha256=sha256_bytes(model_bytes),
                   size=size, origin=origin, target=target, golden=golden,
                   probation=probation or Probation(), min_agent_version=min_agent_version,
                   chunk_bytes=chunk_bytes, chunks=chunks, url=url, new_schema=new_schema,
                   pushed_by=pushed_by)


def canary_devices(devices: list[str], spec: str | None) -> list[str]:
    """``--canary N`` devices or ``--canary P%`` of them, drawn from the OS's entropy (at least
    one when a canary was asked for); none without ``--canary``."""
    if not spec:
        return []
    spec = str(spec).strip()
    try:
        n = (int(np.ceil(len(devices) * float(spec[:-1]) / 100.0)) if spec.endswith("%")
             else int(spec))
    except (ValueError, OverflowError):
        raise InputError(f"--canary {spec!r}: expected a number of devices or a percentage "
                         "(e.g. 2 or 10%)") from None
    if n < 0:
        raise InputError(f"--canary {spec!r} must not be negative")
    n = max(1, min(n, len(devices))) if devices else 0
    pool = sorted(devices)
    rng = secrets.SystemRandom()
    return sorted(rng.sample(pool, n))


# -- the download endpoint -------------------------------------------------------------------------
_PATH = re.compile(r"^/v1/([A-Za-z0-9_.-]{1,64})/objects/([0-9a-f]{64})/([0-9]{1,9})$")


class DownloadServer:
    """Serves registry objects in chunks: ``GET /v1/<fleet>/objects/<sha256>/<index>``.

    Read-only, content-addressed (devices check every chunk against the signed release),
    ``http.server`` in threads; TLS with the configured certificate, and client certificates of
    ``ca_file`` required when it is set. Binds 127.0.0.1 unless configured otherwise.
    """

    def __init__(self, objects: Path, fleet: str, host: str, port: int, chunk_bytes: int, *,
                 cert_file: Path | None = None, key_file: Path | None = None,
                 ca_file: Path | None = None,
                 allowed: Callable[[str], bool] | None = None) -> None:
        root, fleet_name, size = Path(objects), fleet, chunk_bytes
        may_serve = allowed or (lambda _sha: True)
        self.bytes_served = 0  # for benchmarks and operators: what left through this endpoint
        counter = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "bedside"
            sys_version = ""

            timeout = CONNECTION_TIMEOUT_S  # a peer that stalls (or never handshakes) is dropped

            def do_GET(self) -> None:
                m = _PATH.match(self.path)
                if m is None or m.group(1) != fleet_name or not may_serve(m.group(2)):
                    self.send_error(404, "not found")
                    return
                obj = root / f"{m.group(2)}.onnx"
                index = int(m.group(3))
                try:
                    with open(obj, "rb") as f:
                        f.seek(index * size)
                        data = f.read(size)
                except OSError:
                    self.send_error(404, "not found")
                    return
                if not data and index > 0:
                    self.send_error(404, "no such chunk")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                counter.bytes_served += len(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("download endpoint: " + format, *args)

        self.httpd, self.port = bounded_server(host, port, Handler, cert_file, key_file, ca_file)
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                        name="bedside-downloads")

    def start(self) -> DownloadServer:
        self._thread.start()
        log.info("download endpoint on %s:%d", self.httpd.server_address[0], self.port)
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def copy_model_dir(src: Path, dst: Path) -> None:
    """Stage a pushed model directory (manifest and its files) for the service."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def wait_for_rollout(store: ReleaseStore, rollout_id: int, timeout: float,
                     sleep: Callable[[float], None] = time.sleep) -> Rollout:
    deadline = time.monotonic() + timeout
    while True:
        r = store.get(rollout_id)
        assert r is not None
        if r.status in ("complete", "aborted") or time.monotonic() >= deadline:
            return r
        sleep(0.5)
