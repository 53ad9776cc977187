"""The federation on real Flower processes (issue 12): a SuperLink and one SuperNode per clinic on
127.0.0.1, started with Bedside's own commands, the federation submitted with ``flwr run``.

Flower's Deployment Engine starts a ClientApp process for every message (and polls every few
seconds), so a round costs seconds here; the protocol's edge cases run over an in-memory Grid in
tests/unit/federation/test_flower.py."""

from __future__ import annotations

import json
import socket
import ssl

import pytest

from bedside.aggregator.state import State
from bedside.models.registry import Registry
from bedside.privacy.ledger import Ledger
from tests.fleet import make_fleet
from tests.flower import FlowerProcesses, set_flower

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _statuses(fleet):
    d = fleet.plan["aggregator_dir"] / "data" / "flower" / "status"
    return {f.stem: json.loads(f.read_text()) for f in d.glob("*.json")}


def test_wdbc_rounds_over_flower_with_a_device_that_refuses(tmp_path):
    """The statistics round (every clinic adds its own noise), then a training round with
    central noise and record-level DP-SGD at epsilon 8: two clinics train; the third accepts
    only local noise and declines it with reason 'policy', releasing nothing in it."""
    fleet = make_fleet(tmp_path / "fleet", clients=3, rounds=1, statistics=True,
                       aggregator={"rounds": {"min_participants": 2}})
    fleet.plan["clinics"][2]["config"]["privacy"]["accept_noise"] = ["local"]
    set_flower(fleet)
    procs = FlowerProcesses(fleet, tmp_path / "logs")
    try:
        procs.start()
        done = procs.run()
        # then someone who can reach the SuperLink submits an app of their own
        hostile = procs.run(app=_hostile_app(tmp_path / "hostile"))
    finally:
        procs.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert hostile.returncode == 0, hostile.stdout[-3000:] + hostile.stderr[-3000:]
    assert not list((tmp_path / "hostile").glob("ran-*")), "a submitted app's code ran"
    rounds = State(fleet.plan["aggregator_dir"] / "data" / "state.db").rounds()
    assert [(r.settings.task, r.status) for r in rounds] == [
        ("statistics", "closed"), ("train", "closed")]
    assert [r.result["accepted"] for r in rounds] == [3, 2]
    assert [r.result["declined"] for r in rounds] == [{}, {"clinic-3": "policy"}]
    # the privacy report: both epsilons, from the devices' ledgers and the aggregator's accountant
    registry = Registry(fleet.plan["aggregator_dir"] / "data" / "registry")
    final = registry.manifest(registry.latest())
    assert registry.latest() == 3
    assert final.privacy["epsilon"] > 0 and final.privacy["delta"] == pytest.approx(1e-5)
    record = rounds[-1].result["record_epsilon"]
    assert 0 < record["max"] <= 8.0 and record["devices"] == 2
    assert final.metrics["holdout"]["accuracy"] > 0.6
    for i, released_in in ((0, {1, 2}), (1, {1, 2}), (2, {1})):
        ledger = Ledger(fleet.plan["clinics"][i]["dir"] / "data" / "ledger.db", {})
        assert {r.round for r in ledger.releases("record")} == released_in
        assert 0 < ledger.spent("record") <= 8.0
        ledger.close()
    # every device runs the final model, and says so in the status the ServerApp wrote
    statuses = _statuses(fleet)
    assert statuses["aggregator"]["state"] == "done"
    assert {d: statuses[d]["model_version"] for d in fleet.clinic_ids} == {
        d: 3 for d in fleet.clinic_ids}


def _hostile_app(d):
    """An app whose ServerApp and ClientApp leave a mark where they run: Bedside's SuperLink and
    SuperNodes must never import it (they run Bedside's apps, whatever is submitted)."""
    d.mkdir(parents=True)
    for side, cls in (("server", "from flwr.serverapp import ServerApp as App"),
                      ("client", "from flwr.clientapp import ClientApp as App")):
        (d / f"evil_{side}.py").write_text(
            f"import pathlib\npathlib.Path({str(d / f'ran-{side}')!r}).write_text('code ran')\n"
            f"{cls}\napp = App()\n")
    (d / "pyproject.toml").write_text(
        '[project]\nname = "evil"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "evil"\n\n[tool.flwr.app.components]\n'
        'serverapp = "evil_server:app"\nclientapp = "evil_client:app"\n')
    return d


def test_flower_with_tls_and_a_self_signed_ca(tmp_path):
    from bedside.transport.pki import create_fleet

    certs = create_fleet(tmp_path / "certs", [], ["127.0.0.1", "localhost"])
    fleet = make_fleet(tmp_path / "fleet", clients=2, rounds=1)
    port = set_flower(fleet, tls=certs)
    procs = FlowerProcesses(fleet, tmp_path / "logs")
    try:
        procs.start()
        # the SuperLink speaks TLS with the certificate our CA signed, and nothing else
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        with socket.create_connection(("127.0.0.1", port), 10) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() is not None
        with socket.create_connection(("127.0.0.1", port), 10) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert not raw.recv(64).startswith(b"HTTP/")
        done = procs.run()
    finally:
        procs.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rounds = State(fleet.plan["aggregator_dir"] / "data" / "state.db").rounds()
    assert [(r.status, r.result["accepted"]) for r in rounds] == [("closed", 2)]
