"""The agent's durable state: an outbox of signed messages and the rounds it has handled.

An update is written here before it is first published and stays ``pending`` until the
aggregator's signed receipt resolves it (``accepted``, ``rejected`` or ``declined``). While its
round is open it is re-sent every ``resend_seconds`` and after every reconnect; the aggregator
de-duplicates by nonce. Once the round it belongs to has closed (a newer announcement, or its
deadline passed) it is dropped as ``stale`` with a log line: a late update would be refused anyway.
This works the same over Mosquitto (which also queues for offline sessions) and over the embedded
broker (which does not).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bedside.sqlite import TIMINGS_DDL, open_db, transaction


@dataclass(frozen=True)
class OutboxEntry:
    nonce: str
    round: int
    kind: str
    envelope: bytes
    created_at: float
    last_sent_at: float | None
    attempts: int


class AgentState:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.db = open_db(
            self.path, "agent state",
            "CREATE TABLE IF NOT EXISTS outbox (nonce TEXT PRIMARY KEY, round INTEGER NOT NULL,"
            " kind TEXT NOT NULL, envelope BLOB NOT NULL, created_at REAL NOT NULL,"
            " last_sent_at REAL, attempts INTEGER NOT NULL DEFAULT 0,"
            " state TEXT NOT NULL DEFAULT 'pending', reason TEXT);"
            "CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY,"
            " action TEXT NOT NULL, detail TEXT NOT NULL, at REAL NOT NULL);"
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            + TIMINGS_DDL)

    def close(self) -> None:
        self.db.close()

    def get_meta(self, key: str) -> str | None:
        r = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(r[0]) if r else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- rounds ------------------------------------------------------------------------------------
    def handled(self, round_id: int) -> str | None:
        r = self.db.execute("SELECT action FROM rounds WHERE round = ?", (round_id,)).fetchone()
        return r[0] if r else None

    def queue(self, round_id: int, action: str, detail: str, nonce: str, kind: str,
              envelope: bytes) -> None:
        """Mark the round handled and put its message in the outbox, in one transaction."""
        with transaction(self.db):
            self.db.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?)",
                            (round_id, action, detail, time.time()))
            self.db.execute("INSERT INTO outbox (nonce, round, kind, envelope, created_at) "
                            "VALUES (?, ?, ?, ?, ?)",
                            (nonce, round_id, kind, envelope, time.time()))

    def last_round(self) -> tuple[int, str] | None:
        r = self.db.execute("SELECT round, action FROM rounds ORDER BY round DESC LIMIT 1"
                            ).fetchone()
        return (int(r[0]), str(r[1])) if r else None

    # -- outbox ------------------------------------------------------------------------------------
    def pending(self) -> list[OutboxEntry]:
        return [OutboxEntry(*r) for r in self.db.execute(
            "SELECT nonce, round, kind, envelope, created_at, last_sent_at, attempts FROM outbox "
            "WHERE state = 'pending' ORDER BY created_at")]

    def mark_sent(self, nonce: str) -> None:
        self.db.execute("UPDATE outbox SET last_sent_at = ?, attempts = attempts + 1 "
                        "WHERE nonce = ?", (time.time(), nonce))

    def resolve(self, nonce: str, state: str, reason: str = "") -> bool:
        cur = self.db.execute("UPDATE outbox SET state = ?, reason = ?, envelope = x'' "
                              "WHERE nonce = ? AND state = 'pending'", (state, reason, nonce))
        return cur.rowcount == 1

    def outcome(self, nonce: str) -> tuple[str, str | None] | None:
        r = self.db.execute("SELECT state, reason FROM outbox WHERE nonce = ?", (nonce,)).fetchone()
        return (r[0], r[1]) if r else None

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())
