"""Enrollment tokens on the aggregator: ``invite``, the enrollment endpoint, offline bundles.

``bedside aggregator invite`` stores a token's id, device id, group and the SHA-256 of its secret
in ``state.db`` (table ``invites``) and prints the token. The endpoint (``[enrollment] port``,
127.0.0.1 unless configured, TLS required elsewhere) takes one ``POST /v1/enroll``
(:func:`bedside.enrollment.request_body`) and, when the token is known, unused, unexpired and
bound to the device id given:

1. marks the token used (a conditional update: two requests with one token enrol once);
2. writes the device's public key to ``devices/<id>.pub`` (a running service reloads it);
3. signs the device's certificate request with the broker CA (``[enrollment] ca_dir``: CN = the
   device id), records its group, and rewrites the broker's ACL (``[enrollment] broker_dir``);
4. answers with a :class:`~bedside.enrollment.Package`: the aggregator's public key, the CA and
   the device's certificate, the broker's address and the federation's current model release.

If a step after the first fails, the token is given back and what was written is removed: the
device may try again. Every attempt is logged with its device id and outcome, never the secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bedside.audit import AuditLog
from bedside.enrollment import (
    ENROLL_PATH,
    MAX_REQUEST_BYTES,
    EnrollRequest,
    Package,
    Token,
    secret_digest,
    secret_matches,
)
from bedside.errors import BedsideError, InputError
from bedside.sqlite import open_db, transaction
from bedside.wire.signing import SigningKey, VerifyKey, validate_device_id, validate_id

if TYPE_CHECKING:
    from bedside.aggregator.config import AggregatorConfig

log = logging.getLogger("bedside.aggregator.enrollment")

DDL = """
CREATE TABLE IF NOT EXISTS invites (
    token_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, grp TEXT, secret_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL, expires_at REAL NOT NULL, replace_key INTEGER NOT NULL,
    used_at REAL, used_how TEXT, key_fingerprint TEXT);
CREATE TABLE IF NOT EXISTS device_groups (device_id TEXT PRIMARY KEY, grp TEXT NOT NULL);
"""


class Refused(InputError):
    """An enrollment the endpoint refuses: ``code`` (``forged``, ``used``, ``expired``,
    ``wrong_device``, ``enrolled``, ``malformed``) and the HTTP status it answers with."""

    def __init__(self, code: str, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.code, self.status = code, status


@dataclass(frozen=True)
class Invite:
    token_id: str
    device_id: str
    group: str | None
    expires_at: float
    replace_key: bool
    used_at: float | None
    used_how: str | None


class Invites:
    """The ``invites`` and ``device_groups`` tables of ``state.db`` (own connection)."""

    def __init__(self, state_path: Path) -> None:
        self.db = open_db(state_path, "aggregator state", DDL, private=True)

    def close(self) -> None:
        self.db.close()

    def add(self, tok: Token, *, replace_key: bool, now: float) -> int:
        """Store a new invite; earlier unused ones for the device stop working (superseded).
        Returns how many were superseded."""
        with transaction(self.db):
            n = self.void(tok.device_id, "superseded by a newer invite", now)
            self.db.execute("INSERT INTO invites (token_id, device_id, grp, secret_sha256, "
                            "created_at, expires_at, replace_key) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (tok.token_id, tok.device_id, tok.group, secret_digest(tok.secret),
                             now, tok.expires, int(replace_key)))
        return n

    def void(self, device_id: str, why: str, now: float) -> int:
        """Unused tokens for ``device_id`` stop working (an invite superseded, a device revoked);
        returns how many. Call inside a transaction, or alone."""
        cur = self.db.execute("UPDATE invites SET used_at = ?, used_how = ? WHERE device_id = ? "
                              "AND used_at IS NULL", (now, f"void: {why}", device_id))
        return int(cur.rowcount)

    def get(self, token_id: str) -> Invite | None:
        row = self.db.execute("SELECT token_id, device_id, grp, expires_at, replace_key, used_at, "
                              "used_how FROM invites WHERE token_id = ?", (token_id,)).fetchone()
        if row is None:
            return None
        return Invite(row[0], row[1], row[2], float(row[3]), bool(row[4]),
                      None if row[5] is None else float(row[5]), row[6])

    def consume(self, token_id: str, secret: str, device_id: str, fingerprint: str, how: str,
                now: float) -> tuple[Invite, bool]:
        """Check the token and mark it used, at most once (across threads and processes).
        Returns the invite and whether this is a retry: the same token and device key again,
        before expiry (an answer lost on the way, a device that failed after it): enrolled
        already, the device gets its package again."""
        with transaction(self.db):
            row = self.db.execute("SELECT secret_sha256, key_fingerprint FROM invites WHERE "
                                  "token_id = ?", (token_id,)).fetchone()
            inv = self.get(token_id)
            if row is None or inv is None or not secret_matches(secret, str(row[0])):
                raise Refused("forged", "this enrollment token was not issued by this "
                              "aggregator (or was mistyped): ask the data team for a new one")
            if inv.device_id != device_id:
                raise Refused("wrong_device", f"this token enrols {inv.device_id}, not "
                              f"{device_id}")
            if (inv.used_at is not None and inv.used_how == how == "endpoint"
                    and row[1] == fingerprint and now < inv.expires_at):
                return inv, True
            if inv.used_at is not None and (inv.used_how or "").startswith("void"):
                raise Refused("used", f"this enrollment token no longer works ({inv.used_how}); "
                              "ask the data team for a new one")
            if inv.used_at is not None:
                when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(inv.used_at))
                raise Refused("used", f"this enrollment token was used at {when} ({inv.used_how})"
                              "; a token enrols once: ask the data team for a new one")
            if now >= inv.expires_at:
                raise Refused("expired", "this enrollment token has expired; ask the data team "
                              "for a new one")
            cur = self.db.execute("UPDATE invites SET used_at = ?, used_how = ?, "
                                  "key_fingerprint = ? WHERE token_id = ? AND used_at IS NULL",
                                  (now, how, fingerprint, token_id))
            if cur.rowcount != 1:
                raise Refused("used", "this enrollment token was just used")
        return inv, False

    def give_back(self, token_id: str) -> None:
        """An enrollment that failed after :meth:`consume`: the token may be used again."""
        with transaction(self.db):
            self.db.execute("UPDATE invites SET used_at = NULL, used_how = NULL, "
                            "key_fingerprint = NULL WHERE token_id = ?", (token_id,))

    def set_group(self, device_id: str, group: str | None) -> None:
        with transaction(self.db):
            if group is None:
                self.db.execute("DELETE FROM device_groups WHERE device_id = ?", (device_id,))
            else:
                self.db.execute("INSERT INTO device_groups VALUES (?, ?) ON CONFLICT (device_id) "
                                "DO UPDATE SET grp = excluded.grp", (device_id, group))

    def group_of(self, device_id: str) -> str | None:
        row = self.db.execute("SELECT grp FROM device_groups WHERE device_id = ?",
                              (device_id,)).fetchone()
        return None if row is None else str(row[0])

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for device, grp in self.db.execute("SELECT device_id, grp FROM device_groups "
                                           "ORDER BY device_id"):
            out.setdefault(str(grp), []).append(str(device))
        return out

    def pending(self, now: float) -> list[Invite]:
        """Tokens not used yet and not expired."""
        rows = self.db.execute("SELECT token_id FROM invites WHERE used_at IS NULL AND "
                               "expires_at > ? ORDER BY created_at", (now,)).fetchall()
        return [inv for (t,) in rows if (inv := self.get(t)) is not None]


def enrolled_groups(cfg: AggregatorConfig) -> dict[str, list[str]]:
    """``[groups]`` of aggregator.toml joined with the groups devices were invited into."""
    out = {k: list(v) for k, v in cfg.groups.items()}
    if not cfg.state_path.exists():
        return out
    inv = Invites(cfg.state_path)
    try:
        for grp, devices in inv.groups().items():
            out[grp] = sorted(set(out.get(grp, [])) | set(devices))
    finally:
        inv.close()
    return out


def _endpoint_pin(cfg: AggregatorConfig) -> str:
    """SHA-256 of the endpoint's certificate (DER), which tokens pin ('' without TLS)."""
    cert = cfg.enrollment.cert_file
    if cert is None:
        return ""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        leaf = x509.load_pem_x509_certificates(Path(cert).read_bytes())[0]  # a chain: its leaf
    except (OSError, ValueError, IndexError) as exc:
        raise InputError(f"[enrollment] cert_file {cert}: cannot read it ({exc})") from None
    return hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()


def invite(cfg: AggregatorConfig, device_id: str, *, group: str | None = None,
           ttl: float | None = None, replace_key: bool = False, offline: bool = False,
           now: float | None = None) -> Token:
    """Issue a single-use token for ``device_id`` (stored in state.db) and return it."""
    now = time.time() if now is None else now
    validate_device_id(device_id, what="--device-id")
    if group is not None:
        validate_id(group, what="--group")
    existing = cfg.devices / f"{device_id}.pub"
    if existing.exists() and not replace_key:
        raise InputError(f"{device_id} is enrolled already ({existing}); to replace its keys "
                         "(a new device in its place) pass --replace, or revoke it first")
    ec = cfg.enrollment
    if not offline and not ec.port:
        raise InputError(f"{cfg.source}: [enrollment] port is 0, so no endpoint takes this "
                         "token; set [enrollment] port (and restart the service), or make an "
                         "offline bundle with --offline --out FILE")
    if not offline and not ec.url and ec.host in ("0.0.0.0", "::", ""):  # noqa: S104
        raise InputError(f"{cfg.source}: [enrollment] binds {ec.host!r}: set [enrollment] url "
                         "to the address devices reach it at")
    key = SigningKey.load(cfg.key)
    tok = Token.new(fleet=cfg.fleet, device_id=device_id, aggregator=key.public.fingerprint,
                    ttl=ec.token_hours * 3600 if ttl is None else ttl,
                    url="" if offline else ec.base_url,
                    tls_sha256="" if offline else _endpoint_pin(cfg), group=group, now=now)
    inv = Invites(cfg.state_path)
    try:
        superseded = inv.add(tok, replace_key=replace_key, now=now)
    finally:
        inv.close()
    if superseded:
        log.info("%d earlier unused invite(s) for %s no longer work", superseded, device_id)
    log.info("invite issued for %s (token %s…, expires %s)", device_id, tok.token_id[:8],
             time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(tok.expires)))
    return tok


class Enroller:
    """Turns a token and a device's public keys into an enrolled device and its package."""

    def __init__(self, cfg: AggregatorConfig) -> None:
        self.cfg = cfg
        self.invites = Invites(cfg.state_path)
        self.audit = AuditLog(cfg.data_dir / "audit.db", SigningKey.load(cfg.key), "aggregator")
        self._lock = threading.Lock()

    def close(self) -> None:
        self.invites.close()
        self.audit.close()

    def enroll(self, req: EnrollRequest, *, now: float | None = None,
               how: str = "endpoint") -> Package:
        now = time.time() if now is None else now
        try:
            key = VerifyKey.from_text(req.public_key, source="public_key")
        except BedsideError as exc:
            raise Refused("malformed", str(exc), 400) from None
        ec = self.cfg.enrollment
        if ec.ca_dir is not None and req.csr is None:
            raise Refused("malformed", "this federation's broker needs a certificate: the "
                          "request has no CSR", 400)
        with self._lock:
            # everything that can be known before a change is made
            release, model = self._current()
            aggregator_key = SigningKey.load(self.cfg.key).public.to_text()
            host, port = broker_address(self.cfg)
            inv, retry = self.invites.consume(req.token_id, req.secret, req.device_id,
                                              key.fingerprint, how, now)
            dest = self.cfg.devices / f"{req.device_id}.pub"
            if (not retry and dest.exists() and not inv.replace_key
                    and VerifyKey.load(dest).fingerprint != key.fingerprint):
                self.invites.give_back(req.token_id)
                raise Refused("enrolled", f"{req.device_id} is enrolled already with another "
                              "key; the data team can invite it again with --replace", 409)
            previous = dest.read_bytes() if dest.exists() else None
            group_before = self.invites.group_of(req.device_id)
            cert_issued = False
            try:
                client_cert = ca_cert = None
                if ec.ca_dir is not None and req.csr is not None:
                    from bedside.transport.pki import sign_csr

                    try:
                        client_cert = sign_csr(ec.ca_dir, inv.device_id, req.csr)
                    except InputError as exc:
                        raise Refused("malformed", str(exc), 400) from None
                    cert_issued = True
                    ca_cert = (ec.ca_dir / "ca.crt").read_text()
                self.cfg.devices.mkdir(parents=True, exist_ok=True)
                key.save(dest)
                if inv.group is not None:
                    self.invites.set_group(inv.device_id, inv.group)
                refresh_broker(self.cfg)
            except BaseException:
                if not retry:
                    self.invites.give_back(req.token_id)
                if previous is None:
                    dest.unlink(missing_ok=True)
                else:
                    dest.write_bytes(previous)
                self.invites.set_group(inv.device_id, group_before)
                if cert_issued and ec.ca_dir is not None:
                    from bedside.transport.pki import revoke

                    with contextlib.suppress(Exception):  # a certificate nobody received
                        revoke(ec.ca_dir, inv.device_id)
                with contextlib.suppress(Exception):
                    refresh_broker(self.cfg)
                raise
            self.audit.append("device_enrolled", f"device {inv.device_id}", actor=how,
                              key=key.fingerprint, group=inv.group, retry=retry,
                              token=inv.token_id[:8])
        log.info("enrolled %s (key %s%s%s)", inv.device_id, key.fingerprint,
                 f", group {inv.group}" if inv.group else "", ", again: a retry" if retry else "")
        return Package(fleet=self.cfg.fleet, device_id=inv.device_id,
                       aggregator_key=aggregator_key, broker_host=host, broker_port=port,
                       release=release, model=model, group=inv.group, ca_cert=ca_cert,
                       client_cert=client_cert, privacy=dict(ec.privacy))

    def _current(self) -> tuple[bytes, bytes]:
        """The federation's current model: its signed release and its ONNX file."""
        from bedside.aggregator.releases import ReleaseStore
        from bedside.aggregator.rollout import base_version
        from bedside.models.registry import Registry

        registry = Registry(self.cfg.registry_path)
        version = base_version(registry, ReleaseStore(self.invites.db))
        release = registry.release(version) if version is not None else None
        if version is None or release is None:
            raise Refused("not_ready", "the federation has no model yet: start the aggregator "
                          "service once, then enrol", 503)
        return release, registry.model_bytes(version)


def broker_address(cfg: AggregatorConfig) -> tuple[str, int]:
    if cfg.enrollment.broker:
        from bedside.transport.mosquitto import parse_listener

        return parse_listener(cfg.enrollment.broker)
    return cfg.mqtt.host, cfg.mqtt.port


def refresh_broker(cfg: AggregatorConfig) -> list[str]:
    """Rewrite the ACL (enrolled devices) and the CRL copy in ``[enrollment] broker_dir``;
    returns what was rewritten. Mosquitto reads the ACL again on SIGHUP and the CRL when it
    restarts (``deploy/systemd/bedside-broker-reload.path`` restarts it when either changes)."""
    import fcntl

    from bedside.files import atomic_write_bytes
    from bedside.transport.pki import CRL_FILE, acl_text
    from bedside.wire.signing import KeyRing

    d = cfg.enrollment.broker_dir
    if d is None:
        return []
    done = []
    with open(d / ".bedside.lock", "a") as lock:  # the service and the CLI, one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        devices = list(KeyRing.from_dir(cfg.devices)) if cfg.devices.is_dir() else []
        atomic_write_bytes(d / "acl", acl_text(cfg.fleet, devices, aggregator_cn(cfg),
                                                cfg.workers.ids).encode())
        done.append(str(d / "acl"))
        ca = cfg.enrollment.ca_dir
        if ca is not None and (ca / CRL_FILE).exists():
            atomic_write_bytes(d / CRL_FILE, (ca / CRL_FILE).read_bytes(), mode=0o644)
            done.append(str(d / CRL_FILE))
    return done


def aggregator_cn(cfg: AggregatorConfig) -> str:
    """The aggregator's MQTT identity: its certificate's CN (``aggregator`` without TLS)."""
    from bedside.transport.pki import certificate_cn

    if cfg.mqtt.cert_file is None:
        return "aggregator"
    return certificate_cn(Path(cfg.mqtt.cert_file).read_text()) or "aggregator"


def offline_bundle(cfg: AggregatorConfig, tok: Token, *, now: float | None = None) -> Package:
    """Enrol ``tok``'s device here, with keys made here, and return the bundle that carries them
    (the token is used up by it)."""
    from bedside.enrollment import request_body
    from bedside.transport.pki import make_csr

    signing = SigningKey.generate()
    client_key, csr = make_csr(tok.device_id)
    req = EnrollRequest.parse(request_body(tok, signing.public.to_text(),
                                           csr if cfg.enrollment.ca_dir is not None else None))
    enroller = Enroller(cfg)
    try:
        pkg = enroller.enroll(req, now=now, how="offline bundle")
    finally:
        enroller.close()
    from dataclasses import replace

    return replace(pkg, device_key=signing.private_pem().decode(),
                   client_key=client_key if pkg.client_cert else None, token=tok)


class EnrollmentServer:
    """``POST /v1/enroll`` over HTTPS (HTTP on loopback only), in threads."""

    def __init__(self, cfg: AggregatorConfig) -> None:
        from bedside.httpd import MAX_PER_CLIENT, bounded_server

        self.enroller = Enroller(cfg)
        enroller = self.enroller

        class Handler(BaseHTTPRequestHandler):
            server_version = "bedside"
            sys_version = ""
            timeout = 30.0

            def do_POST(self) -> None:
                if self.path != ENROLL_PATH:
                    self._answer(404, {"error": "not_found", "message": "no such endpoint"})
                    return
                try:
                    length = int(self.headers.get("Content-Length", ""))
                except ValueError:
                    length = -1
                if not 0 < length <= MAX_REQUEST_BYTES:
                    self._answer(413 if length > 0 else 411,
                                 {"error": "malformed", "message": "request size missing or "
                                  f"over {MAX_REQUEST_BYTES} bytes"})
                    return
                body = self.rfile.read(length)
                device = "?"
                try:
                    req = EnrollRequest.parse(body)
                    device = req.device_id
                    pkg = enroller.enroll(req)
                except Refused as exc:
                    log.warning("enrollment of %s refused: %s (%s)", device, exc.code, exc)
                    self._answer(exc.status, {"error": exc.code, "message": str(exc)})
                    return
                except InputError as exc:
                    log.warning("enrollment request refused: %s", exc)
                    self._answer(400, {"error": "malformed", "message": str(exc)})
                    return
                except Exception:
                    log.exception("enrollment of %s failed", device)
                    self._answer(500, {"error": "internal", "message": "the aggregator could "
                                       "not enrol this device; its operator's log says why"})
                    return
                self._send(200, pkg.to_json())

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                import json

                self._send(status, json.dumps(body).encode())

            def _send(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("enrollment endpoint: " + format, *args)

        ec = cfg.enrollment
        self.httpd, self.port = bounded_server(ec.host, ec.port, Handler, ec.cert_file,
                                               ec.key_file, per_client=MAX_PER_CLIENT)
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                        name="bedside-enrollment")

    def start(self) -> EnrollmentServer:
        self._thread.start()
        log.info("enrollment endpoint on %s:%d", self.httpd.server_address[0], self.port)
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.enroller.close()
