"""Rotating the aggregator's key (issue 14, item 2): the old key signs the new one; devices pin it
and then accept only the new key's signatures."""

from __future__ import annotations

import pytest

from bedside.cli import main
from bedside.constants import AGGREGATOR_ID, KIND_ANNOUNCE, topic_key, topic_round
from bedside.demo.run import to_toml
from bedside.errors import SignatureError, WireError
from bedside.wire.envelope import encode
from bedside.wire.rotation import follow, make_statement
from bedside.wire.signing import SigningKey
from tests.fleet import mem_fleet
from tests.release_tools import drive


def test_a_chain_leads_from_the_pinned_key_only():
    a, b, c = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    s1 = make_statement(a, b.public, "f", 1, [])
    s2 = make_statement(b, c.public, "f", 2, [s1])
    assert follow(s2, a.public, "f") == (c.public, 2)  # offline through both rotations
    assert follow(s2, b.public, "f") == (c.public, 2)
    assert follow(s2, c.public, "f") is None  # pinned already
    stranger = SigningKey.generate()
    with pytest.raises(SignatureError, match="pinned key"):
        follow(s2, stranger.public, "f")
    forged = make_statement(stranger, c.public, "f", 1, [])  # claims to replace a, signed by x
    bad = bytearray(forged)
    with pytest.raises(WireError):
        follow(make_statement(stranger, stranger.public, "f", 2, [bytes(bad)]), a.public, "f")
    with pytest.raises(WireError, match="this fleet"):
        follow(s1, a.public, "other")


def test_devices_pin_the_rotated_key_and_refuse_the_old_one(tmp_path, capsys):
    # devices without a record-level budget (their device-level one is large): the second round
    # is not declined for budget
    mf = mem_fleet(tmp_path, clients=2, rounds=1,
                   agent={"privacy": {"record_epsilon": None, "allow_no_record_dp": True}})
    mf.run()
    agg = mf.aggregator
    old_key = SigningKey.load(agg.cfg.key)
    assert main(["aggregator", "rotate-key", "--config", str(mf.fleet.aggregator_toml)]) == 0
    assert "Restart the aggregator service" in capsys.readouterr().out
    new_key = SigningKey.load(agg.cfg.key)
    assert new_key.public.fingerprint != old_key.public.fingerprint
    # restart with one more planned round: its announcement is signed with the new key
    agg.state.close()
    mf.fleet.plan["aggregator"]["rounds"]["rounds"] = 2
    mf.fleet.aggregator_toml.write_text(to_toml(mf.fleet.plan["aggregator"]))
    mf.aggregator = mf.new_aggregator()
    mf.aggregator.start()
    drive(mf, steps=100)
    rounds = mf.aggregator.state.rounds()
    assert [(r.round, r.status, r.result["accepted"]) for r in rounds] == [
        (1, "closed", 2), (2, "closed", 2)]
    for a in mf.agents:
        assert a.pinned.get(AGGREGATOR_ID).fingerprint == new_key.public.fingerprint
        assert a.cfg.aggregator_key.read_text().strip() == new_key.public.to_text()
        assert a.models.current_version() == 3
    # the old key signs nothing a device accepts any more: an announcement of a round 9
    forged = encode(KIND_ANNOUNCE, AGGREGATOR_ID, old_key, {}, round=9, model_version=3,
                    meta={"fleet": "demo", "state": "done"})
    mf.broker.publish(topic_round("demo"), forged, retain=False)
    drive(mf, steps=3)
    assert all(a.announce.header.round == 2 for a in mf.agents)
    # a rotation statement signed by a stranger is refused: the pinned key stays
    stranger = SigningKey.generate()
    mf.broker.publish(topic_key("demo"), make_statement(stranger, stranger.public, "demo", 9,
                                                        []), retain=False)
    drive(mf, steps=3)
    assert all(a.pinned.get(AGGREGATOR_ID).fingerprint == new_key.public.fingerprint
               for a in mf.agents)
    # the aggregator's audit trail passes from the old key to the new one (the rotation entry
    # is signed by the old key) and verifies with both
    from bedside.audit import verify

    v = verify(mf.aggregator.cfg.data_dir / "audit.db", [old_key.public, new_key.public])
    assert v.ok, v.problem
    assert v.keys == [old_key.public.fingerprint, new_key.public.fingerprint]


def test_a_device_rotates_its_own_key(tmp_path, capsys):
    """``bedside edge rotate-key``: the device's old key signs the new one, the aggregator
    re-enrolls it and confirms, the device switches; the old key's updates are then rejected."""
    from bedside.constants import KIND_UPDATE, topic_update

    mf = mem_fleet(tmp_path, clients=2, rounds=2,
                   agent={"privacy": {"record_epsilon": None, "allow_no_record_dp": True}})
    a = mf.agents[0]
    old = SigningKey.load(a.cfg.key)
    assert main(["edge", "rotate-key", "--config", str(mf.fleet.agent_toml(0))]) == 0
    assert "switches to it once the aggregator confirms" in capsys.readouterr().out
    drive(mf, steps=5)
    new = SigningKey.load(a.cfg.key)
    assert new.public.fingerprint != old.public.fingerprint
    assert a.key.public.fingerprint == new.public.fingerprint
    enrolled = mf.aggregator.cfg.devices / "clinic-1.pub"
    assert enrolled.read_text().strip() == new.public.to_text()
    mf.run()
    assert [r.result["accepted"] for r in mf.aggregator.state.rounds()] == [2, 2]
    # an update signed by the old key is rejected
    stale = encode(KIND_UPDATE, "clinic-1", old, {}, round=2, model_version=2,
                   meta={"decline": "budget", "fleet": "demo"})
    mf.broker.publish(topic_update("demo", "clinic-1"), stale, retain=False)
    mf.aggregator.step(0.0)
    rows = mf.aggregator.state.db.execute(
        "SELECT reason FROM rejections WHERE sender = 'clinic-1'").fetchall()
    assert ("bad_signature",) in rows
    from bedside.audit import verify

    v = verify(a.cfg.data / "audit.db", [old.public, new.public])  # handed over, verifiable
    assert v.ok, v.problem


def test_rotations_grow_by_one_link_and_an_interrupted_one_is_finished(tmp_path, monkeypatch):
    import os as _os

    from bedside.aggregator.config import load
    from bedside.aggregator.keys import published, rotate_key
    from bedside.aggregator.service import Aggregator
    from bedside.errors import ConfigError
    from tests.fleet import seeded_fleet

    fleet = seeded_fleet(tmp_path, clients=1, rounds=1)
    cfg = load(fleet.aggregator_toml)
    first = SigningKey.load(cfg.key).public
    sizes = []
    for _ in range(12):  # more than a chain of nested chains could ever carry
        rotate_key(cfg)
        sizes.append(len(published(cfg)))
    assert sizes[-1] - sizes[-2] == pytest.approx(sizes[-2] - sizes[-3], rel=0.05)  # linear
    assert follow(published(cfg), first, "demo")[0].fingerprint == \
        SigningKey.load(cfg.key).public.fingerprint  # from the very first key: 12 links
    # a crash after the statements, before the swap
    real = _os.replace

    def crash_at_the_swap(src, dst):
        if str(dst) == str(cfg.key):
            raise OSError("crash (test)")
        real(src, dst)

    monkeypatch.setattr(_os, "replace", crash_at_the_swap)
    with pytest.raises(OSError, match="crash"):
        rotate_key(cfg)
    monkeypatch.setattr(_os, "replace", real)
    with pytest.raises(ConfigError, match="rotation was interrupted"):
        Aggregator(cfg)  # it would publish a key it does not sign with
    _, new, sequence = rotate_key(cfg)  # finishes it: no second statement for the same key
    assert sequence == 13 and SigningKey.load(cfg.key).public.fingerprint == new
    assert follow(published(cfg), first, "demo")[0].fingerprint == new
    assert (cfg.key.with_name(cfg.key.name + ".retired-13").stat().st_mode & 0o077) == 0


def test_a_junk_device_rotation_does_not_stop_the_aggregator(tmp_path):
    from bedside.constants import KIND_KEY, topic_report

    mf = mem_fleet(tmp_path, clients=1, rounds=1)
    a = mf.agents[0]
    junk = encode(KIND_KEY, a.cfg.device_id, a.key, {}, round=0, model_version=0,
                  meta={"fleet": "demo", "new_key": "junk"})
    mf.broker.publish(topic_report("demo", a.cfg.device_id), junk, retain=False)
    mf.aggregator.step(0.0)  # no exception
    rows = mf.aggregator.state.db.execute(
        "SELECT reason FROM rejections WHERE sender = 'clinic-1'").fetchall()
    assert ("key_rotation",) in rows
    assert (mf.aggregator.cfg.devices / "clinic-1.pub").read_text().strip() == \
        a.key.public.to_text()
