"""The paho transport itself, over both real brokers: delivery of an update-sized message, manual
acknowledgement, and the socket settings that keep large messages fast."""

from __future__ import annotations

import os
import socket
import time

import pytest

from bedside.transport.mqtt import MqttConfig, MqttTransport
from tests.brokers import start_embedded, start_mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request, tmp_path):
    b = (start_mosquitto(tmp_path / "mosquitto", ["clinic-1"], fleet="t")
         if request.param == "mosquitto" else start_embedded())
    yield b
    b.stop()


def test_large_message_round_trip_without_nagle(broker):
    sub = MqttTransport(broker.config("aggregator"), client_id="aggregator-t", manual_ack=True)
    pub = MqttTransport(broker.config("clinic-1"), client_id="clinic-1")
    try:
        assert sub.wait_connected(10) and pub.wait_connected(10)
        for t in (sub, pub):
            sock = t._client.socket()
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert not sub.wait_subscribed("bedside/v1/t/update/+", 0.2)  # not asked for yet
        sub.subscribe("bedside/v1/t/update/+", qos=1)
        assert sub.wait_subscribed("bedside/v1/t/update/+", 10)  # the broker's SUBACK
        body = os.urandom(200 * 1024)
        pub.publish("bedside/v1/t/update/clinic-1", body, qos=1)
        msg = sub.get(10)
        assert msg is not None and msg.payload == body and msg.topic.endswith("/clinic-1")
        msg.ack()
    finally:
        sub.close()
        pub.close()


def test_snapshot_dict_allows_changes_while_iterating():
    from bedside.transport.broker import SnapshotDict

    d = SnapshotDict(a=1, b=2)
    for k in d:
        d[k + "x"] = 0
    for k, _ in d.items():
        del d[k]
    assert d == {} and isinstance(d.keys(), list)


def test_embedded_broker_survives_clients_connecting_and_subscribing_together(caplog):
    """amqtt 0.11 iterates its subscription table across awaits when a client connects (to send
    retained messages); a client subscribing meanwhile used to kill the connecting client's
    session (see bedside.transport.broker). Reproduce the demo's start: retained messages, then
    many clients connecting and subscribing at once."""
    import logging

    caplog.set_level(logging.ERROR, logger="asyncio")
    b = start_embedded()
    clients = []
    try:
        owner = MqttTransport(b.config("aggregator"), client_id="aggregator", clean_session=True)
        assert owner.wait_connected(10)
        for i in range(30):
            owner.subscribe(f"bedside/v1/t/status/s{i}", qos=1)
            owner.publish(f"bedside/v1/t/status/s{i}", b"x", qos=1, retain=True)
        owner.publish("bedside/v1/t/round", b"announce", qos=1, retain=True)
        time.sleep(0.5)
        for wave in range(3):
            batch = [MqttTransport(b.config(f"c{wave}-{i}"), client_id=f"c{wave}-{i}",
                                   clean_session=True) for i in range(10)]
            for i, c in enumerate(batch):
                c.subscribe(f"bedside/v1/t/receipt/c{wave}-{i}", qos=1)
                c.subscribe("bedside/v1/t/round", qos=1)
            clients += batch
        assert all(c.wait_connected(10) for c in clients)
        got = [c.get(10) for c in clients]
        assert [m.topic if m else None for m in got] == ["bedside/v1/t/round"] * len(got)
        crashes = [r for r in caplog.records if "client_connected_cb" in r.getMessage()]
        assert not crashes, crashes[0].exc_info
        owner.close()
    finally:
        for c in clients:
            c.close()
        b.stop()


def _leave_persistent_session(b, filters: list[str]) -> None:
    """The aggregator's persistent session (client id agg-p) subscribed to ``filters``, then
    disconnected: the broker keeps the subscriptions."""
    agg = MqttTransport(b.config("aggregator"), client_id="agg-p", clean_session=False,
                        manual_ack=True)
    assert agg.wait_connected(10)
    for f in filters:
        agg.subscribe(f, qos=1)
    time.sleep(0.3)
    agg.close()


def test_queued_messages_reach_a_persistent_client_that_subscribes_late(tmp_path):
    """Mosquitto queues QoS 1 messages for an offline persistent session and sends them right
    after CONNACK, before the services call subscribe() again: they must reach the inbox (only
    stray *retained* messages are dropped)."""
    b = start_mosquitto(tmp_path / "mosquitto", ["clinic-1"], fleet="t")
    try:
        _leave_persistent_session(b, ["bedside/v1/t/update/+"])
        dev = MqttTransport(b.config("clinic-1"), client_id="clinic-1")
        assert dev.wait_connected(10)
        dev.publish("bedside/v1/t/update/clinic-1", b"queued", qos=1)
        time.sleep(0.3)
        dev.close()
        agg = MqttTransport(b.config("aggregator"), client_id="agg-p", clean_session=False,
                            manual_ack=True)
        assert agg.wait_connected(10)
        time.sleep(0.5)  # the queued message arrives before the late subscribe below
        agg.subscribe("bedside/v1/t/update/+", qos=1)
        msg = agg.get(10)
        assert msg is not None and msg.payload == b"queued" and not msg.retain
        msg.ack()
        agg.close()
    finally:
        b.stop()


def test_unsubscribe_removes_a_filter_from_a_persistent_session(tmp_path):
    """A coordinator that ran alone (subscribed to every update) and now has validator workers:
    its persistent session must stop getting updates, or each would be judged twice."""
    b = start_mosquitto(tmp_path / "mosquitto", ["clinic-1"], fleet="t")
    try:
        _leave_persistent_session(b, ["bedside/v1/t/update/+", "bedside/v1/t/report/+"])
        agg = MqttTransport(b.config("aggregator"), client_id="agg-p", clean_session=False,
                            manual_ack=True)
        agg.unsubscribe("bedside/v1/t/update/+")  # before the connection: sent once connected
        assert agg.wait_connected(10)
        time.sleep(0.5)
        dev = MqttTransport(b.config("clinic-1"), client_id="clinic-1")
        assert dev.wait_connected(10)
        dev.publish("bedside/v1/t/update/clinic-1", b"update", qos=1)
        dev.publish("bedside/v1/t/report/clinic-1", b"report", qos=1)
        msg = agg.get(10)
        assert msg is not None and msg.payload == b"report"  # the session kept this filter
        msg.ack()
        assert agg.get(1.0) is None  # and dropped that one
        dev.close()
        agg.close()
    finally:
        b.stop()


def test_embedded_broker_releases_its_port_when_stopped_with_clients_connected():
    b = start_embedded()
    clients = [MqttTransport(b.config(f"c{i}"), client_id=f"c{i}") for i in range(5)]
    assert all(c.wait_connected(10) for c in clients)
    b.stop()
    try:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", b.port)) != 0  # refused: nothing listens
    finally:
        for c in clients:
            c.close()


def test_full_inbox_drops_and_acknowledges_new_messages(broker, caplog):
    """A flood cannot grow the inbox past max_inbox_bytes. Dropped messages are acknowledged, so
    the broker's in-flight window (Mosquitto: 20 unacknowledged messages) never stalls delivery;
    once the consumer catches up, messages are queued again."""
    import dataclasses
    import logging

    from bedside.transport.mqtt import INBOX_MESSAGE_COST

    caplog.set_level(logging.WARNING, logger="bedside.transport.mqtt")
    size, room, sent = 1024, 10, 60
    cfg = dataclasses.replace(broker.config("aggregator"),
                              max_inbox_bytes=room * (size + INBOX_MESSAGE_COST))
    sub = MqttTransport(cfg, client_id="aggregator-full", manual_ack=True)
    pub = MqttTransport(broker.config("clinic-1"), client_id="clinic-1")
    try:
        assert sub.wait_connected(10) and pub.wait_connected(10)
        sub.subscribe("bedside/v1/t/update/+", qos=1)
        time.sleep(0.3)
        for i in range(sent):
            pub.publish("bedside/v1/t/update/clinic-1", bytes([i]) * size, qos=1)
        deadline = time.monotonic() + 20
        while sub.dropped + sub._inbox.qsize() < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sub._inbox.qsize() == room and sub.dropped == sent - room
        assert "inbox full" in caplog.text and "aggregator-full" in caplog.text
        kept = []
        while (m := sub.get(0.5)) is not None:
            kept.append(m.payload[0])
            m.ack()
        assert kept == list(range(room))  # the first ones, in order
        pub.publish("bedside/v1/t/update/clinic-1", b"after", qos=1)
        m = sub.get(10)
        assert m is not None and m.payload == b"after"
        m.ack()
        assert sub.dropped == sent - room
    finally:
        sub.close()
        pub.close()


def test_inbox_limit_is_checked():
    from bedside.errors import ConfigError
    from bedside.transport.mqtt import INBOX_MESSAGE_COST, MqttConfig

    with pytest.raises(ConfigError, match="max_inbox_bytes"):
        MqttConfig(max_inbox_bytes=INBOX_MESSAGE_COST - 1)


def test_a_device_certificate_cannot_borrow_an_identity_or_another_fleet(tmp_path):
    """Mosquitto with the shipped config and a generated ACL: a device cannot take over the
    aggregator's session by using its client id, cannot publish another device's updates, and
    cannot publish into another fleet."""
    from bedside.transport.pki import acl_text

    b = start_mosquitto(tmp_path / "mosquitto", ["clinic-1", "clinic-2", "observer"],
                        fleet="north", acl_extra="user observer\ntopic read bedside/v1/#\n")
    agg = obs = dev = None
    try:
        agg = MqttTransport(b.config("aggregator"), client_id="aggregator-north",
                            clean_session=False, manual_ack=True)
        obs = MqttTransport(b.config("observer"), client_id="observer")
        assert agg.wait_connected(10) and obs.wait_connected(10)
        agg.subscribe("bedside/v1/north/update/+", qos=1)
        obs.subscribe("bedside/v1/#", qos=1)
        time.sleep(0.3)
        # clinic-1's certificate, presenting the aggregator's client id
        dev = MqttTransport(b.config("clinic-1"), client_id="aggregator-north")
        assert dev.wait_connected(10)
        time.sleep(0.5)
        assert agg.connected, "the device took over the aggregator's session"
        dev.publish("bedside/v1/north/update/clinic-1", b"mine", qos=1)
        dev.publish("bedside/v1/north/update/clinic-2", b"someone else's", qos=1)
        dev.publish("bedside/v1/south/update/clinic-1", b"another fleet", qos=1)
        got = []
        while (m := obs.get(2)) is not None:
            got.append((m.topic, m.payload))
        assert got == [("bedside/v1/north/update/clinic-1", b"mine")]
        m = agg.get(5)
        assert m is not None and m.payload == b"mine"
        m.ack()
    finally:
        for t in (agg, obs, dev):
            if t is not None:
                t.close()
        b.stop()
    assert "user aggregator" in acl_text("north", ["clinic-1"])
    with pytest.raises(Exception, match="reserved"):
        acl_text("north", ["aggregator"])


def test_a_device_cannot_take_over_another_devices_session(tmp_path, caplog):
    """Device A (certificate clinic-1) connecting with B's client id 'clinic-2' is connected as
    itself (use_username_as_clientid): B keeps its connection and its messages, and the
    persistent session A opened is clinic-1's, which the real clinic-1 finds again."""
    import logging

    caplog.set_level(logging.WARNING, logger="bedside.transport.mqtt")
    b = start_mosquitto(tmp_path / "mosquitto", ["clinic-1", "clinic-2"], fleet="north")
    mine, theirs = "bedside/v1/north/receipt/clinic-1", "bedside/v1/north/receipt/clinic-2"
    clients = []

    def client(who, cid):
        t = MqttTransport(b.config(who), client_id=cid, clean_session=False)
        clients.append(t)
        assert t.wait_connected(10)
        return t

    try:
        agg = client("aggregator", "aggregator-north")
        dev_b = client("clinic-2", "clinic-2")
        dev_b.subscribe(theirs, qos=1)
        assert dev_b.wait_subscribed(theirs, 10)
        dev_a = client("clinic-1", "clinic-2")  # B's client id, A's certificate
        dev_a.subscribe(mine, qos=1)
        assert dev_a.wait_subscribed(mine, 10)
        time.sleep(1.5)  # a takeover drops B at once (and each then takes the session back)
        agg.publish(theirs, b"for B", qos=1)
        m = dev_b.get(5)
        assert m is not None and m.payload == b"for B"
        assert dev_b.connected and dev_a.connected
        lost = [r.getMessage() for r in caplog.records if "connection lost" in r.getMessage()]
        assert lost == [], "a connection was taken over"
        dev_a.close()
        agg.publish(mine, b"for A", qos=1)  # queued for A's session while it is away
        real_a = client("clinic-1", "clinic-1")
        m = real_a.get(10)
        assert m is not None and m.payload == b"for A", "A's session was not clinic-1's"
    finally:
        for c in clients:
            c.close()
        b.stop()


def test_a_revoked_device_certificate_is_refused_by_mosquitto(tmp_path, capsys):
    """``bedside broker revoke`` rewrites the CA's CRL, which the shipped Mosquitto config
    honours: after a restart the revoked device cannot connect; the others still can."""
    from bedside.cli import main

    b = start_mosquitto(tmp_path / "mosquitto", ["clinic-1", "clinic-2"])
    clients = []
    try:
        before = MqttTransport(b.config("clinic-1"), client_id="clinic-1")
        clients.append(before)
        assert before.wait_connected(10)
        assert main(["broker", "revoke", "--out", str(b.certs), "--identity", "clinic-1"]) == 0
        assert "restart or reload Mosquitto" in capsys.readouterr().out
        before.close()
        b.kill()
        b.restart()
        revoked = MqttTransport(b.config("clinic-1"), client_id="clinic-1")
        other = MqttTransport(b.config("clinic-2"), client_id="clinic-2")
        clients += [revoked, other]
        assert other.wait_connected(10)
        assert not revoked.wait_connected(3)
    finally:
        for c in clients:
            c.close()
        b.stop()


def test_an_unreachable_broker_is_reported_at_once_and_at_every_retry(caplog):
    """Clinic IT sees at once that the agent cannot reach its broker (not 40 s of silence)."""
    import logging

    from bedside.transport import free_port

    caplog.set_level(logging.WARNING, logger="bedside.transport.mqtt")
    t = MqttTransport(MqttConfig(port=free_port()), client_id="lonely")
    try:
        deadline = time.monotonic() + 15
        while t.failed_attempts < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert t.failed_attempts >= 2 and not t.connected
        lines = [r.getMessage() for r in caplog.records
                 if r.getMessage().startswith(f"{t.cfg.describe()}: cannot reach")]
        assert "attempt 1" in lines[0] and "attempt 2" in lines[1]
    finally:
        t.close()


def test_mosquitto_from_the_generated_config_refuses_strangers(tmp_path, capsys):
    """``bedside broker config`` writes a directory Mosquitto starts from: a device with its
    certificate connects; no certificate, a certificate of another CA and plaintext MQTT on the
    TLS port are refused; subscribing to another device's receipts delivers nothing."""
    import subprocess

    from bedside.cli import main
    from bedside.transport import free_port
    from bedside.transport.pki import create_fleet
    from tests.brokers import _wait_port, mosquitto_binary

    ca = create_fleet(tmp_path / "ca", ["aggregator", "clinic-1", "clinic-2"], ["127.0.0.1"])
    other = create_fleet(tmp_path / "other-ca", ["clinic-1"], ["127.0.0.1"])
    port = free_port()
    out = tmp_path / "etc"
    assert main(["broker", "config", "--fleet", "north", "--device", "clinic-1", "--device",
                 "clinic-2", "--ca", str(ca), "--out", str(out), "--listen",
                 f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data"),
                 "--broker-group", ""]) == 0
    assert "mosquitto.conf" in capsys.readouterr().out
    (tmp_path / "data").mkdir()
    conf = (out / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "require_certificate true" in conf
    assert f"listener {port} 127.0.0.1" in conf and conf.count("listener ") == 1
    if os.geteuid() == 0:  # tests only: Mosquitto would drop to a user who cannot enter tmp_path
        (out / "mosquitto.conf").write_text("user root\n" + conf)
    log = tmp_path / "mosquitto.log"
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(out / "mosquitto.conf")],
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    clients = []

    def client(ca_dir, who, cid):
        cfg = MqttConfig(host="127.0.0.1", port=port, ca_file=ca_dir / "ca.crt",
                         cert_file=ca_dir / f"{who}.crt" if who else None,
                         key_file=ca_dir / f"{who}.key" if who else None)
        t = MqttTransport(cfg, client_id=cid)
        clients.append(t)
        return t

    try:
        _wait_port(port)
        ok = client(ca, "clinic-1", "clinic-1")
        assert ok.wait_connected(10)
        assert not client(ca, None, "anonymous").wait_connected(3)
        assert not client(other, "clinic-1", "clinic-1-forged").wait_connected(3)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # MQTT CONNECT
            s.sendall(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 0]))
            s.settimeout(5)
            try:
                reply = s.recv(4)
            except (ConnectionError, TimeoutError, OSError):
                reply = b""
            assert not reply.startswith(b"\x20")  # no CONNACK over plaintext
        peer = client(ca, "clinic-2", "clinic-2")
        assert peer.wait_connected(10)
        ok.subscribe("bedside/v1/north/receipt/clinic-2", qos=1)  # not clinic-1's to read
        agg = client(ca, "aggregator", "aggregator")
        assert agg.wait_connected(10)
        time.sleep(0.3)
        agg.publish("bedside/v1/north/receipt/clinic-2", b"for clinic-2 only", qos=1)
        assert ok.get(2) is None
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        proc.wait(10)


def test_an_explicit_plaintext_listener_is_loopback_only_and_needs_a_password(tmp_path, capsys):
    """``--plaintext-loopback PORT``: a listener without TLS, on 127.0.0.1 only, for tools on the
    broker's machine; anonymous clients are refused, a user from the password file connects
    (and the ACL still applies to it)."""
    import subprocess

    from bedside.cli import main
    from bedside.transport import free_port
    from bedside.transport.pki import create_fleet
    from tests.brokers import _wait_port, mosquitto_binary

    ca = create_fleet(tmp_path / "ca", ["aggregator", "clinic-1"], ["127.0.0.1"])
    tls_port, plain_port = free_port(), free_port()
    out = tmp_path / "etc"
    assert main(["broker", "config", "--fleet", "north", "--device", "clinic-1", "--ca", str(ca),
                 "--out", str(out), "--listen", f"127.0.0.1:{tls_port}", "--data-dir",
                 str(tmp_path / "data"), "--broker-group", "",
                 "--plaintext-loopback", str(plain_port)]) == 0
    conf = (out / "mosquitto.conf").read_text()
    assert f"listener {plain_port} 127.0.0.1" in conf and conf.count("listener ") == 2
    (tmp_path / "data").mkdir()
    subprocess.run(["mosquitto_passwd", "-b", str(out / "passwd"), "monitor", "s3cret-pw"],
                   check=True, capture_output=True)
    acl = (out / "acl").read_text() + "\nuser monitor\ntopic read bedside/v1/north/round\n"
    (out / "acl").write_text(acl)
    if os.geteuid() == 0:
        (out / "mosquitto.conf").write_text("user root\n" + conf)
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(out / "mosquitto.conf")],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "log").open("wb"))
    clients = []
    try:
        _wait_port(plain_port)
        _wait_port(tls_port)
        anonymous = MqttTransport(MqttConfig(port=plain_port), client_id="anon")
        wrong = MqttTransport(MqttConfig(port=plain_port, username="monitor", password="nope"),
                              client_id="wrong")
        good = MqttTransport(MqttConfig(port=plain_port, username="monitor",
                                        password="s3cret-pw"), client_id="monitor")
        device = MqttTransport(MqttConfig(port=tls_port, ca_file=ca / "ca.crt",
                                          cert_file=ca / "clinic-1.crt",
                                          key_file=ca / "clinic-1.key"), client_id="clinic-1")
        clients += [anonymous, wrong, good, device]
        assert good.wait_connected(10) and device.wait_connected(10)
        assert not anonymous.wait_connected(2) and not wrong.wait_connected(1)
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        proc.wait(10)
