"""One round logic: the in-process core, the MQTT federation (separate processes, a real broker)
and the Flower federation (a real SuperLink and SuperNodes) reach the same global weights when
every random draw is seeded alike, the feature-statistics round (round 1) included."""

from __future__ import annotations

import numpy as np
import pytest

from bedside.demo.inprocess import run_demo_in_process
from bedside.demo.run import DemoConfig, run
from bedside.models.onnx_weights import read_weights
from bedside.models.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.mark.parametrize("mode", ["central", "local"])
def test_in_process_core_equals_the_mqtt_federation(tmp_path, mode):
    cfg = DemoConfig(clients=3, rounds=4, mode=mode, noise_seed=11, out=tmp_path / "demo",
                     quiet=True, noise_multiplier=0.2 if mode == "central" else 0.01)
    report = run(cfg)
    assert [r["accepted"] for r in report["rounds"]] == [3, 3, 3, 3, 3]
    assert [r["task"] for r in report["rounds"]] == ["statistics"] + ["train"] * 4
    registry = Registry(tmp_path / "demo" / "aggregator" / "data" / "registry")
    final = registry.latest()
    assert final == 6
    names = list(registry.manifest(final).parameters)
    mqtt = read_weights(registry.model_bytes(final), names)

    core = run_demo_in_process(DemoConfig(clients=3, rounds=4, mode=mode, noise_seed=11,
                                          noise_multiplier=cfg.noise_multiplier))
    assert [r.accepted for r in core.rounds] == [3, 3, 3, 3, 3]
    assert registry.manifest(final).schema == core.manifest.schema  # the same input scaling
    for name in names:
        # the aggregator adds the updates in arrival order: equal up to float rounding
        np.testing.assert_allclose(core.weights[name], mqtt[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    # and the accuracy the demo printed for every round is the core's
    assert [round(r.metrics["accuracy"], 6) for r in core.rounds] == [
        round(r["accuracy"], 6) for r in report["rounds"]]


def test_in_process_core_equals_the_flower_federation_on_a_users_csv(tmp_path):
    """One federation, two transports: ``bedside demo --transport flower`` (a real SuperLink and
    SuperNodes) on a user's CSV reaches the in-process core's weights, seeded alike; the MQTT
    demo does the same above, so both transports produce the core's model."""
    from bedside.models import datasets

    csv = datasets.to_csv(datasets.load("wdbc"), tmp_path / "cohort.csv", label_column="outcome")
    settings = {"clients": 3, "rounds": 1, "noise_seed": 5, "data": csv, "label": "outcome"}
    report = run(DemoConfig(out=tmp_path / "demo", quiet=True, transport="flower", **settings))
    assert [r["accepted"] for r in report["rounds"]] == [3, 3]  # statistics, then training
    assert report["privacy"]["record"]["epsilon_max"] <= 8.0
    assert report["privacy"]["device"]["epsilon"] > 0
    assert {d["model_version"] for d in report["devices"].values()} == {3}
    registry = Registry(tmp_path / "demo" / "aggregator" / "data" / "registry")
    names = list(registry.manifest(3).parameters)
    flower = read_weights(registry.model_bytes(3), names)
    core = run_demo_in_process(DemoConfig(**settings))
    for name in names:
        np.testing.assert_allclose(core.weights[name], flower[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert [round(r.metrics["accuracy"], 6) for r in core.rounds] == [
        round(r["accuracy"], 6) for r in report["rounds"]]
