"""``bedside aggregator serve | worker | invite | enroll | revoke | rotate-key | status``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bedside.cli import print_json, run_until_signalled


def build(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    p = sub.add_parser("serve", help="run rounds until the planned rounds are done or stopped")
    p.add_argument("--config", required=True, type=Path, metavar="aggregator.toml")
    p.set_defaults(func=_serve)

    p = sub.add_parser("worker", help="run a validator worker ([workers]): judge updates from "
                       "the shared subscription into PostgreSQL, beside 'serve' (docs/scaling.md)")
    p.add_argument("--config", required=True, type=Path, metavar="aggregator.toml")
    p.add_argument("--id", required=True, dest="worker_id", metavar="ID",
                   help="this worker's id, one of [workers] ids (fixed: its MQTT session "
                   "and its partial sums are kept under it)")
    p.add_argument("--cert", type=Path, metavar="FILE", help="its broker certificate (CN "
                   "aggregator-worker-ID; default: [mqtt] cert_file)")
    p.add_argument("--key", type=Path, metavar="FILE", help="that certificate's private key")
    p.add_argument("--monitor-port", type=int, default=0, metavar="PORT",
                   help="serve this worker's Prometheus /metrics on PORT ([monitor] host; "
                   "default: none)")
    p.set_defaults(func=_worker)

    p = sub.add_parser("invite", help="issue a single-use, expiring enrollment token for a "
                       "device: prints one line to hand to its clinic ('bedside edge enroll "
                       "--token')")
    p.add_argument("--config", required=True, type=Path, metavar="aggregator.toml")
    p.add_argument("--device-id", required=True)
    p.add_argument("--group", metavar="NAME", help="put the device in this group (a target "
                   "of 'models push --to group:NAME')")
    p.add_argument("--expires", metavar="DURATION", help="e.g. 30m, 24h (default: [enrollment] "
                   "token_hours), 7d")
    p.add_argument("--replace", action="store_true", help="the device is enrolled already: "
                   "its new keys replace the old ones (a replacement device)")
    p.add_argument("--offline", action="store_true", help="no endpoint: enrol the device now "
                   "with keys made here and write them, its certificate and the model to --out "
                   "(a credential: carry it on removable media and destroy it after use)")
    p.add_argument("--out", type=Path, metavar="FILE", help="with --offline: the bundle file "
                   "('bedside edge enroll --token-file FILE')")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_invite)

    p = sub.add_parser("enroll", help="enroll a device's public key by hand (it may then send "
                       "updates); 'invite' does it in one step")
    p.add_argument("--config", required=True, type=Path, metavar="aggregator.toml")
    p.add_argument("--device-id", required=True)
    p.add_argument("--public-key", required=True, type=Path, metavar="FILE.pub")
    p.add_argument("--force", action="store_true", help="replace an enrolled key")
    p.set_defaults(func=_enroll)

    p = sub.add_parser("revoke", help="stop accepting a device at once (a running aggregator "
                       "notices); with --ca, also revoke its broker certificate")
    p.add_argument("device", metavar="DEVICE_ID")
    p.add_argument("--config", required=True, type=Path, metavar="aggregator.toml")
    p.add_argument("--ca", type=Path, metavar="DIR", help="the broker CA ('bedside broker certs "
                   "--out'): also revoke the device's certificate and rewrite the CRL (default: "
                   "[enrollment] ca_dir)")
    p.set_defaults(func=_revoke)

    p = sub.add_parser("rotate-key", help="replace the aggregator's signing key: the old key "
                       "signs the new one, which devices verify and pin (restart the service)")
    p.add_argument("--config", required=True, type=Path, metavar="aggregator.toml")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_rotate_key)

    p = sub.add_parser("status", help="rounds, model versions and privacy spent (offline)")
    p.add_argument("--config", required=True, type=Path, metavar="aggregator.toml")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)


def _serve(ns: argparse.Namespace) -> int:
    from bedside.aggregator.config import load
    from bedside.aggregator.service import Aggregator

    agg = Aggregator(load(ns.config))

    def close() -> None:
        agg.close()
        agg.transport.close()

    return run_until_signalled(agg.run, close)


def _enroll(ns: argparse.Namespace) -> int:
    from bedside.aggregator.config import load
    from bedside.errors import InputError
    from bedside.wire.signing import VerifyKey, validate_device_id

    cfg = load(ns.config)
    validate_device_id(ns.device_id, what="--device-id")
    key = VerifyKey.load(ns.public_key)
    cfg.devices.mkdir(parents=True, exist_ok=True)
    dest = cfg.devices / f"{ns.device_id}.pub"
    if dest.exists() and not ns.force:
        existing = VerifyKey.load(dest)
        if existing.fingerprint != key.fingerprint:
            raise InputError(f"{ns.device_id} is already enrolled with another key "
                             f"({existing.fingerprint}); use --force to replace it")
    key.save(dest)
    audit_entry(cfg, "device_enrolled", f"device {ns.device_id}", key=key.fingerprint,
                how="by hand")
    print(f"enrolled {ns.device_id} (fingerprint {key.fingerprint}); it takes part from the next "
          "round")
    return 0


def _worker(ns: argparse.Namespace) -> int:
    from bedside.aggregator.config import load
    from bedside.aggregator.worker import Worker
    from bedside.errors import InputError

    if not 0 <= ns.monitor_port < 65536:
        raise InputError(f"--monitor-port {ns.monitor_port}: expected 0..65535")
    worker = Worker(load(ns.config), ns.worker_id, cert_file=ns.cert, key_file=ns.key,
                    monitor_port=ns.monitor_port)

    def close() -> None:
        worker.transport.close()
        worker.close()

    return run_until_signalled(worker.run, close)


def _invite(ns: argparse.Namespace) -> int:
    from bedside.aggregator.config import load
    from bedside.aggregator.enrollment import invite, offline_bundle
    from bedside.enrollment import parse_duration
    from bedside.errors import InputError
    from bedside.files import atomic_write_bytes

    cfg = load(ns.config)
    if ns.offline != (ns.out is not None):
        raise InputError("--offline and --out FILE go together (an offline bundle is a file)")
    if ns.out is not None and (ns.out.exists() or not ns.out.parent.is_dir()):
        raise InputError(f"--out {ns.out}: " + ("exists (a bundle is never overwritten)"
                                                 if ns.out.exists() else
                                                 "its directory does not exist"))
    ttl = parse_duration(ns.expires) if ns.expires else None
    tok = invite(cfg, ns.device_id, group=ns.group, ttl=ttl, replace_key=ns.replace,
                 offline=ns.offline)
    audit_entry(cfg, "invite_issued", f"device {ns.device_id}", group=ns.group, offline=ns.offline,
           replace=ns.replace, token=tok.token_id[:8], expires=tok.expires)
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(tok.expires))
    if ns.offline:
        pkg = offline_bundle(cfg, tok)
        atomic_write_bytes(ns.out, pkg.to_json(), mode=0o600)  # private keys: owner only
        info = {"device_id": tok.device_id, "bundle": str(ns.out), "expires": tok.expires,
                "aggregator_fingerprint": tok.aggregator}
        if ns.json:
            print_json(info)
        else:
            print(f"{ns.device_id} is enrolled; its bundle {ns.out} holds its private keys: carry "
                  "it to the device, run 'bedside edge enroll --token-file "
                  f"{ns.out.name} --dir DIR' there before {expires}, then destroy it.\n"
                  f"aggregator key fingerprint (check it on the device): {tok.aggregator}")
        return 0
    line = tok.encode()
    if ns.json:
        print_json({"device_id": tok.device_id, "token": line, "expires": tok.expires,
                    "url": tok.url, "aggregator_fingerprint": tok.aggregator})
    else:
        print(line)
        print(f"# single use, for {tok.device_id} only, until {expires}; on the device: bedside "
              "edge enroll --token-file FILE --dir DIR (hand it over as you would a password)",
              file=sys.stderr)
    return 0


def _revoke(ns: argparse.Namespace) -> int:
    """Move the device's key to ``<devices>/revoked/``: the running aggregator reloads its
    enrolled devices when that directory changes, and rejects the device's next message. Its
    unused enrollment tokens stop working, its broker certificate is revoked (CRL) and the
    broker's ACL rewritten."""
    import os

    from bedside.aggregator.config import load
    from bedside.aggregator.enrollment import Invites, refresh_broker
    from bedside.errors import InputError
    from bedside.wire.signing import validate_device_id

    cfg = load(ns.config)
    validate_device_id(ns.device, what="DEVICE_ID")
    key = cfg.devices / f"{ns.device}.pub"
    gone = cfg.devices / "revoked" / f"{ns.device}.pub"
    invites = Invites(cfg.state_path)
    try:
        voided = invites.void(ns.device, "device revoked", time.time())
    finally:
        invites.close()
    if voided:
        print(f"{voided} unused enrollment token(s) for {ns.device} no longer work")
    if key.exists():
        gone.parent.mkdir(exist_ok=True)
        os.replace(key, gone)
        print(f"{ns.device} is no longer enrolled: its updates are rejected from now on (its key "
              f"is kept in {gone})")
    elif gone.exists():
        print(f"{ns.device} was revoked before")
    elif not voided:
        raise InputError(f"{ns.device} is not enrolled in {cfg.devices} and has no unused token")
    ca = ns.ca or cfg.enrollment.ca_dir
    if ca is not None:
        from bedside.transport.pki import CRL_FILE, revoke

        if (ca / f"{ns.device}.crt").exists():
            serial = revoke(ca, ns.device)
            print(f"revoked its broker certificate (serial {serial:x}); {ca / CRL_FILE} "
                  "rewritten")
        else:
            print(f"no broker certificate for {ns.device} in {ca}: nothing to revoke there")
    audit_entry(cfg, "device_revoked", f"device {ns.device}", tokens_voided=voided,
           certificate=ca is not None)
    rewritten = refresh_broker(cfg)
    if rewritten:
        print(f"rewrote {', '.join(rewritten)}: restart Mosquitto so that it reads the CRL and "
              "refuses the device (bedside-broker-reload.path does it)")
    elif ca is not None:
        print("copy the CRL to the broker and regenerate its ACL ('bedside broker config'), "
              "then restart Mosquitto")
    return 0


def _rotate_key(ns: argparse.Namespace) -> int:
    from bedside.aggregator.config import load
    from bedside.aggregator.keys import rotate_key

    cfg = load(ns.config)
    old, new, sequence = rotate_key(cfg)
    from bedside.audit import record

    # signed by the old (retired) key: it hands the audit trail over to the new one
    record(cfg.data_dir / "audit.db", cfg.key.with_name(f"{cfg.key.name}.retired-{sequence}"),
           "aggregator", "key_rotated", "aggregator", old=old, new=new, rotation=sequence)
    info = {"old_fingerprint": old, "new_fingerprint": new, "rotation": sequence,
            "key": str(cfg.key), "public_key": str(cfg.key.with_suffix(".pub"))}
    if ns.json:
        print_json(info)
    else:
        print(f"rotation {sequence}: the aggregator's key is now {new} (was {old}; kept as "
              f"{cfg.key.name}.retired-{sequence}).\nRestart the aggregator service: it publishes "
              "the rotation, signed by the old key, before anything it signs with the new one, "
              "and devices pin the new key.\nGive devices enrolled from now on the new public "
              f"key ({info['public_key']}).")
    return 0


def _status(ns: argparse.Namespace) -> int:
    from bedside.aggregator.config import load
    from bedside.aggregator.state import State, open_rounds
    from bedside.models.registry import Registry

    cfg = load(ns.config)
    # the round tables: state.db, or the PostgreSQL database the service and its workers share
    state, registry = open_rounds(cfg, State(cfg.state_path)), Registry(cfg.registry_path)
    rounds: list[dict[str, Any]] = [
        {"round": r.round, "status": r.status, "model_version": r.model_version,
         "accepted": len(state.accepted(r.round)),
         "rejected": {k: v for k, v in state.rejections(r.round).items() if k != "duplicate"},
         "declined": state.declines(r.round)} for r in state.rounds()]
    latest = registry.latest()
    info = {"fleet": cfg.fleet, "versions": registry.versions(), "rounds": rounds,
            "latest_privacy": registry.manifest(latest).privacy if latest else {},
            "latest_metrics": registry.manifest(latest).metrics if latest else {}}
    if ns.json:
        print_json(info)
        return 0
    from bedside.federation.report import strength
    from bedside.models.catalog import privacy_text

    versions = info["versions"]
    acc = (info["latest_metrics"].get("holdout") or {}).get("accuracy")
    print(f"fleet {cfg.fleet}: " + (f"model versions v{versions[0]}..v{versions[-1]} (latest "
                                     f"v{latest}" + (f", held-out accuracy {acc:.4f})"
                                                     if acc is not None else ")")
                                     if versions else "no model version yet"))
    if rounds:
        print(f"{'round':>7}  {'status':<7}  {'base':>5}  {'accepted':>8}  {'declined':>8}  "
              "rejected")
    for r in rounds:
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(r["rejected"].items())) or "0"
        print(f"{r['round']:>7}  {r['status']:<7}  {'v' + str(r['model_version']):>5}  "
              f"{r['accepted']:>8}  {len(r['declined']):>8}  {rejected}")
    if latest is not None:
        m = registry.manifest(latest)
        print(f"privacy of v{latest}: {privacy_text(m)}"
              + (f": {strength(m.privacy.get('epsilon'))}" if "epsilon" in m.privacy else ""))
    return 0


def audit_entry(cfg: Any, action: str, subject: str, **detail: Any) -> None:
    """An entry in the aggregator's audit trail (<data_dir>/audit.db) for a command."""
    from bedside.audit import record

    record(cfg.data_dir / "audit.db", cfg.key, "aggregator", action, subject, **detail)
