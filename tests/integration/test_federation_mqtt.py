"""Federation over real brokers: Mosquitto with the project's TLS + ACL config, and the embedded
amqtt broker. Agents run in threads of the test process; the aggregator in a thread, or as a
separate process where it must be killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bedside.aggregator.state import State
from bedside.constants import KIND_UPDATE, topic_update, topic_updates_all
from bedside.transport.mqtt import MqttTransport
from bedside.wire.envelope import decode
from bedside.wire.signing import SigningKey
from tests.brokers import start_embedded, start_mosquitto
from tests.fleet import close_agents, make_fleet, start_agent, start_aggregator, wait_for
from tests.wire_tools import resign, with_nan

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
CLINICS = ["clinic-1", "clinic-2", "clinic-3"]
# A test-only identity that may read everything (a certificate is one session: with
# use_username_as_clientid, a second connection with the aggregator's would replace it).
SPY = "spy"
SPY_ACL = f"user {SPY}\ntopic read bedside/v1/#\n"


def _mosquitto(tmp_path):
    return start_mosquitto(tmp_path / "mosquitto", [*CLINICS, SPY], acl_extra=SPY_ACL)


@pytest.fixture()
def mosquitto(tmp_path):
    b = _mosquitto(tmp_path)
    yield b
    b.stop()


@pytest.fixture(params=["mosquitto", "embedded"])
def any_broker(request, tmp_path):
    b = _mosquitto(tmp_path) if request.param == "mosquitto" else start_embedded()
    yield b
    b.stop()


def _stop_all(fleet, stops):
    for s in stops:
        s.set()
    for t in fleet.threads:
        t.join(30)
    close_agents(fleet)


def test_full_run(tmp_path, any_broker):
    fleet = make_fleet(tmp_path / "fleet", clients=3, rounds=3, broker=any_broker)
    agg, agg_stop, agg_thread = start_aggregator(fleet)
    agents = [start_agent(fleet, i) for i in range(3)]
    try:
        agg_thread.join(180)
        assert agg.finished, "the federation did not finish"
        rounds = agg.state.rounds()
        assert [r.result["accepted"] for r in rounds] == [3, 3, 3]
        assert agg.registry.versions() == [1, 2, 3, 4]
        wait_for(lambda: all(a.models.current_version() == 4 and a.done for a, _, _ in agents),
                 30, "every agent to run v4")
        for a, _, _ in agents:
            assert a.state.counts() == {"accepted": 3}
            rep = a.privacy_report()["record"]
            assert rep["epsilon"] <= rep["budget_epsilon"]
    finally:
        _stop_all(fleet, [agg_stop] + [s for _, s, _ in agents])
        agg.transport.close()


def test_bad_updates_are_rejected_and_the_round_completes(tmp_path, mosquitto):
    fleet = make_fleet(tmp_path / "fleet", clients=3, rounds=1, broker=mosquitto,
                       aggregator={"max_update_bytes": 256 * 1024,
                                   "rounds": {"deadline_seconds": 40}})
    f = fleet.plan["fleet"]
    keys = {c: SigningKey.load(fleet.plan["clinics"][i]["dir"] / "keys" / f"{c}.key")
            for i, c in enumerate(CLINICS)}
    spy = MqttTransport(mosquitto.config(SPY), SPY, clean_session=True)
    assert spy.wait_connected(10)
    spy.subscribe(topic_updates_all(f))
    agg, agg_stop, agg_thread = start_aggregator(fleet)
    # clinic-3 is held back so that the round stays open while the attacks arrive
    agents = [start_agent(fleet, i, offline=(i == 2)) for i in range(3)]
    gate = agents[2][0].transport

    def attack(device, payload):
        """Someone holding the device's certificate (its session is taken over meanwhile; the
        device reconnects afterwards and its outbox re-sends)."""
        t = MqttTransport(mosquitto.config(device), device, clean_session=True)
        try:
            assert t.wait_connected(10)
            t.publish(topic_update(f, topic_device.get(device, device)), payload)
        finally:
            t.close()

    topic_device: dict[str, str] = {}
    try:
        captured = {}

        def got_updates():
            while (m := spy.get(0.1)) is not None:
                env = decode(m.payload, agg.devices, kinds={KIND_UPDATE})
                if env.tensors:
                    captured[env.header.sender] = m.payload
            return {"clinic-1", "clinic-2"} <= set(captured)

        wait_for(got_updates, 90, "clinic-1 and clinic-2 to send their updates")
        good1, good2 = captured["clinic-1"], captured["clinic-2"]
        # forged signature: clinic-1's certificate, someone else's signing key
        attack("clinic-1", resign(good1, SigningKey.generate()))
        # verbatim replay of clinic-2's accepted update (indistinguishable from a re-send)
        attack("clinic-2", good2)
        # NaN, correctly signed with clinic-3's key
        nan3 = with_nan(resign(good1, keys["clinic-3"],
                               edit=lambda h: h.update(sender="clinic-3", nonce="ab" * 16)),
                        keys["clinic-3"])
        attack("clinic-3", nan3)
        # oversized: larger than the aggregator's limit
        attack("clinic-1", os.urandom(300 * 1024))
        # the broker's ACL: clinic-1 may not publish on clinic-2's topic (dropped silently)
        topic_device["clinic-1"] = "clinic-2"
        attack("clinic-1", good1)
        state = State(fleet.plan["aggregator_dir"] / "data" / "state.db")
        wait_for(lambda: sum(state.rejections(1).values()) >= 4, 30,
                 "three rejections and a duplicate")
        gate.closed = False  # clinic-3 delivers its honest update
        agg_thread.join(90)
        assert agg.finished
        r1 = state.get_round(1)
        assert r1.status == "closed"
        assert r1.result["accepted"] == 3
        assert r1.result["rejected"] == {"bad_signature": 1, "non_finite": 1, "too_large": 1}
        assert r1.result["duplicates"] == 1  # the replay, recognised and not counted twice
        senders = [u["sender"] for u in state.accepted(1)]
        assert sorted(senders) == CLINICS
    finally:
        spy.close()
        _stop_all(fleet, [agg_stop] + [s for _, s, _ in agents])
        agg.transport.close()


def test_offline_agent_delivers_from_outbox(tmp_path, mosquitto):
    fleet = make_fleet(tmp_path / "fleet", clients=3, rounds=2, broker=mosquitto,
                       aggregator={"rounds": {"deadline_seconds": 60}})
    agg, agg_stop, agg_thread = start_aggregator(fleet)
    agents = [start_agent(fleet, i, offline=(i == 0)) for i in range(3)]
    a0 = agents[0][0]
    try:
        wait_for(lambda: a0.state.handled(1) == "contributed", 90, "clinic-1 to train round 1")
        time.sleep(1.0)
        assert len(a0.state.pending()) == 1  # trained, but could not send
        assert agg.state.current_round().round == 1
        a0.transport.closed = False  # back online within the round: sent from the outbox
        agg_thread.join(120)
        assert agg.finished
        assert [r.result["accepted"] for r in agg.state.rounds()] == [3, 3]
        wait_for(lambda: a0.state.counts().get("accepted") == 2, 20, "receipts for clinic-1")
    finally:
        _stop_all(fleet, [agg_stop] + [s for _, s, _ in agents])
        agg.transport.close()


def test_offline_agent_drops_stale_update(tmp_path, mosquitto):
    fleet = make_fleet(tmp_path / "fleet", clients=3, rounds=2, broker=mosquitto,
                       aggregator={"rounds": {"deadline_seconds": 12, "min_participants": 2}})
    agg, agg_stop, agg_thread = start_aggregator(fleet)
    agents = [start_agent(fleet, i, offline=(i == 0)) for i in range(3)]
    a0 = agents[0][0]
    try:
        wait_for(lambda: a0.state.handled(1) == "contributed", 90, "clinic-1 to train round 1")
        wait_for(lambda: agg.state.get_round(1).status == "closed", 60,
                 "round 1 to close at its deadline without clinic-1")
        assert agg.state.get_round(1).result["accepted"] == 2
        a0.transport.closed = False  # back online after the round closed
        wait_for(lambda: a0.state.counts().get("stale") == 1, 30, "the stale update to be dropped")
        assert "clinic-1" not in {u["sender"] for u in agg.state.accepted(1)}
        agg_thread.join(120)
        assert agg.finished
        assert agg.state.get_round(2).result["accepted"] == 3  # it takes part again
    finally:
        _stop_all(fleet, [agg_stop] + [s for _, s, _ in agents])
        agg.transport.close()


def _spawn_aggregator(fleet, log):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "bedside", "aggregator", "serve", "--config",
                             str(fleet.aggregator_toml)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=fleet.plan["aggregator_dir"])


def test_aggregator_killed_mid_round_loses_nothing(tmp_path, mosquitto):
    fleet = make_fleet(tmp_path / "fleet", clients=3, rounds=2, broker=mosquitto,
                       aggregator={"rounds": {"deadline_seconds": 90}})
    log = (tmp_path / "aggregator.log").open("wb")
    proc = _spawn_aggregator(fleet, log)
    agents = [start_agent(fleet, i, offline=(i == 2)) for i in range(3)]
    a2 = agents[2][0]
    state = State(fleet.plan["aggregator_dir"] / "data" / "state.db")
    try:
        wait_for(lambda: state.current_round() is not None
                 and len(state.accepted(1)) == 2, 120, "two accepted updates in round 1")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # while the aggregator is dead, clinic-3 delivers: Mosquitto queues it for the
        # aggregator's persistent session
        a2.transport.closed = False
        wait_for(lambda: a2.state.pending() and a2.state.pending()[0].attempts >= 1, 30,
                 "clinic-3 to publish while the aggregator is down")
        proc = _spawn_aggregator(fleet, log)
        wait_for(lambda: state.get_round(1).status == "closed", 120, "round 1 to close")
        r1 = state.get_round(1)
        assert r1.result["accepted"] == 3
        assert sorted(u["sender"] for u in state.accepted(1)) == CLINICS
        assert r1.result["rejected"] == {}  # re-deliveries are duplicates, never counted twice
        proc.wait(120)
        assert proc.returncode == 0
        assert [r.status for r in state.rounds()] == ["closed", "closed"]
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop_all(fleet, [s for _, s, _ in agents])
        log.close()


def test_updates_are_clipped_on_the_wire(tmp_path, mosquitto):
    """What crosses the broker from a device is only the clipped delta (central mode)."""
    fleet = make_fleet(tmp_path / "fleet", clients=3, rounds=1, broker=mosquitto)
    spy = MqttTransport(mosquitto.config(SPY), SPY, clean_session=True)
    assert spy.wait_connected(10)
    spy.subscribe(topic_updates_all(fleet.plan["fleet"]))
    agg, agg_stop, agg_thread = start_aggregator(fleet)
    agents = [start_agent(fleet, i) for i in range(3)]
    try:
        agg_thread.join(120)
        seen = 0
        while (m := spy.get(0.5)) is not None:
            env = decode(m.payload, agg.devices, kinds={KIND_UPDATE})
            if env.tensors:
                seen += 1
                norm = np.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64)))
                                   for t in env.tensors.values()))
                assert norm <= 1.0 + 1e-5
                assert set(env.tensors) == set(agg.registry.manifest(1).parameters)
        assert seen >= 3
    finally:
        spy.close()
        _stop_all(fleet, [agg_stop] + [s for _, s, _ in agents])
        agg.transport.close()


def test_devices_follow_a_key_rotation_and_refuse_the_old_key(tmp_path, mosquitto, caplog):
    """``bedside aggregator rotate-key``, then the aggregator restarts (issue 14): over Mosquitto
    the devices pin the new key (the rotation is signed by the old one) and take part in the next
    round, announced with the new key; a round announced with the old key is ignored."""
    import logging

    from bedside.cli import main
    from bedside.constants import AGGREGATOR_ID, topic_round
    from bedside.demo.run import to_toml
    from tests.wire_tools import split

    caplog.set_level(logging.WARNING, logger="bedside.edge.agent")
    # no record-level budget (the device-level one is large): round 2 is not declined for it
    fleet = make_fleet(tmp_path / "fleet", clients=2, rounds=1, broker=mosquitto,
                       agent={"agent": {"exit_when_done": False},
                              "privacy": {"record_epsilon": None, "allow_no_record_dp": True}})
    f = fleet.plan["fleet"]
    spy = MqttTransport(mosquitto.config(SPY), SPY, clean_session=True)
    assert spy.wait_connected(10)
    spy.subscribe(topic_round(f))
    spy.subscribe(topic_updates_all(f))
    assert spy.wait_subscribed(topic_updates_all(f), 10)
    agents = [start_agent(fleet, i) for i in range(2)]
    stops = [s for _, s, _ in agents]
    agg = forger = None

    def serve():
        nonlocal agg
        agg, stop, thread = start_aggregator(fleet)
        stops.append(stop)
        thread.join(90)
        assert agg.finished, "the federation did not finish"
        agg.close()
        agg.transport.close()  # its client id is free for the forger below

    try:
        serve()
        old = SigningKey.load(agg.cfg.key)
        assert main(["aggregator", "rotate-key", "--config", str(fleet.aggregator_toml)]) == 0
        new = SigningKey.load(agg.cfg.key)
        assert new.public.fingerprint != old.public.fingerprint
        agg.state.close()
        fleet.plan["aggregator"]["rounds"]["rounds"] = 2  # one more round, under the new key
        fleet.aggregator_toml.write_text(to_toml(fleet.plan["aggregator"]))
        serve()
        assert [(r.round, r.status, r.result["accepted"]) for r in agg.state.rounds()] == [
            (1, "closed", 2), (2, "closed", 2)]
        for a, _, _ in agents:
            assert a.pinned.get(AGGREGATOR_ID).fingerprint == new.public.fingerprint
            assert a.cfg.aggregator_key.read_text().strip() == new.public.to_text()
        announced = []
        while (m := spy.get(0.5)) is not None:
            if m.topic == topic_round(f):
                announced.append(m.payload)
        round2 = [p for p in announced
                  if split(p)[0]["round"] == 2 and split(p)[0]["meta"].get("state") != "done"]
        assert round2, "round 2 was not announced"
        # round 3, announced as round 2 was (still before its deadline) but signed with the old key
        forged = resign(round2[0], old, edit=lambda h: h.update(round=3, model_version=3,
                                                                nonce="f0" * 16))
        refused = len([r for r in caplog.records if "bad_signature" in r.getMessage()])
        forger = MqttTransport(mosquitto.config("aggregator"), "aggregator", clean_session=True)
        assert forger.wait_connected(10)
        forger.publish(topic_round(f), forged, qos=1)
        wait_for(lambda: len([r for r in caplog.records
                              if "bad_signature" in r.getMessage()]) >= refused + 2, 15,
                 "both devices to refuse the announcement signed with the old key")
        time.sleep(1.0)  # a device that took it would train and send an update now
        sent = []
        while (m := spy.get(0.5)) is not None:
            if m.topic != topic_round(f):
                sent.append(m.topic)
        assert sent == [], "a device answered a round announced with the old key"
        for a, _, _ in agents:
            assert a.announce.header.round == 2 and a.state.handled(3) is None
    finally:
        spy.close()
        if forger is not None:
            forger.close()
        _stop_all(fleet, stops)
        if agg is not None:
            agg.state.close()
