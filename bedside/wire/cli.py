"""``bedside keys``: generate and inspect Ed25519 signing keys.

``bedside keys generate --out DIR [--name NAME] [--force] [--json]`` writes ``NAME.key`` (mode
0600, stays on this machine) and ``NAME.pub`` (share it: enrollment, pinning) and prints the
fingerprint. ``bedside keys show FILE [--json]`` prints the public key and fingerprint of a
``.key`` or ``.pub`` file. Exit codes: 0 ok, 1 failure (key files), 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bedside.cli import print_json
from bedside.errors import KeyStoreError
from bedside.wire.signing import SigningKey, VerifyKey, generate_keypair

DEFAULT_NAME = "bedside"


def build(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")

    g = sub.add_parser(
        "generate", help="write NAME.key (private, mode 0600) and NAME.pub (public)",
        description="Generate an Ed25519 key pair. The .key file never leaves this machine; the "
                    ".pub file is what you enroll (devices) or pin (the aggregator's key).")
    g.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="directory to write the key files into (created if missing)")
    g.add_argument("--name", default=DEFAULT_NAME, metavar="NAME",
                   help=f"file name stem, e.g. the device id or 'aggregator' "
                        f"(default: {DEFAULT_NAME})")
    g.add_argument("--force", action="store_true",
                   help="replace an existing key pair (whatever trusts the old key stops "
                        "accepting this sender)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=_generate)

    s = sub.add_parser("show", help="print the public key and fingerprint of a .key or .pub file",
                       description="Print the public key text and fingerprint of a key file. A "
                                   "private key file must have mode 0600.")
    s.add_argument("file", type=Path, metavar="FILE", help="a NAME.key or NAME.pub file")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_show)


def _generate(ns: argparse.Namespace) -> int:
    key_path, pub_path = generate_keypair(ns.out, ns.name, overwrite=ns.force)
    public = VerifyKey.load(pub_path)
    info = {"name": ns.name, "private_key": os.fspath(key_path), "public_key": os.fspath(pub_path),
            "public_key_text": public.to_text(), "fingerprint": public.fingerprint}
    if ns.json:
        print_json(info)
    else:
        print(f"wrote {key_path} (private, mode 0600: keep it on this machine, never copy it)\n"
              f"wrote {pub_path} (public: enroll or pin this one)\n"
              f"fingerprint {public.fingerprint} (compare it out of band when enrolling)")
    return 0


def _is_private(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(64)
    except FileNotFoundError:
        raise KeyStoreError(f"{path}: no such key file") from None
    except OSError as exc:
        raise KeyStoreError(f"{path}: cannot read the key file ({exc.strerror or exc})") from None
    return head.lstrip().startswith(b"-----BEGIN") and b"PRIVATE KEY" in head


def _show(ns: argparse.Namespace) -> int:
    path: Path = ns.file
    private = _is_private(path)
    public = SigningKey.load(path).public if private else VerifyKey.load(path)
    info = {"file": os.fspath(path), "kind": "private" if private else "public",
            "public_key_text": public.to_text(), "fingerprint": public.fingerprint}
    if ns.json:
        print_json(info)
    else:
        print(f"{path}: {info['kind']} key\n"
              f"public key  {public.to_text()}\n"
              f"fingerprint {public.fingerprint}")
    return 0
