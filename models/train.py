"""Training loops (torch): plain, and record-level DP-SGD.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") draws each step's batch by
Poisson sampling (every record independently with probability ``q``), computes every sampled
record's own gradient (``torch.func``: ``vmap`` of ``grad``), clips each to L2 norm
``max_grad_norm``, sums them, adds Gaussian noise with standard deviation ``noise_multiplier *
max_grad_norm`` and divides by the expected batch size, then takes the optimizer's step. It is the
algorithm of Opacus' ``make_private(poisson_sampling=True)``, step for step (same sampler, same
clip factor ``C / (norm + 1e-6)``, same scaling; ``tests/unit/models/test_dpsgd.py`` checks it
against Opacus), without Opacus' import and per-round engine set-up, which cost a device more
than its training (``benchmarks/README.md``).

The loop follows a :class:`~bedside.privacy.dpsgd.DPSGDPlan` fixed before training (and recorded
in the privacy ledger) and refuses to run anything else; it only *describes* what it did in
:class:`FitResult`. Accounting is never mixed into the loop.

Randomness (batch sampling, noise) comes from ``torch.Generator``s seeded from the OS's entropy
unless a seed is given (tests, reproducible demos). Like every floating-point Gaussian sampler
this is not an exact sample of the real-valued distribution (Mironov 2012); see docs/privacy.md.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from bedside.errors import InputError, PrivacyError
from bedside.privacy import dpsgd
from bedside.privacy.dpsgd import DPSGDPlan


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise InputError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise InputError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")


@dataclass(frozen=True)
class FitResult:
    """What a training run did. For DP-SGD this is the input to the accountant."""

    rows: int
    epochs: int
    steps: int
    final_loss: float
    dp: bool
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    max_grad_norm: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _generators(seed: int | None) -> tuple[torch.Generator, torch.Generator]:
    """Two independent generators (batch sampling, noise): from the OS, or derived from a seed."""
    if seed is None:
        seeds = [secrets.randbits(63), secrets.randbits(63)]
    else:
        seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(2, np.uint64) >> 1]
    gens = []
    for s in seeds:
        g = torch.Generator()
        g.manual_seed(s)
        gens.append(g)
    return gens[0], gens[1]


def fit(net: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig,
        dp: DPSGDPlan | None = None) -> FitResult:
    """Train ``net`` in place on (x, y); with ``dp``, record-level DP-SGD following that plan."""
    if len(x) != len(y) or len(x) == 0:
        raise InputError(f"training needs matching, non-empty x and y (got {len(x)}, {len(y)})")
    gen, noise_gen = _generators(cfg.seed)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    yt = torch.from_numpy(np.asarray(y, np.int64))
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD
    optimizer = opt_cls(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    net.train()
    if dp is None:
        steps, last = _plain(net, xt, yt, cfg, optimizer, gen)
        net.eval()
        return FitResult(rows=len(x), epochs=cfg.epochs, steps=steps, final_loss=last, dp=False)
    planned = DPSGDPlan.for_records(len(x), cfg.batch_size, cfg.epochs, dp.noise_multiplier,
                                    dp.max_grad_norm)
    if (planned.steps, planned.sample_rate) != (dp.steps, dp.sample_rate):
        raise PrivacyError(f"DP-SGD on {len(x)} records with batch {cfg.batch_size} for "
                           f"{cfg.epochs} epoch(s) runs {planned.steps} steps at sample rate "
                           f"{planned.sample_rate:.6g}; the plan says {dp.steps} at "
                           f"{dp.sample_rate:.6g}. Refusing to train with unaccounted loss")
    steps, last = _dp_sgd(net, xt, yt, cfg, dp, optimizer, gen, noise_gen)
    net.eval()
    return FitResult(rows=len(x), epochs=cfg.epochs, steps=steps, final_loss=last, dp=True,
                     noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate,
                     max_grad_norm=dp.max_grad_norm)


def _plain(net: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
           optimizer: torch.optim.Optimizer, gen: torch.Generator) -> tuple[int, float]:
    loader = DataLoader(TensorDataset(x, y), batch_size=min(cfg.batch_size, len(x)),
                        shuffle=True, generator=gen)
    steps, last = 0, float("nan")
    for _ in range(cfg.epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(xb), yb)
            loss.backward()
            optimizer.step()
            steps += 1
            last = float(loss.detach())
    return steps, last


def poisson_batch(rows: int, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Indices of one Poisson-sampled batch, drawn as Opacus' ``UniformWithReplacementSampler``
    draws them (one uniform per record from ``gen``): possibly empty."""
    return (torch.rand(rows, generator=gen) < rate).nonzero(as_tuple=False).reshape(-1)


def clipped_gradient_sum(net: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         max_grad_norm: float) -> dict[str, torch.Tensor]:
    """Sum over the rows of each row's loss gradient, each clipped to L2 norm ``max_grad_norm``.

    Per-example gradients come from ``torch.func`` (``vmap`` over ``grad`` of the one-row loss);
    the clip factor is Opacus': ``min(1, C / (||g_i|| + 1e-6))`` with the norm over all
    parameters. No row is ever seen by the sum with more than norm ``C``.
    """
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.detach() for k, v in net.named_buffers()}
    if len(x) == 0:
        return {k: torch.zeros_like(v) for k, v in params.items()}

    def row_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(net, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_row = vmap(grad(row_loss), in_dims=(None, 0, 0), randomness="different")(params, x, y)
    norms = torch.stack([g.reshape(len(x), -1).norm(2, dim=-1) for g in per_row.values()],
                        dim=1).norm(2, dim=1)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("i,i...", factor, g) for k, g in per_row.items()}


def _dp_sgd(net: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, dp: DPSGDPlan,
            optimizer: torch.optim.Optimizer, gen: torch.Generator,
            noise_gen: torch.Generator) -> tuple[int, float]:
    rows = len(x)
    per_epoch = dpsgd.batches_per_epoch(rows, cfg.batch_size)
    expected = dpsgd.expected_batch_size(rows, cfg.batch_size)
    std = dp.noise_multiplier * dp.max_grad_norm
    params = dict(net.named_parameters())
    steps, last = 0, float("nan")
    for _ in range(cfg.epochs):
        for _ in range(per_epoch):
            idx = poisson_batch(rows, dp.sample_rate, gen)
            xb, yb = x[idx], y[idx]
            summed = clipped_gradient_sum(net, xb, yb, dp.max_grad_norm)
            # An empty batch is still a noised step (noise on a zero sum): skipping it would
            # reveal that the batch was empty.
            for k, p in params.items():
                noise = torch.normal(0.0, std, size=p.shape, generator=noise_gen)
                p.grad = (summed[k] + noise) / expected
            optimizer.step()
            steps += 1
            if len(xb):
                with torch.no_grad():
                    last = float(F.cross_entropy(net(xb), yb))
    return steps, last


@torch.no_grad()
def predict_proba(net: nn.Module, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Class probabilities from the torch network (used for parity and metrics)."""
    net.eval()
    out = []
    for i in range(0, len(x), batch):
        logits = net(torch.from_numpy(np.ascontiguousarray(x[i : i + batch], np.float32)))
        if getattr(net, "probabilities", False):
            out.append(logits.numpy())
        else:
            out.append(torch.softmax(logits, dim=-1).numpy())
    return np.concatenate(out).astype(np.float64)
