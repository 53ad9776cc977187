"""``bedside models list|show``: the registry's versions, their origin, lineage and privacy."""

from __future__ import annotations

import json

import pytest

from bedside.cli import main
from tests.fleet import mem_fleet


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    mf = mem_fleet(tmp_path_factory.mktemp("catalog"), clients=2, rounds=2, statistics=True)
    mf.run()
    return mf.aggregator.registry.root


def test_list_shows_every_version_and_where_it_came_from(registry, capsys):
    assert main(["models", "list", "--registry", str(registry), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["versions"]
    assert [r["version"] for r in rows] == [1, 2, 3, 4]
    assert [r["parent"] for r in rows] == [None, 1, 2, 3]
    assert rows[0]["origin"] == "starting model (exported)"
    assert rows[1]["origin"] == "feature statistics round 1 (2 device(s))"
    assert rows[3]["origin"] == "training round 3 (2 device(s))"
    assert rows[3]["epsilon_device"] > 0 and 0 < rows[3]["epsilon_record_max"] <= 8
    assert rows[3]["accuracy"] is not None
    assert main(["models", "list", "--registry", str(registry)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["version", "parent"] and len(table) == 5


def test_show_walks_the_lineage_and_refuses_an_unknown_version(registry, capsys):
    assert main(["models", "show", "4", "--registry", str(registry)]) == 0
    out = capsys.readouterr().out
    assert "lineage: v4 (training round 3" in out and "<- v1 (starting model" in out
    assert "device-level epsilon" in out and "record-level epsilon <=" in out
    assert main(["models", "show", "4", "--registry", str(registry), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in body["lineage"]] == [4, 3, 2, 1]
    assert main(["models", "show", "9", "--registry", str(registry)]) == 2
    assert "no version 9 (it holds 1..4)" in capsys.readouterr().err
    assert main(["models", "list", "--registry", str(registry.parent)]) == 2
    assert "not a registry" in capsys.readouterr().err


def test_privacy_text_never_claims_a_guarantee_a_version_does_not_have():
    from bedside.manifest import Manifest
    from bedside.models.catalog import privacy_text

    def text(privacy):
        return privacy_text(Manifest(name="m", version=2, schema=_schema(), sha256="",
                                     opset=18, privacy=privacy))

    assert text({"epsilon": None, "note": "a round without device-level noise: no "
                 "device-level guarantee"}).startswith("no device-level guarantee")
    seeded = text({"epsilon": 3.0, "delta": 1e-5, "noise": "central", "rounds": 2,
                   "seeded_noise": True, "warning": "noise was seeded: NOT private"})
    assert seeded.startswith("device-level epsilon 3") and "WARNING: noise was seeded" in seeded
    assert text({"status": "unknown", "note": "imported"}) == "unknown: imported"


def _schema():
    from bedside.models import datasets

    return datasets.load("wdbc").schema


def test_origin_names_pushes_and_rollbacks():
    from bedside.manifest import Manifest
    from bedside.models.catalog import origin

    def m(training):
        return Manifest(name="m", version=2, schema=_schema(), sha256="", opset=18,
                        training=training)

    assert origin(m({"pushed": {"by": "ana", "target": "group:icu", "from": "models/x"}})) == \
        "pushed by ana to group:icu (from models/x)"
    assert origin(m({"rollback_of": 3, "pushed": {"by": "ana", "target": "all"}})) == \
        "rollback to version 3 by ana"
