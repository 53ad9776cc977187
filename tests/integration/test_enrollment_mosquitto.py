"""Devices enrolled by token only take part in a round over TLS through Mosquitto, started from
the generated configuration; a revoked device's next update is then rejected by the running
aggregator, and the broker refuses its reconnection."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from bedside.cli import main
from bedside.config import to_toml
from bedside.transport import free_port
from bedside.transport.mqtt import MqttConfig, MqttTransport
from tests.brokers import _wait_port, mosquitto_binary
from tests.fleet import (
    GatedTransport,
    close_agents,
    make_fleet,
    start_agent,
    start_aggregator,
    wait_for,
)


class _DownAfterEachUpdate(GatedTransport):
    """The device's uplink goes down right after each update it sends: its next one waits in its
    outbox until the test opens the gate again, however soon the next round starts."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                wait: bool = True) -> None:
        super().publish(topic, payload, qos=qos, retain=retain, wait=wait)
        if "/update/" in topic:
            self.closed = True


def _start(conf_dir: Path, log: Path) -> subprocess.Popen:
    conf = conf_dir / "mosquitto.conf"
    if os.geteuid() == 0 and not conf.read_text().startswith("user root"):
        # tests only: as root Mosquitto drops to a user who cannot enter pytest's tmp_path
        conf.write_text("user root\n" + conf.read_text())
    return subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=log.open("ab"))


def test_a_round_over_tls_with_devices_enrolled_by_token_only(tmp_path, capsys):
    from bedside.aggregator.config import load as load_agg

    # the data team: a CA, the broker's configuration for a fleet with no device yet
    fleet = make_fleet(tmp_path / "fed", clients=2, rounds=2,
                       agent={"agent": {"exit_when_done": False}})
    agg_dir = fleet.plan["aggregator_dir"]
    for pub in (agg_dir / "keys" / "devices").glob("*.pub"):
        pub.unlink()  # nobody enrolled by hand
    ca, etc, data = tmp_path / "ca", tmp_path / "etc", tmp_path / "data"
    data.mkdir()
    port, enroll_port = free_port(), free_port()
    assert main(["broker", "certs", "--out", str(ca), "--identity", "aggregator",
                 "--downloads-host", "127.0.0.1", "--broker-group", ""]) == 0
    assert main(["broker", "config", "--fleet", fleet.plan["fleet"], "--devices",
                 str(agg_dir / "keys" / "devices"), "--ca", str(ca), "--out", str(etc),
                 "--listen", f"127.0.0.1:{port}", "--data-dir", str(data),
                 "--broker-group", ""]) == 0
    log = tmp_path / "mosquitto.log"
    broker = _start(etc, log)
    agg = stop = None
    stops: list = []
    try:
        _wait_port(port)
        table = fleet.plan["aggregator"]
        table["mqtt"] = {"host": "127.0.0.1", "port": port, "ca_file": str(ca / "ca.crt"),
                         "cert_file": str(ca / "aggregator.crt"),
                         "key_file": str(ca / "aggregator.key")}
        table["enrollment"] = {"port": enroll_port, "cert_file": str(ca / "downloads.crt"),
                               "key_file": str(ca / "downloads.key"), "ca_dir": str(ca),
                               "broker_dir": str(etc),
                               "privacy": fleet.plan["clinics"][0]["config"]["privacy"]}
        fleet.aggregator_toml.write_text(to_toml(table))
        agg, stop, _ = start_aggregator(fleet)
        wait_for(lambda: agg.enrollment is not None, 30, "the enrollment endpoint")
        # each clinic: a token from the data team, one command on the device, its records
        for clinic in fleet.plan["clinics"]:
            capsys.readouterr()
            assert main(["aggregator", "invite", "--config", str(fleet.aggregator_toml),
                         "--device-id", clinic["id"]]) == 0
            token = tmp_path / f"{clinic['id']}.token"
            token.write_text(capsys.readouterr().out)
            dev = tmp_path / "devices" / clinic["id"]
            extra = {"agent": {"exit_when_done": False}}
            assert main(["edge", "enroll", "--token-file", str(token), "--dir", str(dev)]) == 0
            toml = dev / "agent.toml"
            assert main(["edge", "ingest", str(clinic["dir"] / "records.csv"), "--config",
                         str(toml)]) == 0
            toml.write_text(toml.read_text() + "\n" + to_toml(extra))
            clinic["dir"] = dev  # the fleet's agents now run from what enrollment wrote
        acl = (etc / "acl").read_text()
        assert "user clinic-1" in acl and "user clinic-2" in acl
        broker.send_signal(signal.SIGHUP)  # Mosquitto reads the rewritten ACL
        gates = []
        for i in range(2):
            agent, s, _ = start_agent(fleet, i, offline=True)  # nothing sent yet: swap its gate
            agent.transport = _DownAfterEachUpdate(agent.transport.inner)
            gates.append(agent.transport)
            stops.append(s)
        wait_for(lambda: len(agg.state.accepted(1)) == 2, 120, "both token-enrolled devices' "
                 "updates in round 1")
        wait_for(lambda: agg.state.current_round().round == 2, 30, "round 2 to open")
        # revocation: the device's certificate goes into the CRL, its key out of the aggregator
        capsys.readouterr()
        assert main(["aggregator", "revoke", "clinic-2", "--config",
                     str(fleet.aggregator_toml)]) == 0
        out = capsys.readouterr().out
        assert "revoked its broker certificate" in out and "restart Mosquitto" in out
        assert "user clinic-2" not in (etc / "acl").read_text()
        # Mosquitto still runs the old ACL: clinic-2's next update reaches the running aggregator
        gates[1].closed = False
        wait_for(lambda: agg.state.rejections(2).get("unknown_sender"), 60,
                 "the revoked device's round 2 update to be rejected")
        assert agg.state.db.execute("SELECT DISTINCT sender FROM rejections WHERE round = 2"
                                    ).fetchall() == [("clinic-2",)]
        gates[0].closed = False  # the other device's update is accepted, and the round closes
        wait_for(lambda: agg.state.get_round(2).status == "closed", 60, "round 2 to close")
        assert [u["sender"] for u in agg.state.accepted(2)] == ["clinic-1"]
        assert agg.state.get_round(2).result["accepted"] == 1
        broker.terminate()
        broker.wait(10)
        broker = _start(etc, log)  # Mosquitto reads its CRL at start
        _wait_port(port)
        cfg = load_agg(fleet.aggregator_toml)
        dev2 = tmp_path / "devices" / "clinic-2" / "tls"
        revoked = MqttTransport(MqttConfig(host="127.0.0.1", port=port,
                                           ca_file=dev2 / "ca.crt",
                                           cert_file=dev2 / "clinic-2.crt",
                                           key_file=dev2 / "clinic-2.key"),
                                client_id="clinic-2")
        try:
            assert not revoked.wait_connected(3), "a revoked certificate connected"
        finally:
            revoked.close()
        assert "clinic-2" not in {p.stem for p in cfg.devices.glob("*.pub")}
    finally:
        for s in [*stops, stop]:
            if s is not None:
                s.set()
        for t in fleet.threads:
            t.join(10)
        close_agents(fleet)
        if agg is not None:
            agg.close()
            agg.transport.close()
        broker.terminate()
        broker.wait(10)
