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
  Reopening with a different budget for a stored unit raises LedgerError (start a new ledger file
  to change a budget); a budget for a new unit may be added.

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

from bedside.constants import LEDGER_SCHEMA, PRIVACY_UNITS
from bedside.errors import BudgetExceededError, InputError, LedgerError
from bedside.files import fsync_dir
from bedside.privacy import accountant as acct
from bedside.sqlite import transaction

__all__ = ["MECHANISMS", "Budget", "Ledger", "Mechanism", "Release", "Unit", "releases_event"]

Unit = Literal["record", "device"]
Mechanism = Literal["sampled_gaussian", "gaussian"]
MECHANISMS: Final[tuple[str, ...]] = ("sampled_gaussian", "gaussian")

LEDGER_KIND: Final = "bedside-privacy-ledger"
BUSY_TIMEOUT_S: Final = 30.0

_SCHEMA_SQL: Final = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE budgets (
    unit       TEXT PRIMARY KEY CHECK (unit IN ('record', 'device')),
    epsilon    REAL NOT NULL CHECK (epsilon > 0),
    delta      REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    created_at TEXT NOT NULL
);
CREATE TABLE releases (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    batch            TEXT NOT NULL,
    round            INTEGER NOT NULL CHECK (round >= 0),
    unit             TEXT NOT NULL CHECK (unit IN ('record', 'device')),
    mechanism        TEXT NOT NULL CHECK (mechanism IN ('sampled_gaussian', 'gaussian')),
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate      REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps            INTEGER NOT NULL CHECK (steps >= 0),
    note             TEXT NOT NULL DEFAULT '',
    recorded_at      TEXT NOT NULL
);
CREATE INDEX releases_unit ON releases (unit, id);
CREATE TRIGGER releases_no_update BEFORE UPDATE ON releases
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER releases_no_delete BEFORE DELETE ON releases
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER budgets_no_update BEFORE UPDATE ON budgets
    BEGIN SELECT RAISE(ABORT, 'privacy budgets are fixed for the life of a ledger'); END;
CREATE TRIGGER budgets_no_delete BEFORE DELETE ON budgets
    BEGIN SELECT RAISE(ABORT, 'privacy budgets are fixed for the life of a ledger'); END;
CREATE TRIGGER meta_no_update BEFORE UPDATE ON meta
    BEGIN SELECT RAISE(ABORT, 'ledger metadata is fixed'); END;
CREATE TRIGGER meta_no_delete BEFORE DELETE ON meta
    BEGIN SELECT RAISE(ABORT, 'ledger metadata is fixed'); END;
"""
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
        note: free text for people reading the ledger (never parsed).
    """

    round: int
    unit: Unit
    mechanism: Mechanism
    noise_multiplier: float
    sample_rate: float
    steps: int
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "round", acct._check_steps(self.round, "round"))
        _check_unit(self.unit)
        if self.mechanism not in MECHANISMS:
            raise InputError(
                f"mechanism must be one of {', '.join(MECHANISMS)}; got {self.mechanism!r}"
            )
        z = acct._check_noise_multiplier(self.noise_multiplier)
        if z == 0.0:
            raise InputError(
                "noise_multiplier must be > 0: a release without noise has infinite epsilon and "
                "can never fit a budget"
            )
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
        """This release as a dp-accounting ``DpEvent``."""
        if self.mechanism == "gaussian":
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
            directory.mkdir(parents=True, exist_ok=True)
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
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (LEDGER_SCHEMA,))
                now = _now()
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("kind", LEDGER_KIND), ("created_at", now), ("accountant", accountant)],
                )
                conn.executemany(
                    "INSERT INTO budgets (unit, epsilon, delta, created_at) VALUES (?, ?, ?, ?)",
                    [(u, b.epsilon, b.delta, now) for u, b in sorted(budgets.items())],
                )
                conn.execute("COMMIT")
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
            "SELECT id, round, unit, mechanism, noise_multiplier, sample_rate, steps, note "
            "FROM releases WHERE unit = ? ORDER BY id",
            (unit,),
        )
        for row_id, rnd, u, mech, z, q, steps, note in cur:
            try:
                out.append(Release(rnd, u, mech, z, q, steps, note))
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

        The cache key includes the row count and the last row id read in the same snapshot, so
        a release recorded by another process invalidates it too.
        """
        assert self._conn is not None
        count, last_id = self._conn.execute(
            "SELECT COUNT(*), COALESCE(MAX(id), 0) FROM releases WHERE unit = ?", (unit,)
        ).fetchone()
        budget = budgets.get(unit)
        if budget is None:
            if count:
                raise LedgerError(
                    f"the privacy ledger at {self.path} holds {unit} releases but no {unit} "
                    "budget; refusing to contribute"
                )
            return {"epsilon": 0.0, "accountant": self.accountant, "count": 0}
        key = (unit, int(count), int(last_id), self.accountant, budget.delta)
        cached = self._cache.get(key)
        if cached is None:
            rows = self._rows(unit)
            cached = self._epsilon_report(rows, budget.delta)
            cached["count"] = len(rows)
            cached["rounds"] = len({r.round for r in rows})
            cached["last_round"] = max((r.round for r in rows), default=None)
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
        """Epsilon spent so far by ``unit``, at the unit's budget delta (0.0 if nothing)."""
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
        """Check every unit's budget and append ``releases``, in one transaction.

        Either all of ``releases`` are recorded or, on any refusal or error, none is. Call this
        *before* the privatized update leaves the device, and send it only if this returned.
        An empty list records nothing (a round that released nothing private), but still raises
        LedgerError if the ledger is unreadable.

        Raises:
            BudgetExceededError: a unit would exceed its budget, or has no budget.
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
                    "sample_rate, steps, note, recorded_at) VALUES (?,?,?,?,?,?,?,?,?)",
                    [
                        (
                            batch,
                            r.round,
                            r.unit,
                            r.mechanism,
                            r.noise_multiplier,
                            r.sample_rate,
                            r.steps,
                            r.note,
                            now,
                        )
                        for r in items
                    ],
                )

    def report(self) -> dict[str, dict[str, Any]]:
        """Per unit: epsilon spent, delta, budget, remaining, releases, rounds. JSON-serialisable.

        Units listed are those with a budget. ``accountant`` names the accountant that gave the
        epsilon (with ``"auto"``: the tighter of RDP and PLD).
        """
        with self._guard() as conn, transaction(conn, "DEFERRED"):
            budgets = self._load_budgets()
            out: dict[str, dict[str, Any]] = {}
            for unit in PRIVACY_UNITS:
                budget = budgets.get(unit)
                if budget is None:
                    self._unit_state(unit, budgets)  # raises if orphan releases exist
                    continue
                state = self._unit_state(unit, budgets)
                eps = float(state["epsilon"])
                out[unit] = {
                    "epsilon": eps,
                    "delta": budget.delta,
                    "budget_epsilon": budget.epsilon,
                    "remaining_epsilon": max(0.0, budget.epsilon - eps),
                    "releases": int(state["count"]),
                    "rounds": int(state.get("rounds", 0)),
                    "last_round": state.get("last_round"),
                    "accountant": str(state["accountant"]),
                }
            return out

    # -- internals ----------------------------------------------------------------------------
    def _no_budget(self, unit: str) -> BudgetExceededError:
        return BudgetExceededError(
            f"no {unit}-level privacy budget is configured in the ledger at {self.path}; "
            f"refusing a {unit} release (configure a {unit} budget to contribute at this unit)"
        )

    def _check_locked(self, items: Sequence[Release]) -> None:
        budgets = self._load_budgets()
        for unit in sorted({r.unit for r in items}):
            budget = budgets.get(unit)
            if budget is None:
                raise self._no_budget(unit)
            new = [r for r in items if r.unit == unit]
            would = float(self._epsilon_report(self._rows(unit) + new, budget.delta)["epsilon"])
            if not would <= budget.epsilon:  # also refuses NaN
                spent = float(self._unit_state(unit, budgets)["epsilon"])
                rounds = sorted({r.round for r in new})
                raise BudgetExceededError(
                    f"{unit}-level privacy budget exceeded: spent epsilon {spent:.6g}, would be "
                    f"{_fmt(would)} after round(s) {', '.join(map(str, rounds))}, budget "
                    f"{budget.epsilon:g} at delta {budget.delta:g}; refusing to contribute"
                )


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
