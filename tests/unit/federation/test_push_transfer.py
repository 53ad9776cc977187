"""Models larger than one message: hashed chunks from the aggregator's download endpoint, resumed
after a cut, refused when tampered; swaps under a concurrent inference loop; the CLI."""

from __future__ import annotations

import json

import pytest

from bedside.aggregator.releases import DownloadServer, make_release
from bedside.aggregator.rollout import PushOptions, stage_push
from bedside.cli import main
from bedside.demo.run import to_toml
from bedside.edge.releases import Download, check_url
from bedside.errors import IntegrityError, TransportError
from bedside.federation.release import Target
from bedside.manifest import load_manifest, verify_model_file
from bedside.models.registry import Registry
from bedside.transport import free_port
from bedside.wire.envelope import peek
from tests.fleet import mem_fleet, wait_for
from tests.release_tools import InferenceLoop, drive, other_model, stores


@pytest.fixture()
def served(tmp_path, exported):
    """A registry holding one model, served in 1 KiB chunks on a loopback port."""
    src = exported("logreg", "wdbc")
    reg = Registry(tmp_path / "registry")
    m = load_manifest(src)
    data = verify_model_file(src, m)
    reg.add(data, m)
    server = DownloadServer(reg.root / "objects", "demo", "127.0.0.1", free_port(), 1024).start()
    rel = make_release(counter=1, manifest=m, model_bytes=data, origin="push",
                       target=Target("all", None), max_message_bytes=1024, chunk_bytes=1024,
                       url=f"http://127.0.0.1:{server.port}", golden=None)
    yield rel, data, reg, server
    server.close()


def test_a_cut_download_resumes_and_completes(tmp_path, served):
    rel, data, _, _ = served
    assert len(rel.chunks) > 3
    d = Download(tmp_path / "dl", rel, "demo")
    assert not d.step(max_chunks=2)
    assert d.done == 2
    with open(d.path, "ab") as f:
        f.write(b"half a chunk")  # the process died while writing chunk 3
    again = Download(tmp_path / "dl", rel, "demo")  # after a restart
    assert again.done == 2 and again.path.stat().st_size == 2 * 1024
    while not again.step():
        pass
    assert again.verified_file().read_bytes() == data
    assert list((tmp_path / "dl").glob("*.part")) == [again.path]


def test_one_partial_download_at_a_time(tmp_path, served):
    rel, _, _, _ = served
    first = Download(tmp_path / "dl", rel, "demo")
    first.step(max_chunks=1)
    from dataclasses import replace

    newer = replace(rel, counter=2)
    Download(tmp_path / "dl", newer, "demo")
    assert not first.path.exists()


def test_a_tampered_chunk_is_refused(tmp_path, served):
    rel, data, reg, _ = served
    obj = reg.root / "objects" / f"{rel.sha256}.onnx"
    obj.chmod(0o600)
    tampered = bytearray(data)
    tampered[1500] ^= 0xFF  # chunk 2 on the server is not what was signed
    obj.write_bytes(bytes(tampered))
    d = Download(tmp_path / "dl", rel, "demo")
    with pytest.raises(IntegrityError, match="chunk 2"):
        while not d.step():
            pass


def test_the_endpoint_serves_only_what_it_should(served):
    import urllib.error
    import urllib.request

    rel, _, _, server = served
    base = f"http://127.0.0.1:{server.port}/v1"
    for path in (f"/other/objects/{rel.sha256}/0", f"/demo/objects/{'0' * 64}/0",
                 f"/demo/objects/{rel.sha256}/99999", "/demo/objects/../../etc/passwd/0"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + path, timeout=5)
        assert e.value.code == 404


def test_plain_http_only_on_this_machine():
    check_url("http://127.0.0.1:8470")
    check_url("https://aggregator.hospital.example:8470")
    with pytest.raises(TransportError, match="neither https"):
        check_url("http://aggregator.hospital.example:8470")
    with pytest.raises(TransportError):
        check_url("file:///etc/passwd")


def test_a_large_model_reaches_the_fleet_in_chunks(tmp_path):
    mf = mem_fleet(tmp_path, clients=2, rounds=1)
    mf.run()
    port = free_port()
    mf.fleet.plan["aggregator"]["releases"] = {"max_message_bytes": 64 * 1024,
                                               "chunk_bytes": 16 * 1024, "http_port": port}
    mf.fleet.aggregator_toml.write_text(to_toml(mf.fleet.plan["aggregator"]))
    mf.aggregator.state.close()
    mf.aggregator = mf.new_aggregator()
    mf.aggregator.start()
    try:
        cfg, store, registry = stores(mf.aggregator)
        src = other_model(registry.path(2), tmp_path / "big", pad_bytes=300 * 1024)
        rid = stage_push(cfg, store, registry, src, PushOptions())
        with InferenceLoop(mf.agents[0].models) as loop:  # inference through the swap
            # the downloads run on their own threads: step until they are done (a busy
            # machine takes longer), then until the loop has served the new version
            # (every device downloads on its own thread: wait for all of them)
            wait_for(lambda: (drive(mf, steps=1), store.get(rid).status == "complete"
                              and 3 in loop.served
                              and all(a.models.current_version() == 3 for a in mf.agents))[1],
                     60, "the chunked release", poll=0.02)
        assert not loop.errors
        assert {2, 3} <= loop.served
        r = store.get(rid)
        assert r.status == "complete"
        rel_meta = peek(registry.release(3)).meta["release"]
        assert len(rel_meta["chunks"]) > 1  # it did not travel inline
        assert [a.models.current_version() for a in mf.agents] == [3, 3]
        for a in mf.agents:
            assert a.models.manifest().sha256 == load_manifest(src).sha256
            assert not list((a.models.root / ".downloads").glob("*.part"))
    finally:
        mf.aggregator.close()


def test_without_an_endpoint_a_large_model_is_refused_clearly(tmp_path):
    mf = mem_fleet(tmp_path, clients=1, rounds=1)
    mf.run()
    cfg, store, registry = stores(mf.aggregator)
    object.__setattr__(cfg.releases, "max_message_bytes", 1024)
    rid = stage_push(cfg, store, registry, other_model(registry.path(2), tmp_path / "m"),
                     PushOptions())
    drive(mf, steps=3)
    r = store.get(rid)
    assert r.status == "aborted" and "set [releases] http_port" in r.reason


def test_the_cli(tmp_path, capsys):
    mf = mem_fleet(tmp_path, clients=2, rounds=1)
    mf.run()
    toml = str(mf.fleet.aggregator_toml)
    src = other_model(mf.aggregator.registry.path(2), tmp_path / "m")
    assert main(["models", "push", str(src), "--config", toml, "--to", "device:clinic-1"]) == 0
    assert "rollout 1 staged" in capsys.readouterr().out
    assert main(["models", "push", str(src), "--config", toml, "--to", "group:x"]) == 2
    assert "no device group 'x'" in capsys.readouterr().err
    drive(mf)
    assert main(["models", "status", "--config", toml]) == 0
    out = capsys.readouterr().out
    assert "clinic-1" in out and "active" in out and "complete" in out
    assert main(["models", "rollback", "--to", "2", "--config", toml, "--target",
                 "device:clinic-1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["origin"] == "rollback"
    drive(mf)
    assert main(["models", "status", "--config", toml, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert {d["device"]: (d["version"], d["state"]) for d in st["devices"]} == {
        "clinic-1": (4, "active"), "clinic-2": (2, "active")}  # round releases are reported too
    assert [(r["origin"], r["status"], r["version"]) for r in st["rollouts"]] == [
        ("push", "complete", 3), ("rollback", "complete", 4)]
    assert [a.models.current_version() for a in mf.agents] == [4, 2]


def test_a_silent_client_does_not_stall_the_tls_endpoint(tmp_path, exported):
    import socket

    from bedside.edge.releases import client_context
    from bedside.transport.pki import DOWNLOADS_ID, create_fleet, issue

    certs = create_fleet(tmp_path / "certs", ["device-1"])
    issue(certs, DOWNLOADS_ID, server_hosts=["127.0.0.1"])
    src = exported("logreg", "wdbc")
    reg = Registry(tmp_path / "registry")
    m = load_manifest(src)
    data = verify_model_file(src, m)
    reg.add(data, m)
    server = DownloadServer(reg.root / "objects", "demo", "127.0.0.1", free_port(), 1024,
                            cert_file=certs / "downloads.crt", key_file=certs / "downloads.key",
                            ca_file=certs / "ca.crt",
                            allowed=lambda sha: sha == m.sha256).start()
    silent = socket.create_connection(("127.0.0.1", server.port))  # connects, never speaks
    try:
        rel = make_release(counter=1, manifest=m, model_bytes=data, origin="push",
                           target=Target("all", None), max_message_bytes=1024, chunk_bytes=1024,
                           url=f"https://127.0.0.1:{server.port}", golden=None)
        ctx = client_context(certs / "ca.crt", certs / "device-1.crt", certs / "device-1.key")
        d = Download(tmp_path / "dl", rel, "demo", ctx, timeout=5.0)
        assert d.step(max_chunks=3) is False and d.done == 3  # served despite the silent one
        no_cert = Download(tmp_path / "dl2", rel, "demo", client_context(certs / "ca.crt", None,
                                                                          None), timeout=5.0)
        no_cert.step(max_chunks=1)
        assert no_cert.done == 0  # the endpoint wants the fleet's client certificates
    finally:
        silent.close()
        server.close()


def test_the_endpoint_serves_only_released_models(tmp_path, served):
    import urllib.error
    import urllib.request

    rel, _, reg, _ = served
    server = DownloadServer(reg.root / "objects", "demo", "127.0.0.1", free_port(), 1024,
                            allowed=lambda sha: False).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/v1/demo/objects/"
                                   f"{rel.sha256}/0", timeout=5)
        assert e.value.code == 404
    finally:
        server.close()
