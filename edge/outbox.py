"""The agent's durable state: an outbox of signed messages and the rounds it has handled.

An update is written here before it is first published and stays ``pending`` until the
aggregator's signed receipt resolves it (``accepted``, ``rejected`` or ``declined``). While its
round is open it is re-sent every ``resend_seconds`` and after every reconnect; the aggregator
de-duplicates by nonce. Once the round it belongs to has closed (a newer announcement, or its
deadline passed) it is dropped as ``stale`` with a log line: a late update would be refused anyway.
This works the same over Mosquitto (which also queues for offline sessions) and over the embedded
broker (which does not).

Rounds are kept per federation (fleet): a device that leaves one federation and joins another
keeps its data folder, its records and its privacy ledger, and starts the new federation's rounds
from its first. :meth:`AgentState.contributed` lists every round the device ever contributed to,
in every federation, which the agent checks against its ledger at start-up.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from bedside.sqlite import TIMINGS_DDL, open_db, transaction

_DDL = (
    "CREATE TABLE IF NOT EXISTS outbox (nonce TEXT PRIMARY KEY, fleet TEXT NOT NULL DEFAULT '',"
    " round INTEGER NOT NULL, kind TEXT NOT NULL, envelope BLOB NOT NULL,"
    " created_at REAL NOT NULL, last_sent_at REAL, attempts INTEGER NOT NULL DEFAULT 0,"
    " state TEXT NOT NULL DEFAULT 'pending', reason TEXT);"
    "CREATE TABLE IF NOT EXISTS rounds (fleet TEXT NOT NULL, round INTEGER NOT NULL,"
    " action TEXT NOT NULL, detail TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (fleet, round));"
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
    + TIMINGS_DDL)


@dataclass(frozen=True)
class OutboxEntry:
    nonce: str
    round: int
    kind: str
    envelope: bytes
    created_at: float
    last_sent_at: float | None
    attempts: int


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}


class AgentState:
    """``agent.db`` for one federation (``fleet``); older single-federation files are migrated,
    their rounds assigned to ``fleet``."""

    def __init__(self, path: str | Path, fleet: str, key: bytes | None = None) -> None:
        self.path = Path(path)
        self.fleet = fleet
        self.db = open_db(self.path, "agent state", private=True, key=key)
        with transaction(self.db):
            if "round" in _columns(self.db, "rounds") and "fleet" not in _columns(self.db,
                                                                                 "rounds"):
                self.db.execute("ALTER TABLE rounds RENAME TO rounds_v1")
            if "round" in _columns(self.db, "outbox") and "fleet" not in _columns(self.db,
                                                                                 "outbox"):
                self.db.execute("ALTER TABLE outbox ADD COLUMN fleet TEXT NOT NULL DEFAULT ''")
                self.db.execute("UPDATE outbox SET fleet = ?", (fleet,))
        self.db.executescript(_DDL)
        with transaction(self.db):
            if "round" in _columns(self.db, "rounds_v1"):
                self.db.execute("INSERT OR IGNORE INTO rounds SELECT ?, round, action, detail, at "
                                "FROM rounds_v1", (fleet,))
                self.db.execute("DROP TABLE rounds_v1")
                announced = self.get_meta("announce_round")
                if announced is not None:
                    self.set_meta(self._announce_key, announced)

    def close(self) -> None:
        self.db.close()

    def get_meta(self, key: str) -> str | None:
        r = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(r[0]) if r else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    @property
    def _announce_key(self) -> str:
        return f"announce_round:{self.fleet}"

    def announced_round(self) -> int | None:
        """The newest round of this federation the device has seen announced."""
        v = self.get_meta(self._announce_key)
        return None if v is None else int(v)

    def set_announced_round(self, round_id: int) -> None:
        self.set_meta(self._announce_key, str(round_id))

    # -- rounds ------------------------------------------------------------------------------------
    def handled(self, round_id: int) -> str | None:
        r = self.db.execute("SELECT action FROM rounds WHERE fleet = ? AND round = ?",
                            (self.fleet, round_id)).fetchone()
        return r[0] if r else None

    def queue(self, round_id: int, action: str, detail: str, nonce: str, kind: str,
              envelope: bytes) -> None:
        """Mark the round handled and put its message in the outbox, in one transaction."""
        with transaction(self.db):
            self.db.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?)",
                            (self.fleet, round_id, action, detail, time.time()))
            self.db.execute("INSERT INTO outbox (nonce, fleet, round, kind, envelope, created_at) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (nonce, self.fleet, round_id, kind, envelope, time.time()))

    def last_round(self) -> tuple[int, str] | None:
        r = self.db.execute("SELECT round, action FROM rounds WHERE fleet = ? ORDER BY round DESC "
                            "LIMIT 1", (self.fleet,)).fetchone()
        return (int(r[0]), str(r[1])) if r else None

    def contributed(self) -> set[tuple[str, int]]:
        """Every (fleet, round) this device sent an update in, in every federation."""
        return {(str(f), int(r)) for f, r in self.db.execute(
            "SELECT fleet, round FROM rounds WHERE action = 'contributed'")}

    # -- outbox ------------------------------------------------------------------------------------
    def pending(self) -> list[OutboxEntry]:
        return [OutboxEntry(*r) for r in self.db.execute(
            "SELECT nonce, round, kind, envelope, created_at, last_sent_at, attempts FROM outbox "
            "WHERE state = 'pending' AND fleet = ? ORDER BY created_at", (self.fleet,))]

    def mark_sent(self, nonce: str) -> None:
        self.db.execute("UPDATE outbox SET last_sent_at = ?, attempts = attempts + 1 "
                        "WHERE nonce = ?", (time.time(), nonce))

    def resolve(self, nonce: str, state: str, reason: str = "") -> bool:
        cur = self.db.execute("UPDATE outbox SET state = ?, reason = ?, envelope = x'' "
                              "WHERE nonce = ? AND state = 'pending'", (state, reason, nonce))
        return cur.rowcount == 1

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, COUNT(*) FROM outbox WHERE fleet = ? "
                                    "GROUP BY state", (self.fleet,)).fetchall())
