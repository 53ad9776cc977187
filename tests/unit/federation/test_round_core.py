"""The round core: settings declared once, state that survives a crash, adaptive clipping as a
round option, and devices and aggregator accounting the same rounds with the same rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bedside.constants import UNIT_DEVICE
from bedside.errors import ValidationError
from bedside.federation.settings import AdaptiveClipping, FederationSettings, RoundSettings
from bedside.models.onnx_weights import read_weights
from bedside.models.registry import Registry
from tests.fleet import mem_fleet

SHA = "a" * 64


def test_round_settings_round_trip_through_the_announcement():
    fed = FederationSettings()
    s = fed.announce("north", 3, deadline=1.7e9, model_sha256=SHA)
    assert RoundSettings.from_meta(s.to_meta()) == s
    assert s.train.lr == fed.training.lr and s.planned_rounds == fed.rounds.rounds
    adaptive = RoundSettings(fleet="f", deadline=1.0, model_sha256=SHA, clip_norm=2.0,
                             noise="central", noise_multiplier=1.0,
                             adaptive=AdaptiveClipping(count_noise=3.0))
    assert RoundSettings.from_meta(adaptive.to_meta()) == adaptive
    # the update gets z_u = (z^-2 - (2 sigma_b)^-2)^-1/2 (Andrew et al. 2021)
    assert adaptive.update_noise_multiplier == pytest.approx((1 - 1 / 36) ** -0.5)


@pytest.mark.parametrize(("change", "match"), [
    ({"surprise": 1}, "unknown key"),
    ({"noise": "everywhere"}, "must be one of"),
    ({"clip_norm": 0}, "clip_norm"),
    ({"model_sha256": "xyz"}, "sha256"),
    ({"adaptive": {"count_noise": 0.1}, "noise_multiplier": 1.0}, "count_noise"),
    ({"adaptive": {"count_noise": 1.0}, "noise": "none", "noise_multiplier": 0.0},
     "adaptive clipping needs device-level noise"),
    ({"train": {"epochs": 10**9}}, "epochs"),
])
def test_a_malformed_announcement_is_a_bad_announcement(change, match):
    meta = {**FederationSettings().announce("f", 1, deadline=1.0, model_sha256=SHA).to_meta(),
            **change}
    with pytest.raises(ValidationError, match=match) as err:
        RoundSettings.from_meta(meta)
    assert err.value.reason == "bad_announcement"


class _Crash(BaseException):
    """The aggregator process dies (as if killed): nothing after this point runs."""


def _fleet(tmp_path, **kw):
    return mem_fleet(tmp_path, clients=3, rounds=3, aggregator={
        "strategy": {"optimizer": "fedavgm", "optimizer_params": {"momentum": 0.9}}}, **kw)


def test_a_crash_after_storing_a_version_loses_nothing(tmp_path, monkeypatch):
    """Killed right after the new version (model and server optimizer state) is stored, before the
    round is marked closed and the model published: the restarted aggregator publishes that
    version and continues with its momentum, ending exactly where an uninterrupted run ends."""
    steady = _fleet(tmp_path / "steady")
    steady.run()

    crashed = _fleet(tmp_path / "crashed")
    real_add = Registry.add

    def add_then_die(self, onnx_bytes, manifest, server_state=None):
        path = real_add(self, onnx_bytes, manifest, server_state)
        if manifest.version == 2:
            raise _Crash
        return path

    monkeypatch.setattr(Registry, "add", add_then_die)
    with pytest.raises(_Crash):
        crashed.run()
    monkeypatch.undo()
    assert crashed.aggregator.state.current_round().status == "open"  # not marked closed
    crashed.aggregator = crashed.new_aggregator()  # the service restarted from disk
    crashed.aggregator.start()
    crashed.run()

    for mf in (steady, crashed):
        assert mf.aggregator.finished
        assert [r.status for r in mf.aggregator.state.rounds()] == ["closed"] * 3
        assert mf.aggregator.registry.versions() == [1, 2, 3, 4]
    a, b = steady.aggregator.registry, crashed.aggregator.registry
    momentum = a.server_state(2)
    assert momentum and set(momentum) == set(b.server_state(2))
    for k in momentum:
        np.testing.assert_array_equal(momentum[k], b.server_state(2)[k])
    names = list(a.manifest(4).parameters)
    wa, wb = read_weights(a.model_bytes(4), names), read_weights(b.model_bytes(4), names)
    for k in names:
        np.testing.assert_allclose(wa[k], wb[k], rtol=0, atol=1e-7)


def test_adaptive_clipping_moves_the_clip_norm_and_both_sides_account_it_alike(tmp_path):
    mf = mem_fleet(tmp_path, clients=3, rounds=4, aggregator={"privacy": {
        "clip_norm": 0.02, "adaptive_clipping": {"target_quantile": 0.5, "learning_rate": 0.5,
                                                 "count_noise": 0.5}}})
    mf.run()
    agg = mf.aggregator
    rounds = agg.state.rounds()
    assert [r.status for r in rounds] == ["closed"] * 4
    clips = [r.settings.clip_norm for r in rounds]
    assert clips[0] == 0.02 and len(set(clips)) == 4
    for before, after, r in zip(clips, clips[1:], rounds, strict=False):
        assert math.exp(-0.5) * before - 1e-12 <= after <= math.exp(0.5) * before + 1e-12
        assert agg.registry.manifest(r.result["base_version"] + 1).training[
            "next_clip_norm"] == pytest.approx(after)
    # every accepted update carried its clip bit, and nothing else new
    assert all(set(u["info"]) >= {"clip_bit"} for r in rounds for u in agg.state.accepted(r.round))
    # device ledgers and the aggregator account the same releases: update + count, each round
    final = agg.registry.manifest(agg.registry.latest()).privacy
    for a in mf.agents:
        dev = a.privacy_report()[UNIT_DEVICE]
        assert dev["releases"] == 8 and dev["rounds"] == 4
        assert dev["epsilon"] == pytest.approx(final["epsilon"], rel=1e-9)


def test_adaptive_clipping_in_local_mode_noises_the_bit_on_the_device(tmp_path):
    mf = mem_fleet(tmp_path, clients=3, rounds=2, mode="local", noise_multiplier=0.05,
                   aggregator={"privacy": {"adaptive_clipping": {"count_noise": 0.5}}})
    mf.run()
    bits = [u["info"]["clip_bit"] for r in mf.aggregator.state.rounds()
            for u in mf.aggregator.state.accepted(r.round)]
    assert len(bits) == 6 and not all(b in (0.0, 1.0) for b in bits)
