"""The paho transport itself, over both real brokers: delivery of an update-sized message, manual
acknowledgement, and the socket settings that keep large messages fast."""

from __future__ import annotations

import os
import socket
import time

import pytest

from bedside.transport.mqtt import MqttTransport
from tests.brokers import start_embedded, start_mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request, tmp_path):
    b = (start_mosquitto(tmp_path / "mosquitto", ["clinic-1"]) if request.param == "mosquitto"
         else start_embedded())
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
        sub.subscribe("bedside/v1/t/update/+", qos=1)
        time.sleep(0.3)  # let the subscription reach the broker
        body = os.urandom(200 * 1024)
        pub.publish("bedside/v1/t/update/clinic-1", body, qos=1)
        msg = sub.get(10)
        assert msg is not None and msg.payload == body and msg.topic.endswith("/clinic-1")
        msg.ack()
    finally:
        sub.close()
        pub.close()
