"""The release core (bedside.federation.release): parsing, targets, the device's judgement."""

from __future__ import annotations

import numpy as np
import pytest

from bedside.errors import InputError, ValidationError
from bedside.federation.release import (
    Golden,
    Probation,
    Release,
    Target,
    agent_version_ok,
    check_golden,
    chunk_digests,
    judge_release,
    n_chunks,
    parse_target,
)

SHA = "a" * 64


def _rel(**kw):
    d = dict(counter=5, version=3, sha256=SHA, size=10, origin="push", target=Target("all", None))
    d.update(kw)
    return Release(**d)


def _judge(rel, **kw):
    d = dict(device_id="clinic-1", fleet="f", release_fleet="f", last_counter=5,
             last_sha256=SHA, agent_version="0.1.0", blocked=set())
    d.update(kw)
    return judge_release(rel, **d)


def test_round_trip_through_meta():
    g = Golden(np.ones((2, 3), np.float32), np.full((2, 2), 0.5, np.float32), 1e-3)
    rel = _rel(golden=g, probation=Probation(seconds=30, max_error_rate=0.1), chunks=(SHA,),
               url="https://agg:8470", target=Target("group:icu", ("a", "b")))
    back = Release.from_meta(rel.to_meta())
    assert back.to_meta() == rel.to_meta()
    assert back.target.includes("a") and not back.target.includes("c")


@pytest.mark.parametrize("bad", [None, {}, {"counter": "5"}, {"counter": 0, "version": 1,
                                                                "sha256": SHA, "size": 1}])
def test_unreadable_releases_are_refused(bad):
    with pytest.raises(ValidationError) as e:
        Release.from_meta(bad)
    assert e.value.reason == "bad_release"


def test_the_chunk_list_must_cover_the_file():
    meta = _rel(size=10, chunk_bytes=4, chunks=(SHA, SHA)).to_meta()  # needs 3
    with pytest.raises(ValidationError, match="chunk list"):
        Release.from_meta(meta)
    assert n_chunks(10, 4) == 3 and len(chunk_digests(b"x" * 10, 4)) == 3


def test_judgement():
    assert _judge(_rel(counter=6))[0] == ""
    assert _judge(_rel())[0] == "ignore"  # the one it runs, delivered again
    assert _judge(_rel(sha256="b" * 64))[0] == "replay"
    assert _judge(_rel(counter=4))[0] == "older_counter"
    assert _judge(_rel(counter=6), release_fleet="other")[0] == "fleet"
    assert _judge(_rel(counter=6, target=Target("device:x", ("x",))))[0] == "not_targeted"
    assert _judge(_rel(counter=6, min_agent_version="0.2"))[0] == "agent_too_old"
    assert _judge(_rel(counter=6), blocked={3})[0] == "blocked"
    assert _judge(_rel(counter=1), last_counter=None)[0] == ""


def test_agent_versions():
    assert agent_version_ok("", "0.1.0")
    assert agent_version_ok("0.1", "0.1.0")
    assert agent_version_ok("0.1.0", "0.1.0rc1")  # pre-release tags are ignored
    assert not agent_version_ok("0.2.0", "0.1.9")
    assert agent_version_ok("0.10.0", "0.10.1") and not agent_version_ok("0.10.0", "0.9.9")


def test_targets():
    groups = {"icu": ["b", "a"], "empty": []}
    assert parse_target("all", groups).devices is None
    assert parse_target("group:icu", groups).devices == ("a", "b")
    assert parse_target("device:a", groups, enrolled=["a"]).devices == ("a",)
    for bad, msg in [("group:nope", "no device group 'nope'"), ("group:empty", "no devices"),
                     ("device:zz", "not enrolled"), ("everyone", "expected all")]:
        with pytest.raises(InputError, match=msg):
            parse_target(bad, groups, enrolled=["a", "b"])


def test_golden_comparison():
    g = Golden(np.zeros((2, 3), np.float32), np.array([[0.2, 0.8], [0.5, 0.5]], np.float32), 1e-3)
    assert check_golden(g, g.outputs + 5e-4) == ""
    assert "largest difference" in check_golden(g, g.outputs + 0.1)
    assert "shape" in check_golden(g, g.outputs[:1])
    assert "non-finite" in check_golden(g, np.full((2, 2), np.nan))
    with pytest.raises(ValidationError):
        Golden(np.zeros((0, 3)), np.zeros((0, 2)))
