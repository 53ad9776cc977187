"""The audit trail: hash-chained, every entry signed; any edit, drop, insertion or reordering
is detected and the first bad entry named."""

from __future__ import annotations

import json
import sqlite3

import pytest

from bedside.audit import AuditLog, verify
from bedside.cli import main
from bedside.wire.signing import SigningKey


@pytest.fixture
def log(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "audit.db"
    with AuditLog(path, key, "device:clinic-1") as a:
        for i in range(1, 7):
            a.append("round_contributed", f"round {i}", fleet="north", nonce=f"n{i}")
    return path, key


def _db(path):
    return sqlite3.connect(path, isolation_level=None)


def _verdict(path, key, anchor=None):
    return verify(path, [key.public], anchor)


def test_an_intact_log_verifies_and_names_its_head(log):
    path, key = log
    v = _verdict(path, key)
    assert v.ok and v.entries == 6 and v.head is not None and v.head[0] == 6


def test_an_edited_entry_is_named(log):
    path, key = log
    _db(path).execute("UPDATE entries SET detail = ? WHERE seq = 3",
                      (json.dumps({"fleet": "north", "nonce": "forged"}),))
    v = _verdict(path, key)
    assert not v.ok and v.first_bad == 3 and "edited" in v.problem, v.problem


def test_an_edit_with_its_hash_recomputed_fails_on_the_signature(log):
    """Someone who can write the file but lacks the key rebuilds the chain: caught."""
    from bedside.audit import entry_hash

    path, key = log
    db = _db(path)
    rows = db.execute("SELECT seq, at, component, actor, action, subject, detail, prev FROM "
                      "entries ORDER BY seq").fetchall()
    prev = None
    for r in rows:
        seq, at, comp, actor, action, subject, detail, old_prev = r
        if seq == 4:
            detail = json.dumps({"fleet": "north", "nonce": "forged"})
        p = prev if prev is not None else old_prev
        digest = entry_hash(seq, at, comp, actor, action, subject, detail, p)
        db.execute("UPDATE entries SET detail = ?, prev = ?, hash = ? WHERE seq = ?",
                   (detail, p, digest, seq))
        prev = digest
    v = _verdict(path, key)
    assert not v.ok and v.first_bad == 4 and "signature" in v.problem


@pytest.mark.parametrize("seq", [1, 3, 6])
def test_a_dropped_entry_is_detected(log, seq):
    path, key = log
    _db(path).execute("DELETE FROM entries WHERE seq = ?", (seq,))
    anchor = _verdict_head(path, key, seq)
    v = _verdict(path, key, anchor)
    assert not v.ok
    assert v.first_bad == (seq + 1 if seq < 6 else 6), v.problem


def _verdict_head(path, key, seq):
    """The last entry cannot be told from a shorter log without an anchor recorded before."""
    return (6, "0" * 64) if seq == 6 else None


def test_dropping_the_newest_entry_is_caught_by_the_anchor(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "audit.db"
    with AuditLog(path, key, "aggregator") as a:
        for i in range(3):
            a.append("round_closed", f"round {i + 1}")
    head = _verdict(path, key).head
    assert head is not None
    _db(path).execute("DELETE FROM entries WHERE seq = 3")
    assert _verdict(path, key).ok  # shorter but consistent ...
    v = _verdict(path, key, head)
    assert not v.ok and "cut from the end" in v.problem  # ... unless checked against the anchor


def test_an_inserted_entry_is_detected(log):
    path, key = log
    db = _db(path)
    row = db.execute("SELECT * FROM entries WHERE seq = 2").fetchone()
    db.execute("UPDATE entries SET seq = seq + 1 WHERE seq >= 3")
    db.execute("INSERT INTO entries VALUES (3, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row[1:])
    v = _verdict(path, key)
    assert not v.ok and v.first_bad == 3


def test_reordered_entries_are_detected(log):
    """Entry 5 moved before entry 2 (their sequence numbers swapped)."""
    path, key = log
    db = _db(path)
    db.execute("UPDATE entries SET seq = -1 WHERE seq = 2")
    db.execute("UPDATE entries SET seq = 2 WHERE seq = 5")
    db.execute("UPDATE entries SET seq = 5 WHERE seq = -1")
    v = _verdict(path, key)
    assert not v.ok and v.first_bad == 2, v.problem


def test_another_key_and_a_rotated_key(log, tmp_path):
    path, key = log
    assert not verify(path, [SigningKey.generate().public]).ok
    new = SigningKey.generate()
    with AuditLog(path, key, "device:clinic-1") as a:  # the rotation is signed by the old key
        a.append("key_rotated", "device clinic-1", old=key.public.fingerprint,
                 new=new.public.fingerprint)
        a.key = new
        a.append("round_contributed", "round 7")
    assert not _verdict(path, key).ok
    assert verify(path, [key.public, new.public]).ok
    stranger = SigningKey.generate()  # a key given, but never handed over to
    with AuditLog(path, stranger, "device:clinic-1") as a:
        a.append("round_contributed", "round 8")
    assert not verify(path, [key.public, new.public, stranger.public]).ok


def test_the_cli_verifies_and_exits_nonzero_when_tampered(log, tmp_path, capsys):
    path, key = log
    pub = key.public.save(tmp_path / "k.pub")
    assert main(["audit", "verify", "--log", str(path), "--key", str(pub)]) == 0
    out = capsys.readouterr().out
    assert "6 entries, chain and signatures intact" in out
    head = out.split("head ")[1].split(" ")[0]
    assert main(["audit", "show", "--log", str(path), "--last", "2"]) == 0
    assert "round 6" in capsys.readouterr().out
    _db(path).execute("DELETE FROM entries WHERE seq = 6")
    assert main(["audit", "verify", "--log", str(path), "--key", str(pub), "--anchor", head,
                 "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_a_federation_leaves_verifiable_trails_on_every_side(tmp_path):
    from bedside.wire.signing import VerifyKey
    from tests.fleet import mem_fleet

    mf = mem_fleet(tmp_path, clients=2, rounds=1)
    mf.run()
    agg_dir = mf.fleet.plan["aggregator_dir"]
    agg_log = mf.aggregator.cfg.data_dir / "audit.db"
    v = verify(agg_log, [VerifyKey.load(agg_dir / "keys" / "aggregator.pub")])
    assert v.ok, v.problem
    from bedside.audit import tail

    actions = [e["action"] for e in tail(agg_log, 50)]
    assert "round_opened" in actions and "round_closed" in actions
    for i, agent in enumerate(mf.agents):
        cid = mf.fleet.clinic_ids[i]
        dev_log = agent.cfg.data / "audit.db"
        v = verify(dev_log, [VerifyKey.load(agg_dir / "keys" / "devices" / f"{cid}.pub")])
        assert v.ok, v.problem
        assert "round_contributed" in [e["action"] for e in tail(dev_log, 50)]


def test_a_rotated_away_key_cannot_write_later_and_components_do_not_mix(tmp_path):
    """After a rotation (signed by the old key) the old key may sign only until the new one's
    first entry; an entry from another component's log is refused."""
    old, new = SigningKey.generate(), SigningKey.generate()
    path = tmp_path / "audit.db"
    with AuditLog(path, old, "device:clinic-1") as a:
        a.append("round_contributed", "round 1")
        a.append("key_rotated", "device clinic-1", old=old.public.fingerprint,
                 new=new.public.fingerprint)
        a.append("round_contributed", "round 2")  # a service not restarted yet: allowed
        a.key = new
        a.append("round_contributed", "round 3")
    assert verify(path, [old.public, new.public]).ok
    with AuditLog(path, old, "device:clinic-1") as a:  # the old key, after the new one wrote
        a.append("round_contributed", "round 4")
    v = verify(path, [old.public, new.public])
    assert not v.ok and v.first_bad == 5 and "rotated away" in v.problem
    other = tmp_path / "other.db"
    with AuditLog(other, old, "device:clinic-1") as a:
        a.append("enrolled", "device clinic-1")
    with AuditLog(other, old, "aggregator") as a:
        a.append("round_opened", "round 1")
    v = verify(other, [old.public])
    assert not v.ok and v.first_bad == 2 and "another log" in v.problem


def test_verify_reads_only_and_refuses_an_empty_or_foreign_database(tmp_path):
    import os

    key = SigningKey.generate()
    foreign = tmp_path / "foreign.db"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE patients (a)")
    db.commit()
    db.close()
    before = os.stat(foreign).st_mtime_ns, foreign.read_bytes()
    with pytest.raises(Exception, match="not an audit log"):
        verify(foreign, [key.public])
    assert (os.stat(foreign).st_mtime_ns, foreign.read_bytes()) == before
    path = tmp_path / "audit.db"
    with AuditLog(path, key, "aggregator") as a:
        a.append("round_opened", "round 1")
    _db(path).execute("DELETE FROM entries")
    v = verify(path, [key.public])
    assert not v.ok and "no entry" in v.problem
