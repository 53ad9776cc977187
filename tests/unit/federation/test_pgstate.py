"""The round state in PostgreSQL (issue 16, item 3), against a real server: several writers,
one truth. The database, not the workers' good timing, keeps an update from counting twice."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bedside.aggregator.state import Batch, Contended, UpdateRow
from bedside.errors import ConfigError, InputError, StateError
from bedside.federation.settings import RoundSettings
from bedside.federation.strategies import RunningSum

_names = itertools.count()
SHAPES = {"w": (3,)}


@pytest.fixture()
def dsn(pg):
    return pg.create_db(f"unit_{next(_names)}")


def _store(dsn: str, writer: str = ""):
    from bedside.aggregator.pgstate import PgRounds

    return PgRounds(dsn, "fleet-a", writer)


def _open(store, round_id: int = 1) -> None:
    settings = RoundSettings(fleet="fleet-a", deadline=1e12, model_sha256="0" * 64,
                             clip_norm=1.0, noise="none", noise_multiplier=0.0)
    store.open_round(round_id, 1, b"announce", settings)


def _row(sender: str, nonce: str, round_id: int = 1) -> UpdateRow:
    return UpdateRow(round_id, sender, nonce, f"digest-{nonce}", 1.0, 0.5, {}, None)


def _sum(*values: float) -> bytes:
    acc = RunningSum(SHAPES)
    for v in values:
        acc.add({"w": np.full(3, v, dtype=np.float32)})
    return acc.to_bytes()


def test_the_second_writer_of_an_update_writes_nothing_of_its_group(dsn):
    a, b = _store(dsn, "1"), _store(dsn, "2")
    _open(a)
    a.commit_batch(Batch(updates=[_row("dev-1", "n1")], sums=(1, _sum(1.0), 1)))
    group = Batch(updates=[_row("dev-2", "n2"), _row("dev-1", "n1")],
                  rejections=[(1, "dev-3", "bad_signature", "x")], sums=(1, _sum(2.0, 1.0), 2))
    with pytest.raises(Contended):
        b.commit_batch(group)
    assert [u["sender"] for u in a.accepted(1)] == ["dev-1"]  # dev-2 was rolled back with it
    assert b.rejections(1) == {} and b.running_sum(1) is None
    # judged again without the copy, the group goes through
    b.commit_batch(Batch(updates=[_row("dev-2", "n2")], sums=(1, _sum(2.0), 1)))
    parts = [RunningSum.from_bytes(p, SHAPES) for p in a.partial_sums(1)]
    assert sorted(p.count for p in parts) == [1, 1]
    merged = RunningSum(SHAPES)
    for p in parts:
        merged.merge(p)
    np.testing.assert_array_equal(merged.sums["w"], [3.0, 3.0, 3.0])
    assert a.running_sum(1) != b.running_sum(1)  # each writer reads its own


def test_two_processes_under_one_id_cannot_overwrite_each_others_sum(dsn):
    """Compare-and-set on the partial sum: what one process of an id wrote, the other (which
    read an older sum) cannot replace; it judges its group again on the stored sum."""
    first, second = _store(dsn, "1"), _store(dsn, "1")
    _open(first)
    assert first.running_sum(1) is None and second.running_sum(1) is None  # both read: empty
    first.commit_batch(Batch(updates=[_row("dev-1", "n1")], sums=(1, _sum(1.0), 1)))
    with pytest.raises(Contended):
        second.commit_batch(Batch(updates=[_row("dev-2", "n2")], sums=(1, _sum(2.0), 1)))
    first.commit_batch(Batch(updates=[_row("dev-3", "n3")], sums=(1, _sum(1.0, 3.0), 2)))
    stale = RunningSum.from_bytes(second.running_sum(1), SHAPES)  # judged again: reads 2
    assert stale.count == 2
    second.commit_batch(Batch(updates=[_row("dev-2", "n2")], sums=(1, _sum(1.0, 3.0, 2.0), 3)))
    with pytest.raises(Contended):  # now the first one's view is the stale one
        first.commit_batch(Batch(updates=[_row("dev-4", "n4")], sums=(1, _sum(1.0, 3.0, 4.0), 3)))
    assert RunningSum.from_bytes(first.running_sum(1), SHAPES).count == 3


def test_a_nul_in_a_device_chosen_string_does_not_fail_its_group(dsn):
    store = _store(dsn, "1")
    _open(store)
    store.commit_batch(Batch(declines=[(1, "dev-1", "bad\x00reason")],
                             rejections=[(1, "dev-2", "invalid", "detail \x00 here")]))
    assert store.declines(1) == {"dev-1": "bad\ufffdreason"}
    assert store.rejections(1) == {"invalid": 1}


def test_a_reconnected_worker_holds_its_id_again(dsn):
    first = _store(dsn, "1")
    first.claim("host", 1)
    killer = _store(dsn, "")
    killer._all("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                "application_name = 'bedside-1'")
    assert first.current_round() is None  # reconnects, and takes the lock again
    with pytest.raises(StateError, match="in use"):
        _store(dsn, "1").claim("host", 2)


def test_one_lookup_sees_a_nonce_and_a_contribution_together(dsn):
    a = _store(dsn, "1")
    _open(a)
    assert a.seen("dev-1", "n1", 1) == (None, False)
    a.commit_batch(Batch(updates=[_row("dev-1", "n1")]))
    assert a.seen("dev-1", "n1", 1) == ((1, "digest-n1"), True)
    assert a.seen("dev-1", "other", 1) == (None, True)
    assert a.seen("dev-1", "n1", 2) == ((1, "digest-n1"), False)


def test_nothing_is_recorded_into_a_round_the_coordinator_is_closing(dsn):
    coordinator, worker = _store(dsn), _store(dsn, "1")
    _open(coordinator)
    coordinator.begin_close(1)
    assert coordinator.get_round(1).status == "closing"
    with pytest.raises(Contended, match="no longer open"):
        worker.commit_batch(Batch(updates=[_row("dev-1", "n1")], sums=(1, _sum(1.0), 1)))
    assert worker.accepted(1) == [] and worker.partial_sums(1) == []
    worker.add_rejection(1, "dev-1", "no_open_round", "late")  # verdicts on late ones are kept
    coordinator.finish_round(1, "closed", {"accepted": 0})
    assert coordinator.get_round(1).status == "closed"


def test_a_worker_id_is_held_by_one_process(dsn):
    first = _store(dsn, "1")
    first.claim("host", 1)
    with pytest.raises(StateError, match="in use by another running process"):
        _store(dsn, "1").claim("host", 2)
    first.close()  # the process ends: PostgreSQL releases the id
    again = _store(dsn, "1")
    again.claim("host", 3)
    assert again.workers(60) == ["1"]


def test_a_database_belongs_to_one_fleet(dsn):
    from bedside.aggregator.pgstate import PgRounds

    PgRounds(dsn, "fleet-a").close()
    with pytest.raises(StateError, match="fleet 'fleet-a', not 'fleet-b'"):
        PgRounds(dsn, "fleet-b")


def test_an_unreachable_server_is_named(pg):
    from bedside.aggregator.pgstate import PgRounds

    with pytest.raises(StateError, match="cannot connect to PostgreSQL"):
        PgRounds(f"host=127.0.0.1 port={pg.port} user=nobody dbname=missing", "fleet-a")


def _config(tmp_path, **tables):
    from bedside.aggregator.config import load
    from bedside.demo.run import to_toml

    (tmp_path / "aggregator.toml").write_text(to_toml({
        "fleet": "fleet-a", "key": "k", "devices": "d", **tables}))
    return load(tmp_path / "aggregator.toml")


def test_settings_refuse_what_cannot_work(tmp_path):
    with pytest.raises(ConfigError, match="password"):
        _config(tmp_path, state={"backend": "postgresql",
                                 "dsn": "host=db user=bedside password=secret"})
    with pytest.raises(ConfigError, match="password"):
        _config(tmp_path, state={"backend": "postgresql",
                                 "dsn": "postgresql://bedside:secret@db/bedside"})
    with pytest.raises(ConfigError, match="needs dsn"):
        _config(tmp_path, state={"backend": "postgresql"})
    with pytest.raises(ConfigError, match="backend = 'postgresql'"):
        _config(tmp_path, workers={"group": "validators", "ids": ["1"]})
    with pytest.raises(ConfigError, match="ids is empty"):
        _config(tmp_path, state={"backend": "postgresql", "dsn": "host=db"},
                workers={"group": "validators"})
    cfg = _config(tmp_path, state={"backend": "postgresql", "dsn": "host=db dbname=b"},
                  workers={"group": "validators", "ids": ["1", "2"]})
    assert cfg.workers.ids == ["1", "2"]


def test_a_device_cannot_take_a_workers_broker_identity():
    from bedside.wire.signing import validate_device_id

    with pytest.raises(InputError, match="reserved"):
        validate_device_id("aggregator-worker-1")


def test_the_acl_lets_workers_read_updates_and_write_receipts_only():
    from bedside.transport.pki import acl_text

    text = acl_text("fleet-a", ["dev-1"], workers=["1"])
    block = text.split("user aggregator-worker-1\n")[1].split("\n\n")[0].splitlines()
    assert block == ["topic read bedside/v1/fleet-a/update/+",
                     "topic write bedside/v1/fleet-a/receipt/+"]
