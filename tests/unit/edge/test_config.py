"""agent.toml: the record-level budget is required unless explicitly waived."""

from __future__ import annotations

import pytest

from bedside.edge.config import load
from bedside.errors import ConfigError

BASE = 'device_id = "c1"\nfleet = "f"\nkey = "k"\naggregator_key = "a.pub"\n'


def test_record_budget_required(tmp_path):
    (tmp_path / "agent.toml").write_text(BASE)
    with pytest.raises(ConfigError, match="record_epsilon' is required"):
        load(tmp_path / "agent.toml")
    (tmp_path / "agent.toml").write_text(BASE + "[privacy]\nallow_no_record_dp = true\n")
    assert load(tmp_path / "agent.toml").privacy.record_epsilon is None
    (tmp_path / "agent.toml").write_text(BASE + "[privacy]\nrecord_epsilon = 3.0\n")
    cfg = load(tmp_path / "agent.toml")
    assert cfg.privacy.record_epsilon == 3.0 and cfg.data_dir == tmp_path / "c1-data"


@pytest.mark.parametrize(("extra", "match"), [
    ("[privacy]\nrecord_epsilon = 3.0\nallow_no_record_dp = true\n", "not both"),
    ("[privacy]\nrecord_epsilon = -1\n", "must be > 0"),
    ("[privacy]\nrecord_epsilon = 3.0\n[agent]\nresend_secs = 1\n", "unknown key"),
    ('device_id = "a/b"\n', "device_id"),
])
def test_bad_values_are_named(tmp_path, extra, match):
    text = BASE + extra if not extra.startswith("device_id") else extra + BASE.split("\n", 1)[1]
    (tmp_path / "agent.toml").write_text(text)
    with pytest.raises(Exception, match=match):
        load(tmp_path / "agent.toml")


def test_mqtt_inbox_limit(tmp_path):
    from bedside.transport.mqtt import DEFAULT_MAX_INBOX_BYTES

    ok = BASE + "[privacy]\nrecord_epsilon = 3.0\n"
    (tmp_path / "agent.toml").write_text(ok)
    assert load(tmp_path / "agent.toml").mqtt.max_inbox_bytes == DEFAULT_MAX_INBOX_BYTES
    (tmp_path / "agent.toml").write_text(ok + "[mqtt]\nmax_inbox_bytes = 1048576\n")
    assert load(tmp_path / "agent.toml").mqtt.max_inbox_bytes == 1048576
    (tmp_path / "agent.toml").write_text(ok + "[mqtt]\nmax_inbox_bytes = 10\n")
    with pytest.raises(ConfigError, match="max_inbox_bytes' must be >= 512"):
        load(tmp_path / "agent.toml")
