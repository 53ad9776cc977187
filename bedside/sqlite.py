"""One way to open Bedside's SQLite files: WAL, synchronous=FULL, usable from the service thread.

Services are built on one thread and run their loop on another, so connections are not tied to
the creating thread; each connection is used by one thread at a time (the service loop), and
tests that inspect a running service read through their own connection.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from bedside.errors import StateError


def open_db(path: str | Path, what: str, schema: str = "") -> sqlite3.Connection:
    """Open (creating if needed) ``path``; ``schema`` is run as a script (CREATE ... IF NOT EXISTS).

    Raises StateError naming the file and ``what`` it holds if it cannot be opened.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = sqlite3.connect(p, isolation_level=None, timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        if schema:
            db.executescript(schema)
        return db
    except sqlite3.DatabaseError as exc:
        raise StateError(f"{p}: cannot open the {what} ({exc}); restore it from backup or move "
                         "it aside") from None
