"""DP-SGD training: what the ledger is told is exactly what Opacus runs."""

from __future__ import annotations

import numpy as np
import pytest

from bedside.models import datasets
from bedside.models.spec import ArchSpec
from bedside.models.train import DPConfig, TrainConfig, dp_sample_rate, dp_steps, fit
from bedside.models.zoo import build


@pytest.mark.parametrize(("n", "batch", "epochs"), [(100, 40, 3), (200, 16, 1), (31, 32, 2),
                                                    (130, 100, 2), (90, 32, 3)])
def test_plan_matches_opacus(n, batch, epochs):
    ds = datasets.load("wdbc").subset(np.arange(n))
    net = build(ArchSpec.for_schema("logreg", ds.schema), ds.schema, seed=0)
    r = fit(net, ds.x, ds.y, TrainConfig(epochs=epochs, batch_size=batch, seed=1),
            DPConfig(noise_multiplier=1.0))
    assert r.steps == dp_steps(n, batch, epochs)
    assert r.sample_rate == pytest.approx(dp_sample_rate(n, batch), abs=1e-15)
    assert all(np.isfinite(p.detach().numpy()).all() for p in net.parameters())


def test_seeded_training_is_reproducible_and_noise_is_not_the_sampling_stream():
    ds = datasets.load("wdbc").subset(np.arange(120))
    runs = []
    for seed in (5, 5, 6):
        net = build(ArchSpec.for_schema("logreg", ds.schema), ds.schema, seed=0)
        fit(net, ds.x, ds.y, TrainConfig(epochs=1, batch_size=16, seed=seed),
            DPConfig(noise_multiplier=1.0))
        runs.append(np.concatenate([p.detach().numpy().ravel() for p in net.parameters()]))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], runs[2])
