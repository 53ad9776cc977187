"""One way to use Bedside's SQLite files: open them, and run transactions.

* :func:`open_db`: WAL journal, ``synchronous=FULL`` (a committed transaction survives a power
  cut), usable from the service thread. Services are built on one thread and run their loop on
  another, so connections are not tied to the creating thread; each connection is used by one
  thread at a time (the service loop), and tests that inspect a running service read through
  their own connection.
* :func:`transaction`: ``BEGIN IMMEDIATE`` (or another kind) ... ``COMMIT``, rolled back on any
  exception, so a group of writes happens entirely or not at all.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from bedside.errors import StateError
from bedside.files import private_file


def open_db(path: str | Path, what: str, schema: str = "", *,
            private: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) ``path``; ``schema`` is run as a script (CREATE ... IF NOT EXISTS).

    ``private``: the file is 0600 and its directory 0700 whatever the umask (SQLite gives its
    journal files the database's own permissions). Raises StateError naming the file and
    ``what`` it holds if it cannot be opened.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        if private:
            private_file(p, what)
        db = sqlite3.connect(p, isolation_level=None, timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        if schema:
            db.executescript(schema)
        return db
    except sqlite3.DatabaseError as exc:
        raise StateError(f"{p}: cannot open the {what} ({exc}); restore it from backup or move "
                         "it aside") from None
    except OSError as exc:
        raise StateError(f"{p}: cannot open the {what} ({exc.strerror or exc})") from None


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
