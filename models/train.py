"""Training loops (torch): plain, and record-level DP-SGD with Opacus.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") clips each example's gradient
to ``max_grad_norm`` and adds Gaussian noise with std ``noise_multiplier * max_grad_norm`` to the
sum, over batches drawn by Poisson sampling with rate ``q = batch_size / n`` (Opacus
``make_private(poisson_sampling=True)``). The loop only *describes* what it did (noise multiplier,
sample rate, number of steps) in :class:`FitResult`; the privacy accountant turns that description
into epsilon. Accounting is never mixed into the loop.

Noise comes from a ``torch.Generator`` seeded from the OS's entropy unless a seed is given (tests).
Opacus' ``secure_mode`` (a cryptographically secure sampler, which also resists floating-point
attacks on the Gaussian sampler, Mironov 2012) needs torchcsprng, which is not installable here;
this is stated in docs/privacy.md.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bedside.errors import InputError, PrivacyError

# Known, harmless warnings, silenced by message (module-level: catch_warnings is not thread-safe
# and agents train on their own threads). Opacus warns that its secure RNG is off (see above);
# torch, that a full backward hook fires on inputs without gradients (Opacus' per-sample hooks).
warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")


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
class DPConfig:
    """Record-level DP-SGD settings. ``noise_multiplier`` = noise std / ``max_grad_norm``."""

    noise_multiplier: float
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise InputError(f"DP-SGD noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0:
            raise InputError(f"DP-SGD max_grad_norm must be > 0, got {self.max_grad_norm}")


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


def _batches_per_epoch(rows: int, batch_size: int) -> int:
    return math.ceil(rows / min(batch_size, rows))


def dp_sample_rate(rows: int, batch_size: int) -> float:
    """The Poisson sampling rate DP-SGD uses for ``rows`` records and a batch of ``batch_size``.

    Exactly what Opacus does (``DPDataLoader.from_data_loader``): ``1 / len(loader)`` with
    ``len(loader) = ceil(rows / batch_size)``. The privacy ledger records this value, so it must
    be the one training really uses (``fit`` checks).
    """
    return 1.0 / _batches_per_epoch(rows, batch_size)


def dp_steps(rows: int, batch_size: int, epochs: int) -> int:
    """DP-SGD steps ``fit`` takes: Opacus runs ``len(loader)`` Poisson batches per epoch."""
    return epochs * _batches_per_epoch(rows, batch_size)


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
        dp: DPConfig | None = None) -> FitResult:
    """Train ``net`` in place on (x, y); with ``dp``, record-level DP-SGD via Opacus."""
    return _fit(net, x, y, cfg, dp)


def _fit(net: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig,
         dp: DPConfig | None) -> FitResult:
    if len(x) != len(y) or len(x) == 0:
        raise InputError(f"training needs matching, non-empty x and y (got {len(x)}, {len(y)})")
    gen, noise_gen = _generators(cfg.seed)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    data = TensorDataset(torch.from_numpy(np.ascontiguousarray(x, np.float32)),
                         torch.from_numpy(np.asarray(y, np.int64)))
    loader = DataLoader(data, batch_size=min(cfg.batch_size, len(data)), shuffle=True,
                        generator=gen)
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD
    optimizer = opt_cls(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model: nn.Module = net
    actual_q = 0.0
    net.train()
    if dp is not None:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")  # its accountant is unused: we account ourselves
        model, optimizer, loader = engine.make_private(
            module=net, optimizer=optimizer, data_loader=loader,
            noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True, noise_generator=noise_gen,
        )
        planned_q = dp_sample_rate(len(data), cfg.batch_size)
        actual_q = float(getattr(loader, "sample_rate", -1.0))  # Opacus' DPDataLoader
        if abs(actual_q - planned_q) > 1e-12:
            raise PrivacyError(f"Opacus samples at rate {loader.sample_rate}, the plan at "
                               f"{planned_q}; refusing to train with unaccounted privacy loss")
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    steps, last = 0, float("nan")
    for _ in range(cfg.epochs):
        for xb, yb in loader:
            # Poisson sampling can draw an empty batch. It must still be a noised step (Opacus
            # adds noise to a zero gradient): skipping it would reveal that the batch was empty.
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            steps += 1
            if len(xb):
                last = float(loss.detach())
    model.eval()
    net.eval()
    if dp is None:
        return FitResult(rows=len(x), epochs=cfg.epochs, steps=steps, final_loss=last, dp=False)
    return FitResult(rows=len(x), epochs=cfg.epochs, steps=steps, final_loss=last, dp=True,
                     noise_multiplier=dp.noise_multiplier,
                     sample_rate=actual_q,  # what Opacus actually used
                     max_grad_norm=dp.max_grad_norm)


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
