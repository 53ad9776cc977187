"""The device's own append-only privacy ledger (SQLite): it refuses to exceed its budget.

A clinic's patients must stay protected even if the aggregator misbehaves (asks for more rounds
than planned, replays a round, forgets what it asked). So every device keeps its own record of
what it has released and checks every new release against its own budget *before* anything
leaves the device::

    ledger = Ledger(data_dir / "privacy.db", {"device": Budget(epsilon=3.0, delta=1e-5)})
    release = Release(round=7, unit="device", mechanism="sampled_gaussian",
                      noise_multiplier=1.1, sample_rate=0.1, steps=1)
    ledger.record([release])   # raises BudgetExceededError (and records nothing) if over budget
    ...send the update only after record() returned...

Properties:

* **Atomic check-and-append.** :meth:`Ledger.record` checks every unit's budget and appends the
  releases in one ``BEGIN IMMEDIATE`` transaction, so two processes sharing the file cannot both
  pass the check. Either all releases of a call are stored or none is.
* **Append-only.** There is no update or delete API, and SQLite triggers abort any ``UPDATE`` or
  ``DELETE`` on the releases and budgets tables.
* **Durable.** WAL journal with ``synchronous=FULL``: a committed release survives a power cut;
  a process killed mid-write leaves the ledger as it was before that transaction.
* **Fail closed.** A missing, unreadable, corrupt, foreign or wrong-version file raises
  :class:`~bedside.errors.LedgerError` on open or on any call; a unit without a configured budget
  is refused. Callers treat any :class:`~bedside.errors.PrivacyError` as "do not contribute".
* **Budgets are fixed for the life of a ledger.** They are stored in the file when it is created.
  Reopening with a different budget for a stored unit raises LedgerError; a budget for a new unit
  may be added, and then covers every release already recorded for that unit.
* **Every release is recorded, budget or not.** A unit without a budget is accounted all the same
  (nothing limits it), so a budget added later covers the past. A release without differential
  privacy (a device that trained without DP-SGD, a round without device-level noise) is recorded
  as mechanism ``none``: its epsilon is infinite, and a budget for that unit refuses from then on
  rather than report a small, false figure.
* **Who enforces each guarantee.** A release is ``enforced_by`` the device (DP-SGD, local noise,
  noised statistics: it holds whatever the aggregator does) or by the aggregator (central noise:
  the device sent a clipped update without noise and relies on the aggregator adding it). Reports
  give both figures: the epsilon if the aggregator is honest, and what the device enforced itself.
* **Which federation.** Each release names the fleet it was made in; one ledger accounts for all of
  them, because it belongs to the device's records, not to a federation or a model.

Accounting: each unit's releases are grouped by (noise multiplier, sample rate), described as
dp-accounting events and composed (see :mod:`bedside.privacy.accountant`). The epsilon reported is
at the unit's budget delta. ``noise_multiplier`` in a :class:`Release` is always the noise
standard deviation divided by the L2 sensitivity of what was noised; the caller normalises (a
device that noises its own clipped update with ``N(0, (zC)^2)`` records ``z / 2``, because its
sensitivity between any two local datasets is ``2C``; see ``docs/privacy.md``).
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from bedside.constants import DEFAULT_DELTA, LEDGER_SCHEMA, PRIVACY_UNITS
from bedside.errors import BudgetExceededError, InputError, LedgerError
from bedside.files import fsync_dir, private_dir, refuse_shared
from bedside.privacy import accountant as acct
from bedside.sqlite import transaction

__all__ = ["MECHANISMS", "Budget", "Ledger", "Mechanism", "Release", "Unit", "releases_event"]

Unit = Literal["record", "device"]
Mechanism = Literal["sampled_gaussian", "gaussian", "none"]
MECHANISMS: Final[tuple[str, ...]] = ("sampled_gaussian", "gaussian", "none")
EnforcedBy = Literal["device", "aggregator"]
ENFORCERS: Final[tuple[str, ...]] = ("device", "aggregator")

LEDGER_KIND: Final = "bedside-privacy-ledger"
BUSY_TIMEOUT_S: Final = 30.0

# The releases table, declared once (the schema below and the migration from version 1 use it).
_RELEASES_COLUMNS: Final = """(
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    batch            TEXT NOT NULL,
    round            INTEGER NOT NULL CHECK (round >= 0),
    unit             TEXT NOT NULL CHECK (unit IN ('record', 'device')),
    mechanism        TEXT NOT NULL CHECK (mechanism IN ('sampled_gaussian', 'gaussian', 'none')),
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier >= 0),
    sample_rate      REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps            INTEGER NOT NULL CHECK (steps >= 0),
    enforced_by      TEXT NOT NULL CHECK (enforced_by IN ('device', 'aggregator')),
    fleet            TEXT NOT NULL DEFAULT '',
    note             TEXT NOT NULL DEFAULT '',
    recorded_at      TEXT NOT NULL,
    CHECK ((mechanism = 'none') = (noise_multiplier = 0))
)"""
_RELEASE_GUARDS: Final = """
CREATE INDEX releases_unit ON releases (unit, id);
CREATE TRIGGER releases_no_update BEFORE UPDATE ON releases
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER releases_no_delete BEFORE DELETE ON releases
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
"""
_SCHEMA_SQL: Final = (
    """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE budgets (
    unit       TEXT PRIMARY KEY CHECK (unit IN ('record', 'device')),
    epsilon    REAL NOT NULL CHECK (epsilon > 0),
    delta      REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    created_at TEXT NOT NULL
);
CREATE TABLE releases """ + _RELEASES_COLUMNS + ";" + _RELEASE_GUARDS + """
CREATE TRIGGER budgets_no_update BEFORE UPDATE ON budgets
    BEGIN SELECT RAISE(ABORT, 'privacy budgets are fixed for the life of a ledger'); END;
CREATE TRIGGER budgets_no_delete BEFORE DELETE ON budgets
    BEGIN SELECT RAISE(ABORT, 'privacy budgets are fixed for the life of a ledger'); END;
CREATE TRIGGER meta_no_update BEFORE UPDATE ON meta
    BEGIN SELECT RAISE(ABORT, 'ledger metadata is fixed'); END;
CREATE TRIGGER meta_no_delete BEFORE DELETE ON meta
    BEGIN SELECT RAISE(ABORT, 'ledger metadata is fixed'); END;
""")
# Version 1 ledgers (no 'none' releases, no enforcer, no fleet) are migrated on open: every row is
# kept; a device-level row whose note says central noise is marked as enforced by the aggregator.
_MIGRATE_1_TO_2: Final = (
    "BEGIN IMMEDIATE;\nCREATE TABLE releases_v2 " + _RELEASES_COLUMNS  # noqa: S608 (constants)
    + """;
INSERT INTO releases_v2 (id, batch, round, unit, mechanism, noise_multiplier, sample_rate, steps,
                         enforced_by, fleet, note, recorded_at)
    SELECT id, batch, round, unit, mechanism, noise_multiplier, sample_rate, steps,
           CASE WHEN unit = 'device' AND note LIKE 'central%' THEN 'aggregator' ELSE 'device' END,
           '', note, recorded_at FROM releases;
DROP TABLE releases;
ALTER TABLE releases_v2 RENAME TO releases;
""" + _RELEASE_GUARDS + "UPDATE schema_version SET version = 2;\nCOMMIT;\n")
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_TABLES: Final = frozenset({"schema_version", "meta", "budgets", "releases"})


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_unit(unit: object) -> str:
    if unit not in PRIVACY_UNITS:
        raise InputError(f"unit must be one of {', '.join(PRIVACY_UNITS)}; got {unit!r}")
    return str(unit)


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """A unit's privacy budget: the ledger refuses any release that would take epsilon (at this
    delta) above ``epsilon``."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        acct._check_epsilon(self.epsilon, "budget epsilon")
        acct._check_delta(self.delta, "budget delta")
        object.__setattr__(self, "epsilon", float(self.epsilon))
        object.__setattr__(self, "delta", float(self.delta))


@dataclass(frozen=True)
class Release:
    """One privatized release, as the ledger accounts it.

    Attributes:
        round: the federated round (>= 0) this release belongs to.
        unit: ``"record"`` (DP-SGD on the device, per-example clipping) or ``"device"`` (the
            whole update is clipped and noised).
        mechanism: ``"sampled_gaussian"`` (Poisson-subsampled Gaussian, ``steps`` times) or
            ``"gaussian"`` (full participation; ``sample_rate`` must be 1).
        noise_multiplier: noise standard deviation divided by the L2 sensitivity of what was
            noised, > 0. The caller normalises (local device-level noise ``N(0, (zC)^2)`` on a
            clipped update has sensitivity ``2C``: record ``z / 2``).
        sample_rate: probability in (0, 1] that the unit took part in a step (Poisson sampling
            the adversary does not observe); 1.0 when unsure.
        steps: how many times the mechanism ran (>= 0; DP-SGD steps, or 1 per round).
        note: text for people reading the ledger; Bedside recognises only its own releases of
            feature statistics and of per-group counts by how their note starts.
        enforced_by: ``"device"`` if the device itself added the noise (DP-SGD, local noise),
            ``"aggregator"`` if the guarantee depends on the aggregator adding it (central).
        fleet: the federation the release was made in.

    Mechanism ``"none"`` (``noise_multiplier`` 0) is a release without differential privacy:
    its epsilon is infinite.
    """

    round: int
    unit: Unit
    mechanism: Mechanism
    noise_multiplier: float
    sample_rate: float
    steps: int
    note: str = ""
    enforced_by: EnforcedBy = "device"
    fleet: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "round", acct._check_steps(self.round, "round"))
        _check_unit(self.unit)
        if self.mechanism not in MECHANISMS:
            raise InputError(
                f"mechanism must be one of {', '.join(MECHANISMS)}; got {self.mechanism!r}"
            )
        z = acct._check_noise_multiplier(self.noise_multiplier)
        if (z == 0.0) != (self.mechanism == "none"):
            raise InputError(
                "a release without noise is mechanism 'none' (infinite epsilon) and only it has "
                f"noise_multiplier 0; got mechanism {self.mechanism!r} with {z:g}"
            )
        if self.enforced_by not in ENFORCERS:
            raise InputError(f"enforced_by must be one of {', '.join(ENFORCERS)}; got "
                             f"{self.enforced_by!r}")
        if not isinstance(self.fleet, str):
            raise InputError(f"fleet must be a string, got {type(self.fleet).__name__}")
        q = acct._check_sample_rate(self.sample_rate)
        if self.mechanism == "gaussian" and q != 1.0:
            raise InputError(
                f"sample_rate must be 1 for mechanism 'gaussian' (full participation), got {q:g}; "
                "use mechanism 'sampled_gaussian' for Poisson sampling"
            )
        object.__setattr__(self, "steps", acct._check_steps(self.steps))
        if not isinstance(self.note, str):
            raise InputError(f"note must be a string, got {type(self.note).__name__}")
        object.__setattr__(self, "noise_multiplier", z)
        object.__setattr__(self, "sample_rate", q)

    def event(self) -> Any:
        """This release as a dp-accounting ``DpEvent`` (no noise: a Gaussian of multiplier 0,
        which every accountant here takes as infinite epsilon)."""
        if self.mechanism in ("gaussian", "none"):
            return acct.gaussian(self.noise_multiplier, self.steps)
        return acct.sampled_gaussian(self.noise_multiplier, self.sample_rate, self.steps)


def releases_event(releases: Iterable[Release]) -> Any:
    """The composition of ``releases`` as one event, identical mechanisms grouped.

    Composing the same mechanism ``a`` times and then ``b`` times is composing it ``a + b``
    times; grouping keeps PLD accounting to one self-composition per distinct
    (noise multiplier, sample rate), however many rounds the ledger holds.
    """
    steps: dict[tuple[float, float], int] = {}
    for r in releases:
        key = (r.noise_multiplier, r.sample_rate)  # 'gaussian' has sample_rate 1.0
        steps[key] = steps.get(key, 0) + r.steps
    return acct.compose(acct.sampled_gaussian(z, q, t) for (z, q), t in sorted(steps.items()))


# ---------------------------------------------------------------------------------------------
# The ledger
# ---------------------------------------------------------------------------------------------
class Ledger:
    """The device's append-only privacy ledger. See the module docstring.

    Args:
        path: the SQLite file. Created (atomically) if it does not exist; then ``budgets`` is
            required.
        budgets: unit -> :class:`Budget`. ``None`` reads the budgets stored in the file (what
            ``bedside privacy report`` does). For an existing ledger, a budget that differs from
            the stored one raises LedgerError; a budget for a new unit is added.
        accountant: ``"auto"``, ``"rdp"`` or ``"pld"``. ``None`` uses the one stored at creation
            (``"auto"`` for a new ledger). Every choice gives a valid upper bound.
        create: whether a missing file may be created. A device that has already taken part
            passes ``False``: a ledger that vanished must not silently restart at epsilon 0.

    Raises:
        LedgerError: the file is missing (and no budgets were given), unreadable, corrupt, not a
            Bedside ledger, of another schema version, or its budgets conflict with ``budgets``.
        InputError: invalid ``budgets`` or ``accountant``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        budgets: Mapping[str, Budget] | None = None,
        accountant: str | None = None,
        *,
        create: bool = True,
    ) -> None:
        self.path = Path(path)
        if accountant is not None:
            acct._check_accountant(accountant)
        wanted = self._check_budgets(budgets)
        self._lock = threading.RLock()
        self._cache: dict[tuple[str, int, int, str, float], dict[str, Any]] = {}
        self._conn: sqlite3.Connection | None = None
        if not self.path.exists():
            if not create:
                raise LedgerError(
                    f"the privacy ledger {self.path} is missing, but this device has taken part "
                    "before: refusing to start a new one at epsilon 0. Restore it from backup "
                    "(never delete a ledger to reset a budget)"
                )
            if wanted is None:
                raise LedgerError(
                    f"no privacy ledger at {self.path}; a ledger is created by the device agent "
                    "with its budgets (check the path)"
                )
            self._create(wanted, accountant or "auto")
        self._conn = self._open()
        self._identity: tuple[int, int] | None = None
        try:
            with self._guard():
                self._verify()
                # a real ledger describes patients' data: others must not have been able to read
                refuse_shared(self.path, "privacy ledger")
                self._use_wal()
                st = self.path.stat()
                self._identity = (st.st_dev, st.st_ino)
                stored_accountant = self._meta().get("accountant", "auto")
                self.accountant: str = accountant or stored_accountant
                acct._check_accountant(self.accountant)
                if wanted:
                    self._reconcile_budgets(wanted)
        except BaseException:
            self.close()
            raise

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Close the database connection. Further calls raise LedgerError."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r}, accountant={getattr(self, 'accountant', None)!r})"

    @staticmethod
    def _check_budgets(budgets: Mapping[str, Budget] | None) -> dict[str, Budget] | None:
        if budgets is None:
            return None
        out: dict[str, Budget] = {}
        for unit, budget in budgets.items():
            _check_unit(unit)
            if not isinstance(budget, Budget):
                raise InputError(
                    f"budget for unit {unit!r} must be a Budget, got {type(budget).__name__}"
                )
            out[unit] = budget
        return out

    def _create(self, budgets: dict[str, Budget], accountant: str) -> None:
        """Build the ledger in a temporary file, then link it into place (atomic, no clobber)."""
        directory = self.path.parent
        try:
            private_dir(directory)  # the ledger describes patients' data: owner only
            fd, tmp_name = tempfile.mkstemp(prefix=".ledger-", suffix=".tmp", dir=directory)
            os.close(fd)
        except OSError as exc:
            raise LedgerError(f"cannot create the privacy ledger at {self.path}: {exc}") from exc
        tmp = Path(tmp_name)
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                # A private temporary file: nobody else sees it until it is linked into place.
                conn.executescript(_SCHEMA_SQL)
                with transaction(conn):
                    conn.execute("INSERT INTO schema_version (version) VALUES (?)",
                                  (LEDGER_SCHEMA,))
                    now = _now()
                    conn.executemany(
                        "INSERT INTO meta (key, value) VALUES (?, ?)",
                        [("kind", LEDGER_KIND), ("created_at", now), ("accountant", accountant)],
                    )
                    conn.executemany(
                        "INSERT INTO budgets (unit, epsilon, delta, created_at) "
                        "VALUES (?, ?, ?, ?)",
                        [(u, b.epsilon, b.delta, now) for u, b in sorted(budgets.items())],
                    )
            finally:
                conn.close()  # checkpoints the WAL into the main file
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            # Fails if another process created the ledger first: then open theirs (budgets are
            # reconciled on open).
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self.path)
            fsync_dir(directory)
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(f"cannot create the privacy ledger at {self.path}: {exc}") from exc
        finally:
            for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,  # explicit BEGIN/COMMIT only
                timeout=BUSY_TIMEOUT_S,
                check_same_thread=False,  # guarded by self._lock
            )
        except sqlite3.Error as exc:
            raise LedgerError(self._unreadable(exc)) from exc
        try:
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            conn.close()
            raise LedgerError(self._unreadable(exc)) from exc
        return conn

    def _use_wal(self) -> None:
        """Switch to WAL, after :meth:`_verify` (so a foreign or empty file is never written)."""
        assert self._conn is not None
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise LedgerError(f"the privacy ledger at {self.path} cannot use WAL journaling")

    def _unreadable(self, exc: BaseException) -> str:
        return (
            f"the privacy ledger at {self.path} is unreadable or corrupt ({exc}); refusing to "
            "contribute. Restore it from a backup; never delete it to start over, that would "
            "forget what this device has already released"
        )

    @contextlib.contextmanager
    def _guard(self) -> Iterator[sqlite3.Connection]:
        """Serialise access and turn every SQLite failure into LedgerError (fail closed)."""
        with self._lock:
            if self._conn is None:
                raise LedgerError(f"the privacy ledger at {self.path} is closed")
            self._check_file()
            try:
                yield self._conn
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise LedgerError(
                        f"the privacy ledger at {self.path} stayed locked by another process for "
                        f"{BUSY_TIMEOUT_S:g} s; refusing to contribute this time"
                    ) from exc
                raise LedgerError(self._unreadable(exc)) from exc
            except sqlite3.Error as exc:
                raise LedgerError(self._unreadable(exc)) from exc

    def _check_file(self) -> None:
        """Cheap per-call checks SQLite cannot make through an open connection: the file at
        ``path`` is still the one opened (not deleted or replaced) and still starts with the
        SQLite header (not overwritten)."""
        try:
            st = self.path.stat()
            with open(self.path, "rb") as fh:
                header = fh.read(len(_SQLITE_MAGIC))
        except OSError as exc:
            raise LedgerError(self._unreadable(exc)) from exc
        if self._identity is not None and (st.st_dev, st.st_ino) != self._identity:
            raise LedgerError(
                f"the privacy ledger at {self.path} was replaced or deleted while in use; "
                "refusing to contribute (restart the agent to open the file now at that path)"
            )
        if header != _SQLITE_MAGIC:
            raise LedgerError(self._unreadable(RuntimeError("the file header is not SQLite's")))

    # -- checks on open -----------------------------------------------------------------------
    def _verify(self) -> None:
        assert self._conn is not None
        conn = self._conn
        check = conn.execute("PRAGMA quick_check").fetchall()
        if [tuple(r) for r in check] != [("ok",)]:
            detail = "; ".join(str(r[0]) for r in check[:3])
            raise LedgerError(self._unreadable(RuntimeError(f"integrity check: {detail}")))
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables >= _TABLES:
            raise LedgerError(
                f"{self.path} is not a Bedside privacy ledger (missing tables: "
                f"{', '.join(sorted(_TABLES - tables))}); refusing to contribute"
            )
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version")]
        if versions == [1] and self._meta().get("kind") == LEDGER_KIND:
            self._migrate_from_1()
            versions = [LEDGER_SCHEMA]
        if versions != [LEDGER_SCHEMA]:
            raise LedgerError(
                f"the privacy ledger at {self.path} has schema version {versions or 'none'}, "
                f"this Bedside reads version {LEDGER_SCHEMA}; refusing to contribute "
                "(upgrade Bedside, or restore the right file)"
            )
        if self._meta().get("kind") != LEDGER_KIND:
            raise LedgerError(
                f"{self.path} is not a Bedside privacy ledger; refusing to contribute"
            )

    def _migrate_from_1(self) -> None:
        """Version 1 -> 2 in one transaction; every release is kept (see _MIGRATE_1_TO_2)."""
        assert self._conn is not None
        conn = self._conn
        try:
            conn.executescript(_MIGRATE_1_TO_2)  # its own BEGIN IMMEDIATE ... COMMIT
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _meta(self) -> dict[str, str]:
        assert self._conn is not None
        return {str(k): str(v) for k, v in self._conn.execute("SELECT key, value FROM meta")}

    def _load_budgets(self) -> dict[str, Budget]:
        assert self._conn is not None
        out: dict[str, Budget] = {}
        for unit, eps, delta in self._conn.execute("SELECT unit, epsilon, delta FROM budgets"):
            try:
                out[_check_unit(unit)] = Budget(float(eps), float(delta))
            except (InputError, TypeError, ValueError) as exc:
                raise LedgerError(
                    f"the privacy ledger at {self.path} holds an invalid budget for {unit!r}: "
                    f"{exc}; refusing to contribute"
                ) from exc
        return out

    def _reconcile_budgets(self, wanted: dict[str, Budget]) -> None:
        assert self._conn is not None
        conn = self._conn
        with transaction(conn, "IMMEDIATE"):
            stored = self._load_budgets()
            for unit, budget in sorted(wanted.items()):
                have = stored.get(unit)
                if have is None:
                    conn.execute(
                        "INSERT INTO budgets (unit, epsilon, delta, created_at) VALUES (?,?,?,?)",
                        (unit, budget.epsilon, budget.delta, _now()),
                    )
                elif have != budget:
                    raise LedgerError(
                        f"the privacy ledger at {self.path} was created with the {unit} budget "
                        f"(epsilon={have.epsilon:g}, delta={have.delta:g}), not "
                        f"(epsilon={budget.epsilon:g}, delta={budget.delta:g}); budgets are fixed "
                        "for the life of a ledger. Fix the configuration, or start a new ledger "
                        "file for a new budget"
                    )

    # -- reading ------------------------------------------------------------------------------
    def _rows(self, unit: str) -> list[Release]:
        assert self._conn is not None
        out: list[Release] = []
        cur = self._conn.execute(
            "SELECT id, round, unit, mechanism, noise_multiplier, sample_rate, steps, note, "
            "enforced_by, fleet FROM releases WHERE unit = ? ORDER BY id",
            (unit,),
        )
        for row_id, rnd, u, mech, z, q, steps, note, by, fleet in cur:
            try:
                out.append(Release(rnd, u, mech, z, q, steps, note, by, fleet))
            except (InputError, TypeError) as exc:
                raise LedgerError(
                    f"the privacy ledger at {self.path} holds an invalid release (row {row_id}): "
                    f"{exc}; refusing to contribute"
                ) from exc
        return out

    def _epsilon_report(self, releases: Sequence[Release], delta: float) -> dict[str, Any]:
        if not releases:
            return {"epsilon": 0.0, "accountant": self.accountant}
        rep = acct.epsilon_report(releases_event(releases), delta, self.accountant)
        return {"epsilon": float(rep["epsilon"]), "accountant": str(rep["accountant"])}

    def _unit_state(self, unit: str, budgets: Mapping[str, Budget]) -> dict[str, Any]:
        """Epsilon spent by ``unit`` with its release count; cached until the unit's rows change.

        A unit without a budget is accounted at the default delta (1e-5). The cache key includes
        the row count and the last row id read in the same snapshot, so a release recorded by
        another process invalidates it too.
        """
        assert self._conn is not None
        count, last_id = self._conn.execute(
            "SELECT COUNT(*), COALESCE(MAX(id), 0) FROM releases WHERE unit = ?", (unit,)
        ).fetchone()
        budget = budgets.get(unit)
        delta = budget.delta if budget is not None else DEFAULT_DELTA
        key = (unit, int(count), int(last_id), self.accountant, delta)
        cached = self._cache.get(key)
        if cached is None:
            rows = self._rows(unit)
            cached = self._epsilon_report(rows, delta)
            cached["count"] = len(rows)
            cached["rounds"] = len({(r.fleet, r.round) for r in rows})
            cached["last_round"] = rows[-1].round if rows else None
            cached["aggregator_dependent"] = sum(r.enforced_by == "aggregator" for r in rows)
            cached["without_noise"] = sum(r.mechanism == "none" for r in rows)
            cached["delta"] = delta
            self._cache = {k: v for k, v in self._cache.items() if k[0] != unit}
            self._cache[key] = cached
        return cached

    # -- public API ---------------------------------------------------------------------------
    @property
    def budgets(self) -> dict[str, Budget]:
        """The budgets stored in the ledger (unit -> Budget)."""
        with self._guard():
            return self._load_budgets()

    def spent(self, unit: str) -> float:
        """Epsilon spent so far by ``unit`` (``inf`` after a release without noise), at the
        unit's budget delta (the default delta without a budget), assuming the aggregator added
        the central noise it announced."""
        _check_unit(unit)
        with self._guard() as conn, transaction(conn, "DEFERRED"):
            return float(self._unit_state(unit, self._load_budgets())["epsilon"])

    def check(self, releases: Iterable[Release]) -> None:
        """Raise BudgetExceededError if recording ``releases`` would exceed any unit's budget.

        Advisory: only :meth:`record` checks and appends atomically. An empty list passes (and
        still fails closed with LedgerError if the ledger is unreadable).
        """
        items = _check_releases(releases)
        with self._guard() as conn, transaction(conn, "DEFERRED"):
            self._check_locked(items)

    def record(self, releases: Iterable[Release]) -> None:
        """Check the budgets and append ``releases``, in one transaction.

        Every release is recorded, whether its unit has a budget or not (a budget added later
        covers it). Either all of ``releases`` are recorded or, on any refusal or error, none is.
        Call this *before* the privatized update leaves the device, and send it only if this
        returned. An empty list records nothing, but still raises LedgerError if the ledger is
        unreadable.

        Raises:
            BudgetExceededError: a unit with a budget would exceed it.
            LedgerError: the ledger cannot be read or written.
            InputError: ``releases`` holds something other than Release.
        """
        items = _check_releases(releases)
        with self._guard() as conn:
            if not items:
                self._load_budgets()  # still fail closed on an unreadable ledger
                return
            with transaction(conn, "IMMEDIATE"):
                self._check_locked(items)
                batch = uuid.uuid4().hex
                now = _now()
                conn.executemany(
                    "INSERT INTO releases (batch, round, unit, mechanism, noise_multiplier, "
                    "sample_rate, steps, enforced_by, fleet, note, recorded_at) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    [(batch, r.round, r.unit, r.mechanism, r.noise_multiplier, r.sample_rate,
                      r.steps, r.enforced_by, r.fleet, r.note, now) for r in items],
                )

    def releases(self, unit: str) -> list[Release]:
        """Every release recorded for ``unit``, oldest first."""
        _check_unit(unit)
        with self._guard() as conn, transaction(conn, "DEFERRED"):
            return self._rows(unit)

    def rounds(self) -> set[tuple[str, int]]:
        """The (fleet, round) of every release recorded (the rounds this ledger knows of)."""
        with self._guard() as conn:
            return {(str(f), int(r)) for f, r in conn.execute(
                "SELECT DISTINCT fleet, round FROM releases")}

    def report(self) -> dict[str, dict[str, Any]]:
        """Per unit with a budget or releases: what was spent, and who enforced it.

        ``epsilon`` assumes the aggregator added the central noise it announced; ``None`` means
        infinite (a release without noise). ``epsilon_device_enforced`` is the guarantee the device
        holds by itself, whatever the aggregator does: ``None`` (no guarantee) once the unit has a
        release that relies on the aggregator, else the same figure. ``guarantee`` says it in
        words. JSON-serialisable (no infinities).
        """
        with self._guard() as conn, transaction(conn, "DEFERRED"):
            budgets = self._load_budgets()
            out: dict[str, dict[str, Any]] = {}
            for unit in PRIVACY_UNITS:
                budget = budgets.get(unit)
                state = self._unit_state(unit, budgets)
                if budget is None and not state["count"]:
                    continue
                eps = float(state["epsilon"])
                finite = math.isfinite(eps)
                relies = state["aggregator_dependent"] > 0
                out[unit] = {
                    "epsilon": eps if finite else None,
                    "epsilon_device_enforced": None if relies or not finite else eps,
                    "delta": state["delta"],
                    "budget_epsilon": budget.epsilon if budget else None,
                    "remaining_epsilon": (max(0.0, budget.epsilon - eps) if budget and finite
                                          else 0.0 if budget else None),
                    "releases": int(state["count"]),
                    "rounds": int(state["rounds"]),
                    "last_round": state["last_round"],
                    "accountant": str(state["accountant"]),
                    "guarantee": guarantee_text(unit, eps, state["delta"], relies,
                                                int(state["without_noise"])),
                }
            return out

    # -- internals ----------------------------------------------------------------------------
    def _check_locked(self, items: Sequence[Release]) -> None:
        budgets = self._load_budgets()
        for unit in sorted({r.unit for r in items}):
            budget = budgets.get(unit)
            if budget is None:
                continue  # accounted, not limited: a budget added later covers it
            new = [r for r in items if r.unit == unit]
            rows = self._rows(unit)
            would = float(self._epsilon_report(rows + new, budget.delta)["epsilon"])
            if not would <= budget.epsilon:  # also refuses NaN
                spent = float(self._unit_state(unit, budgets)["epsilon"])
                rounds = sorted({r.round for r in new})
                cause = ""
                if any(r.mechanism == "none" for r in rows + new):
                    cause = (" (a release without differential privacy is in the ledger or in "
                             "this round: its epsilon is infinite, so this unit can never "
                             "contribute again)")
                raise BudgetExceededError(
                    f"{unit}-level privacy budget exceeded: spent epsilon {_fmt(spent)}, would "
                    f"be {_fmt(would)} after round(s) {', '.join(map(str, rounds))}, budget "
                    f"{budget.epsilon:g} at delta {budget.delta:g}{cause}; refusing to contribute"
                )


def guarantee_text(unit: str, epsilon: float, delta: float, relies_on_aggregator: bool,
                   without_noise: int) -> str:
    """What a unit's releases guarantee, in words a privacy officer can check."""
    who = "one patient's record" if unit == "record" else "this device's whole contribution"
    if without_noise:
        return (f"no {unit}-level guarantee: {without_noise} release(s) were made without "
                f"{'DP-SGD' if unit == 'record' else 'device-level noise'}, so epsilon is "
                "infinite from then on")
    if epsilon == 0.0:
        return f"nothing has been released at the {unit} level yet"
    text = f"{who} is protected at epsilon {epsilon:.3g}, delta {delta:g}"
    if relies_on_aggregator:
        return (text + " if the aggregator added the central noise it announced; this device "
                "sent those updates clipped but without noise, so against an aggregator that did "
                "not add it there is no device-level guarantee")
    return text + ", enforced by this device itself (it holds whatever the aggregator does)"


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.6g}"


def _check_releases(releases: Iterable[Release]) -> list[Release]:
    if isinstance(releases, Release):
        raise InputError("releases must be a list of Release, got a single Release; wrap it")
    items = list(releases)
    for i, r in enumerate(items):
        if not isinstance(r, Release):
            raise InputError(f"releases[{i}] must be a Release, got {type(r).__name__}")
    return items
