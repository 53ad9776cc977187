"""Fixtures shared by the federation unit tests."""

from __future__ import annotations

import pytest

from bedside.transport.memory import MemoryTransport


@pytest.fixture
def traffic(monkeypatch):
    """Every message published on the in-memory broker, with the client that published it:
    (client id, topic, payload)."""
    sent: list[tuple[str, str, bytes]] = []
    publish = MemoryTransport.publish

    def recording(self, topic, payload, **kw):
        publish(self, topic, payload, **kw)
        sent.append((self.client_id, topic, bytes(payload)))

    monkeypatch.setattr(MemoryTransport, "publish", recording)
    return sent
