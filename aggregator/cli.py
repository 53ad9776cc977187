"""``bedside aggregator serve | enroll | revoke | status``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bedside.cli import print_json, run_until_signalled


def build(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    p = sub.add_parser("serve", help="run rounds until the planned rounds are done or stopped")
    p.add_argument("--config", required=True, type=Path, metavar="aggregator.toml")
    p.set_defaults(func=_serve)

    p = sub.add_parser("enroll", help="enroll a device's public key (it may then send updates)")
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
                   "--out'): also revoke the device's certificate and rewrite the CRL")
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
    print(f"enrolled {ns.device_id} (fingerprint {key.fingerprint}); it takes part from the next "
          "round")
    return 0


def _revoke(ns: argparse.Namespace) -> int:
    """Move the device's key to ``<devices>/revoked/``: the running aggregator reloads its
    enrolled devices when that directory changes, and rejects the device's next message."""
    import os

    from bedside.aggregator.config import load
    from bedside.errors import InputError
    from bedside.wire.signing import validate_device_id

    cfg = load(ns.config)
    validate_device_id(ns.device, what="DEVICE_ID")
    key = cfg.devices / f"{ns.device}.pub"
    gone = cfg.devices / "revoked" / f"{ns.device}.pub"
    if key.exists():
        gone.parent.mkdir(exist_ok=True)
        os.replace(key, gone)
        print(f"{ns.device} is no longer enrolled: its updates are rejected from now on (its key "
              f"is kept in {gone})")
    elif gone.exists():
        print(f"{ns.device} was revoked before")
    else:
        raise InputError(f"{ns.device} is not enrolled in {cfg.devices}")
    if ns.ca is not None:
        from bedside.transport.pki import CRL_FILE, revoke

        serial = revoke(ns.ca, ns.device)
        print(f"revoked its broker certificate (serial {serial:x}); {ns.ca / CRL_FILE} "
              "rewritten: restart or reload Mosquitto (SIGHUP), and regenerate the ACL "
              "('bedside broker acl --devices')")
    return 0


def _rotate_key(ns: argparse.Namespace) -> int:
    from bedside.aggregator.config import load
    from bedside.aggregator.keys import rotate_key

    cfg = load(ns.config)
    old, new, sequence = rotate_key(cfg)
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
    from bedside.aggregator.state import State
    from bedside.models.registry import Registry

    cfg = load(ns.config)
    state, registry = State(cfg.state_path), Registry(cfg.registry_path)
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
