"""Closing a round, as a pure function: aggregate, central noise, server optimizer, next clip norm.

:func:`aggregate_round` takes the round's accepted updates (streamed, so memory stays O(model)
with FedAvg), the global weights and the server optimizer's state, and returns the new weights and
state. Writing the weights into the ONNX graph, evaluating, storing and publishing the version are
the driver's. Randomness comes from the ``rng`` argument
(:func:`bedside.federation.seeds.round_rng`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bedside.constants import NOISE_CENTRAL, NOISE_LOCAL
from bedside.errors import InputError
from bedside.federation.settings import RoundSettings
from bedside.federation.strategies import (
    AggregationRule,
    RunningSum,
    ServerOptimizer,
    Tensors,
    UpdateSource,
)
from bedside.privacy.mechanisms import add_gaussian_noise, l2_norm, next_clip_norm, noised_count

MIN_CLIP_NORM, MAX_CLIP_NORM = 1e-9, 1e6


@dataclass(frozen=True)
class RoundOutcome:
    weights: Tensors
    optimizer_state: Tensors
    delta_norm: float  # L2 norm of the aggregated (noised) delta
    next_clip_norm: float | None = None  # adaptive clipping: the next round's clip norm
    unclipped_fraction: float | None = None  # adaptive clipping: the private estimate used


def aggregate_round(updates: UpdateSource | RunningSum, *, count: int, settings: RoundSettings,
                    weights: Mapping[str, np.ndarray], optimizer_state: Tensors,
                    rule: AggregationRule, optimizer: ServerOptimizer, rng: np.random.Generator,
                    clip_bits: Sequence[float] = ()) -> RoundOutcome:
    """Aggregate ``count`` accepted updates into new global weights.

    * ``rule`` turns the updates into one delta (FedAvg streams them); a driver that kept only
      the updates' :class:`RunningSum` (an incremental rule) passes that instead;
    * central noise: ``N(0, (z_u C)^2)`` on the sum of clipped updates, i.e. ``N(0, (z_u C /
      n)^2)`` on their mean, where ``z_u`` is the round's update noise multiplier (docs/privacy.md);
    * the server optimizer applies the delta (``sgd`` with lr 1 is FedAvg);
    * adaptive clipping: the count of updates within ``C`` (noised here in central mode; each bit
      already noised by its device in local mode) moves the clip norm towards the target quantile.
    """
    if count < 1:
        raise InputError("no updates to aggregate: the round is empty")
    shapes = {k: tuple(np.shape(v)) for k, v in weights.items()}
    if isinstance(updates, RunningSum):
        if not rule.incremental:
            raise InputError(f"rule {rule.name!r} needs every update, not their running sum")
        if updates.count != count:
            raise InputError(f"the running sum holds {updates.count} update(s), the round "
                             f"accepted {count}")
        delta = updates.mean()
    else:
        streamed = [0]

        def counted() -> Iterator[tuple[Mapping[str, np.ndarray], float]]:
            streamed[0] = 0
            for item in updates():
                streamed[0] += 1
                yield item
        delta = rule.aggregate(counted, shapes)
        if streamed[0] != count:  # every accepted update, and only those, or no new version
            raise InputError(f"the round accepted {count} update(s) but {streamed[0]} were "
                             "aggregated")
    if settings.noise == NOISE_CENTRAL:
        names = list(delta)
        noised = add_gaussian_noise([delta[k] for k in names], settings.update_noise_multiplier,
                                    settings.clip_norm / count, rng)
        delta = dict(zip(names, noised, strict=True))
    new_weights, new_state = optimizer.step(weights, delta, optimizer_state)
    nxt = fraction = None
    a = settings.adaptive
    if a is not None:
        if len(clip_bits) != count:
            raise InputError(f"adaptive clipping needs one clip bit per update ({count}), got "
                             f"{len(clip_bits)}")
        if settings.noise == NOISE_LOCAL:
            noisy = float(sum(clip_bits))  # each device noised its own bit
        else:
            noisy = noised_count(clip_bits, a.count_noise, rng)
        fraction = min(1.0, max(0.0, noisy / count))
        nxt = next_clip_norm(settings.clip_norm, noisy, count, a.target_quantile,
                             a.learning_rate)
        nxt = min(max(nxt, MIN_CLIP_NORM), MAX_CLIP_NORM)  # what an announcement may carry
    return RoundOutcome(weights=new_weights, optimizer_state=new_state,
                        delta_norm=l2_norm(list(delta.values())), next_clip_norm=nxt,
                        unclipped_fraction=fraction)
