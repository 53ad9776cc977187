"""The device-level guarantee of everything a federation has released, from the accountant.

The aggregator (any driver) states what one device's whole contribution is protected by, over the
rounds released so far; devices account the same rounds with the same releases
(:func:`bedside.privacy.federated.device_round_releases`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bedside.constants import NOISE_CENTRAL, NOISE_NONE
from bedside.federation.settings import RoundSettings


def strength(epsilon: float | None) -> str:
    """An epsilon in the words a privacy officer uses: above 10 weak, above 1 moderate, else
    strong (at delta well below one over the population size). None or infinite: none."""
    if epsilon is None or not math.isfinite(epsilon):
        return "no guarantee"
    if epsilon > 10:
        return "a weak guarantee"
    return "a moderate guarantee" if epsilon > 1 else "a strong guarantee"


def round_device_releases(round_id: int, s: RoundSettings) -> list[Any]:
    """The device-level releases a device made in a round it contributed to."""
    from bedside.federation.fairness import count_releases
    from bedside.federation.statistics import statistics_releases
    from bedside.privacy.federated import device_round_releases

    if s.statistics is not None:
        return [r for r in statistics_releases(round_id, s.statistics) if r.unit == "device"]
    out = device_round_releases(round_id, s.noise, s.update_noise_multiplier,
                                s.adaptive.count_noise if s.adaptive else None)
    if s.group_counts is not None and s.group_counts.release:  # the counts beside the update
        out += [r for r in count_releases(round_id, s.group_counts) if r.unit == "device"]
    return out


def device_privacy(rounds: Sequence[RoundSettings], delta: float,
                   seeded_devices: bool = False) -> dict[str, Any]:
    """Device-level epsilon of ``rounds`` (each accounted with the settings it ran under).

    Central mode counts the rounds that released a model; local mode every round in which the
    (untrusted) aggregator received updates: the caller passes the rounds that count. Membership
    is public in Bedside, so the adjacency is replace-one and no amplification by sampling is
    claimed (see :mod:`bedside.privacy.federated`).
    """
    from bedside.privacy import accountant as acct
    from bedside.privacy.ledger import releases_event

    last = rounds[-1] if rounds else None
    out: dict[str, Any] = {"unit": "device", "rounds": len(rounds), "delta": delta,
                           "adjacency": "replace one device's data (membership is public)"}
    if seeded_devices or any(s.seeded for s in rounds):
        out["seeded_noise"] = True
        out["warning"] = ("noise was seeded (a test or demo): reproducible, so NOT private, "
                          "whatever epsilon says")
    if last is not None:
        out.update(noise=last.noise, noise_multiplier=last.noise_multiplier,
                   clip_norm=last.clip_norm)
        if last.adaptive is not None:
            out["adaptive_clipping"] = True
    if any(s.noise == NOISE_NONE and s.statistics is None for s in rounds):
        # null, not infinity: the report travels in signed JSON, which carries finite numbers
        out["epsilon"] = None
        out["note"] = "a round without device-level noise: no device-level guarantee"
        return out
    releases = [r for i, s in enumerate(rounds, start=1) for r in round_device_releases(i, s)]
    out["epsilon"] = acct.epsilon(releases_event(releases), delta) if releases else 0.0
    if last is not None:
        out["trust"] = ("assumes the aggregator adds the announced noise (central DP)"
                        if last.noise == NOISE_CENTRAL else
                        "holds against the aggregator (local DP); bound for a device in every "
                        "round")
    return out
