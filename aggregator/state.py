"""The aggregator's durable state (SQLite, WAL): rounds, accepted updates, rejections, privacy.

Messages are recorded in groups (:meth:`State.commit_batch`: one transaction, one fsync) before
any of their MQTT messages is acknowledged, so a crash (even SIGKILL) at any moment either keeps a
message or lets the broker redeliver it; the (sender, round, nonce) key makes the redelivery a
no-op instead of a double count.

What an accepted update leaves here depends on the aggregation rule. With an incremental rule
(FedAvg) the round keeps one durable running sum (``round_sums``: the weighted sum of the
accepted updates, their count and weight), updated in the same transaction as the updates' rows:
disk and memory O(model) per round, however many devices. Rules that need every update (median,
trimmed mean) and statistics rounds keep each update's tensors until the round is aggregated. The
digests and nonces stay for replay detection and audit. The server optimizer's state is not here:
it is stored with the model version it produced, in the registry (one commit point for both).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bedside.errors import StateError
from bedside.federation.settings import RoundSettings
from bedside.models.registry import pack_tensors, unpack_tensors
from bedside.sqlite import TIMINGS_DDL, open_db, transaction

if TYPE_CHECKING:
    from bedside.aggregator.config import AggregatorConfig

SCHEMA = 2  # 2: the server optimizer's state moved into the registry

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    model_version INTEGER NOT NULL,
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'closed', 'failed')),
    announce BLOB NOT NULL,
    settings TEXT NOT NULL,
    closed_at REAL,
    result TEXT
);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL,
    sender TEXT NOT NULL,
    nonce TEXT NOT NULL,
    digest TEXT NOT NULL,
    weight REAL NOT NULL,
    norm REAL NOT NULL,
    received_at REAL NOT NULL,
    info TEXT NOT NULL DEFAULT '{}',
    tensors BLOB,
    PRIMARY KEY (round, sender)
);
CREATE UNIQUE INDEX IF NOT EXISTS updates_nonce ON updates (sender, round, nonce);
CREATE TABLE IF NOT EXISTS declines (
    round INTEGER NOT NULL, sender TEXT NOT NULL, reason TEXT NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (round, sender)
);
CREATE TABLE IF NOT EXISTS round_sums (
    round INTEGER PRIMARY KEY, sums BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER, sender TEXT, reason TEXT NOT NULL, detail TEXT NOT NULL,
    received_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class UpdateRow:
    round: int
    sender: str
    nonce: str
    digest: str
    weight: float
    norm: float
    info: dict[str, Any]
    tensors: dict[str, np.ndarray] | None  # None: folded into the round's running sum


class Contended(StateError):
    """Another writer recorded one of the group's updates first, or closed its round: nothing of
    the group was written; judge it again (the store now knows why)."""


@dataclass
class Batch:
    """Verdicts on a group of messages, recorded together (:meth:`State.commit_batch`)."""

    updates: list[UpdateRow] = field(default_factory=list)
    declines: list[tuple[int, str, str]] = field(default_factory=list)
    rejections: list[tuple[int | None, str | None, str, str]] = field(default_factory=list)
    sums: tuple[int, bytes, int] | None = None  # (round, the running sum after this group,
    #                                               the number of updates it holds)

    def __len__(self) -> int:
        return len(self.updates) + len(self.declines) + len(self.rejections)


@dataclass(frozen=True)
class RoundRow:
    round: int
    model_version: int
    opened_at: float
    deadline: float
    status: str
    announce: bytes
    settings: RoundSettings
    closed_at: float | None
    result: dict[str, Any] | None


class RoundStore:
    """The round tables, written once for SQLite (:class:`State`) and PostgreSQL
    (:class:`bedside.aggregator.pgstate.PgRounds`): ``?`` placeholders, plain SQL both speak.
    A backend provides :meth:`_all`, :meth:`_one`, :meth:`_many`, :meth:`_tx` and the running
    sums (one per writer in PostgreSQL: each validator worker keeps its own)."""

    # -- backend -----------------------------------------------------------------------------------
    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        rows = self._all(sql, params)
        return rows[0] if rows else None

    def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def _tx(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _save_sums(self, round_id: int, sums: bytes, count: int) -> None:
        raise NotImplementedError

    def _saved(self, round_id: int, count: int) -> None:
        """After a commit: this writer's stored sum of ``round_id`` now holds ``count``
        updates."""

    def _drop_sums(self, round_id: int) -> None:
        self._all("DELETE FROM round_sums WHERE round = ?", (round_id,))

    def _lock_open(self, round_ids: set[int]) -> None:
        """Inside :meth:`commit_batch`'s transaction: refuse to record updates into a round
        that is no longer open (another process closes rounds; SQLite has one writer)."""

    def running_sum(self, round_id: int) -> bytes | None:
        """This writer's durable running sum of round ``round_id``'s accepted updates
        (incremental rules), or None if none was kept."""
        raise NotImplementedError

    def partial_sums(self, round_id: int) -> list[bytes]:
        """Every writer's running sum of round ``round_id`` (merged, they hold every update
        the round accepted)."""
        raise NotImplementedError

    def begin_close(self, round_id: int) -> None:
        """Stop round ``round_id`` taking updates before it is aggregated (no-op with one
        writer)."""

    def close(self) -> None:
        raise NotImplementedError

    # -- rounds ------------------------------------------------------------------------------------
    _settings: dict[str, RoundSettings]
    _ROUND = ("SELECT round, model_version, opened_at, deadline, status, announce, settings, "
              "closed_at, result FROM rounds")

    def open_round(self, round_id: int, model_version: int, announce: bytes,
                   settings: RoundSettings) -> None:
        self._all(
            "INSERT INTO rounds (round, model_version, opened_at, deadline, status, announce, "
            "settings) VALUES (?, ?, ?, ?, 'open', ?, ?)",
            (round_id, model_version, time.time(), settings.deadline, announce,
             json.dumps(settings.to_meta())))

    def _row(self, r: tuple[Any, ...]) -> RoundRow:
        settings = self._settings.get(r[6])
        if settings is None:  # parsed once per round: this runs for every group of messages
            settings = RoundSettings.from_meta(json.loads(r[6]))
            if len(self._settings) > 64:
                self._settings.clear()
            self._settings[r[6]] = settings
        return RoundRow(round=r[0], model_version=r[1], opened_at=r[2], deadline=r[3],
                        status=r[4], announce=bytes(r[5]), settings=settings,
                        closed_at=r[7], result=json.loads(r[8]) if r[8] else None)

    def current_round(self) -> RoundRow | None:
        r = self._one(self._ROUND + " ORDER BY round DESC LIMIT 1")
        return self._row(r) if r else None

    def get_round(self, round_id: int) -> RoundRow | None:
        r = self._one(self._ROUND + " WHERE round = ?", (round_id,))
        return self._row(r) if r else None

    def rounds(self) -> list[RoundRow]:
        return [self._row(r) for r in self._all(self._ROUND + " ORDER BY round")]

    def finish_round(self, round_id: int, status: str, result: dict[str, Any],
                     drop: Iterable[int] | None = None) -> None:
        """Close a round and drop the tensors (the digests stay) of the rounds ``drop``
        (default: this one), in one transaction. A failed statistics round keeps its vectors:
        they count towards the retry."""
        with self._tx():
            self._all("UPDATE rounds SET status = ?, closed_at = ?, result = ? WHERE round = ?",
                      (status, time.time(), json.dumps(result), round_id))
            for r in (round_id,) if drop is None else drop:
                self._all("UPDATE updates SET tensors = NULL WHERE round = ?", (r,))
                self._drop_sums(r)

    # -- updates -----------------------------------------------------------------------------------
    def nonce_seen(self, sender: str, nonce: str) -> tuple[int, str] | None:
        r = self._one("SELECT round, digest FROM updates WHERE sender = ? AND nonce = ?",
                      (sender, nonce))
        return (r[0], r[1]) if r else None

    def seen(self, sender: str, nonce: str, round_id: int | None
             ) -> tuple[tuple[int, str] | None, bool]:
        """In one statement (one snapshot, whatever other writers commit meanwhile): where this
        sender's ``nonce`` was recorded (round, digest), and whether the sender has an update in
        round ``round_id``."""
        nonce_at, contributed = None, False
        for r, n, d in self._all("SELECT round, nonce, digest FROM updates WHERE sender = ? AND "
                                 "(nonce = ? OR round = ?)", (sender, nonce, round_id)):
            if n == nonce:
                nonce_at = (int(r), str(d))
            if r == round_id:
                contributed = True
        return nonce_at, contributed

    def commit_batch(self, batch: Batch) -> None:
        """Record a group of verdicts, and the round's running sum if given, in one transaction:
        durable before any of the group's messages is acknowledged. An update whose round is no
        longer open, or that another writer recorded first, fails the whole group with
        :class:`Contended` (nothing is written): judge the group again."""
        now = time.time()
        with self._tx():
            rounds = {u.round for u in batch.updates}
            if batch.sums is not None:
                rounds.add(batch.sums[0])
            self._lock_open(rounds)
            self._many(  # in sender order: concurrent writers take row locks in the same order
                "INSERT INTO updates (round, sender, nonce, digest, weight, norm, received_at, "
                "info, tensors) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(u.round, u.sender, u.nonce, u.digest, u.weight, u.norm, now,
                  json.dumps(u.info), None if u.tensors is None else pack_tensors(u.tensors))
                 for u in sorted(batch.updates, key=lambda u: (u.round, u.sender))])
            self._many("INSERT INTO declines VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                       [(r, s, reason, now) for r, s, reason in batch.declines])
            self._many(
                "INSERT INTO rejections (round, sender, reason, detail, received_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(r, s, reason, detail[:500], now) for r, s, reason, detail in batch.rejections])
            if batch.sums is not None:
                self._save_sums(*batch.sums)
        if batch.sums is not None:
            self._saved(batch.sums[0], batch.sums[2])

    def folded(self, round_id: int) -> int:
        """Accepted updates of round ``round_id`` that kept no tensors (folded into a running
        sum)."""
        r = self._one("SELECT COUNT(*) FROM updates WHERE round = ? AND tensors IS NULL",
                      (round_id,))
        return int(r[0]) if r else 0

    def accepted(self, round_id: int) -> list[dict[str, Any]]:
        cols = ("sender", "nonce", "digest", "weight", "norm", "received_at", "info")
        rows = [dict(zip(cols, r, strict=True)) for r in self._all(
            "SELECT sender, nonce, digest, weight, norm, received_at, info FROM updates "
            "WHERE round = ? ORDER BY received_at, sender", (round_id,))]
        for r in rows:
            r["info"] = json.loads(r["info"])
        return rows

    def answered(self, round_id: int) -> set[str]:
        return {r[0] for r in self._all(
            "SELECT sender FROM updates WHERE round = ? UNION SELECT sender FROM declines "
            "WHERE round = ?", (round_id, round_id))}

    def declines(self, round_id: int) -> dict[str, str]:
        return {s: reason for s, reason in self._all(
            "SELECT sender, reason FROM declines WHERE round = ?", (round_id,))}

    def first_tensors(self, round_ids: Iterable[int]) -> list[tuple[str, dict[str, np.ndarray]]]:
        """(sender, tensors) of the accepted updates of ``round_ids`` that still hold tensors,
        the first per sender (a statistics round and its retries)."""
        out: dict[str, dict[str, np.ndarray]] = {}
        for r in round_ids:
            for sender, blob in self._all(
                    "SELECT sender, tensors FROM updates WHERE round = ? AND tensors IS NOT NULL "
                    "ORDER BY received_at, sender", (r,)):
                out.setdefault(sender, unpack_tensors(bytes(blob)))
        return list(out.items())

    def iter_updates(self, round_id: int) -> Iterator[tuple[dict[str, np.ndarray], float]]:
        """Stream the round's accepted updates one at a time (memory: one update)."""
        for (sender,) in self._all("SELECT sender FROM updates WHERE round = ? AND tensors IS "
                                   "NOT NULL ORDER BY received_at, sender", (round_id,)):
            r = self._one("SELECT tensors, weight FROM updates WHERE round = ? AND sender = ?",
                          (round_id, sender))
            assert r is not None
            yield unpack_tensors(bytes(r[0])), float(r[1])

    # -- rejections --------------------------------------------------------------------------------
    def add_rejection(self, round_id: int | None, sender: str | None, reason: str,
                      detail: str) -> None:
        self._all("INSERT INTO rejections (round, sender, reason, detail, received_at) "
                  "VALUES (?, ?, ?, ?, ?)", (round_id, sender, reason, detail[:500], time.time()))

    def rejections(self, round_id: int) -> dict[str, int]:
        return {reason: int(n) for reason, n in self._all(
            "SELECT reason, COUNT(*) FROM rejections WHERE round = ? GROUP BY reason",
            (round_id,))}


class State(RoundStore):
    """The single-process state (SQLite, WAL, ``state.db``): the round tables and, beside them,
    what only the service writes (releases, invites, timings)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.db = open_db(self.path, "aggregator state", _DDL + TIMINGS_DDL, private=True)
        self._settings: dict[str, RoundSettings] = {}
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA),))
            elif int(row[0]) != SCHEMA:
                raise StateError(f"{self.path}: state schema {row[0]} is not {SCHEMA}; use the "
                                 "Bedside version that wrote it or migrate")
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{self.path}: cannot open the aggregator state ({exc}); restore it "
                             "from backup") from None

    def close(self) -> None:
        self.db.close()

    # -- backend -----------------------------------------------------------------------------------
    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.db.execute(sql, params).fetchall()

    def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self.db.executemany(sql, rows)

    def _tx(self) -> AbstractContextManager[Any]:
        return transaction(self.db)

    def _save_sums(self, round_id: int, sums: bytes, count: int) -> None:
        self.db.execute("INSERT INTO round_sums VALUES (?, ?) ON CONFLICT (round) DO UPDATE SET "
                        "sums = excluded.sums", (round_id, sums))

    def running_sum(self, round_id: int) -> bytes | None:
        r = self._one("SELECT sums FROM round_sums WHERE round = ?", (round_id,))
        return bytes(r[0]) if r else None

    def partial_sums(self, round_id: int) -> list[bytes]:
        own = self.running_sum(round_id)
        return [] if own is None else [own]



def open_rounds(cfg: AggregatorConfig, state: State, writer: str = "") -> RoundStore:
    """The round store ``cfg`` names: ``state`` itself (SQLite, the default) or the PostgreSQL
    database of ``[state] dsn`` (shared with validator workers; ``writer``: whose running sums
    this process writes)."""
    if cfg.state.backend == "postgresql":
        from bedside.aggregator.pgstate import PgRounds

        return PgRounds(cfg.state.dsn, cfg.fleet, writer)
    return state
