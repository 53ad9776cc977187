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
