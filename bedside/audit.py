"""A tamper-evident audit trail: who or what did what, when, to which model, round or release.

Each component (a device's agent and commands, the aggregator's service and commands) appends
entries to its own ``audit.db``. An entry holds a sequence number, the time, the component, the
actor (a person's command or the service), the action, its subject (``round 7``, ``model v3``,
``device clinic-2``) and a small JSON detail, never patient data (callers pass counts, versions,
digests and ids, never values or file names a clinic may have named after a patient).

Entries form a hash chain: each one's SHA-256 covers its content and the previous entry's hash,
so editing an entry breaks its own hash, and dropping, inserting or reordering breaks the chain.
Every entry is also a checkpoint signed with the component's Ed25519 key, so someone who can
write the file but does not hold the key cannot rebuild a consistent chain after a change.
Dropping the newest entries leaves a consistent, shorter chain: :func:`verify` detects it
against an anchor recorded elsewhere (``--anchor SEQ:HASH``, the head that a previous
verification printed).

``bedside audit verify --log audit.db --key component.pub`` names the first bad entry.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bedside.errors import InputError
from bedside.sqlite import open_db, transaction
from bedside.wire.signing import SigningKey, VerifyKey

GENESIS = "0" * 64
DDL = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER NOT NULL, at REAL NOT NULL, component TEXT NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, subject TEXT NOT NULL, detail TEXT NOT NULL, prev TEXT NOT NULL,
    hash TEXT NOT NULL, signature TEXT NOT NULL, key TEXT NOT NULL);
"""
#: Detail values are small: ids, counts, versions, digests.
MAX_DETAIL_BYTES = 2048


def entry_hash(seq: int, at: float, component: str, actor: str, action: str, subject: str,
               detail: str, prev: str) -> str:
    body = json.dumps([seq, repr(at), component, actor, action, subject, detail, prev],
                      separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(body.encode()).hexdigest()


def _signed(component: str, seq: int, digest: str) -> bytes:
    return f"bedside-audit-1:{component}:{seq}:{digest}".encode()


class AuditLog:
    """Append-only: there is no update or delete here. One writer at a time per file (the
    append runs in one ``BEGIN IMMEDIATE`` transaction, so a command and the running service
    may share a log)."""

    def __init__(self, path: str | Path, key: SigningKey, component: str, *,
                 clock: Any = time.time) -> None:
        self.path = Path(path)
        self.key, self.component, self.clock = key, component, clock
        self.db: Any = open_db(self.path, "audit log", DDL, private=True)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def append(self, action: str, subject: str = "", *, actor: str = "service",
               **detail: Any) -> tuple[int, str]:
        """Add an entry; returns its sequence number and hash (the new head)."""
        text = json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)
        if len(text) > MAX_DETAIL_BYTES:
            raise InputError(f"audit detail of {action!r} is {len(text)} bytes; entries hold "
                             "ids, counts and digests only")
        if self.db is None:  # closed: an entry still goes in (a service closing down)
            self.db = open_db(self.path, "audit log", DDL, private=True)
        with transaction(self.db):
            row = self.db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1"
                                  ).fetchone()
            seq, prev = (int(row[0]) + 1, str(row[1])) if row else (1, GENESIS)
            at = float(self.clock())
            digest = entry_hash(seq, at, self.component, actor, action, subject, text, prev)
            signature = self.key.sign(_signed(self.component, seq, digest)).hex()
            self.db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (seq, at, self.component, actor, action, subject, text, prev, digest,
                             signature, self.key.public.fingerprint))
        return seq, digest


def record(path: str | Path, key_path: str | Path, component: str, action: str,
           subject: str = "", *, actor: str = "operator", **detail: Any) -> None:
    """One entry from a command (opens, appends, closes)."""
    with AuditLog(path, SigningKey.load(key_path), component) as log:
        log.append(action, subject, actor=actor, **detail)


@dataclass
class Verdict:
    ok: bool
    entries: int
    head: tuple[int, str] | None  # the newest entry: record it, pass it as --anchor next time
    problem: str = ""
    first_bad: int | None = None  # the sequence number (or position) of the first bad entry
    keys: list[str] = field(default_factory=list)  # fingerprints that signed entries

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": self.entries,
                "head": None if self.head is None else {"seq": self.head[0],
                                                        "hash": self.head[1]},
                "problem": self.problem, "first_bad": self.first_bad, "keys": self.keys}


def parse_anchor(text: str) -> tuple[int, str]:
    seq, sep, digest = text.partition(":")
    if not sep or not seq.isdigit() or len(digest) != 64:
        raise InputError(f"--anchor {text!r}: expected SEQ:HASH as 'bedside audit verify' "
                         "printed it")
    return int(seq), digest.lower()


def verify(path: str | Path, keys: list[VerifyKey],
           anchor: tuple[int, str] | None = None) -> Verdict:
    """Check the chain, every hash and every signature, in sequence order, read-only.

    The first entry is signed by one of ``keys``; every later one by the same key, until a
    ``key_rotated`` entry (signed by that key) names the next one: from then on entries may be
    signed by the old key (a service not restarted yet) until the first entry signed by the new
    one, and by the new one only after that. All entries name one component. With ``anchor``,
    the entry it names must still be there unchanged (nothing was cut from the end)."""
    import sqlite3

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no audit log here")
    try:
        db = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT seq, at, component, actor, action, subject, detail, prev, "
                              "hash, signature, key FROM entries ORDER BY seq, rowid").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise InputError(f"{p}: not an audit log ({exc})") from None
    by_fp = {k.fingerprint: k for k in keys}
    prev_seq, prev_hash = 0, GENESIS
    head: tuple[int, str] | None = None
    seen_keys: list[str] = []
    allowed: set[str] = set(by_fp)  # the first entry: any key given
    pending: str | None = None  # a rotation's new key, until its first entry
    component0 = str(rows[0][2]) if rows else ""

    def bad(n: int, why: str) -> Verdict:
        return Verdict(False, len(rows), head, why, n, seen_keys)

    if not rows:
        return bad(1, "the log holds no entry (emptied, or not this component's log)")
    for pos, r in enumerate(rows, start=1):
        seq, at, component, actor, action, subject, detail, prev, digest, sig, fp = r
        if not isinstance(seq, int) or seq != prev_seq + 1:
            what = ("an entry before it was dropped" if isinstance(seq, int) and seq > prev_seq + 1
                    else "an entry was inserted (two share its number)")
            return bad(seq if isinstance(seq, int) else pos,
                       f"entry {pos} has sequence number {seq}, expected {prev_seq + 1}: {what}")
        if prev != prev_hash:
            return bad(seq, f"entry {seq} does not follow entry {prev_seq} (its link differs): "
                       "entries were dropped, inserted or reordered")
        if entry_hash(seq, float(at), component, actor, action, subject, detail, prev) != digest:
            return bad(seq, f"entry {seq} ({action}) does not match its hash: it was edited, "
                       "inserted or moved")
        if component != component0:
            return bad(seq, f"entry {seq} names component {component!r}, the log is "
                       f"{component0!r}'s: it was inserted from another log")
        key = by_fp.get(str(fp))
        if key is None:
            return bad(seq, f"entry {seq} is signed by key {fp}, which is not among the keys "
                       "given (--key)")
        if str(fp) not in allowed:
            return bad(seq, f"entry {seq} is signed by key {fp}, which was rotated away before "
                       "it: it was written afterwards with an old key")
        try:
            key.verify(bytes.fromhex(str(sig)), _signed(str(component), seq, str(digest)))
        except Exception:  # a bad hex string or signature: the same verdict
            return bad(seq, f"entry {seq} ({action}) carries a signature that does not verify: "
                       "it was forged or rewritten")
        if fp not in seen_keys:
            seen_keys.append(str(fp))
        nxt = _rotated_to(action, detail)
        if nxt is not None:  # the old key (a service not restarted yet) or the new one
            allowed, pending = {str(fp), nxt}, nxt
        elif pending is None or str(fp) == pending:  # from the new key's first entry on: it only
            allowed, pending = {str(fp)}, None
        prev_seq, prev_hash, head = seq, str(digest), (seq, str(digest))
    if anchor is not None:
        a_seq, a_hash = anchor
        if a_seq > prev_seq:
            return bad(prev_seq + 1, f"the log ends at entry {prev_seq}, but entry {a_seq} was "
                       "recorded before (--anchor): entries were cut from the end")
        stored = rows[a_seq - 1][8] if a_seq >= 1 else None
        if stored != a_hash:
            return bad(a_seq, f"entry {a_seq} is not the one recorded before (--anchor)")
    return Verdict(True, len(rows), head, "", None, seen_keys)


#: Actions that hand the log over to a new key (their detail's ``new`` fingerprint).
ROTATIONS = ("key_rotated",)


def _rotated_to(action: str, detail: str) -> str | None:
    if action not in ROTATIONS:
        return None
    try:
        new = json.loads(detail).get("new")
    except (ValueError, AttributeError):
        return None
    return str(new) if new else None


def tail(path: str | Path, n: int = 20) -> list[dict[str, Any]]:
    db = open_db(Path(path), "audit log", DDL)
    try:
        rows = db.execute("SELECT seq, at, component, actor, action, subject, detail FROM "
                          "entries ORDER BY seq DESC LIMIT ?", (n,)).fetchall()
    finally:
        db.close()
    return [{"seq": r[0], "at": r[1], "component": r[2], "actor": r[3], "action": r[4],
             "subject": r[5], "detail": json.loads(r[6])} for r in reversed(rows)]


__all__ = ["AuditLog", "Verdict", "parse_anchor", "record", "tail", "verify"]
