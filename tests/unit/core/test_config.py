"""Settings declared once: the loader derived from the dataclasses, and the docs generated from
them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from bedside.aggregator.config import AggregatorConfig
from bedside.aggregator.config import load as load_aggregator
from bedside.config import load_file, markdown_table, read_table, setting, to_table
from bedside.edge.config import AgentConfig
from bedside.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("cls", [AggregatorConfig, AgentConfig])
def test_the_docs_list_every_setting_with_its_default(cls):
    docs = (ROOT / "docs" / "configuration.md").read_text()
    assert markdown_table(cls) in docs, (
        f"docs/configuration.md is out of date for {cls.__name__}: run 'make docs'")


@dataclass(frozen=True)
class Inner:
    k: float = setting(0.5, "a number", min=0.0, max=1.0)


@dataclass(frozen=True)
class Outer:
    name: str = setting(doc="required text")
    count: int = setting(3, "a count", min=1)
    mode: Literal["a", "b"] = setting("a", "a choice")
    path: Path | None = setting(None, "a path")
    gate: float | None = setting(0.1, "false turns it off", false_is_none=True)
    inner: Inner = setting(doc="a table", factory=Inner)


@pytest.mark.parametrize(("table", "match"), [
    ({}, r"where: 'name' is required"),
    ({"name": 1}, r"'name' must be a string, got 1"),
    ({"name": "x", "count": 0}, r"'count' must be >= 1, got 0"),
    ({"name": "x", "count": True}, r"'count' must be an integer"),
    ({"name": "x", "mode": "c"}, r"'mode' must be one of a, b; got 'c'"),
    ({"name": "x", "inner": {"k": 2}}, r"where \[inner\]: 'k' must be <= 1, got 2"),
    ({"name": "x", "inner": {"kk": 2}}, r"where \[inner\]: unknown key\(s\) kk"),
    ({"name": "x", "inner": 3}, r"'inner' must be a table"),
    ({"name": "x", "typo": 1}, r"unknown key\(s\) typo"),
    ({"name": "x", "gate": float("nan")}, r"'gate' must be a finite number"),
    ({"name": "x", "gate": 10**400}, r"'gate' is too large"),
])
def test_the_derived_loader_names_what_is_wrong(table, match):
    with pytest.raises(ConfigError, match=match):
        read_table(Outer, table, "where", Path("/base"))


def test_the_derived_loader_reads_types_paths_and_switches(tmp_path):
    o = read_table(Outer, {"name": "x", "path": "sub/file", "gate": False, "inner": {"k": 1}},
                   "w", tmp_path)
    assert o.path == tmp_path / "sub" / "file" and o.gate is None and o.inner.k == 1.0
    assert read_table(Outer, {"name": "x"}, "w").gate == 0.1
    assert to_table(o) == {"name": "x", "count": 3, "mode": "a", "path": str(tmp_path / "sub" /
                                                                               "file"),
                           "inner": {"k": 1.0}}


def test_config_files_name_the_file_and_cross_checks_run(tmp_path):
    (tmp_path / "keys").mkdir()
    base = 'fleet = "f"\nkey = "keys/a.key"\ndevices = "keys"\n'
    (tmp_path / "aggregator.toml").write_text(base)
    cfg = load_aggregator(tmp_path / "aggregator.toml")
    assert cfg.data_dir == tmp_path / "aggregator-data" and cfg.key == tmp_path / "keys/a.key"
    (tmp_path / "aggregator.toml").write_text(base + '[strategy]\nrule = "median"\n')
    with pytest.raises(ConfigError, match=r"aggregator\.toml: noise = 'central' is calibrated"):
        load_aggregator(tmp_path / "aggregator.toml")
    (tmp_path / "aggregator.toml").write_text(base + '[strategy]\nrule = "krum"\n')
    with pytest.raises(ConfigError, match="unknown aggregation rule 'krum'"):
        load_aggregator(tmp_path / "aggregator.toml")
    (tmp_path / "aggregator.toml").write_text(base + "[privacy.adaptive_clipping]\n"
                                              "count_noise = 0.1\n")
    with pytest.raises(ConfigError, match="count_noise must be > noise_multiplier / 2"):
        load_aggregator(tmp_path / "aggregator.toml")
    (tmp_path / "aggregator.toml").write_text("fleet = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_file(AggregatorConfig, tmp_path / "aggregator.toml")
    with pytest.raises(ConfigError, match="no such config file"):
        load_file(AggregatorConfig, tmp_path / "missing.toml")


def test_secrets_stay_out_of_reprs():
    from bedside.transport.mqtt import MqttConfig

    assert "hunter2" not in repr(MqttConfig(username="u", password="hunter2"))


def test_plaintext_mqtt_beyond_loopback_needs_allow_insecure_and_is_warned_about(caplog):
    from bedside.transport.mqtt import MqttConfig, warn_if_insecure

    for host in ("127.0.0.1", "localhost", "::1"):
        assert not MqttConfig(host=host).insecure
    with pytest.raises(ConfigError, match="allow_insecure = true"):
        MqttConfig(host="broker.hospital.example")
    cfg = MqttConfig(host="10.1.2.3", allow_insecure=True)
    assert cfg.insecure
    with caplog.at_level("WARNING"):
        warn_if_insecure(cfg)
    assert "plaintext" in caplog.text


@pytest.mark.parametrize(("text", "section"), [
    ('[agent]\nseed = 3\n', "agent"),
])
def test_seeded_noise_needs_the_testing_switch(tmp_path, text, section):
    from bedside.edge.config import load as load_agent

    base = ('device_id = "c1"\nfleet = "f"\nkey = "k"\naggregator_key = "a.pub"\n'
            '[privacy]\nrecord_epsilon = 3.0\n')
    (tmp_path / "agent.toml").write_text(base + text)
    with pytest.raises(ConfigError, match="removes their privacy"):
        load_agent(tmp_path / "agent.toml")
    (tmp_path / "agent.toml").write_text("testing = true\n" + base + text)
    assert load_agent(tmp_path / "agent.toml").agent.seed == 3
    (tmp_path / "keys").mkdir()
    agg = 'fleet = "f"\nkey = "keys/a.key"\ndevices = "keys"\n[privacy]\nnoise_seed = 1\n'
    (tmp_path / "aggregator.toml").write_text(agg)
    with pytest.raises(ConfigError, match="removes its privacy"):
        load_aggregator(tmp_path / "aggregator.toml")
    (tmp_path / "aggregator.toml").write_text("testing = true\n" + agg)
    assert load_aggregator(tmp_path / "aggregator.toml").privacy.noise_seed == 1


@pytest.mark.parametrize("device", ["aggregator", "Aggregator", "broker", "ca"])
def test_a_device_cannot_take_a_services_identity(tmp_path, device):
    from bedside.edge.config import load as load_agent
    from bedside.wire.signing import SigningKey, validate_device_id

    with pytest.raises(Exception, match="reserved for a Bedside service"):
        validate_device_id(device)
    (tmp_path / "agent.toml").write_text(f'device_id = "{device}"\nfleet = "f"\nkey = "k"\n'
                                         'aggregator_key = "a.pub"\n[privacy]\n'
                                         'record_epsilon = 1.0\n')
    with pytest.raises(ConfigError, match="reserved"):
        load_agent(tmp_path / "agent.toml")
    # an aggregator whose devices directory holds a service's id refuses to start
    from bedside.aggregator.service import Aggregator

    (tmp_path / "devices").mkdir()
    SigningKey.generate().save(tmp_path / "agg.key")
    SigningKey.generate().public.save(tmp_path / "devices" / f"{device}.pub")
    (tmp_path / "aggregator.toml").write_text('fleet = "f"\nkey = "agg.key"\n'
                                              'devices = "devices"\n')
    with pytest.raises(ConfigError, match="reserved"):
        Aggregator(load_aggregator(tmp_path / "aggregator.toml"))


def test_the_shipped_mosquitto_config_is_the_generated_one():
    """deploy/mosquitto/mosquitto.conf is what 'bedside broker config' writes for
    /etc/bedside/mosquitto: edit the generator, never the file."""
    from bedside.transport.mosquitto import config_text

    shipped = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    assert shipped == config_text("/etc/bedside/mosquitto", "/var/lib/mosquitto")
    assert "0.0.0.0" not in shipped and "listener 8883 127.0.0.1" in shipped
