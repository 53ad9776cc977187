"""``bedside edge status`` and ``bedside aggregator status`` read as tables and sentences for
clinic IT and the data team (``--json`` stays for machines)."""

from __future__ import annotations

import json

import pytest

from bedside.cli import main
from tests.fleet import mem_fleet


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    mf = mem_fleet(tmp_path_factory.mktemp("status"), clients=2, rounds=2)
    mf.run()
    for a in mf.agents:
        a.close()
    mf.aggregator.state.close()
    return mf


def test_edge_status_says_what_serves_and_what_is_protected_in_words(finished, capsys):
    assert main(["edge", "status", "--config", str(finished.fleet.agent_toml(0))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("clinic-1 (fleet demo)")
    assert "model: v3 serving" in out and "last round: 2, contributed" in out
    assert "record-level privacy: epsilon" in out and "of a budget of 8" in out
    assert "device-level privacy: epsilon" in out
    assert "guarantee" in out and "{" not in out  # sentences, not a Python dict
    assert main(["edge", "status", "--config", str(finished.fleet.agent_toml(0)), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["serving_version"] == 3


def test_aggregator_status_is_a_table_with_the_strength_of_the_guarantee(finished, capsys):
    assert main(["aggregator", "status", "--config", str(finished.fleet.aggregator_toml)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fleet demo: model versions v1..v3 (latest v3")
    assert lines[1].split() == ["round", "status", "base", "accepted", "declined", "rejected"]
    assert [line.split()[:4] for line in lines[2:4]] == [["1", "closed", "v1", "2"],
                                                        ["2", "closed", "v2", "2"]]
    assert lines[4].startswith("privacy of v3: device-level epsilon")
    assert lines[4].endswith("guarantee")


def test_edge_status_before_the_first_start_says_so_and_a_lost_ledger_is_an_error(tmp_path,
                                                                                 capsys):
    """A device that never took part has no ledger yet: the status says so plainly (it used to
    claim the device had taken part), and creates nothing; once it took part, a missing ledger
    is reported as the error it is."""
    from tests.fleet import seeded_fleet

    fleet = seeded_fleet(tmp_path, clients=2, rounds=1)
    toml = str(fleet.agent_toml(0))
    assert main(["edge", "status", "--config", toml]) == 0
    out = capsys.readouterr().out
    assert "no ledger yet" in out and "taken part" not in out
    from bedside.edge.config import load

    cfg = load(toml)
    assert not cfg.ledger_path.exists()
    mf = mem_fleet(tmp_path / "ran", clients=2, rounds=1)
    mf.run()
    cfg = mf.agents[0].cfg
    for a in mf.agents:
        a.close()
    cfg.ledger_path.rename(cfg.ledger_path.with_suffix(".lost"))
    assert main(["edge", "status", "--config", str(mf.fleet.agent_toml(0))]) == 0
    assert "UNAVAILABLE" in capsys.readouterr().out
