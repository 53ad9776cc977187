"""One way to use Bedside's SQLite files: open them, and run transactions.

* :func:`open_db`: WAL journal, ``synchronous=FULL`` (a committed transaction survives a power
  cut), usable from the service thread. Services are built on one thread and run their loop on
  another, so connections are not tied to the creating thread; each connection is used by one
  thread at a time (the service loop), and tests that inspect a running service read through
  their own connection.
* :func:`transaction`: ``BEGIN IMMEDIATE`` (or another kind) ... ``COMMIT``, rolled back on any
  exception, so a group of writes happens entirely or not at all.
* Encryption at rest (optional): with a ``key``, :func:`open_db` opens the file with SQLCipher
  (``sqlcipher3``, the ``encryption`` extra): AES-256 on every page, the key from a file only the
  service user reads (:func:`read_key`). :func:`encrypt_file` turns an existing plaintext file
  into an encrypted one.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bedside.errors import ConfigError, StateError
from bedside.files import fsync_dir, private_file, refuse_shared

PLAINTEXT_HEADER = b"SQLite format 3\x00"
KEY_BYTES = 32


def sqlcipher() -> Any:
    try:
        import sqlcipher3.dbapi2 as sqlcipher
    except ImportError:
        raise ConfigError("encryption at rest ([storage] key_file) needs SQLCipher: pip install "
                          "'bedside[encryption]' (on ARM, build sqlcipher3 against Debian's "
                          "libsqlcipher-dev), or remove key_file") from None
    return sqlcipher


def read_key(path: str | Path, what: str = "database key") -> bytes:
    """A key file: 64 hex digits, readable by its owner only."""
    p = Path(path)
    refuse_shared(p, what)
    try:
        text = p.read_text().strip()
        key = bytes.fromhex(text)
    except FileNotFoundError:
        raise ConfigError(f"{p}: the {what} file does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{p}: a {what} file holds {2 * KEY_BYTES} hex digits (make one with "
                          "openssl rand -hex 32, mode 0600)")
    return key


def write_key(path: str | Path, what: str = "database key") -> bytes:
    """Create a new random key file (0600, created exclusively: two processes never replace
    each other's key); refuses to replace one (data would be lost)."""
    import os
    import secrets

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:
        raise ConfigError(f"{p} exists; a {what} is never replaced (what it protects would be "
                          "lost)") from None
    with os.fdopen(fd, "wb") as f:
        f.write((key.hex() + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(p.parent)
    return key


def _connect(p: Path, key: bytes | None) -> Any:
    if key is None:
        return sqlite3.connect(p, isolation_level=None, timeout=30, check_same_thread=False)
    db = sqlcipher().connect(str(p), isolation_level=None, timeout=30, check_same_thread=False)
    db.execute("PRAGMA cipher_log_level = NONE")  # a wrong key is reported once, by open_db
    db.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
    return db


def open_db(path: str | Path, what: str, schema: str = "", *,
            private: bool = False, key: bytes | None = None) -> sqlite3.Connection:
    """Open (creating if needed) ``path``; ``schema`` is run as a script (CREATE ... IF NOT EXISTS).

    ``private``: the file is 0600 and its directory 0700 whatever the umask (SQLite gives its
    journal files the database's own permissions). ``key``: the file is encrypted with it
    (SQLCipher). Raises StateError naming the file and ``what`` it holds if it cannot be opened.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    errors: tuple[type[Exception], ...] = (sqlite3.DatabaseError,)
    if key is not None:
        errors += (sqlcipher().DatabaseError,)
        if _is_plaintext(p):
            raise StateError(f"{p}: the {what} is not encrypted, but [storage] key_file is set; "
                             "stop the agent and run 'bedside edge encrypt-store --config "
                             "agent.toml' (or remove key_file)")
    elif p.exists() and p.stat().st_size and not _is_plaintext(p):
        raise StateError(f"{p}: the {what} is encrypted (or damaged); set [storage] key_file to "
                         "its key")
    try:
        if private:
            private_file(p, what)
        db = _connect(p, key)
        if key is not None:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # wrong key: fails here
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        if schema:
            db.executescript(schema)
        return db
    except errors as exc:
        if key is not None:
            raise StateError(f"{p}: cannot open the {what} with the key of [storage] key_file "
                             f"({exc}): a wrong key, or a damaged file") from None
        raise StateError(f"{p}: cannot open the {what} ({exc}); restore it from backup or move "
                         "it aside") from None
    except OSError as exc:
        raise StateError(f"{p}: cannot open the {what} ({exc.strerror or exc})") from None


def _is_plaintext(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(len(PLAINTEXT_HEADER)) == PLAINTEXT_HEADER
    except FileNotFoundError:
        return False


def encrypt_file(path: str | Path, key: bytes) -> bool:
    """Encrypt the plaintext SQLite file ``path`` in place with ``key`` (nothing else may have
    it open). Returns False when it is encrypted already or missing. The plaintext copy is
    replaced atomically; its free pages are not scrubbed from the disk (full-disk encryption
    covers that: docs/deploy.md)."""
    import os

    p = Path(path)
    if not _is_plaintext(p):
        return False
    plain = sqlite3.connect(p)
    plain.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    plain.execute("PRAGMA journal_mode=DELETE")  # no -wal file left beside the replaced file
    plain.close()
    tmp = p.with_name(f".{p.name}.encrypting")
    tmp.unlink(missing_ok=True)
    db = sqlcipher().connect(str(p), isolation_level=None)
    try:
        db.execute("ATTACH DATABASE ? AS encrypted KEY ?", (str(tmp), f"x'{key.hex()}'"))
        db.execute("SELECT sqlcipher_export('encrypted')")
        db.execute("DETACH DATABASE encrypted")
    finally:
        db.close()
    os.chmod(tmp, 0o600)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, p)
    fsync_dir(p.parent)
    return True


@contextlib.contextmanager
def transaction(db: sqlite3.Connection, kind: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
    """``with transaction(db): ...``: all the writes inside commit together, or none does."""
    db.execute(f"BEGIN {kind}")
    try:
        yield db
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


#: Where a service keeps how long each phase of a round took (local, never published): the
#: federation benchmark reads it (benchmarks/federation.py, "where a round's time goes").
TIMINGS_DDL = ("CREATE TABLE IF NOT EXISTS timings (round INTEGER NOT NULL, phase TEXT NOT NULL, "
               "seconds REAL NOT NULL, PRIMARY KEY (round, phase));")


def add_timings(db: sqlite3.Connection, round_id: int, phases: dict[str, float]) -> None:
    """Add ``phases`` (seconds) to round ``round_id``'s timings (summing a phase seen before)."""
    with transaction(db):
        for phase, seconds in phases.items():
            db.execute("INSERT INTO timings VALUES (?, ?, ?) ON CONFLICT (round, phase) DO "
                       "UPDATE SET seconds = seconds + excluded.seconds",
                       (round_id, phase, float(seconds)))


def read_timings(db: sqlite3.Connection) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for r, phase, seconds in db.execute("SELECT round, phase, seconds FROM timings"):
        out.setdefault(int(r), {})[str(phase)] = float(seconds)
    return out
