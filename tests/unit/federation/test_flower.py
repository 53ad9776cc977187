"""Flower as a second driver of the round core (issue 12), without processes: the message codec,
the Mailbox transport, the [flower] settings, the app Flower installs, and whole federations over
an in-memory Grid that runs Bedside's real ClientApp. The same federations run on real Flower
processes in tests/integration/test_federation_flower.py."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import numpy as np
import pytest

from bedside.aggregator.config import load as load_agg
from bedside.aggregator.flower import FlowerDriver, _Node
from bedside.aggregator.service import Aggregator
from bedside.constants import (
    KIND_ANNOUNCE,
    KIND_UPDATE,
    topic_round,
    topic_status,
    topic_update,
    topic_updates_all,
)
from bedside.demo.run import to_toml
from bedside.errors import ConfigError, WireError
from bedside.models.onnx_weights import read_weights
from bedside.transport.flower import (
    FlowerNodeConfig,
    FlowerServerConfig,
    Mailbox,
    flower_env,
    pack,
    superlink_argv,
    supernode_argv,
    unpack,
    write_app,
)
from bedside.wire.envelope import encode
from bedside.wire.signing import SigningKey
from tests.fleet import mem_fleet, seeded_fleet
from tests.flower import MemoryGrid, set_flower


# -- codec and mailbox -----------------------------------------------------------------------------
def test_pack_carries_envelopes_unchanged():
    items = [("bedside/v1/f/round", b"\x00signed\xff"), ("bedside/v1/f/model", bytes(range(256)))]
    assert unpack(pack(items)) == items
    assert unpack(pack([])) == []


@pytest.mark.parametrize("config", [
    {"topics": ["a", "b"], "payloads": [b"x"]},  # do not pair up
    {"topics": [1], "payloads": [b"x"]},  # not a topic
    {"topics": ["a"], "payloads": ["x"]},  # not bytes
    {"topics": ["a"] * 65, "payloads": [b"x"] * 65},  # too many
])
def test_unpack_refuses_what_pack_does_not_write(config):
    from flwr.app import ConfigRecord, RecordDict

    with pytest.raises(WireError):
        unpack(RecordDict({"bedside": ConfigRecord(config)}))
    with pytest.raises(WireError, match="without"):
        unpack(RecordDict({"other": ConfigRecord({"topics": []})}))


def test_mailbox_delivers_only_what_was_subscribed_and_keeps_retained():
    box = Mailbox()
    box.subscribe(topic_updates_all("f"))
    assert box.deliver(topic_update("f", "clinic-1"), b"u")
    assert not box.deliver(topic_round("f"), b"r")  # nobody subscribed
    msg = box.get(0)
    assert msg is not None and msg.payload == b"u" and box.get(0) is None
    box.publish(topic_round("f"), b"a1", retain=True)
    box.publish(topic_round("f"), b"a2", retain=True)
    box.publish("x", b"y")
    assert box.retained == {topic_round("f"): b"a2"}
    assert [p for _, p in box.take()] == [b"a1", b"a2", b"y"] and box.take() == []


# -- settings and processes ------------------------------------------------------------------------
def test_flower_needs_tls_or_an_explicit_insecure_on_loopback(tmp_path):
    with pytest.raises(ConfigError, match="no TLS files"):
        FlowerServerConfig()
    with pytest.raises(ConfigError, match="no TLS files"):
        FlowerNodeConfig()
    with pytest.raises(ConfigError, match="plaintext Flower beyond"):
        FlowerServerConfig(host="10.0.0.5", insecure=True, expose_all_apis=True)
    with pytest.raises(ConfigError, match="Control and Runtime APIs"):
        FlowerServerConfig(host="0.0.0.0", ca_file=tmp_path / "ca.crt",
                           cert_file=tmp_path / "s.crt", key_file=tmp_path / "s.key")
    with pytest.raises(ConfigError, match="plaintext Flower beyond"):
        FlowerNodeConfig(superlink="aggregator.example:9093", insecure=True)
    with pytest.raises(ConfigError, match="go together"):
        FlowerServerConfig(ca_file=tmp_path / "ca.crt")
    with pytest.raises(ConfigError, match="host:port"):
        FlowerNodeConfig(superlink="9093", insecure=True)
    tls = FlowerServerConfig(host="10.0.0.5", ca_file=tmp_path / "ca.crt",
                             cert_file=tmp_path / "s.crt", key_file=tmp_path / "s.key",
                             expose_all_apis=True)
    argv = superlink_argv(tls, tmp_path / "db")
    assert "--insecure" not in argv and argv[argv.index("--ssl-certfile") + 1].endswith("s.crt")
    argv = superlink_argv(FlowerServerConfig(insecure=True), tmp_path / "db")
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "--insecure" in argv
    assert "--disable-runtime-dependency-installation" in argv  # nothing fetched at run time
    node = supernode_argv(FlowerNodeConfig(superlink="a.example:9093", ca_file=tmp_path / "ca"),
                          tmp_path / "agent.toml")
    assert node[node.index("--host") + 1] == "127.0.0.1" and "--insecure" not in node
    assert node[node.index("--root-certificates") + 1] == str(tmp_path / "ca")
    env = flower_env(tmp_path)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"


def test_the_app_flower_installs_names_bedsides_server_and_client(tmp_path):
    from flwr.common.config import validate_config

    app = write_app(tmp_path / "app")
    config = tomllib.loads((app / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(config, check_module=True, project_dir=app)
    assert ok, errors
    assert config["project"]["dependencies"] == []  # nothing installed at run time


def test_bedside_replaces_exactly_what_the_pinned_flower_runtime_has():
    """The runtime functions Bedside replaces (so that a submitted app's code never runs)
    exist in this Flower; a release that renamed one is refused, not silently bypassed."""
    import importlib

    from bedside.transport.flower import replace_in

    server = importlib.import_module("flwr.superlink.runtime.run_serverapp")
    client = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    for module, names in ((client, ("install_from_fab", "install_app_dependencies",
                                    "get_project_dir", "get_load_client_app_fn")),
                          (server, ("install_from_fab", "install_app_dependencies",
                                    "get_project_dir", "get_project_config",
                                    "get_fused_config_from_dir", "run_"))):
        replace_in(module, **{n: getattr(module, n) for n in names})
    with pytest.raises(ConfigError, match=r"not flwr==1\.41\.0"):
        replace_in(client, load_everything=None)


def test_flower_processes_start_bedsides_runtime_first_on_path(tmp_path):
    from bedside.aggregator.flower import superlink_command
    from bedside.edge.config import load as load_agent
    from bedside.edge.flower import supernode_command
    from bedside.transport.flower import CONFIG_ENV

    fleet = seeded_fleet(tmp_path, clients=2, rounds=1)
    set_flower(fleet)
    cfg = load_agg(fleet.aggregator_toml)
    _, env = superlink_command(cfg)
    script = Path(env["PATH"].split(os.pathsep)[0]) / "flwr-serverapp"
    assert "bedside.aggregator.flower_app import serverapp_main" in script.read_text()
    assert os.access(script, os.X_OK)
    assert env[CONFIG_ENV] == str(fleet.aggregator_toml.resolve())
    _, env = supernode_command(load_agent(fleet.agent_toml(0)), fleet.agent_toml(0))
    runtime = Path(env["PATH"].split(os.pathsep)[0])
    assert "bedside.edge.flower_app import clientapp_main" in (runtime /
                                                              "flwr-clientapp").read_text()
    # every other program Flower starts by name refuses on a device (an agent app, a model...)
    import subprocess

    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    others = set(TASK_TYPE_TO_COMMAND.values()) - {"flwr-clientapp"}
    assert others >= {"flwr-agentapp", "flwr-serverapp", "flwr-model", "flwr-connector"}
    for name in others:
        done = subprocess.run([str(runtime / name), "--token", "x"], capture_output=True,
                              text=True, env=env, check=False)
        assert done.returncode == 1 and "this side runs only flwr-clientapp" in done.stderr
    assert "" not in env["PATH"].split(os.pathsep)


def test_a_config_without_flower_says_how_to_add_it(tmp_path):
    from bedside.aggregator.flower import superlink_command
    from bedside.edge.config import load as load_agent
    from bedside.edge.flower import supernode_command

    fleet = seeded_fleet(tmp_path, clients=2, rounds=1)
    with pytest.raises(ConfigError, match=r"no \[flower\] table"):
        superlink_command(load_agg(fleet.aggregator_toml))
    with pytest.raises(ConfigError, match=r"no \[flower\] table"):
        supernode_command(load_agent(fleet.agent_toml(0)), fleet.agent_toml(0))


# -- federations over an in-memory Grid ------------------------------------------------------------
def flower_federation(work, policy=None, final_seconds=60.0, **kw):
    """A seeded fleet driven over Flower (in-memory Grid, real ClientApp); ``policy`` rewrites
    clinic 1's [privacy]. Returns (driver, aggregator, fleet)."""
    fleet = seeded_fleet(work, **kw)
    if policy:
        fleet.plan["clinics"][0]["config"]["privacy"].update(policy)
    set_flower(fleet)
    link = Mailbox()
    agg = Aggregator(load_agg(fleet.aggregator_toml), link)
    grid = MemoryGrid([fleet.agent_toml(i) for i in range(len(fleet.clinic_ids))])
    driver = FlowerDriver(agg, link, grid, poll=0.01, status_dir=work / "status",
                          final_seconds=final_seconds)
    return driver, agg, fleet


@pytest.fixture(scope="module")
def over_flower(tmp_path_factory):
    driver, agg, fleet = flower_federation(tmp_path_factory.mktemp("flower"), clients=3,
                                           rounds=2)
    driver.run()
    return driver, agg, fleet


def test_a_federation_over_flower_completes_and_every_device_gets_the_final_model(over_flower):
    driver, agg, _ = over_flower
    assert agg.finished
    assert [(r.status, r.result["accepted"]) for r in agg.state.rounds()] == [("closed", 3)] * 2
    final = agg.registry.latest()
    assert final == 3
    assert {d: s["model_version"] for d, s in driver.statuses.items()} == {
        "clinic-1": final, "clinic-2": final, "clinic-3": final}
    assert {n.device for n in driver.nodes.values()} == {"clinic-1", "clinic-2", "clinic-3"}
    # the privacy report is the service's own
    privacy = agg.registry.manifest(final).privacy
    assert privacy["epsilon"] > 0 and privacy["delta"] == pytest.approx(1e-5)
    assert agg.state.rounds()[-1].result["record_epsilon"]["max"] <= 8.0
    # two rounds and the end: the model is sent once per version, not with every message
    assert driver.messages == 9


def test_statuses_are_written_for_operators(over_flower):
    import json

    driver, _, _ = over_flower
    lines = (driver.status_dir / "aggregator.jsonl").read_text().splitlines()
    states = [json.loads(line)["state"] for line in lines]
    assert states.count("round_closed") == 2 and states[-1] == "done"
    device = json.loads((driver.status_dir / "clinic-1.json").read_text())
    assert device["device"] == "clinic-1"


def test_flower_and_mqtt_reach_the_same_weights_and_the_same_declines(tmp_path):
    """One federation, two transports: seeded alike, the Flower driver and the MQTT driver (on
    the in-memory broker) produce the same model, and a device whose policy refuses the rounds
    declines them over Flower exactly as over MQTT."""
    policy = {"accept_noise": ["local"]}  # the aggregator announces central noise
    driver, agg, fleet = flower_federation(tmp_path / "flower", policy, clients=3, rounds=2)
    driver.run()
    mf = mem_fleet(tmp_path / "mqtt", clients=3, rounds=2)
    c = mf.fleet.plan["clinics"][0]["config"]
    c["privacy"].update(policy)
    mf.fleet.agent_toml(0).write_text(to_toml(c))
    mf.agents[0].transport.close()
    mf.agents[0] = mf.new_agent(0)
    mf.agents[0].start()
    mf.run()
    for a in (agg, mf.aggregator):
        assert [r.result["declined"] for r in a.state.rounds()] == [{"clinic-1": "policy"}] * 2
        assert [r.result["accepted"] for r in a.state.rounds()] == [2, 2]
    final = agg.registry.latest()
    assert final == mf.aggregator.registry.latest() == 3
    names = list(agg.registry.manifest(final).parameters)
    over_flower = read_weights(agg.registry.model_bytes(final), names)
    over_mqtt = read_weights(mf.aggregator.registry.model_bytes(final), names)
    for name in names:
        np.testing.assert_allclose(over_flower[name], over_mqtt[name], rtol=1e-5, atol=1e-6)
    # the refusing device's own records of it
    from bedside.edge.outbox import AgentState

    state = AgentState(fleet.plan["clinics"][0]["dir"] / "data" / "agent.db", "demo")
    assert [state.handled(r) for r in (1, 2)] == ["declined:policy"] * 2


def test_a_node_cannot_speak_for_another_device(tmp_path):
    """A SuperNode is bound to the device that signed its first update; an update it carries
    for another device (even validly signed by that device's stolen key) is a topic mismatch."""
    driver, agg, fleet = flower_federation(tmp_path, clients=2, rounds=2)
    agg.start()
    driver._collect()
    node = driver.nodes.setdefault(7, _Node())
    cur = agg.state.current_round()
    stolen = SigningKey.load(fleet.plan["clinics"][1]["dir"] / "keys" / "clinic-2.key")
    own = SigningKey.load(fleet.plan["clinics"][0]["dir"] / "keys" / "clinic-1.key")
    decline = encode(KIND_UPDATE, "clinic-1", own, {}, round=cur.round,
                     model_version=cur.model_version, meta={"decline": "no_records",
                                                            "fleet": "demo"})
    driver.receive(node, [(topic_update("demo", "clinic-1"), decline)])
    assert node.device == "clinic-1"
    forged = encode(KIND_UPDATE, "clinic-2", stolen, {}, round=cur.round,
                    model_version=cur.model_version, meta={"decline": "no_records",
                                                           "fleet": "demo"})
    driver.receive(node, [(topic_update("demo", "clinic-2"), forged)])
    assert agg.state.declines(cur.round) == {"clinic-1": "no_records"}
    assert agg.state.rejections(cur.round)  # the forged one, with its reason


def test_a_hostile_server_gets_nothing_from_a_device(tmp_path):
    """An announcement signed by another key, sent inside a Flower message, is ignored: the
    device answers with its status only (no update, no decline)."""
    from bedside.edge.config import load as load_agent
    from bedside.edge.flower import exchange

    fleet = seeded_fleet(tmp_path, clients=2, rounds=1)
    cfg = load_agent(fleet.agent_toml(0))
    forged = encode(KIND_ANNOUNCE, "aggregator", SigningKey.generate(), {}, round=1,
                    model_version=1, meta={"fleet": "demo", "task": "train"})
    out = exchange(cfg, [(topic_round("demo"), forged)])
    assert [t for t, _ in out] == [topic_status("demo", "clinic-1")]


def test_flower_commands_refuse_a_config_without_flower_with_exit_2(tmp_path, capsys):
    from bedside.cli import main

    fleet = seeded_fleet(tmp_path, clients=2, rounds=1)
    for command, path in (("superlink", fleet.aggregator_toml), ("run", fleet.aggregator_toml),
                          ("supernode", fleet.agent_toml(0))):
        assert main(["flower", command, "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"bedside flower: error: {path}" in err and "[flower]" in err
    assert main(["flower"]) == 2  # no command: the group's help


def test_a_silent_or_failing_node_delays_no_one_and_loses_no_receipt(tmp_path):
    """clinic-3's SuperNode never answers, clinic-2's ClientApp fails in round 1: the rounds
    close at their deadlines with the others' updates; clinic-2 is asked again in the round and
    gets the receipts it missed."""
    driver, agg, fleet = flower_federation(tmp_path, clients=3, rounds=2, final_seconds=0.5,
                                           aggregator={"rounds": {"deadline_seconds": 4.0,
                                                                  "min_participants": 1}})
    grid = driver.grid
    grid.down.add(3)
    grid.failing.add(2)
    original = driver._reply

    def heal(flight, reply):  # the ClientApp works again after its first failure
        original(flight, reply)
        grid.failing.discard(2)

    driver._reply = heal
    driver.run()
    assert [(r.status, r.result["accepted"]) for r in agg.state.rounds()] == [("closed", 2)] * 2
    to_clinic_2 = [m for m in grid.pushed if m.metadata.dst_node_id == 2]
    assert len(to_clinic_2) >= 3  # round 1 twice (after the failure), round 2, the end
    from bedside.edge.outbox import AgentState

    state = AgentState(fleet.plan["clinics"][1]["dir"] / "data" / "agent.db", "demo")
    assert state.counts().get("accepted") == 2  # both receipts arrived


def test_what_a_stranger_node_sends_never_reaches_the_aggregator_or_stops_it(tmp_path):
    driver, agg, fleet = flower_federation(tmp_path, clients=2, rounds=1)
    agg.start()
    driver._collect()
    stranger = driver.nodes.setdefault(99, _Node())
    cur = agg.state.current_round()
    unsigned = encode(KIND_UPDATE, "clinic-1", SigningKey.generate(), {}, round=cur.round,
                      model_version=cur.model_version, meta={"decline": "no_records",
                                                             "fleet": "demo"})
    driver.receive(stranger, [(topic_update("demo", "clinic-1"), unsigned),
                              (topic_status("demo", "clinic-1"), b"[" * 60000),
                              (topic_status("demo", "clinic-1"), b"\xff\xfe"),
                              ("bedside/v1/other/round", b"x")])
    assert stranger.device is None
    assert agg.state.rejections(cur.round) == {} and agg.state.declines(cur.round) == {}
    # an authentic decline of an earlier round (a replay) does not bind either
    own = SigningKey.load(fleet.plan["clinics"][0]["dir"] / "keys" / "clinic-1.key")
    old = encode(KIND_UPDATE, "clinic-1", own, {}, round=cur.round - 1 or 0,
                 model_version=cur.model_version, meta={"decline": "no_records",
                                                        "fleet": "demo"})
    driver.receive(stranger, [(topic_update("demo", "clinic-1"), old)])
    assert stranger.device is None
    # clinic-1's own node declines the round and is bound; a copy of that decline carried by
    # the stranger (a replay) does not move the binding
    node = driver.nodes.setdefault(1, _Node())
    fresh = encode(KIND_UPDATE, "clinic-1", own, {}, round=cur.round,
                   model_version=cur.model_version, meta={"decline": "no_records",
                                                          "fleet": "demo"})
    driver.receive(node, [(topic_update("demo", "clinic-1"), fresh)])
    assert node.device == "clinic-1"
    driver.receive(stranger, [(topic_update("demo", "clinic-1"), fresh)])
    assert stranger.device is None and node.device == "clinic-1"


def test_release_reports_travel_over_flower_and_a_round_supersedes_a_targeted_push(tmp_path):
    """Over Flower, devices' signed release reports reach the aggregator (here for the rounds'
    releases). A push to one device staged before the run is superseded: a SuperNode gets its
    device's releases only once bound (after round 1's update), and round 1's release to everyone
    has replaced it by then, so the device never installs the older push (docs/models.md)."""
    from bedside.aggregator.rollout import PushOptions, stage_push
    from tests.release_tools import other_model

    driver, agg, _ = flower_federation(tmp_path, clients=2, rounds=2)
    agg._bootstrap_model()  # the registry's first version, to push from
    src = other_model(agg.registry.path(1), tmp_path / "pushed", 0.5)
    rid = stage_push(agg.cfg, agg.rollouts.store, agg.registry, src,
                     PushOptions(to="device:clinic-2"))
    driver.run()
    r = agg.rollouts.store.get(rid)
    assert (r.status, r.version, r.counter) == ("complete", 2, 2)
    final = agg.rollouts.store.current_counter()
    reports = {(x["device"], x["counter"]): x["state"] for x in agg.rollouts.store.reports()}
    assert reports[("clinic-1", final)] == reports[("clinic-2", final)] == "active"
    assert ("clinic-2", r.counter) not in reports  # superseded before its node was bound
    assert driver.link.retained["bedside/v1/demo/release/clinic-2"] == b""
