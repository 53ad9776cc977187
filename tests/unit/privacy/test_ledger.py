"""The device's privacy ledger (bedside.privacy.ledger): budgets, atomicity, fail closed."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bedside.constants import LEDGER_SCHEMA
from bedside.errors import BudgetExceededError, InputError, LedgerError
from bedside.privacy import accountant as acct
from bedside.privacy.ledger import Budget, Ledger, Release, releases_event

dp_accounting = pytest.importorskip("dp_accounting")

ROOT = Path(__file__).resolve().parents[3]


def local_round(r: int, z: float = 8.0) -> Release:
    """One round of local device-level noise: a Gaussian (the caller already normalised z)."""
    return Release(round=r, unit="device", mechanism="gaussian", noise_multiplier=z,
                   sample_rate=1.0, steps=1, note="test")


def dpsgd_round(r: int) -> Release:
    return Release(round=r, unit="record", mechanism="sampled_gaussian", noise_multiplier=1.0,
                   sample_rate=0.01, steps=100)


# ---------------------------------------------------------------------------------------------
# Budgets are enforced, across restarts
# ---------------------------------------------------------------------------------------------
def test_device_takes_part_until_refused_and_keeps_refusing_after_restart(
    ledger_path: Path,
) -> None:
    """Budget epsilon 1 at delta 1e-5, rounds of a Gaussian with z = 8. T rounds are one Gaussian
    with z / sqrt(T) (exact), whose epsilon (Balle & Wang) is 0.926 for T=4 and 1.047 for T=5:
    the device must take part in exactly 4 rounds."""
    budget = Budget(epsilon=1.0, delta=1e-5)
    expected_rounds = max(
        t for t in range(1, 20) if dp_accounting.get_epsilon_gaussian(8 / math.sqrt(t), 1e-5) <= 1
    )
    assert expected_rounds == 4

    ledger = Ledger(ledger_path, {"device": budget})
    taken, spent = 0, [0.0]
    for r in range(20):
        try:
            ledger.record([local_round(r)])
        except BudgetExceededError as exc:
            msg = str(exc)
            assert "device-level privacy budget exceeded" in msg
            assert f"round(s) {r}" in msg and "budget 1 at delta 1e-05" in msg
            break
        taken += 1
        spent.append(ledger.spent("device"))
        assert spent[-1] <= budget.epsilon
        assert spent[-1] > spent[-2]
        assert ledger.report()["device"]["epsilon"] <= budget.epsilon
    assert taken == expected_rounds
    assert spent[-1] == pytest.approx(
        dp_accounting.get_epsilon_gaussian(8 / math.sqrt(taken), 1e-5), rel=1e-3
    )
    before = ledger.report()
    ledger.close()

    # Simulated restart: same file, same configuration.
    again = Ledger(ledger_path, {"device": budget})
    assert again.report() == before
    assert again.spent("device") == spent[-1]
    with pytest.raises(BudgetExceededError):
        again.record([local_round(taken)])
    with pytest.raises(BudgetExceededError):
        again.check([local_round(taken)])
    # Something cheaper may still fit: the ledger refuses what does not fit, not everything.
    again.check([local_round(99, z=200.0)])
    again.record([local_round(99, z=200.0)])
    rep = again.report()["device"]
    assert rep["releases"] == taken + 1 and rep["rounds"] == taken + 1 and rep["last_round"] == 99
    assert rep["epsilon"] <= 1.0
    assert rep["remaining_epsilon"] == pytest.approx(1.0 - rep["epsilon"])
    again.close()


def test_report_is_per_unit_and_json_serialisable(ledger_path: Path) -> None:
    budgets = {"record": Budget(8.0, 1e-6), "device": Budget(4.0, 1e-5)}
    with Ledger(ledger_path, budgets) as ledger:
        empty = ledger.report()
        assert set(empty) == {"record", "device"}
        assert empty["record"] == {
            "epsilon": 0.0, "epsilon_device_enforced": 0.0, "delta": 1e-6, "budget_epsilon": 8.0,
            "remaining_epsilon": 8.0, "releases": 0, "rounds": 0, "last_round": None,
            "accountant": "auto", "guarantee": "nothing has been released at the record level yet",
        }
        ledger.record([dpsgd_round(0), local_round(0)])
        ledger.record([dpsgd_round(1), local_round(1)])
        rep = ledger.report()
        json.dumps(rep, allow_nan=False)
        # Each unit's epsilon is its own composition, at its own delta.
        expected_record = acct.epsilon(acct.sampled_gaussian(1.0, 0.01, 200), 1e-6)
        assert rep["record"]["epsilon"] == pytest.approx(expected_record, rel=1e-9)
        expected_device = acct.epsilon(acct.gaussian(8.0, 2), 1e-5)
        assert rep["device"]["epsilon"] == pytest.approx(expected_device, rel=1e-9)
        assert rep["record"]["releases"] == 2 and rep["record"]["rounds"] == 2
        assert rep["record"]["accountant"] == "pld"


def test_record_is_all_or_nothing(ledger_path: Path) -> None:
    with Ledger(ledger_path, {"record": Budget(100.0, 1e-5), "device": Budget(0.5, 1e-5)}) as lg:
        with pytest.raises(BudgetExceededError, match="device-level"):
            lg.record([dpsgd_round(0), local_round(0, z=4.0)])  # device part does not fit
        assert lg.report()["record"]["releases"] == 0  # the record part was not stored either


def test_a_unit_without_a_budget_is_accounted_not_limited(ledger_path: Path) -> None:
    with Ledger(ledger_path, {"device": Budget(5.0, 1e-5)}) as lg:
        lg.record([dpsgd_round(0), local_round(0)])
        rep = lg.report()
        assert rep["device"]["releases"] == 1 and rep["record"]["releases"] == 1
        assert rep["record"]["budget_epsilon"] is None and rep["record"]["delta"] == 1e-5
        assert lg.spent("record") == pytest.approx(
            acct.epsilon(acct.sampled_gaussian(1.0, 0.01, 100), 1e-5), rel=1e-9)


def test_a_budget_added_later_covers_the_past(ledger_path: Path) -> None:
    """A device that took part without a record budget (or without DP-SGD) and is then given one:
    the budget counts everything already released."""
    with Ledger(ledger_path, {}) as lg:
        for r in range(3):
            lg.record([dpsgd_round(r)])
        past = lg.spent("record")
    tight = Budget(past * 0.9, 1e-5)
    with Ledger(ledger_path, {"record": tight}) as lg:
        assert lg.report()["record"]["epsilon"] == pytest.approx(past)
        with pytest.raises(BudgetExceededError, match="record-level privacy budget exceeded"):
            lg.record([dpsgd_round(3)])


def test_a_release_without_dp_makes_a_later_budget_refuse(ledger_path: Path) -> None:
    no_dp = Release(round=0, unit="record", mechanism="none", noise_multiplier=0.0,
                    sample_rate=1.0, steps=1, note="trained without DP-SGD")
    with Ledger(ledger_path, {}) as lg:
        lg.record([no_dp])
        rep = lg.report()["record"]
        assert rep["epsilon"] is None and rep["epsilon_device_enforced"] is None
        assert "no record-level guarantee" in rep["guarantee"]
        json.dumps(rep, allow_nan=False)
    with Ledger(ledger_path, {"record": Budget(8.0, 1e-5)}) as lg, pytest.raises(
            BudgetExceededError, match="infinite"):
        lg.record([dpsgd_round(1)])


def test_reports_say_which_guarantee_depends_on_the_aggregator(ledger_path: Path) -> None:
    central = Release(round=0, unit="device", mechanism="gaussian", noise_multiplier=0.5,
                      sample_rate=1.0, steps=1, enforced_by="aggregator", fleet="f")
    with Ledger(ledger_path, {"device": Budget(1e6, 1e-5)}) as lg:
        lg.record([local_round(0)])
        assert lg.report()["device"]["epsilon_device_enforced"] == lg.spent("device")
        assert "enforced by this device itself" in lg.report()["device"]["guarantee"]
        lg.record([central])
        rep = lg.report()["device"]
        assert rep["epsilon"] == lg.spent("device") and rep["epsilon_device_enforced"] is None
        assert "if the aggregator added the central noise it announced" in rep["guarantee"]
        assert lg.rounds() == {("", 0), ("f", 0)}


def test_a_version_1_ledger_is_migrated_keeping_every_release(ledger_path: Path) -> None:
    """A ledger written by the previous Bedside (schema 1) opens, keeps its rows, and a central
    device-level release is marked as depending on the aggregator."""
    ledger_path.parent.mkdir(parents=True)
    db = sqlite3.connect(ledger_path)
    db.executescript("""
        CREATE TABLE schema_version (version INTEGER NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE budgets (unit TEXT PRIMARY KEY, epsilon REAL NOT NULL, delta REAL NOT NULL,
                              created_at TEXT NOT NULL);
        CREATE TABLE releases (id INTEGER PRIMARY KEY AUTOINCREMENT, batch TEXT NOT NULL,
            round INTEGER NOT NULL, unit TEXT NOT NULL, mechanism TEXT NOT NULL,
            noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0), sample_rate REAL NOT NULL,
            steps INTEGER NOT NULL, note TEXT NOT NULL DEFAULT '', recorded_at TEXT NOT NULL);
        INSERT INTO schema_version VALUES (1);
        INSERT INTO meta VALUES ('kind', 'bedside-privacy-ledger'), ('accountant', 'auto'),
                                ('created_at', '2026-11-01');
        INSERT INTO budgets VALUES ('device', 1000.0, 1e-5, '2026-11-01');
        INSERT INTO releases (batch, round, unit, mechanism, noise_multiplier, sample_rate, steps,
                              note, recorded_at)
            VALUES ('b1', 1, 'device', 'gaussian', 0.1, 1.0, 1, 'central noise; replace-one', 'x'),
                   ('b2', 2, 'device', 'gaussian', 0.1, 1.0, 1, 'local noise; replace-one', 'x');
    """)
    db.close()
    ledger_path.chmod(0o600)  # as Bedside wrote ledgers (a shared one is refused)
    with Ledger(ledger_path, {"device": Budget(1000.0, 1e-5)}) as lg:
        rep = lg.report()["device"]
        assert rep["releases"] == 2 and rep["epsilon_device_enforced"] is None
        assert rep["epsilon"] == pytest.approx(acct.epsilon(acct.gaussian(0.1, 2), 1e-5))
        lg.record([local_round(3)])
    raw = sqlite3.connect(ledger_path)
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(LEDGER_SCHEMA,)]
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("DELETE FROM releases")
    raw.close()


def test_check_does_not_write(ledger_path: Path) -> None:
    with Ledger(ledger_path, {"device": Budget(1.0, 1e-5)}) as lg:
        lg.check([local_round(0)])
        assert lg.spent("device") == 0.0
        lg.record([])  # nothing released, nothing recorded
        lg.check([])
        assert lg.report()["device"]["releases"] == 0


def test_ledger_is_append_only(ledger_path: Path) -> None:
    with Ledger(ledger_path, {"device": Budget(5.0, 1e-5)}) as lg:
        lg.record([local_round(0)])
    assert not any(hasattr(Ledger, name) for name in ("delete", "update", "remove", "reset"))
    raw = sqlite3.connect(ledger_path)
    for sql in ("UPDATE releases SET noise_multiplier = 100", "DELETE FROM releases",
                "UPDATE budgets SET epsilon = 1000", "DELETE FROM budgets",
                "DELETE FROM meta"):
        with pytest.raises(sqlite3.DatabaseError, match=r"append-only|fixed"):
            raw.execute(sql)
    raw.close()


def test_durability_settings(ledger_path: Path) -> None:
    with Ledger(ledger_path, {"device": Budget(5.0, 1e-5)}) as lg:
        assert lg._conn is not None
        assert lg._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert lg._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    raw = sqlite3.connect(ledger_path)
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(LEDGER_SCHEMA,)]
    raw.close()


def test_report_is_cached_until_something_is_recorded(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = acct.epsilon_report

    def counting(*args: Any, **kwargs: Any) -> acct.EpsilonReport:
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(acct, "epsilon_report", counting)
    with Ledger(ledger_path, {"device": Budget(5.0, 1e-5)}) as lg:
        lg.record([local_round(0)])
        first = lg.report()
        n = calls["n"]
        assert lg.report() == first and lg.spent("device") == first["device"]["epsilon"]
        assert calls["n"] == n  # served from the cache
        # Another process (here: another connection) records: the cache must notice.
        with Ledger(ledger_path) as other:
            other.record([local_round(1)])
        assert lg.report()["device"]["releases"] == 2
        assert calls["n"] > n


# ---------------------------------------------------------------------------------------------
# Budgets are fixed for the life of a ledger
# ---------------------------------------------------------------------------------------------
def test_budgets_are_stored_and_cannot_be_changed(ledger_path: Path) -> None:
    Ledger(ledger_path, {"device": Budget(2.0, 1e-5)}, accountant="rdp").close()
    with Ledger(ledger_path) as lg:  # what `bedside privacy report` does
        assert lg.budgets == {"device": Budget(2.0, 1e-5)}
        assert lg.accountant == "rdp"
    with pytest.raises(LedgerError, match="created with the device budget"):
        Ledger(ledger_path, {"device": Budget(20.0, 1e-5)})
    with pytest.raises(LedgerError, match="created with the device budget"):
        Ledger(ledger_path, {"device": Budget(2.0, 1e-3)})
    # A budget for a new unit may be added.
    with Ledger(ledger_path, {"device": Budget(2.0, 1e-5), "record": Budget(4.0, 1e-6)}) as lg:
        assert set(lg.budgets) == {"device", "record"}


def test_a_ledger_created_without_budgets_accounts_everything(ledger_path: Path) -> None:
    with Ledger(ledger_path, {}) as lg:
        assert lg.report() == {}
        lg.record([local_round(0, z=1000.0)])
        assert lg.report()["device"]["budget_epsilon"] is None


# ---------------------------------------------------------------------------------------------
# Fail closed
# ---------------------------------------------------------------------------------------------
def test_missing_ledger_without_budgets_is_an_error(ledger_path: Path) -> None:
    with pytest.raises(LedgerError, match="no privacy ledger"):
        Ledger(ledger_path)
    assert not ledger_path.exists()  # reading never creates a ledger


@pytest.mark.parametrize(
    "content",
    [b"this is not a database" * 100, b"", b"SQLite format 3\x00" + b"\xff" * 4000],
    ids=["garbage", "empty", "bad-header"],
)
def test_corrupt_file_is_refused_on_open(ledger_path: Path, content: bytes) -> None:
    ledger_path.parent.mkdir(parents=True)
    ledger_path.write_bytes(content)
    with pytest.raises(LedgerError, match="refusing to contribute"):
        Ledger(ledger_path, {"device": Budget(1.0, 1e-5)})
    assert ledger_path.read_bytes() == content  # never "repaired" by recreating it


def test_truncated_ledger_is_refused(ledger_path: Path) -> None:
    with Ledger(ledger_path, {"device": Budget(50.0, 1e-5)}) as lg:
        for r in range(30):
            lg.record([Release(r, "device", "gaussian", 10.0, 1.0, 1, note="x" * 2000)])
    data = ledger_path.read_bytes()
    ledger_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LedgerError), Ledger(ledger_path) as lg:
        lg.report()


def test_corruption_after_open_is_refused_on_the_next_call(ledger_path: Path) -> None:
    lg = Ledger(ledger_path, {"device": Budget(5.0, 1e-5)})
    lg.record([local_round(0)])
    size = ledger_path.stat().st_size
    with open(ledger_path, "r+b") as fh:
        fh.write(b"\x00garbage" * (size // 8))
    with pytest.raises(LedgerError):
        lg.record([local_round(1)])
    with pytest.raises(LedgerError):
        lg.report()
    lg.close()
    with pytest.raises(LedgerError, match="closed"):
        lg.spent("device")


def test_wrong_schema_or_foreign_database_is_refused(ledger_path: Path, tmp_path: Path) -> None:
    Ledger(ledger_path, {"device": Budget(1.0, 1e-5)}).close()
    raw = sqlite3.connect(ledger_path)
    raw.execute("DELETE FROM schema_version")
    raw.execute("INSERT INTO schema_version VALUES (?)", (LEDGER_SCHEMA + 1,))
    raw.commit()
    raw.close()
    with pytest.raises(LedgerError, match=f"schema version \\[{LEDGER_SCHEMA + 1}\\]"):
        Ledger(ledger_path)

    foreign = tmp_path / "other.db"
    raw = sqlite3.connect(foreign)
    raw.execute("CREATE TABLE t (x)")
    raw.commit()
    raw.close()
    with pytest.raises(LedgerError, match="not a Bedside privacy ledger"):
        Ledger(foreign, {"device": Budget(1.0, 1e-5)})


def test_tampered_rows_are_refused(ledger_path: Path) -> None:
    with Ledger(ledger_path, {"device": Budget(5.0, 1e-5)}) as lg:
        lg.record([local_round(0)])
    raw = sqlite3.connect(ledger_path)
    raw.execute("DROP TRIGGER releases_no_update")
    # Passes the table's CHECK constraints but not Release's rules ('gaussian' needs rate 1).
    raw.execute("UPDATE releases SET sample_rate = 0.5")
    raw.commit()
    raw.close()
    with Ledger(ledger_path) as lg, pytest.raises(LedgerError, match="invalid release"):
        lg.report()
    # A row breaking the CHECK constraints fails the integrity check on open.
    raw = sqlite3.connect(ledger_path)
    raw.execute("PRAGMA ignore_check_constraints = ON")
    raw.execute("UPDATE releases SET noise_multiplier = -1")
    raw.commit()
    raw.close()
    with pytest.raises(LedgerError, match="CHECK constraint"):
        Ledger(ledger_path)


def test_a_ledger_replaced_while_open_is_refused(ledger_path: Path) -> None:
    lg = Ledger(ledger_path, {"device": Budget(5.0, 1e-5)})
    lg.record([local_round(0)])
    moved = ledger_path.with_name("old.db")
    ledger_path.rename(moved)
    with pytest.raises(LedgerError, match="unreadable"):
        lg.spent("device")
    Ledger(ledger_path, {"device": Budget(5.0, 1e-5)}).close()  # a fresh, empty ledger
    with pytest.raises(LedgerError, match="replaced or deleted"):
        lg.record([local_round(1)])
    lg.close()


# ---------------------------------------------------------------------------------------------
# Atomicity across processes and crashes
# ---------------------------------------------------------------------------------------------
def test_two_writers_cannot_both_pass_the_check(ledger_path: Path) -> None:
    """Four connections race to record a release of which one fits the budget and two do not:
    exactly one wins."""
    Ledger(ledger_path, {"device": Budget(1.0, 1e-5)}).close()
    assert acct.epsilon(acct.gaussian(4.5), 1e-5) < 1.0 < acct.epsilon(acct.gaussian(4.5, 2), 1e-5)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def writer(i: int) -> None:
        with Ledger(ledger_path) as lg:
            barrier.wait()
            try:
                lg.record([local_round(i, z=4.5)])
                outcomes.append("ok")
            except BudgetExceededError:
                outcomes.append("refused")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok", "refused", "refused", "refused"]
    with Ledger(ledger_path) as lg:
        assert lg.report()["device"]["releases"] == 1


CRASH_WRITER = textwrap.dedent(
    """
    import sys
    from bedside.privacy.ledger import Ledger, Release
    ledger = Ledger(sys.argv[1], accountant="rdp")
    for r in range(1_000_000):
        ledger.record([
            Release(r, "record", "sampled_gaussian", 5.0, 0.01, 10, note="x" * 500),
            Release(r, "device", "gaussian", 50.0, 1.0, 1, note="y" * 500),
        ])
    """
)


def test_crash_mid_write_leaves_whole_releases(
    ledger_path: Path, clean_env: dict[str, str]
) -> None:
    """A writer killed with SIGKILL in the middle of its loop: on reopen the ledger is intact and
    every record() call is either fully present (both units of its round) or absent."""
    budgets = {"record": Budget(1e6, 1e-5), "device": Budget(1e6, 1e-5)}
    Ledger(ledger_path, budgets, accountant="rdp").close()
    env = dict(clean_env, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, str(ledger_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        rows = 0
        while rows < 40:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.02)
            try:
                with sqlite3.connect(ledger_path, timeout=5) as raw:
                    rows = raw.execute("SELECT COUNT(*) FROM releases").fetchone()[0]
            except sqlite3.OperationalError:
                continue
        time.sleep(0.013)  # land somewhere inside a later iteration
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with Ledger(ledger_path, budgets) as lg:
        rep = lg.report()
    assert rep["record"]["releases"] == rep["device"]["releases"] >= 20
    raw = sqlite3.connect(ledger_path)
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    per_round = raw.execute(
        "SELECT round, COUNT(*), COUNT(DISTINCT unit), COUNT(DISTINCT batch) FROM releases "
        "GROUP BY round ORDER BY round"
    ).fetchall()
    raw.close()
    assert [r[0] for r in per_round] == list(range(len(per_round)))
    assert all(r[1:] == (2, 2, 1) for r in per_round)


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"round": -1}, "round must be an integer >= 0"),
        ({"round": True}, "round must be an integer"),
        ({"unit": "patient"}, "unit must be one of record, device"),
        ({"mechanism": "laplace"}, "mechanism must be one of"),
        ({"noise_multiplier": 0.0}, "a release without noise is mechanism 'none'"),
        ({"mechanism": "none", "noise_multiplier": 1.0}, "a release without noise"),
        ({"enforced_by": "nobody"}, "enforced_by must be one of"),
        ({"noise_multiplier": -1.0}, "noise_multiplier must be a finite number >= 0"),
        ({"sample_rate": 0.0}, r"sample_rate must be in \(0, 1\]"),
        ({"mechanism": "gaussian", "sample_rate": 0.5}, "sample_rate must be 1 for mechanism"),
        ({"steps": -1}, "steps must be an integer >= 0"),
    ],
)
def test_release_validation(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"round": 0, "unit": "device", "mechanism": "sampled_gaussian",
                            "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 1}
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        Release(**args)


@pytest.mark.parametrize(
    ("eps", "delta", "match"),
    [(0.0, 1e-5, "budget epsilon"), (math.inf, 1e-5, "budget epsilon"),
     (1.0, 0.0, "budget delta"), (1.0, 1.0, "budget delta")],
)
def test_budget_validation(eps: float, delta: float, match: str) -> None:
    with pytest.raises(InputError, match=match):
        Budget(eps, delta)


def test_ledger_argument_validation(ledger_path: Path) -> None:
    with pytest.raises(InputError, match="unit must be one of"):
        Ledger(ledger_path, {"patient": Budget(1.0, 1e-5)})
    with pytest.raises(InputError, match="must be a Budget"):
        Ledger(ledger_path, {"device": (1.0, 1e-5)})  # type: ignore[dict-item]
    with pytest.raises(InputError, match="accountant must be one of"):
        Ledger(ledger_path, {"device": Budget(1.0, 1e-5)}, accountant="moments")
    assert not ledger_path.exists()
    with Ledger(ledger_path, {"device": Budget(1.0, 1e-5)}) as lg:
        with pytest.raises(InputError, match="single Release"):
            lg.record(local_round(0))  # type: ignore[arg-type]
        with pytest.raises(InputError, match=r"releases\[0\] must be a Release"):
            lg.record([{"round": 0}])  # type: ignore[list-item]


def test_numpy_integers_are_stored_as_integers(ledger_path: Path) -> None:
    import numpy as np

    r = Release(np.int64(3), "device", "gaussian", np.float32(8.0), 1.0, np.int32(1))  # type: ignore[arg-type]
    assert type(r.round) is int and type(r.steps) is int and type(r.noise_multiplier) is float
    with Ledger(ledger_path, {"device": Budget(1.0, 1e-5)}) as lg:
        lg.record([r])
        assert lg.report()["device"]["last_round"] == 3


def test_releases_event_groups_identical_mechanisms() -> None:
    rs = [local_round(0), local_round(1), dpsgd_round(0), dpsgd_round(1)]
    event = releases_event(rs)
    assert event == acct.compose(
        [acct.sampled_gaussian(1.0, 0.01, 200), acct.gaussian(8.0, 2)]
    )
    assert acct.epsilon(event, 1e-5) == pytest.approx(
        acct.epsilon(acct.compose([r.event() for r in rs]), 1e-5), rel=1e-6
    )
