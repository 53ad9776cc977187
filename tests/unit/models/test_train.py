"""DP-SGD training: what the ledger is told is exactly what runs, step for step as Opacus runs it.

Bedside runs DP-SGD itself (``torch.func`` per-example gradients) instead of through Opacus, whose
import and per-round engine set-up cost a device more than its training. Opacus stays installed
with the development tools as the reference these tests compare against.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bedside.errors import PrivacyError
from bedside.models import datasets
from bedside.models.spec import ArchSpec
from bedside.models.train import (
    TrainConfig,
    clipped_gradient_sum,
    fit,
    poisson_batch,
)
from bedside.models.zoo import build
from bedside.privacy import dpsgd
from bedside.privacy.dpsgd import DPSGDPlan


def _plan(n, batch, epochs, z=1.0, c=1.0):
    return DPSGDPlan.for_records(n, batch, epochs, z, c)


@pytest.mark.parametrize(("n", "batch", "epochs"), [(100, 40, 3), (200, 16, 1), (31, 32, 2),
                                                    (130, 100, 2), (90, 32, 3)])
def test_training_runs_exactly_the_plan(n, batch, epochs):
    ds = datasets.load("wdbc").subset(np.arange(n))
    net = build(ArchSpec.for_schema("logreg", ds.schema), ds.schema, seed=0)
    plan = _plan(n, batch, epochs)
    r = fit(net, ds.x, ds.y, TrainConfig(epochs=epochs, batch_size=batch, seed=1), plan)
    assert (r.steps, r.sample_rate) == (plan.steps, plan.sample_rate)
    assert all(np.isfinite(p.detach().numpy()).all() for p in net.parameters())


def test_a_plan_that_is_not_what_training_runs_is_refused():
    ds = datasets.load("wdbc").subset(np.arange(100))
    net = build(ArchSpec.for_schema("logreg", ds.schema), ds.schema, seed=0)
    wrong = DPSGDPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=2)
    with pytest.raises(PrivacyError, match="Refusing to train"):
        fit(net, ds.x, ds.y, TrainConfig(epochs=1, batch_size=40, seed=1), wrong)


def test_plan_numbers_are_opacus_dataloader_numbers():
    opacus_data = pytest.importorskip("opacus.data_loader")
    from torch.utils.data import DataLoader, TensorDataset

    for n, batch in [(100, 40), (31, 32), (569, 32), (7, 3)]:
        data = TensorDataset(torch.zeros(n, 2), torch.zeros(n, dtype=torch.long))
        dl = opacus_data.DPDataLoader.from_data_loader(DataLoader(data, batch_size=batch))
        assert dl.sample_rate == dpsgd.sample_rate(n, batch)
        assert len(dl) == dpsgd.steps(n, batch, 1)


def test_poisson_batches_are_opacus_batches():
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    theirs = list(UniformWithReplacementSampler(num_samples=50, sample_rate=0.1, generator=g1))
    ours = [poisson_batch(50, 0.1, g2).tolist() for _ in range(len(theirs))]
    assert ours == theirs


@pytest.mark.parametrize("arch", ["logreg", "mlp"])
def test_one_step_equals_opacus_without_noise(arch):
    """Same batch, noise 0: the clipped, summed, scaled per-example gradient and the SGD step are
    Opacus' own (GradSampleModule + DPOptimizer)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    ds = datasets.load("wdbc").subset(np.arange(40))
    x = torch.from_numpy(ds.x)
    y = torch.from_numpy(ds.y)
    c, expected, lr = 0.05, 13, 0.5  # a small C: most rows are clipped
    ours = build(ArchSpec.for_schema(arch, ds.schema), ds.schema, seed=3)
    theirs = build(ArchSpec.for_schema(arch, ds.schema), ds.schema, seed=3)

    summed = clipped_gradient_sum(ours, x, y, c)
    opt = torch.optim.SGD(ours.parameters(), lr=lr)
    for k, p in ours.named_parameters():
        p.grad = summed[k] / expected
    opt.step()

    gsm = GradSampleModule(theirs)
    dpo = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=lr), noise_multiplier=0.0,
                      max_grad_norm=c, expected_batch_size=expected)
    torch.nn.functional.cross_entropy(gsm(x), y).backward()
    dpo.step()
    for (k, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-5, atol=1e-7,
                                   err_msg=k)


def test_every_row_is_clipped_to_the_bound():
    ds = datasets.load("wdbc").subset(np.arange(30))
    net = build(ArchSpec.for_schema("mlp", ds.schema), ds.schema, seed=0)
    x, y = torch.from_numpy(ds.x), torch.from_numpy(ds.y)
    for i in range(len(x)):  # one row at a time: the sum is that row's clipped gradient
        g = clipped_gradient_sum(net, x[i : i + 1], y[i : i + 1], 0.01)
        norm = torch.sqrt(sum((v.double() ** 2).sum() for v in g.values()))
        assert float(norm) <= 0.01 + 1e-9
    assert all(float(v.abs().sum()) == 0 for v in clipped_gradient_sum(net, x[:0], y[:0],
                                                                        1.0).values())


def test_noise_has_the_planned_standard_deviation():
    """One SGD step with learning rate 1 moves the weights by (clipped sum + noise) / expected
    batch size; with z = 10^4 the noise dominates, so the step's spread is z C / expected."""
    ds = datasets.load("digits").subset(np.arange(64))
    net = build(ArchSpec.for_schema("mlp", ds.schema, hidden=[128]), ds.schema, seed=0)
    before = np.concatenate([p.detach().numpy().ravel() for p in net.parameters()])
    z, c = 1e4, 1.0
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1.0, optimizer="sgd", seed=4)
    plan = _plan(64, 64, 1, z=z, c=c)  # one step, q = 1
    fit(net, ds.x, ds.y, cfg, plan)
    moved = np.concatenate([p.detach().numpy().ravel() for p in net.parameters()]) - before
    expected = dpsgd.expected_batch_size(64, 64)
    assert moved.std() == pytest.approx(z * c / expected, rel=0.02)  # ~10k coordinates


def test_seeded_training_is_reproducible_and_noise_is_not_the_sampling_stream():
    ds = datasets.load("wdbc").subset(np.arange(120))
    runs = []
    for seed in (5, 5, 6):
        net = build(ArchSpec.for_schema("logreg", ds.schema), ds.schema, seed=0)
        fit(net, ds.x, ds.y, TrainConfig(epochs=1, batch_size=16, seed=seed),
            _plan(120, 16, 1))
        runs.append(np.concatenate([p.detach().numpy().ravel() for p in net.parameters()]))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], runs[2])


def test_cnn_trains_with_dp_sgd():
    ds = datasets.load("vitals", n_windows=60)
    net = build(ArchSpec.for_schema("cnn1d", ds.schema), ds.schema, seed=0)
    r = fit(net, ds.x, ds.y, TrainConfig(epochs=1, batch_size=16, seed=0), _plan(60, 16, 1))
    assert r.steps == 4 and np.isfinite(r.final_loss)


@pytest.mark.parametrize(("dataset", "arch", "params"), [
    ("wdbc", "logreg", {}), ("digits", "logreg", {}), ("vitals", "logreg", {}),
    ("wdbc", "mlp", {}), ("digits", "mlp", {"hidden": [7]}), ("vitals", "mlp", {"hidden": [5, 3]}),
    ("vitals", "cnn1d", {}), ("vitals", "cnn1d", {"channels": [8], "kernel_size": 3})])
def test_the_torch_free_parameter_count_is_the_networks(dataset, arch, params):
    schema = datasets.schema_of(dataset)
    spec = ArchSpec.for_schema(arch, schema, **params)
    net = build(spec, schema)
    assert spec.parameter_count() == sum(p.numel() for p in net.parameters())
