"""Enrollment in one step: tokens, the HTTPS endpoint (pinned), offline bundles, the device."""

from __future__ import annotations

import hashlib
import json
import ssl
import time
from pathlib import Path

import pytest

from bedside.cli import main
from bedside.enrollment import Package, Token, parse_duration, request_body
from bedside.errors import InputError
from bedside.transport import free_port
from tests.fleet import mem_fleet, wait_for


def _token(**kw: object) -> Token:
    base = {"fleet": "demo", "device_id": "clinic-9", "aggregator": "ab" * 8, "ttl": 3600.0}
    return Token.new(**{**base, **kw})  # type: ignore[arg-type]


def test_a_token_is_one_line_that_round_trips_and_names_what_is_wrong():
    tok = _token(url="https://10.0.0.5:8471", tls_sha256="0" * 64, group="icu")
    line = tok.encode()
    assert "\n" not in line and " " not in line
    assert Token.parse("  " + line + "\n") == tok
    with pytest.raises(InputError, match="not a Bedside enrollment token"):
        Token.parse("hello")
    with pytest.raises(InputError, match="damaged"):
        Token.parse(line[:-12])
    with pytest.raises(InputError, match="damaged"):
        Token.parse(line[:30] + "!!!" + line[33:])
    with pytest.raises(InputError, match="expired"):
        _token(ttl=60.0, now=time.time() - 120).check_expiry()
    assert parse_duration("24h") == 86400 and parse_duration("30m") == 1800
    for bad in ("forever", "10s", "90d"):
        with pytest.raises(InputError, match="--expires"):
            parse_duration(bad)


@pytest.fixture
def tls_fleet(tmp_path):
    """A federation (in-memory transport) whose aggregator serves enrollment over HTTPS."""
    from bedside.transport.pki import create_fleet, issue

    ca = create_fleet(tmp_path / "ca", ["aggregator"], ["127.0.0.1"])
    issue(ca, "downloads", server_hosts=["127.0.0.1"])
    port = free_port()
    enrollment = {"port": port, "cert_file": str(ca / "downloads.crt"),
                  "key_file": str(ca / "downloads.key"), "ca_dir": str(ca),
                  "broker": "127.0.0.1:8883", "privacy": {"record_epsilon": 8.0}}
    mf = mem_fleet(tmp_path / "fed", clients=2, rounds=2,
                   aggregator={"enrollment": enrollment})
    mf.ca = ca  # type: ignore[attr-defined]
    yield mf
    mf.aggregator.close()


def _invite(mf, device: str, *extra: str, capsys) -> str:
    capsys.readouterr()
    rc = main(["aggregator", "invite", "--config", str(mf.fleet.aggregator_toml),
               "--device-id", device, *extra])
    assert rc == 0
    return capsys.readouterr().out.strip()


def test_a_device_enrolled_by_token_is_configured_has_the_model_and_takes_part(tls_fleet, tmp_path,
                                                                             capsys):
    from bedside.edge.agent import Agent
    from bedside.edge.config import load as load_agent
    from bedside.transport.memory import MemoryTransport
    from bedside.wire.signing import VerifyKey

    mf = tls_fleet
    line = _invite(mf, "clinic-9", "--group", "icu", capsys=capsys)
    tok = Token.parse(line)
    assert tok.url.startswith("https://127.0.0.1:")
    der = ssl.PEM_cert_to_DER_cert((mf.ca / "downloads.crt").read_text())
    assert tok.tls_sha256 == hashlib.sha256(der).hexdigest()
    token_file = tmp_path / "token.txt"
    token_file.write_text(line + "\n")
    dev = tmp_path / "device"
    rc = main(["edge", "enroll", "--token-file", str(token_file), "--dir", str(dev), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    info = json.loads(out.out)
    assert info["device_id"] == "clinic-9" and info["tls"] and info["model_version"] == 1
    cfg = load_agent(dev / "agent.toml")
    assert cfg.mqtt.cert_file is not None and cfg.mqtt.ca_file is not None
    assert cfg.privacy.record_epsilon == 8.0
    # the pinned key is the aggregator's; the device's key is enrolled; its certificate CN
    agg_pub = VerifyKey.load(mf.fleet.plan["aggregator_dir"] / "keys" / "aggregator.pub")
    assert VerifyKey.load(cfg.aggregator_key) == agg_pub
    enrolled = VerifyKey.load(mf.fleet.plan["aggregator_dir"] / "keys" / "devices" /
                              "clinic-9.pub")
    assert enrolled.fingerprint == info["fingerprint"]
    from bedside.transport.pki import certificate_cn

    assert certificate_cn(Path(cfg.mqtt.cert_file).read_text()) == "clinic-9"
    assert (mf.ca / "clinic-9.crt").exists() and not (mf.ca / "clinic-9.key").exists()
    assert (dev / "keys" / "clinic-9.key").stat().st_mode & 0o077 == 0
    assert (dev / "tls" / "clinic-9.key").stat().st_mode & 0o077 == 0
    # ingest works before the agent ever ran: the model (and its schema) is installed
    csv = mf.fleet.plan["clinics"][0]["dir"] / "records.csv"
    rc = main(["edge", "ingest", str(csv), "--config", str(dev / "agent.toml")])
    assert rc == 0, capsys.readouterr().err
    # the group joins the release targets
    from bedside.aggregator.config import load as load_agg
    from bedside.aggregator.enrollment import enrolled_groups

    assert enrolled_groups(load_agg(mf.fleet.aggregator_toml))["icu"] == ["clinic-9"]
    # running twice is harmless; the token is used up
    assert main(["edge", "enroll", "--token-file", str(token_file), "--dir", str(dev)]) == 0
    assert "already" in capsys.readouterr().out
    rc = main(["edge", "enroll", "--token-file", str(token_file), "--dir", str(tmp_path / "d2")])
    assert rc != 0 and "was used" in capsys.readouterr().err
    # and it takes part in the next round (the service reloads its enrolled devices)
    agent = Agent(cfg, MemoryTransport(mf.broker, "clinic-9", clean_session=False),
                  clock=mf.clock)
    agent.start()
    mf.agents.append(agent)
    mf.run()
    accepted = {r["sender"] for r in mf.aggregator.state.accepted(2)}
    assert "clinic-9" in accepted, accepted


def test_forged_expired_and_other_device_tokens_are_refused_with_clear_errors(tls_fleet,
                                                                            tmp_path, capsys):
    from dataclasses import replace

    from bedside.edge.enroll import enroll

    mf = tls_fleet
    tok = Token.parse(_invite(mf, "clinic-9", capsys=capsys))
    forged = replace(tok, secret=_token().secret)
    with pytest.raises(InputError, match="not issued by this aggregator"):
        enroll(forged, tmp_path / "a")
    other = replace(tok, device_id="clinic-8")
    with pytest.raises(InputError, match="enrols clinic-9, not clinic-8"):
        enroll(other, tmp_path / "b")
    short = Token.parse(_invite(mf, "clinic-7", "--expires", "1m", capsys=capsys))
    from bedside.aggregator.config import load as load_agg
    from bedside.aggregator.enrollment import Enroller
    from bedside.enrollment import EnrollRequest
    from bedside.transport.pki import make_csr
    from bedside.wire.signing import SigningKey

    enroller = Enroller(load_agg(mf.fleet.aggregator_toml))
    csr = make_csr("clinic-7")[1]
    req = EnrollRequest.parse(request_body(short, SigningKey.generate().public.to_text(), csr))
    with pytest.raises(InputError, match="expired"):
        enroller.enroll(req, now=time.time() + 120)
    enroller.close()
    # a device checks expiry itself before contacting anyone
    with pytest.raises(InputError, match="expired"):
        enroll(replace(tok, expires=time.time() - 1), tmp_path / "c")
    # a failed attempt leaves the genuine token usable
    assert enroll(tok, tmp_path / "d")["device_id"] == "clinic-9"


def test_a_device_refuses_an_endpoint_that_is_not_the_pinned_one(tls_fleet, tmp_path, capsys):
    """A machine in the middle (another certificate on the token's address) gets nothing."""
    from dataclasses import replace

    from bedside.edge.enroll import enroll

    mf = tls_fleet
    tok = Token.parse(_invite(mf, "clinic-9", capsys=capsys))
    with pytest.raises(InputError, match="another certificate than the one the token pins"):
        enroll(replace(tok, tls_sha256="1" * 64), tmp_path / "a")
    assert not (mf.fleet.plan["aggregator_dir"] / "keys" / "devices" / "clinic-9.pub").exists()
    # an aggregator key other than the token's is refused after the answer
    with pytest.raises(InputError, match="not the aggregator the data team meant"):
        enroll(replace(tok, aggregator="cd" * 8), tmp_path / "b")


def test_an_offline_bundle_enrols_without_an_endpoint(tls_fleet, tmp_path, capsys):
    from bedside.edge.config import load as load_agent

    mf = tls_fleet
    bundle = tmp_path / "clinic-9.bundle"
    rc = main(["aggregator", "invite", "--config", str(mf.fleet.aggregator_toml), "--device-id",
               "clinic-9", "--offline", "--out", str(bundle)])
    assert rc == 0, capsys.readouterr().err
    assert bundle.stat().st_mode & 0o077 == 0
    assert (mf.fleet.plan["aggregator_dir"] / "keys" / "devices" / "clinic-9.pub").exists()
    capsys.readouterr()
    rc = main(["edge", "enroll", "--token-file", str(bundle), "--dir", str(tmp_path / "dev")])
    out = capsys.readouterr().out
    assert rc == 0 and "destroy it now" in out
    cfg = load_agent(tmp_path / "dev" / "agent.toml")
    assert cfg.mqtt.cert_file is not None
    # a tampered bundle (another model file) is refused
    raw = json.loads(bundle.read_text())
    raw["model"] = raw["model"][:-8] + "AAAAAAAA"
    tampered = tmp_path / "t.bundle"
    tampered.write_text(json.dumps(raw))
    rc = main(["edge", "enroll", "--token-file", str(tampered), "--dir", str(tmp_path / "t")])
    assert rc != 0 and "does not match its signed release" in capsys.readouterr().err


def test_an_invite_needs_an_endpoint_or_offline_and_an_unenrolled_device(tmp_path, capsys):
    mf = mem_fleet(tmp_path / "fed", clients=2, rounds=1)
    toml = str(mf.fleet.aggregator_toml)
    assert main(["aggregator", "invite", "--config", toml, "--device-id", "clinic-9"]) == 2
    assert "[enrollment] port is 0" in capsys.readouterr().err
    assert main(["aggregator", "invite", "--config", toml, "--device-id", "clinic-1",
                 "--offline", "--out", str(tmp_path / "b")]) == 2
    assert "enrolled already" in capsys.readouterr().err


def test_the_endpoint_refuses_junk_and_oversized_requests(tls_fleet):
    import http.client

    mf = tls_fleet
    port = mf.aggregator.enrollment.port
    ctx = ssl.create_default_context(cafile=str(mf.ca / "ca.crt"))
    for body, status in ((b"not json", 400), (b"x" * 70_000, 413),
                         (json.dumps({"token_id": "0" * 32, "secret": "x", "device_id": "a",
                                      "public_key": "junk"}).encode(), 400)):
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        conn.putrequest("POST", "/v1/enroll")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if status != 413:  # an oversized body is refused on its length, before it is read
            conn.send(body)  # (sending it would race the server's close)
        resp = conn.getresponse()
        assert resp.status == status, (body[:20], resp.status)
        assert "error" in json.loads(resp.read())
        conn.close()
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    conn.request("GET", "/v1/enroll")
    assert conn.getresponse().status == 501
    conn.close()


def test_package_json_round_trip():
    pkg = Package(fleet="demo", device_id="clinic-1", aggregator_key="k", broker_host="h",
                  broker_port=8883, release=b"\x00\x01", model=b"onnx", privacy={"a": 1})
    assert Package.from_json(pkg.to_json(), "x") == pkg
    with pytest.raises(InputError, match="missing or malformed"):
        Package.from_json(b'{"fleet": "demo"}', "x")


def test_the_aggregator_service_serves_enrollment_only_while_running(tls_fleet):
    mf = tls_fleet
    port = mf.aggregator.enrollment.port
    mf.aggregator.close()
    wait_for(lambda: _refused(port), 5, "the endpoint to close")


def _refused(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_an_aggregator_suggests_budgets_only_never_the_devices_safeguards(tmp_path, capsys):
    """A hostile suggestion (train without DP-SGD, accept any noise) is not written into the
    device's configuration; the CLI says what it ignored."""
    from bedside.edge.config import load as load_agent
    from bedside.edge.enroll import suggested_privacy

    taken, ignored = suggested_privacy({"record_epsilon": 8, "allow_no_record_dp": True,
                                        "accept_noise": ["none"], "device_epsilon": 1e9,
                                        "record_delta": True, "x\n[agent]": 1})
    assert taken == {"record_epsilon": 8.0}
    assert ignored == ["accept_noise", "allow_no_record_dp", "device_epsilon", "record_delta",
                       "x\n[agent]"]
    mf = mem_fleet(tmp_path / "fed", clients=2, rounds=1, aggregator={"enrollment": {
        "port": free_port(), "privacy": {"record_epsilon": 3.0, "allow_no_record_dp": True,
                                         "min_statistics_noise": 1e-9}}})
    try:
        line = _invite(mf, "clinic-9", capsys=capsys)
        assert main(["edge", "enroll", "--token", line, "--dir", str(tmp_path / "d")]) == 0
        out = capsys.readouterr().out
        assert "record_epsilon 3.0" in out
        assert "ignored from the federation's suggestion" in out and "allow_no_record_dp" in out
        cfg = load_agent(tmp_path / "d" / "agent.toml")
        assert cfg.privacy.record_epsilon == 3.0 and not cfg.privacy.allow_no_record_dp
    finally:
        mf.aggregator.close()


def test_replacing_a_device_revokes_its_old_certificate_and_tokens_can_be_voided(tls_fleet,
                                                                                tmp_path,
                                                                                capsys):
    from bedside.edge.enroll import enroll
    from bedside.transport.pki import revoked

    mf = tls_fleet
    first = Token.parse(_invite(mf, "clinic-9", capsys=capsys))
    enroll(first, tmp_path / "old")
    old_serial = _serial(mf.ca / "clinic-9.crt")
    assert main(["aggregator", "invite", "--config", str(mf.fleet.aggregator_toml),
                 "--device-id", "clinic-9"]) == 2
    assert "--replace" in capsys.readouterr().err
    second = Token.parse(_invite(mf, "clinic-9", "--replace", capsys=capsys))
    enroll(second, tmp_path / "new")
    assert old_serial in {int(str(e["serial"])) for e in revoked(mf.ca)}
    assert _serial(mf.ca / "clinic-9.crt") != old_serial
    # a newer invite voids the older unused one; revoke voids what is left
    a = Token.parse(_invite(mf, "clinic-8", capsys=capsys))
    b = Token.parse(_invite(mf, "clinic-8", capsys=capsys))
    with pytest.raises(InputError, match="superseded"):
        enroll(a, tmp_path / "a")
    assert main(["aggregator", "revoke", "clinic-8", "--config",
                 str(mf.fleet.aggregator_toml)]) == 0
    assert "1 unused enrollment token(s)" in capsys.readouterr().out
    with pytest.raises(InputError, match="device revoked"):
        enroll(b, tmp_path / "b")


def _serial(path: Path) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_a_device_that_lost_the_answer_enrols_again_with_the_same_token(tls_fleet, tmp_path,
                                                                      capsys):
    """The token is used, but the same device key may fetch its package again before expiry."""
    from bedside.edge.enroll import enroll

    mf = tls_fleet
    tok = Token.parse(_invite(mf, "clinic-9", capsys=capsys))
    d = tmp_path / "dev"
    enroll(tok, d)
    (d / "agent.toml").unlink()  # as if it failed after the answer arrived
    again = enroll(tok, d)
    assert again["device_id"] == "clinic-9" and not again["already"]
    # another key with the same token is still refused
    with pytest.raises(InputError, match="was used"):
        enroll(tok, tmp_path / "other")


def test_one_address_cannot_hold_every_connection_of_the_endpoint(tls_fleet):
    import socket

    from bedside.httpd import MAX_PER_CLIENT

    port = tls_fleet.aggregator.enrollment.port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_PER_CLIENT)]
    try:
        extra = socket.create_connection(("127.0.0.1", port))
        extra.settimeout(5)
        assert extra.recv(1) == b""  # closed at once
        extra.close()
    finally:
        for s in idle:
            s.close()


def test_a_token_pins_the_leaf_of_a_certificate_chain(tls_fleet, tmp_path):
    from dataclasses import replace

    from bedside.aggregator.config import load as load_agg
    from bedside.aggregator.enrollment import _endpoint_pin

    mf = tls_fleet
    cfg = load_agg(mf.fleet.aggregator_toml)
    chain = tmp_path / "chain.pem"
    chain.write_bytes((mf.ca / "downloads.crt").read_bytes() + (mf.ca / "ca.crt").read_bytes())
    leaf = _endpoint_pin(cfg)
    assert _endpoint_pin(replace(cfg, enrollment=replace(cfg.enrollment, cert_file=chain))) \
        == leaf
