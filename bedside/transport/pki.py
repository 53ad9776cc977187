"""A small certificate authority for broker TLS: one certificate per device.

Mosquitto (``deploy/mosquitto/mosquitto.conf``) requires a client certificate and takes its
Common Name as the username its ACL checks (``use_identity_as_username``), so a device can publish
only on its own topics. This module creates a CA, the broker's server certificate and one client
certificate per identity (devices and the aggregator). It is what the integration tests use and
what a pilot site can use; a hospital with its own PKI issues the same certificates from it.

Private keys are written with mode 0600 and never logged.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bedside.errors import InputError
from bedside.files import atomic_write_bytes

VALID_DAYS = 825


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    atomic_write_bytes(path, data, mode=0o600)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bedside"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey,
          issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
          server_hosts: list[str] | None = None, client: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
         .public_key(public).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                          crl_sign=True, content_commitment=False,
                                          key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False,
                                          decipher_only=False), critical=True)
    if server_hosts:
        alt: list[x509.GeneralName] = []
        for h in server_hosts:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                alt.append(x509.DNSName(h))
        b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                            critical=False)
    if client:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def create_ca(out: Path, name: str = "Bedside fleet CA") -> None:
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ca.key").exists():
        raise InputError(f"{out / 'ca.key'} exists; refusing to replace a CA (remove it first)")
    key = _key()
    cert = _cert(name, key, _name(name), key, ca=True)
    _write_key(out / "ca.key", key)
    atomic_write_bytes(out / "ca.crt", _pem(cert))
    write_crl(out)  # empty: the broker's config names it from the start


CRL_FILE = "ca.crl"
REVOKED_FILE = "revoked.json"


def revoked(out: Path) -> list[dict[str, object]]:
    """The certificates the CA in ``out`` revoked: identity, serial, time."""
    import json

    path = out / REVOKED_FILE
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({exc}); restore it from backup") from None
    if not isinstance(entries, list):
        raise InputError(f"{path}: expected a list of revoked certificates")
    return entries


def write_crl(out: Path) -> Path:
    """(Re)write ``ca.crl``: every revoked certificate's serial, signed by the CA, valid for
    ``VALID_DAYS`` (an expired CRL makes Mosquitto refuse every client: rewrite it before then
    with ``bedside broker crl``)."""
    ca_cert, ca_key = _load_ca(out)
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
         .last_update(now - dt.timedelta(minutes=5))
         .next_update(now + dt.timedelta(days=VALID_DAYS)))
    for entry in revoked(out):
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(int(str(entry["serial"])))
            .revocation_date(dt.datetime.fromtimestamp(float(str(entry["at"])), dt.UTC))
            .build())
    crl = b.sign(ca_key, hashes.SHA256())
    atomic_write_bytes(out / CRL_FILE, crl.public_bytes(serialization.Encoding.PEM))
    return out / CRL_FILE


def revoke(out: Path, identity: str) -> int:
    """Revoke ``identity``'s certificate (issued by the CA in ``out``) and rewrite the CRL;
    returns its serial. Revoking twice is harmless."""
    import json
    import time

    path = out / f"{identity}.crt"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"{path}: no certificate for {identity!r} in {out}") from None
    except ValueError as exc:
        raise InputError(f"{path}: not a PEM certificate ({exc})") from None
    entries = revoked(out)
    if not any(int(str(e["serial"])) == cert.serial_number for e in entries):
        entries.append({"identity": identity, "serial": str(cert.serial_number),
                        "at": time.time()})
        atomic_write_bytes(out / REVOKED_FILE, (json.dumps(entries, indent=1) + "\n").encode())
    write_crl(out)
    return cert.serial_number


def _load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    except FileNotFoundError:
        raise InputError(f"{out}: no ca.crt/ca.key; create the CA first") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(f"{out / 'ca.key'}: not an EC key")
    return cert, key


def issue(out: Path, identity: str, *, server_hosts: list[str] | None = None) -> tuple[Path, Path]:
    """Issue ``identity.crt``/``identity.key`` signed by the CA in ``out``.

    With ``server_hosts`` it is a server certificate for those names/IPs (the broker); otherwise
    a client certificate whose CN is the identity (a device id or ``aggregator``).
    """
    _check_identity(identity)
    ca_cert, ca_key = _load_ca(out)
    key = _key()
    cert = _cert(identity, key, ca_cert.subject, ca_key, server_hosts=server_hosts or [],
                 client=not server_hosts)
    crt_path, key_path = out / f"{identity}.crt", out / f"{identity}.key"
    _write_key(key_path, key)
    atomic_write_bytes(crt_path, _pem(cert))
    return crt_path, key_path


def _check_identity(identity: str) -> None:
    if not identity or "/" in identity or identity.startswith("."):
        raise InputError(f"invalid certificate identity {identity!r}")


def make_csr(identity: str) -> tuple[str, str]:
    """A new key (PEM, PKCS#8) and a certificate request for ``identity`` (PEM): what a device
    sends to be enrolled, keeping its key."""
    _check_identity(identity)
    key = _key()
    csr = (x509.CertificateSigningRequestBuilder().subject_name(_name(identity))
           .sign(key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem.decode(), csr.public_bytes(serialization.Encoding.PEM).decode()


def sign_csr(out: Path, identity: str, csr_pem: str) -> str:
    """A client certificate for ``identity`` (CN) on the key of ``csr_pem``, signed by the CA in
    ``out``; also written to ``out/<identity>.crt`` (what :func:`revoke` revokes), after the
    certificate it replaces, if any, is revoked. The request's own subject and extensions are
    ignored: the CN is the identity the caller vouches for."""
    _check_identity(identity)
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise InputError(f"the certificate request is not a PEM CSR ({exc})") from None
    if not csr.is_signature_valid:
        raise InputError("the certificate request's signature does not verify (its sender does "
                         "not hold the key)")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise InputError("the certificate request must be for a P-256 EC key")
    ca_cert, ca_key = _load_ca(out)
    cert = _pem(_cert(identity, public, ca_cert.subject, ca_key, client=True))
    if (out / f"{identity}.crt").exists():
        revoke(out, identity)  # the certificate it replaces (a replaced device) stops working
    atomic_write_bytes(out / f"{identity}.crt", cert)
    return cert.decode()


def certificate_cn(pem: str) -> str:
    """The Common Name of a PEM certificate ('' if it has none)."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        raise InputError(f"not a PEM certificate ({exc})") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def acl_text(fleet: str, devices: list[str], aggregator: str = "aggregator",
             workers: Sequence[str] = ()) -> str:
    """A Mosquitto ACL for one federation: each device may publish only its own updates and
    status *in its own fleet*, and read that fleet's announcements, models and its own receipts;
    the aggregator (certificate CN ``aggregator``) owns the fleet's topics. Several fleets on one
    broker: concatenate one ACL per fleet (each with its own aggregator CN).

    Mosquitto patterns (``%u``) cannot name a device's fleet, so the rules are written per device:
    regenerate the file (``bedside broker acl``) when a device is enrolled or revoked.

    ``workers``: validator worker ids (``[workers] ids``); each (CN ``aggregator-worker-<id>``)
    may read the fleet's updates (through the shared subscription) and write receipts.
    """
    from bedside.constants import AGGREGATOR_ID, TOPIC_ROOT
    from bedside.wire.signing import validate_device_id, validate_id

    validate_id(fleet, what="fleet")
    validate_id(aggregator, what="aggregator identity")
    root = f"{TOPIC_ROOT}/{fleet}"
    lines = [f"# Bedside ACL for fleet {fleet!r}: generated by 'bedside broker acl'; regenerate it "
             "when devices are enrolled or revoked.",
             "# The username is the client certificate's CN (use_identity_as_username).", "",
             f"user {aggregator}", f"topic readwrite {root}/#", ""]
    for worker in sorted(set(workers)):
        validate_id(worker, what="worker id")
        lines += [f"user {AGGREGATOR_ID}-worker-{worker}", f"topic read {root}/update/+",
                  f"topic write {root}/receipt/+", ""]
    for device in sorted(set(devices)):
        validate_device_id(device)
        lines += [f"user {device}",
                  f"topic write {root}/update/{device}",
                  f"topic write {root}/status/{device}",
                  f"topic write {root}/report/{device}",
                  f"topic read {root}/round",
                  f"topic read {root}/model",
                  f"topic read {root}/key",
                  f"topic read {root}/release/{device}",
                  f"topic read {root}/receipt/{device}", ""]
    return "\n".join(lines)


#: The aggregator's model download endpoint's server certificate (``downloads.crt``).
DOWNLOADS_ID = "downloads"

#: The group Debian's Mosquitto runs as (it drops root privileges at start).
BROKER_GROUP = "mosquitto"


def create_fleet(out: str | Path, identities: list[str],
                 broker_hosts: list[str] | None = None) -> Path:
    """CA + broker certificate + one client certificate per identity, in ``out`` (0700; see
    :func:`share_with_broker` for the broker's own user)."""
    d = Path(out)
    create_ca(d)
    issue(d, "broker", server_hosts=broker_hosts or ["127.0.0.1", "localhost"])
    for ident in identities:
        issue(d, ident)
    os.chmod(d, 0o700)
    return d


def share_with_broker(d: Path, group: str = BROKER_GROUP) -> str:
    """Make the broker's files in ``d`` readable by ``group`` (Mosquitto 2 drops privileges to
    its own user, which must read them): the directory 0750, ``broker.key`` 0640, the CA and
    broker certificates and the CRL group-owned. Client and CA keys stay owner-only. Returns
    what was done, in words."""
    import grp

    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return f"no group {group!r} here: give the broker's user read access to {d} yourself"
    try:
        for name in (".", "ca.crt", "broker.crt", "broker.key", CRL_FILE):
            os.chown(d / name, -1, gid)
    except PermissionError:
        return (f"could not give group {group!r} the broker's files (run as root, or chgrp "
                f"{group} {d} {d}/ca.crt {d}/broker.* {d}/{CRL_FILE} yourself)")
    os.chmod(d, 0o750)  # noqa: S103 (group: the broker's user; others: nothing)
    os.chmod(d / "broker.key", 0o640)
    return f"the broker's files are readable by group {group!r} (Mosquitto's user)"
