"""The round state in PostgreSQL: shared by the coordinator and its validator workers.

Same tables and SQL as the single-process SQLite state (:class:`~bedside.aggregator.state.
RoundStore`), with what several writers need:

* **one running sum per writer** (``round_sums (round, writer)``): each validator worker folds
  the updates it accepted into its own partial sum, in the same transaction as their rows, so
  "this update's row exists" and "this update is in exactly one partial sum" are one fact; the
  coordinator closes the round from the merged partial sums;
* **de-duplication by the database**: ``updates`` is keyed by (round, sender) and unique on
  (sender, round, nonce). Two workers that judge the same update (a QoS 1 redelivery after a
  worker died, a device's re-send) race to insert it; the loser's whole group is rolled back
  (:class:`~bedside.aggregator.state.Contended`) and judged again, now as a duplicate;
* **closing is a state**: the coordinator marks a round ``closing`` (a row lock every worker's
  transaction shares, ``FOR SHARE``), so no update is recorded into a round after the
  coordinator read its sums;
* **one process per writer id**: a worker (and the coordinator) holds a session advisory lock
  on its id for its lifetime, taken again on every reconnection; a second process with the same
  id is refused. Even so, a partial sum is replaced only if it is still the one this writer
  read (compare-and-set on its update count): two writers of one id can never overwrite each
  other's updates;
* **no lock held for ever**: sessions have TCP keepalives and ``idle_in_transaction_session_
  timeout``, so a worker cut off mid-transaction releases its row locks (and the coordinator's
  close goes on) within a minute.

The connection runs in autocommit; :meth:`PgRounds._tx` groups writes. A connection found broken
is reconnected once per call; otherwise a database error is a :class:`~bedside.errors.
StateError`: the process stops with its messages unacknowledged (the broker redelivers them)
and its supervisor (systemd ``Restart=``) starts it again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from bedside.aggregator.state import Contended, RoundStore
from bedside.errors import ConfigError, StateError
from bedside.federation.settings import RoundSettings

log = logging.getLogger("bedside.aggregator.pgstate")

SCHEMA = 1
#: A session idle inside a transaction this long is ended by the server (its locks released).
IDLE_IN_TX_MS = 60_000

_DDL = """
CREATE TABLE IF NOT EXISTS bedside_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    model_version INTEGER NOT NULL,
    opened_at DOUBLE PRECISION NOT NULL,
    deadline DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'closing', 'closed', 'failed')),
    announce BYTEA NOT NULL,
    settings TEXT NOT NULL,
    closed_at DOUBLE PRECISION,
    result TEXT
);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL,
    sender TEXT NOT NULL,
    nonce TEXT NOT NULL,
    digest TEXT NOT NULL,
    weight DOUBLE PRECISION NOT NULL,
    norm DOUBLE PRECISION NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    info TEXT NOT NULL DEFAULT '{}',
    tensors BYTEA,
    PRIMARY KEY (round, sender)
);
CREATE UNIQUE INDEX IF NOT EXISTS updates_nonce ON updates (sender, round, nonce);
CREATE TABLE IF NOT EXISTS declines (
    round INTEGER NOT NULL, sender TEXT NOT NULL, reason TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (round, sender)
);
CREATE TABLE IF NOT EXISTS round_sums (
    round INTEGER NOT NULL, writer TEXT NOT NULL, sums BYTEA NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (round, writer)
);
CREATE TABLE IF NOT EXISTS rejections (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    round INTEGER, sender TEXT, reason TEXT NOT NULL, detail TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS rejections_round ON rejections (round);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL, seen_at DOUBLE PRECISION NOT NULL
);
"""


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise ConfigError("[state] backend 'postgresql' needs psycopg: pip install "
                          "'bedside[postgres]'") from None
    return psycopg


def _lock_key(fleet: str, writer: str) -> int:
    """A signed 64-bit advisory lock key for (fleet, writer)."""
    h = hashlib.sha256(f"bedside/{fleet}/{writer}".encode()).digest()
    return int.from_bytes(h[:8], "big", signed=True)


class PgRounds(RoundStore):
    """The round tables in the PostgreSQL database ``dsn``. ``writer`` names whose running sum
    this connection writes: ``""`` for the coordinator (a single-process service on
    PostgreSQL), a worker's id for a validator worker (:meth:`claim` first)."""

    def __init__(self, dsn: str, fleet: str, writer: str = "") -> None:
        self.psycopg = _psycopg()
        self.dsn, self.fleet, self.writer = dsn, fleet, writer
        self._settings: dict[str, RoundSettings] = {}
        self._in_tx = False
        self._claimed = False
        self._counts: dict[int, int] = {}  # round -> update count of the sum this writer read
        self.conn = self._connect()
        try:
            with self.conn.transaction():
                # one creator at a time: CREATE ... IF NOT EXISTS races between processes
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)",
                                  (_lock_key(fleet, "schema"),))
                self.conn.execute(_DDL)
                row = self.conn.execute("SELECT value FROM bedside_meta WHERE key = 'schema'"
                                        ).fetchone()
                if row is None:
                    self.conn.execute("INSERT INTO bedside_meta VALUES ('schema', %s), "
                                      "('fleet', %s)", (str(SCHEMA), fleet))
                    row = (str(SCHEMA),)
                owner = self.conn.execute("SELECT value FROM bedside_meta WHERE key = 'fleet'"
                                          ).fetchone()
        except self.psycopg.Error as exc:
            self.conn.close()
            raise StateError(f"PostgreSQL ({self._where()}): cannot create the round tables "
                             f"({_first_line(exc)}); the database user needs CREATE on the "
                             "database") from None
        if int(row[0]) != SCHEMA:
            raise StateError(f"PostgreSQL ({self._where()}): round state schema {row[0]} is not "
                             f"{SCHEMA}; use the Bedside version that wrote it")
        if owner is not None and owner[0] != fleet:
            raise StateError(f"PostgreSQL ({self._where()}) holds the rounds of fleet "
                             f"{owner[0]!r}, not {fleet!r}: give each fleet its own database")

    def _where(self) -> str:
        from psycopg.conninfo import conninfo_to_dict

        d = conninfo_to_dict(self.dsn)
        return f"{d.get('host', 'localhost')}:{d.get('port', 5432)}/{d.get('dbname', '')}"

    def _connect(self) -> Any:
        try:
            conn = self.psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=10,
                application_name=f"bedside-{self.writer or 'service'}",
                keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3,
                options=f"-c idle_in_transaction_session_timeout={IDLE_IN_TX_MS}")
        except self.psycopg.Error as exc:
            raise StateError(f"cannot connect to PostgreSQL ({self._where()}): "
                             f"{_first_line(exc)}; check [state] dsn, that the server runs and "
                             "that the password file (PGPASSFILE) has this user") from None
        if self._claimed:  # the lock belonged to the old session: take it again or stop
            self._lock_id(conn)
        return conn

    def close(self) -> None:
        self.conn.close()

    # -- backend -----------------------------------------------------------------------------------
    def _run(self, sql: str, params: Any, many: bool = False) -> list[tuple[Any, ...]]:
        sql = sql.replace("?", "%s")
        params = [_clean(r) for r in params] if many else _clean(params)
        for attempt in (0, 1):
            try:
                if many:
                    with self.conn.cursor() as cur:
                        cur.executemany(sql, params)
                    return []
                cur = self.conn.execute(sql, params)
                return cur.fetchall() if cur.description else []
            except self.psycopg.errors.UniqueViolation as exc:
                raise Contended(f"another writer recorded it first: {_first_line(exc)}") \
                    from None
            except self.psycopg.errors.DeadlockDetected as exc:
                raise Contended(f"deadlock with another writer: {_first_line(exc)}") from None
            except self.psycopg.OperationalError as exc:
                # the server restarted or the connection broke: reconnect once, outside a
                # transaction (inside one, the caller retries the whole group)
                if attempt or self._in_tx or not self.conn.closed:
                    raise StateError(f"PostgreSQL ({self._where()}): {_first_line(exc)}") \
                        from None
                log.warning("PostgreSQL connection lost (%s); reconnecting", _first_line(exc))
                self.conn = self._connect()
        raise AssertionError("unreachable")

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._run(sql, params)

    def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            self._run(sql, rows, many=True)

    def _tx(self) -> AbstractContextManager[Any]:
        return self._transaction()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        if self.conn.closed:
            self.conn = self._connect()
        self._in_tx = True
        try:
            with self.conn.transaction():
                yield
        except self.psycopg.errors.UniqueViolation as exc:
            raise Contended(f"another writer recorded it first: {_first_line(exc)}") from None
        except self.psycopg.Error as exc:
            raise StateError(f"PostgreSQL ({self._where()}): {_first_line(exc)}") from None
        finally:
            self._in_tx = False

    def _lock_open(self, round_ids: set[int]) -> None:
        for r in sorted(round_ids):
            row = self._one("SELECT status FROM rounds WHERE round = ? FOR SHARE", (r,))
            if row is None or row[0] != "open":
                raise Contended(f"round {r} is {row[0] if row else 'unknown'}, no longer open")

    def _save_sums(self, round_id: int, sums: bytes, count: int) -> None:
        """Replace this writer's partial sum only if it is still the one it read (its count):
        else another process wrote under this id meanwhile, and the group is judged again on
        what is stored."""
        base = self._counts.get(round_id, 0)
        if base == 0:
            self._all("INSERT INTO round_sums VALUES (?, ?, ?, ?)",
                      (round_id, self.writer, sums, count))  # a row already there: Contended
        elif not self._all("UPDATE round_sums SET sums = ?, count = ? WHERE round = ? AND "
                           "writer = ? AND count = ? RETURNING 1",
                           (sums, count, round_id, self.writer, base)):
            raise Contended(f"the partial sum of writer {self.writer!r} changed under it (a "
                            "second process with this id?)")

    def _saved(self, round_id: int, count: int) -> None:
        self._counts[round_id] = count

    def running_sum(self, round_id: int) -> bytes | None:
        r = self._one("SELECT sums, count FROM round_sums WHERE round = ? AND writer = ?",
                      (round_id, self.writer))
        self._counts[round_id] = int(r[1]) if r else 0
        return bytes(r[0]) if r else None

    def partial_sums(self, round_id: int) -> list[bytes]:
        return [bytes(r[0]) for r in self._all(
            "SELECT sums FROM round_sums WHERE round = ? ORDER BY writer", (round_id,))]

    def begin_close(self, round_id: int) -> None:
        """Mark the round ``closing``: waits for every worker transaction recording into it,
        and every later one is refused (:class:`Contended`, then judged as late)."""
        self._all("UPDATE rounds SET status = 'closing' WHERE round = ? AND status = 'open'",
                  (round_id,))

    # -- workers -----------------------------------------------------------------------------------
    def _lock_id(self, conn: Any) -> None:
        got = conn.execute("SELECT pg_try_advisory_lock(%s)",
                           (_lock_key(self.fleet, self.writer),)).fetchone()
        if not got or not got[0]:
            who = (f"worker id {self.writer!r}" if self.writer
                   else f"the coordinator of fleet {self.fleet!r}")
            conn.close()
            raise StateError(f"{who} is in use by another running process (see the 'workers' "
                             "table): give every worker its own --id, and run one service per "
                             "fleet")

    def claim(self, host: str, pid: int) -> None:
        """Hold this writer id (the coordinator: ``""``) for the life of the process: a session
        advisory lock, released by PostgreSQL when the process dies, taken again on every
        reconnection; a worker is registered in ``workers``."""
        self._lock_id(self.conn)
        self._claimed = True
        if not self.writer:
            return
        now = time.time()
        self._all("INSERT INTO workers VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                  "host = excluded.host, pid = excluded.pid, started_at = excluded.started_at, "
                  "seen_at = excluded.seen_at", (self.writer, host, pid, now, now))

    def heartbeat(self) -> None:
        self._all("UPDATE workers SET seen_at = ? WHERE id = ?", (time.time(), self.writer))

    def workers(self, within: float) -> list[str]:
        """Workers seen in the last ``within`` seconds."""
        return [r[0] for r in self._all("SELECT id FROM workers WHERE seen_at >= ? ORDER BY id",
                                        (time.time() - within,))]


def _clean(value: Any) -> Any:
    """PostgreSQL text cannot hold NUL: a device-chosen string (a decline reason, a detail)
    with one must not fail the group it is in (nor, redelivered, every attempt after)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, tuple | list):
        return type(value)(_clean(v) for v in value)
    return value


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
