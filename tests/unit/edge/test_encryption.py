"""Encryption at rest ([storage] key_file): records.db and agent.db under SQLCipher."""

from __future__ import annotations

import pytest

from bedside.cli import main
from bedside.config import to_toml
from bedside.errors import ConfigError, StateError
from bedside.sqlite import open_db, read_key, write_key
from tests.fleet import seeded_fleet, start_mem


def test_an_encrypted_database_needs_its_key_and_says_what_is_wrong(tmp_path):
    key = write_key(tmp_path / "store.key")
    path = tmp_path / "records.db"
    db = open_db(path, "record store", "CREATE TABLE t (a)", private=True, key=key)
    db.execute("INSERT INTO t VALUES ('a patient value')")
    db.close()
    raw = path.read_bytes()
    assert not raw.startswith(b"SQLite format 3") and b"a patient value" not in raw
    with pytest.raises(StateError, match=r"encrypted .*set \[storage\] key_file"):
        open_db(path, "record store")
    with pytest.raises(StateError, match="wrong key"):
        open_db(path, "record store", key=bytes(32))
    db = open_db(path, "record store", key=read_key(tmp_path / "store.key"))
    assert db.execute("SELECT a FROM t").fetchall() == [("a patient value",)]
    db.close()
    # a plaintext file is not silently used as if it were protected
    plain = tmp_path / "plain.db"
    open_db(plain, "record store", "CREATE TABLE t (a)").close()
    with pytest.raises(StateError, match=r"not encrypted.*encrypt-store"):
        open_db(plain, "record store", key=key)
    with pytest.raises(ConfigError, match="never replaced"):
        write_key(tmp_path / "store.key")


def test_a_key_file_others_can_read_or_a_short_one_is_refused(tmp_path):
    k = tmp_path / "k"
    k.write_text("00" * 32)
    k.chmod(0o644)
    with pytest.raises(ConfigError, match="readable or writable by others"):
        read_key(k)
    k.chmod(0o600)
    k.write_text("abcd")
    with pytest.raises(ConfigError, match="64 hex digits"):
        read_key(k)


def test_encrypt_store_keeps_the_records_and_the_agents_take_part(tmp_path, capsys):
    fleet = seeded_fleet(tmp_path / "fed", clients=2, rounds=1)
    for i, c in enumerate(fleet.plan["clinics"]):
        write_key(c["dir"] / "keys" / "store.key")
        c["config"]["storage"] = {"key_file": "keys/store.key"}
        fleet.agent_toml(i).write_text(to_toml(c["config"]))
    toml = fleet.agent_toml(0)
    csv = str(fleet.plan["clinics"][0]["dir"] / "records.csv")
    model = str(tmp_path / "fed" / "initial-model")
    assert main(["edge", "ingest", csv, "--config", str(toml), "--model", model]) != 0
    assert "encrypt-store" in capsys.readouterr().err
    for i in range(2):
        assert main(["edge", "encrypt-store", "--config", str(fleet.agent_toml(i))]) == 0
    assert "encrypted" in capsys.readouterr().out
    records = fleet.plan["clinics"][0]["dir"] / "data" / "records.db"
    assert not records.read_bytes().startswith(b"SQLite format 3")
    assert main(["edge", "encrypt-store", "--config", str(toml)]) == 0  # twice: harmless
    assert "already" in capsys.readouterr().out
    mf = start_mem(fleet)
    mf.run()
    assert len(mf.aggregator.state.accepted(1)) == 2
    schema = mf.agents[0].models.manifest().schema
    assert mf.agents[0].store.count(schema) == fleet.plan["clinics"][0]["rows"]
