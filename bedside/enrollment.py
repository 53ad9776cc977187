"""Enrollment in one step: the token a data team hands to a clinic, and what both sides exchange.

The data team runs ``bedside aggregator invite --device-id ID``, which prints one line (a
:class:`Token`). On the device, ``bedside edge enroll --token LINE`` creates the device's keys and
sends their public halves to the aggregator's enrollment endpoint (:func:`request_body`), which
checks the token, enrols the signing key, signs the device's broker certificate and answers with
everything the device needs (:class:`Package`): the aggregator's public key, the CA and the
device's certificate, where the broker is, and the federation's current model, signed.

What the token carries, and why:

* ``fleet``, ``device_id``: what the device becomes. The aggregator binds the token to that
  device id: a token used by another id is refused.
* ``url`` and ``tls_sha256``: where the endpoint is, and the SHA-256 of its TLS certificate. The
  device has no CA yet, so it pins the certificate itself: a machine in the middle, or a server
  that is not the aggregator, is refused before the device sends anything.
* ``aggregator``: the fingerprint of the aggregator's signing key. The key the endpoint returns
  must match it, so the pinned key is the one the data team meant.
* ``token_id`` and ``secret``: the aggregator stores only the secret's SHA-256; the token is
  single-use and expires (``expires``, Unix time).

Anyone holding the token can enrol as that device until it is used or expires: hand it over as
you would a password (``--token-file`` keeps it out of shell history and ``ps``).

Offline enrollment: ``invite --offline --out FILE`` writes a :class:`Package` that also holds the
device's private keys (made by the data team, enrolled at once, the token used up there and then).
The file is then a credential: carry it on removable media, enrol, and destroy it.

Pure: no network and no files here; :mod:`bedside.aggregator.enrollment` and
:mod:`bedside.edge.enroll` do the I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bedside.errors import InputError
from bedside.wire.signing import validate_device_id, validate_id

TOKEN_PREFIX = "bedside-enroll-1."  # noqa: S105 (a format marker, not a secret)
BUNDLE_FORMAT = "bedside-enrollment-bundle-1"
#: The endpoint's one path.
ENROLL_PATH = "/v1/enroll"
#: A request holds a token, a public key and a CSR: anything bigger is refused unread.
MAX_REQUEST_BYTES = 64 * 1024
#: A response holds the current model, base64 in JSON.
MAX_RESPONSE_BYTES = 512 * 1024 * 1024
SECRET_BYTES = 32
_HEX = re.compile(r"[0-9a-f]{32}")
_SHA = re.compile(r"[0-9a-f]{64}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InputError(f"{what}: not base64url") from None


def secret_digest(secret: str) -> str:
    """What the aggregator stores instead of a token's secret."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def secret_matches(secret: str, digest: str) -> bool:
    return hmac.compare_digest(secret_digest(secret), digest)


def parse_duration(text: str) -> float:
    """``30m``, ``24h``, ``7d`` (or plain seconds) as seconds; at most 30 days."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if m is None:
        raise InputError(f"--expires {text!r}: expected a duration such as 30m, 24h or 7d")
    seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if not 60 <= seconds <= 30 * 86400:
        raise InputError(f"--expires {text!r}: between 1 minute and 30 days, please (a token is "
                         "a credential: keep its life short)")
    return seconds


@dataclass(frozen=True)
class Token:
    fleet: str
    device_id: str
    aggregator: str  # fingerprint of the aggregator's signing key
    token_id: str  # 32 hex digits
    secret: str = field(repr=False)  # base64url, 32 random bytes
    expires: float  # Unix time
    url: str = ""  # the enrollment endpoint ("" in an offline bundle)
    tls_sha256: str = ""  # the endpoint's certificate ("" for plain HTTP on loopback)
    group: str | None = None

    @classmethod
    def new(cls, *, fleet: str, device_id: str, aggregator: str, ttl: float, url: str = "",
            tls_sha256: str = "", group: str | None = None,
            now: float | None = None) -> Token:
        now = time.time() if now is None else now
        return cls(fleet=fleet, device_id=device_id, aggregator=aggregator,
                   token_id=secrets.token_hex(16), secret=_b64(secrets.token_bytes(SECRET_BYTES)),
                   expires=round(now + ttl), url=url, tls_sha256=tls_sha256, group=group)

    def encode(self) -> str:
        body = {k: v for k, v in asdict(self).items() if v not in ("", None)}
        return TOKEN_PREFIX + _b64(json.dumps(body, separators=(",", ":"),
                                              sort_keys=True).encode())

    @classmethod
    def parse(cls, text: str) -> Token:
        """A token as ``invite`` printed it (surrounding whitespace allowed). Errors say what is
        wrong: not a token, damaged (cut or mistyped), or missing a field."""
        t = text.strip().lstrip("\ufeff")  # a BOM left by an editor
        if not t.startswith(TOKEN_PREFIX):
            raise InputError(f"not a Bedside enrollment token (it should start with "
                             f"{TOKEN_PREFIX!r}); copy the whole line that 'bedside aggregator "
                             "invite' printed")
        try:
            raw = json.loads(_unb64(t[len(TOKEN_PREFIX):], "token"))
        except (InputError, ValueError, UnicodeDecodeError, RecursionError):
            raw = None
        if not isinstance(raw, dict):
            raise InputError("the enrollment token is damaged (cut short or mistyped); copy the "
                             "whole line again, or ask the data team for a new one")
        return cls.from_dict(raw, "enrollment token")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> Token:
        try:
            tok = cls(fleet=str(raw["fleet"]), device_id=str(raw["device_id"]),
                      aggregator=str(raw["aggregator"]), token_id=str(raw["token_id"]),
                      secret=str(raw["secret"]), expires=float(raw["expires"]),
                      url=str(raw.get("url", "")), tls_sha256=str(raw.get("tls_sha256", "")),
                      group=None if raw.get("group") is None else str(raw["group"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: missing or malformed field ({exc}); ask the data team "
                             "for a new token") from None
        tok.check_fields(where)
        return tok

    def check_fields(self, where: str) -> None:
        validate_id(self.fleet, what=f"{where}: fleet")
        validate_device_id(self.device_id, what=f"{where}: device id")
        if self.group is not None:
            validate_id(self.group, what=f"{where}: group")
        if not _HEX.fullmatch(self.token_id):
            raise InputError(f"{where}: malformed token id")
        if len(_unb64(self.secret, f"{where}: secret")) != SECRET_BYTES:
            raise InputError(f"{where}: malformed secret")
        if self.tls_sha256 and not _SHA.fullmatch(self.tls_sha256):
            raise InputError(f"{where}: malformed certificate pin")
        if self.url and not re.fullmatch(r"https?://[^\s/?#]+", self.url):
            raise InputError(f"{where}: malformed endpoint URL {self.url!r}")

    def check_expiry(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if now >= self.expires:
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.expires))
            raise InputError(f"the enrollment token for {self.device_id} expired at {when}; ask "
                             "the data team for a new one ('bedside aggregator invite')")


def request_body(token: Token, public_key: str, csr_pem: str | None) -> bytes:
    """What the device POSTs: the token's id and secret, its signing key's public half, and a
    certificate request for its broker identity (None: the federation uses no broker TLS)."""
    return json.dumps({"token_id": token.token_id, "secret": token.secret,
                       "device_id": token.device_id, "public_key": public_key,
                       "csr": csr_pem}).encode()


@dataclass(frozen=True)
class EnrollRequest:
    token_id: str
    secret: str = field(repr=False)
    device_id: str
    public_key: str
    csr: str | None

    @classmethod
    def parse(cls, body: bytes) -> EnrollRequest:
        try:
            raw = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise InputError("the request is not JSON") from None
        if not isinstance(raw, dict):
            raise InputError("the request is not a JSON object")
        strings = ("token_id", "secret", "device_id", "public_key")
        if any(not isinstance(raw.get(k), str) for k in strings):
            raise InputError(f"the request needs {', '.join(strings)} as strings")
        csr = raw.get("csr")
        if csr is not None and not isinstance(csr, str):
            raise InputError("csr: expected a PEM string or null")
        validate_device_id(raw["device_id"], what="device_id")
        return cls(token_id=raw["token_id"], secret=raw["secret"], device_id=raw["device_id"],
                   public_key=raw["public_key"], csr=csr)


@dataclass(frozen=True)
class Package:
    """What a device needs to run: the endpoint's answer, or an offline bundle's content."""

    fleet: str
    device_id: str
    aggregator_key: str  # VerifyKey.to_text()
    broker_host: str
    broker_port: int
    release: bytes  # the federation's current model release (signed envelope)
    model: bytes  # its ONNX file
    group: str | None = None
    ca_cert: str | None = None  # PEM: the broker's CA (None: no broker TLS)
    client_cert: str | None = None  # PEM: the device's certificate, CN = device id
    privacy: dict[str, Any] = field(default_factory=dict)  # suggested [privacy] of agent.toml
    # offline bundles only: private keys made by the data team
    device_key: str | None = field(default=None, repr=False)  # PEM (Ed25519)
    client_key: str | None = field(default=None, repr=False)  # PEM (EC)
    token: Token | None = field(default=None, repr=False)  # offline bundles: its invite

    def to_json(self) -> bytes:
        d: dict[str, Any] = {k: v for k, v in self.__dict__.items()
                             if k not in ("release", "model", "token") and v is not None}
        d["release"], d["model"] = _b64(self.release), _b64(self.model)
        if self.token is not None:
            d["token"] = asdict(self.token)
        if self.device_key is not None:
            d["format"] = BUNDLE_FORMAT
        return json.dumps(d).encode()

    @classmethod
    def from_json(cls, body: bytes, where: str) -> Package:
        try:
            raw = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise InputError(f"{where}: not JSON") from None
        if not isinstance(raw, dict):
            raise InputError(f"{where}: not a JSON object")
        try:
            pkg = cls(fleet=str(raw["fleet"]), device_id=str(raw["device_id"]),
                      aggregator_key=str(raw["aggregator_key"]),
                      broker_host=str(raw["broker_host"]), broker_port=int(raw["broker_port"]),
                      release=_unb64(str(raw["release"]), f"{where}: release"),
                      model=_unb64(str(raw["model"]), f"{where}: model"),
                      group=_opt_str(raw, "group"), ca_cert=_opt_str(raw, "ca_cert"),
                      client_cert=_opt_str(raw, "client_cert"),
                      privacy=dict(raw.get("privacy") or {}),
                      device_key=_opt_str(raw, "device_key"),
                      client_key=_opt_str(raw, "client_key"),
                      token=(Token.from_dict(raw["token"], f"{where}: token")
                             if isinstance(raw.get("token"), dict) else None))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: missing or malformed field ({exc})") from None
        validate_id(pkg.fleet, what=f"{where}: fleet")
        validate_device_id(pkg.device_id, what=f"{where}: device id")
        if not re.fullmatch(r"[A-Za-z0-9.:\[\]-]{1,253}", pkg.broker_host):
            raise InputError(f"{where}: broker host {pkg.broker_host!r} is not a host name or "
                             "address")
        if not 0 < pkg.broker_port < 65536:
            raise InputError(f"{where}: broker port {pkg.broker_port} out of range")
        if bool(pkg.client_cert) and not pkg.ca_cert:
            raise InputError(f"{where}: a client certificate without its CA")
        return pkg


def _opt_str(raw: dict[str, Any], key: str) -> str | None:
    v = raw.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise TypeError(f"{key} must be a string")
    return v


def is_bundle(text: bytes) -> bool:
    """Whether a ``--token-file`` holds an offline bundle (JSON) rather than a token line."""
    return text.lstrip()[:1] == b"{"


__all__ = ["BUNDLE_FORMAT", "ENROLL_PATH", "MAX_REQUEST_BYTES", "MAX_RESPONSE_BYTES",
           "EnrollRequest", "Package", "Token", "is_bundle", "parse_duration", "request_body",
           "secret_digest", "secret_matches"]
