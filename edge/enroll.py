"""``bedside edge enroll --token``: a device enrolled, configured and given its model in one step.

With a token (:class:`bedside.enrollment.Token`) the device makes its own keys (an Ed25519
signing key, an EC key for its broker certificate), connects to the enrollment endpoint the
token names, checks that the endpoint's certificate is the one the token pins *before sending
anything*, and sends the public halves with the token. With an offline bundle (``--token-file``
holding what ``aggregator invite --offline`` wrote) the keys come in the bundle.

Either way the device then checks what it received: the aggregator's key has the fingerprint
the token names, the certificate is its own (CN = its id, its key) and issued by the CA sent,
and the model release is signed by that aggregator key and matches the model file. Only then
does it write, under ``--dir``::

    agent.toml                   a working configuration (broker, TLS, keys, privacy)
    keys/<id>.key, <id>.pub      its signing key (0600) and public key
    keys/aggregator.pub          the pinned aggregator key
    tls/ca.crt, <id>.crt, .key   the broker's CA, its certificate and key (0600)
    data/                        records, ledger, models (0700; --data-dir elsewhere)

and installs the model, so ``bedside edge ingest`` works before the agent first runs.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import ssl
import urllib.parse
from pathlib import Path
from typing import Any

from bedside.constants import AGGREGATOR_ID, KIND_MODEL
from bedside.enrollment import (
    ENROLL_PATH,
    MAX_RESPONSE_BYTES,
    Package,
    Token,
    is_bundle,
    request_body,
)
from bedside.errors import BedsideError, ConfigError, InputError, TransportError
from bedside.files import atomic_write_bytes, private_dir
from bedside.wire.signing import KeyRing, SigningKey, VerifyKey

log = logging.getLogger("bedside.edge.enroll")
TIMEOUT_S = 60.0


def read_token_file(path: Path) -> Token | Package:
    """A ``--token-file``: one token line, or an offline bundle (JSON)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"--token-file {path}: cannot read it ({exc.strerror or exc})") from None
    if is_bundle(data):
        pkg = Package.from_json(data, str(path))
        if pkg.token is None or pkg.device_key is None:
            raise InputError(f"{path}: not an offline enrollment bundle (no token or keys)")
        return pkg
    try:
        return Token.parse(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: neither an enrollment token nor a bundle") from None


def enroll(source: Token | Package, directory: Path, *, data_dir: Path | None = None,
           privacy: dict[str, Any] | None = None, encrypt: bool = False) -> dict[str, Any]:
    """Enrol this device from a token (online) or an offline bundle; returns what was done."""
    tok = source if isinstance(source, Token) else source.token
    assert tok is not None
    tok.check_expiry()
    if encrypt:
        from bedside.sqlite import sqlcipher

        sqlcipher()  # installed, or say so before the token is used
    directory = directory.resolve()
    toml = directory / "agent.toml"
    if toml.exists():
        return _already(toml, tok)
    keys, tls = private_dir(directory / "keys"), directory / "tls"
    key_path = keys / f"{tok.device_id}.key"
    tls_key_path = tls / f"{tok.device_id}.key"
    if isinstance(source, Package):
        pkg = source
        assert pkg.device_key is not None
        signing = SigningKey.from_pem(pkg.device_key.encode(), "the bundle's device key")
        tls_key = pkg.client_key
    else:
        # keys of an attempt that failed before are used again: the aggregator may know them
        signing = SigningKey.load(key_path) if key_path.exists() else SigningKey.generate()
        from bedside.transport.pki import make_csr

        if tls_key_path.exists():
            tls_key = tls_key_path.read_text()
            csr = _csr_for(tls_key, tok.device_id)
        else:
            tls_key, csr = make_csr(tok.device_id)
        if not key_path.exists():
            signing.save(key_path)
        private_dir(tls)
        atomic_write_bytes(tls_key_path, tls_key.encode(), mode=0o600)
        pkg = fetch_package(tok, request_body(tok, signing.public.to_text(), csr))
    aggregator, manifest, rel = check_package(pkg, tok, signing, tls_key)
    chosen, ignored = suggested_privacy(pkg.privacy)
    chosen.update(privacy or {})
    # checked: write it all; agent.toml last (its presence means "enrolled": see _already)
    if key_path.exists():
        if SigningKey.load(key_path).public != signing.public:
            raise InputError(f"{key_path} holds another key than this enrollment's: the "
                             "directory belongs to another enrollment; use an empty --dir")
    else:
        signing.save(key_path)
    signing.public.save(keys / f"{tok.device_id}.pub")
    aggregator.save(keys / "aggregator.pub")
    mqtt: dict[str, Any] = {"host": pkg.broker_host, "port": pkg.broker_port}
    if pkg.ca_cert is not None:
        private_dir(tls)
        atomic_write_bytes(tls / "ca.crt", pkg.ca_cert.encode())
        mqtt["ca_file"] = str(tls / "ca.crt")
        if pkg.client_cert is not None and tls_key is not None:
            atomic_write_bytes(tls / f"{tok.device_id}.crt", pkg.client_cert.encode())
            atomic_write_bytes(tls_key_path, tls_key.encode(), mode=0o600)
            mqtt.update(cert_file=str(tls / f"{tok.device_id}.crt"), key_file=str(tls_key_path))
    data = private_dir(data_dir.resolve() if data_dir is not None else directory / "data")
    table: dict[str, Any] = {"device_id": tok.device_id, "fleet": tok.fleet,
                             "key": str(key_path), "aggregator_key": str(keys / "aggregator.pub"),
                             "data_dir": str(data), "mqtt": mqtt}
    if chosen:
        table["privacy"] = chosen
    if encrypt:
        from bedside.sqlite import write_key

        store_key = keys / "store.key"
        if not store_key.exists():
            write_key(store_key)
        table["storage"] = {"key_file": str(store_key)}
    from bedside.config import to_toml
    from bedside.edge.config import load

    header = (f"# Written by 'bedside edge enroll' for {tok.device_id} in fleet {tok.fleet}.\n"
              "# The [privacy] budget is this device's own decision: change it here (a smaller\n"
              "# epsilon protects patients more); the ledger in data_dir enforces it.\n")
    draft = directory / ".agent.toml.new"
    atomic_write_bytes(draft, (header + to_toml(table)).encode(), mode=0o640)
    try:
        cfg = load(draft)
    except ConfigError as exc:
        draft.unlink()
        raise ConfigError(f"{tok.device_id} cannot be configured: {exc}. Run the same command "
                          "again with your own budget, e.g. --record-epsilon 8") from None
    from bedside.edge.updater import ModelManager
    from bedside.privacy.ledger import Ledger

    models = ModelManager(cfg.models_path)
    if models.manifest(rel.version) is None:
        models.install(pkg.model, manifest, rel.version, None, None, golden=rel.golden)
    Ledger(cfg.ledger_path, cfg.budgets()).close()  # created now, with the budgets it enforces
    from bedside.audit import AuditLog

    with AuditLog(cfg.data / "audit.db", signing, f"device:{tok.device_id}") as audit:
        audit.append("enrolled", f"device {tok.device_id}", actor="operator", fleet=tok.fleet,
                     aggregator=aggregator.fingerprint, key=signing.public.fingerprint,
                     model_version=rel.version, offline=isinstance(source, Package))
    draft.replace(toml)
    return {"device_id": tok.device_id, "fleet": tok.fleet, "config": str(toml),
            "already": False, "fingerprint": signing.public.fingerprint,
            "aggregator_fingerprint": aggregator.fingerprint, "model_version": rel.version,
            "broker": f"{pkg.broker_host}:{pkg.broker_port}", "tls": pkg.ca_cert is not None,
            "group": pkg.group, "privacy": chosen, "ignored_privacy": ignored,
            "encrypted": encrypt}


#: What an aggregator may suggest for a device's [privacy] table, and within which bounds: the
#: budgets. Never the device's safeguards against the aggregator itself (accept_noise,
#: allow_no_record_dp, min_noise_multiplier, max_clip_norm, ...): those are the device's.
SUGGESTIBLE = {"record_epsilon": (0.0, 100.0), "device_epsilon": (0.0, 1000.0),
               "record_delta": (0.0, 1e-3), "device_delta": (0.0, 1e-3)}


def suggested_privacy(suggestion: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """The budgets an aggregator suggests that a device takes (bounded numbers only), and the
    keys it ignored."""
    taken: dict[str, float] = {}
    for k, v in suggestion.items():
        bounds = SUGGESTIBLE.get(k)
        if (bounds is not None and isinstance(v, int | float) and not isinstance(v, bool)
                and bounds[0] < v <= bounds[1]):
            taken[k] = float(v)
    return taken, sorted(set(suggestion) - set(taken))


def _already(toml: Path, tok: Token) -> dict[str, Any]:
    """Run twice (an installer run again): the same device and fleet is fine, nothing else."""
    from bedside.edge.config import load

    cfg = load(toml)
    if (cfg.device_id, cfg.fleet) != (tok.device_id, tok.fleet):
        raise InputError(f"{toml} configures {cfg.device_id} in fleet {cfg.fleet}; this token is "
                         f"for {tok.device_id} in {tok.fleet}. Use another --dir")
    return {"device_id": cfg.device_id, "fleet": cfg.fleet, "config": str(toml),
            "already": True}


def _csr_for(key_pem: str, identity: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError("the broker key left by an earlier attempt is not an EC key; remove "
                         "the tls/ directory and enrol again")
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def fetch_package(tok: Token, body: bytes, timeout: float = TIMEOUT_S) -> Package:
    """POST the request to the token's endpoint; the TLS certificate must be the pinned one."""
    from bedside.transport import is_loopback

    if not tok.url:
        raise InputError("this token names no enrollment endpoint (it came from an offline "
                         "bundle): use --token-file with the bundle")
    u = urllib.parse.urlsplit(tok.url)
    try:
        host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        raise InputError(f"the token names {tok.url!r}: not a valid address") from None
    conn: http.client.HTTPConnection
    if u.scheme == "https":
        if not tok.tls_sha256:
            raise InputError("the token names an HTTPS endpoint but no certificate pin")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the pin is checked instead
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
    elif is_loopback(host) and not tok.tls_sha256:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    else:
        raise InputError(f"the token names {tok.url}: plain HTTP is accepted on this machine's "
                         "loopback only")
    try:
        conn.connect()
        if isinstance(conn, http.client.HTTPSConnection):
            sock = conn.sock
            assert isinstance(sock, ssl.SSLSocket)
            der = sock.getpeercert(binary_form=True) or b""
            if hashlib.sha256(der).hexdigest() != tok.tls_sha256:
                raise InputError(f"{tok.url} presented another certificate than the one the "
                                 "token pins: this is not the aggregator (or someone is in the "
                                 "middle). Nothing was sent. Check the address with the data "
                                 "team")
        conn.request("POST", ENROLL_PATH, body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read(MAX_RESPONSE_BYTES + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise TransportError(f"cannot reach the enrollment endpoint {tok.url} ({exc}); check "
                             "the network and the address with the data team, then run the "
                             "same command again") from None
    finally:
        conn.close()
    if len(data) > MAX_RESPONSE_BYTES:
        raise InputError(f"{tok.url}: the answer exceeds {MAX_RESPONSE_BYTES} bytes; refused")
    if resp.status != 200:
        try:
            why = json.loads(data)
            message, code = str(why["message"]), str(why["error"])
        except (ValueError, KeyError, TypeError):
            message, code = f"HTTP {resp.status}", "http"
        raise EnrollmentRefused(code, f"the aggregator refused the enrollment: {message}")
    return Package.from_json(data, f"the answer of {tok.url}")


class EnrollmentRefused(InputError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_package(pkg: Package, tok: Token, signing: SigningKey,
                  tls_key: str | None) -> tuple[VerifyKey, dict[str, Any], Any]:
    """Everything received is what the token promised; returns the aggregator key, the model's
    manifest and its release."""
    from bedside.federation.release import Release
    from bedside.manifest import sha256_bytes
    from bedside.wire.envelope import decode

    where = "the enrollment answer"
    if (pkg.fleet, pkg.device_id) != (tok.fleet, tok.device_id):
        raise InputError(f"{where} is for {pkg.device_id} in {pkg.fleet}, not {tok.device_id} in "
                         f"{tok.fleet}; refused")
    aggregator = VerifyKey.from_text(pkg.aggregator_key, source=f"{where}: aggregator key")
    if aggregator.fingerprint != tok.aggregator:
        raise InputError(f"{where} carries aggregator key {aggregator.fingerprint}, but the token "
                         f"names {tok.aggregator}; refused (not the aggregator the data team "
                         "meant)")
    if pkg.client_cert is not None:
        _check_certificate(pkg, tok.device_id, tls_key)
    ring = KeyRing()
    ring.add(AGGREGATOR_ID, aggregator)
    try:
        env = decode(pkg.release, ring, kinds={KIND_MODEL})
    except BedsideError as exc:
        raise InputError(f"{where}: the model release does not verify ({exc}); refused") \
            from None
    meta = env.header.meta
    if meta.get("fleet") != tok.fleet:
        raise InputError(f"{where}: the model release is for fleet {meta.get('fleet')!r}")
    rel = Release.from_meta(meta.get("release"))
    manifest = meta.get("manifest")
    if not isinstance(manifest, dict):
        raise InputError(f"{where}: the model release has no manifest")
    if sha256_bytes(pkg.model) != rel.sha256:
        raise InputError(f"{where}: the model file does not match its signed release; refused")
    return aggregator, manifest, rel


def _check_certificate(pkg: Package, device_id: str, tls_key: str | None) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from bedside.transport.pki import certificate_cn

    assert pkg.client_cert is not None and pkg.ca_cert is not None
    if certificate_cn(pkg.client_cert) != device_id:
        raise InputError(f"the broker certificate received is not {device_id}'s; refused")
    try:
        cert = x509.load_pem_x509_certificate(pkg.client_cert.encode())
        ca = x509.load_pem_x509_certificate(pkg.ca_cert.encode())
        cert.verify_directly_issued_by(ca)
    except Exception as exc:  # malformed, wrong issuer, bad signature: all the same refusal
        raise InputError(f"the broker certificate received is not issued by the CA sent with "
                         f"it ({exc}); refused") from None
    if tls_key is None:
        raise InputError("a broker certificate came without its key")
    key = serialization.load_pem_private_key(tls_key.encode(), password=None)
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
        raise InputError("the broker certificate received is not for this device's key; refused")
