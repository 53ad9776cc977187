"""Pushing models to a fleet over real Mosquitto (TLS, the generated ACL), with several agents in
threads and the aggregator service: the acceptance of issue 13.

One federation is shared by the tests of this module, in order: it trains one round, then each
test pushes releases and watches what every device does with them. Large models come from the
aggregator's download endpoint over HTTPS with client certificates of the fleet's CA.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from bedside.aggregator.releases import golden_vectors, sign_release
from bedside.aggregator.rollout import PushOptions, stage_push
from bedside.constants import topic_release
from bedside.demo.run import to_toml
from bedside.edge.predictor import Predictor
from bedside.federation.release import Golden, Release
from bedside.manifest import load_manifest, verify_model_file
from bedside.transport import free_port
from bedside.transport.pki import DOWNLOADS_ID, issue
from bedside.wire.envelope import peek
from bedside.wire.signing import SigningKey
from tests.brokers import start_mosquitto
from tests.fleet import close_agents, make_fleet, start_agent, start_aggregator, wait_for
from tests.release_tools import InferenceLoop, other_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
CLINICS = ["clinic-1", "clinic-2", "clinic-3"]
MB = 1024 * 1024


class Fed:
    def __init__(self, tmp) -> None:
        self.tmp = tmp
        self.broker = start_mosquitto(tmp / "mosquitto", CLINICS)
        self.fleet = make_fleet(tmp / "fleet", clients=3, rounds=1, broker=self.broker,
                                agent={"agent": {"exit_when_done": False}})
        certs = self.broker.certs
        issue(certs, DOWNLOADS_ID, server_hosts=["127.0.0.1"])  # bedside broker certs
        self.fleet.plan["aggregator"]["releases"] = {   # --downloads-host 127.0.0.1
            "max_message_bytes": 16 * MB, "chunk_bytes": 1 * MB, "http_port": free_port(),
            "cert_file": str(certs / "downloads.crt"), "key_file": str(certs / "downloads.key"),
            "ca_file": str(certs / "ca.crt")}  # devices present their fleet certificates
        self.fleet.plan["aggregator"]["groups"] = {"north": ["clinic-1", "clinic-2"]}
        self.fleet.aggregator_toml.write_text(to_toml(self.fleet.plan["aggregator"]))
        self.agents = [start_agent(self.fleet, i) for i in range(3)]
        self.serve()  # the federation's one round

    def serve(self, until=None, timeout: float = 120.0) -> None:
        """Run the aggregator service until it stops by itself (rounds and rollouts done)."""
        agg, stop, thread = start_aggregator(self.fleet)
        self.agg = agg
        try:
            thread.join(timeout)
            assert not thread.is_alive(), "the aggregator service did not finish"
        finally:
            stop.set()
            thread.join(10)
            agg.close()
            agg.transport.close()
            agg.state.close()

    def drain(self, until, timeout: float = 30.0, inject=None) -> bool:
        """Run the service's loop by hand until ``until(aggregator)`` holds (it would stop at
        once by itself: its rounds are done and no rollout is open); ``inject(aggregator)``
        runs once it is connected."""
        from bedside.aggregator.config import load
        from bedside.aggregator.service import Aggregator

        agg = Aggregator(load(self.fleet.aggregator_toml))
        agg.start()
        try:
            if inject is not None:
                wait_for(lambda: agg.transport.connected, 10, "the aggregator to connect")
                inject(agg)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                agg.step(0.1)
                if until(agg):
                    return True
            return False
        finally:
            agg.close()
            agg.transport.close()
            agg.state.close()

    def push(self, src, golden=None, **opts) -> tuple[int, dict]:
        from bedside.aggregator.config import load
        from bedside.aggregator.releases import ReleaseStore
        from bedside.aggregator.state import State
        from bedside.models.registry import Registry

        cfg = load(self.fleet.aggregator_toml)
        state = State(cfg.state_path)
        store, registry = ReleaseStore(state.db), Registry(cfg.registry_path)
        rid = stage_push(cfg, store, registry, src, PushOptions(**opts), golden)
        self.serve()
        r = store.get(rid)
        state.close()
        return r.counter, r.to_dict()

    def agent(self, i):
        return self.agents[i][0]

    def versions(self) -> list[int | None]:
        return [a.models.current_version() for a, _, _ in self.agents]

    def states(self, counter) -> dict[str, tuple[str, str] | None]:
        out = {}
        for a, _, _ in self.agents:
            h = a.releases.get(counter)
            out[a.cfg.device_id] = (h.state, h.reason) if h else None
        return out

    def close(self) -> None:
        for _, stop, _ in self.agents:
            stop.set()
        for t in self.fleet.threads:
            t.join(30)
        close_agents(self.fleet)  # no client left reconnecting to a stopped broker
        self.broker.stop()


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    f = Fed(tmp_path_factory.mktemp("push"))
    wait_for(lambda: f.versions() == [2, 2, 2], 60, "every device to run v2")
    yield f
    f.close()


def _rejections(agg) -> set[tuple[str, str]]:
    return set(agg.state.db.execute("SELECT sender, reason FROM rejections WHERE reason LIKE "
                                    "'release_%'").fetchall())


def _registry(fed):
    from bedside.models.registry import Registry

    return Registry(fed.fleet.plan["aggregator_dir"] / "data" / "registry")


def test_a_release_reaches_its_targets_and_only_them(fed):
    src = other_model(_registry(fed).path(2), fed.tmp / "m3", 0.5)
    counter, r = fed.push(src, to="group:north")
    assert r["status"] == "complete"
    wait_for(lambda: fed.versions() == [3, 3, 2], 30, "the north group to run v3")
    wait_for(lambda: fed.states(counter) == {"clinic-1": ("active", ""),
                                             "clinic-2": ("active", ""), "clinic-3": None},
             30, "reports")
    assert fed.agent(0).models.manifest().sha256 == load_manifest(src).sha256


def test_refused_releases_are_reported_and_the_old_model_keeps_serving(fed):
    from dataclasses import replace

    from bedside.aggregator.config import load

    reg = _registry(fed)
    old, current = reg.release(1), reg.release(3)
    key = SigningKey.load(load(fed.fleet.aggregator_toml).key)
    rel = Release.from_meta(peek(current).meta["release"])
    m = load_manifest(reg.path(3))
    data = verify_model_file(reg.path(3), m)
    forged = bytearray(current)
    forged[-7] ^= 0xFF  # the model's bytes changed after signing
    other_key = sign_release(SigningKey.generate(), "demo", replace(rel, counter=99), m, data)
    # the pinned key, the counter the devices run, another model: a replayed counter
    m2 = load_manifest(other_model(reg.path(2), fed.tmp / "m-replay", 0.1))
    data2 = verify_model_file(fed.tmp / "m-replay", m2)
    m2.version = 3
    replayed = sign_release(key, "demo", replace(rel, sha256=m2.sha256, size=len(data2),
                                                 golden=golden_vectors(data2, m2)), m2, data2)

    def attack(agg) -> None:
        # published with the aggregator's broker identity (only it may publish releases: the
        # ACL), as a compromised broker or a stolen aggregator certificate would
        for device, payload in [("clinic-1", old), ("clinic-1", current), ("clinic-2", forged),
                                ("clinic-1", other_key), ("clinic-2", replayed)]:
            agg.transport.publish(topic_release("demo", device), bytes(payload), qos=1)

    got = fed.drain(lambda agg: {("clinic-1", "release_older_counter"),
                                 ("clinic-2", "release_bad_signature"),
                                 ("clinic-1", "release_bad_signature"),
                                 ("clinic-2", "release_replay")} <= _rejections(agg),
                    inject=attack)
    assert got, "the refusals did not all reach the aggregator"
    assert fed.versions() == [3, 3, 2]  # nothing was installed
    x = fed.agent(0).models.manifest().schema.reference_rows(2)
    assert np.isfinite(fed.agent(0).models.predictor().predict_proba(x)).all()


def test_failing_golden_vectors_stop_the_rollout_at_the_canary(fed):
    from bedside.aggregator.config import load
    from bedside.aggregator.releases import ReleaseStore
    from bedside.aggregator.state import State
    from bedside.models.registry import Registry

    cfg = load(fed.fleet.aggregator_toml)
    state = State(cfg.state_path)
    store, registry = ReleaseStore(state.db), Registry(cfg.registry_path)
    src = other_model(registry.path(3), fed.tmp / "m-bad", 0.7)
    m = load_manifest(src)
    right = golden_vectors(verify_model_file(src, m), m)
    rid = stage_push(cfg, store, registry, src, PushOptions(canary="1",
                                                            abort_on_failure_rate=0.0))
    # vectors that the devices' runtime does not reproduce (the push command itself refuses
    # them, so they are set as the service reads them)
    params = json.loads(store.db.execute("SELECT params FROM rollouts WHERE id = ?",
                                         (rid,)).fetchone()[0])
    params["golden"] = Golden(right.inputs, 1.0 - right.outputs, 1e-4).to_meta()
    store.db.execute("UPDATE rollouts SET params = ? WHERE id = ?", (json.dumps(params), rid))
    state.close()
    fed.serve()
    state = State(cfg.state_path)
    r = ReleaseStore(state.db).get(rid)
    state.close()
    assert r.status == "aborted", r
    states = fed.states(r.counter)
    assert states[r.canary[0]] == ("rejected", "golden_vectors")
    assert [s for d, s in states.items() if d != r.canary[0]] == [None, None]  # never saw it
    assert fed.versions() == [3, 3, 2]


def test_a_100_mb_model_arrives_in_chunks_and_a_cut_download_resumes(fed, monkeypatch):
    from bedside.edge import releases

    src = other_model(_registry(fed).path(3), fed.tmp / "m-big", 0.9, pad_bytes=100 * MB)
    size = (src / "model.onnx").stat().st_size
    assert size > 100 * MB
    cut = threading.Event()
    cut.set()
    real = releases.Download._fetch

    def flaky(self, index):  # the network drops halfway, until the test lets it back
        if cut.is_set() and index >= self.total // 2:
            raise releases.TransportError("connection reset (test)")
        return real(self, index)

    monkeypatch.setattr(releases.Download, "_fetch", flaky)
    agent = fed.agent(2)
    loop = InferenceLoop(agent.models).__enter__()  # inference through the download and swap
    agg, agg_stop, agg_thread = None, None, None
    try:
        from bedside.aggregator.config import load
        from bedside.aggregator.releases import ReleaseStore
        from bedside.aggregator.state import State
        from bedside.models.registry import Registry

        cfg = load(fed.fleet.aggregator_toml)
        state = State(cfg.state_path)
        rid = stage_push(cfg, ReleaseStore(state.db), Registry(cfg.registry_path), src,
                         PushOptions(to="device:clinic-3"))
        state.close()
        agg, agg_stop, agg_thread = start_aggregator(fed.fleet)  # serves the chunks meanwhile
        part = agent.models.root / ".downloads"
        wait_for(lambda: any(p.stat().st_size >= size // 3 for p in part.glob("*.part")), 60,
                 "the download to stop halfway")
        time.sleep(1.0)
        assert agent.models.current_version() == 2
        cut.clear()  # the network is back: the download resumes where it stopped
        wait_for(lambda: agent.models.current_version() == 5, 120, "clinic-3 to run v5")
    finally:
        loop.__exit__()
        if agg_stop is not None:
            agg_stop.set()
            agg_thread.join(30)
            agg.close()
            agg.transport.close()
            agg.state.close()
    assert not loop.errors
    assert {2, 5} <= loop.served
    assert agent.models.manifest().sha256 == load_manifest(src).sha256
    assert not list(part.glob("*.part"))
    st = agent.releases.last()
    assert (st.version, st.state) == (5, "active")
    h = peek(_registry(fed).release(5))
    assert len(h.meta["release"]["chunks"]) == -(-size // MB)  # not inline: in 1 MB chunks
    assert rid


def test_an_imported_sklearn_model_is_pushed_and_served(fed):
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from bedside.models import datasets
    from bedside.models.importer import import_onnx

    ds = datasets.load("wdbc")
    schema = load_manifest(_registry(fed).path(2)).schema
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(ds.x, ds.y)
    onnx_file = fed.tmp / "sk.onnx"
    onnx_file.write_bytes(to_onnx(clf, initial_types=[("x", FloatTensorType([None, 30]))])
                          .SerializeToString())
    import_onnx(onnx_file, schema, fed.tmp / "sk-model")
    counter, r = fed.push(fed.tmp / "sk-model", to="device:clinic-3")
    assert r["status"] == "complete"
    wait_for(lambda: fed.agent(2).models.current_version() == 6, 30, "clinic-3 to run v6")
    p = Predictor(fed.agent(2).models.root / "current")
    assert p.manifest.privacy == {"status": "unknown",
                                  "note": p.manifest.privacy.get("note")}
    rows = ds.x[:50][schema.within_range(ds.x[:50])]
    np.testing.assert_allclose(fed.agent(2).models.predictor().predict_proba(rows),
                               clf.predict_proba(rows), atol=1e-5)
    assert fed.states(counter)["clinic-3"] == ("active", "")


def test_after_a_key_rotation_devices_take_releases_signed_by_the_new_key_only(fed, capsys,
                                                                               caplog):
    """Issue 14: ``bedside aggregator rotate-key``; over Mosquitto (the ACL lets devices read the
    fleet's key topic) every device pins the new key, installs a release it signs, and refuses
    one the old key signs."""
    from dataclasses import replace

    from bedside.aggregator.config import load
    from bedside.cli import main
    from bedside.constants import AGGREGATOR_ID

    caplog.set_level("WARNING")
    cfg = load(fed.fleet.aggregator_toml)
    old = SigningKey.load(cfg.key)
    assert main(["aggregator", "rotate-key", "--config", str(fed.fleet.aggregator_toml)]) == 0
    capsys.readouterr()
    new = SigningKey.load(cfg.key)
    src = other_model(_registry(fed).path(3), fed.tmp / "m-rotated", 0.3)
    _, r = fed.push(src, to="device:clinic-1")  # the service publishes the rotation first
    assert r["status"] == "complete"
    wait_for(lambda: all(a.pinned.get(AGGREGATOR_ID).fingerprint == new.public.fingerprint
                         for a, _, _ in fed.agents), 30, "every device to pin the new key")
    wait_for(lambda: fed.agent(0).models.current_version() == 7, 30, "clinic-1 to run v7")
    # the old key's signature on a newer release is refused
    reg = _registry(fed)
    rel = Release.from_meta(peek(reg.release(7)).meta["release"])
    m = load_manifest(reg.path(7))
    data = verify_model_file(reg.path(7), m)
    m.version = 8
    stale = sign_release(old, "demo", replace(rel, counter=rel.counter + 5, version=8), m, data)
    refused = "ignored message on bedside/v1/demo/release/clinic-1: bad_signature"
    before = caplog.text.count(refused)
    fed.drain(lambda agg: caplog.text.count(refused) > before, timeout=10,
              inject=lambda agg: agg.transport.publish(topic_release("demo", "clinic-1"), stale,
                                                       qos=1))
    assert caplog.text.count(refused) > before  # refused by the device, which says why
    assert fed.agent(0).models.current_version() == 7
