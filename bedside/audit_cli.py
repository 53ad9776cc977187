"""``bedside audit verify | show``: check a component's audit trail, or read its last entries."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bedside.cli import print_json


def build(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    p = sub.add_parser("verify", help="check that no entry was edited, dropped, inserted or "
                       "reordered, and every signature; names the first bad entry")
    p.add_argument("--log", required=True, type=Path, metavar="audit.db",
                   help="a device's <data_dir>/audit.db or the aggregator's")
    p.add_argument("--key", required=True, action="append", type=Path, metavar="FILE.pub",
                   help="the component's public key (repeat it for keys it rotated away)")
    p.add_argument("--anchor", metavar="SEQ:HASH", help="the head an earlier verification "
                   "printed: detects entries cut from the end")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_verify)

    p = sub.add_parser("show", help="the last entries (who or what did what, when)")
    p.add_argument("--log", required=True, type=Path, metavar="audit.db")
    p.add_argument("--last", type=int, default=20, metavar="N")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_show)


def _verify(ns: argparse.Namespace) -> int:
    from bedside.audit import parse_anchor, verify
    from bedside.wire.signing import VerifyKey

    keys = [VerifyKey.load(k) for k in ns.key]
    verdict = verify(ns.log, keys, parse_anchor(ns.anchor) if ns.anchor else None)
    if ns.json:
        print_json(verdict.to_dict())
    elif verdict.ok:
        head = verdict.head
        print(f"{ns.log}: {verdict.entries} entries, chain and signatures intact"
              + (f"; head {head[0]}:{head[1]} (record it; pass it as --anchor next time)"
                 if head else ""))
    else:
        print(f"{ns.log}: TAMPERED: {verdict.problem}")
    return 0 if verdict.ok else 1


def _show(ns: argparse.Namespace) -> int:
    from bedside.audit import tail

    entries = tail(ns.log, ns.last)
    if ns.json:
        print_json({"entries": entries})
        return 0
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["at"]))
        detail = ", ".join(f"{k}={v}" for k, v in e["detail"].items())
        print(f"{e['seq']:>6}  {when}  {e['actor']:<9} {e['action']:<20} {e['subject']:<14} "
              f"{detail}")
    return 0
