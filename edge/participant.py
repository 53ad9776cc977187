"""One device's part in one round, without a network: decide, plan, train, privatize, record.

:func:`participate` is what every device driver runs for a round it is asked to join (the MQTT
:class:`~bedside.edge.agent.Agent`, Flower's ClientApp and the in-process simulation): it returns
either a :class:`Contribution` (the privatized update and the metadata that travels with it,
already recorded in the ledger) or a :class:`Decline` with a reason. Signing, the outbox and
publishing are the driver's. The privacy rules themselves are the round core's
(:mod:`bedside.federation.device`); training is :func:`bedside.edge.trainer.local_update` (torch,
imported only here, only when the device trains).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bedside.constants import UNIT_RECORD
from bedside.errors import (
    BudgetExceededError,
    InputError,
    LedgerError,
    PolicyDeclined,
    PrivacyError,
)
from bedside.federation.device import (
    DevicePrivacy,
    plan_group_counts,
    plan_round,
    privatize,
    update_meta,
)
from bedside.federation.seeds import training_seed
from bedside.federation.settings import RoundSettings
from bedside.manifest import Manifest

log = logging.getLogger("bedside.edge.participant")


@dataclass(frozen=True)
class Contribution:
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any]
    steps: int
    norm: float  # before clipping; stays on the device
    timings: dict[str, float]


@dataclass(frozen=True)
class Decline:
    reason: str
    detail: str = ""


#: What a round can be declined for, raised by the privacy rules: the reason code each becomes.
_REASONS: tuple[tuple[type[PrivacyError], str], ...] = (
    (PolicyDeclined, "policy"), (BudgetExceededError, "budget"),
    (LedgerError, "ledger_unavailable"))
DECLINING = tuple(t for t, _ in _REASONS)


def declined(exc: PrivacyError) -> Decline:
    """The decline for ``exc`` (one of ``DECLINING``): its reason code, its message kept local."""
    return Decline(next(r for t, r in _REASONS if isinstance(exc, t)), str(exc))


def participate(round_id: int, settings: RoundSettings, manifest: Manifest, model_bytes: bytes,
                x: np.ndarray, y: np.ndarray, *, privacy: DevicePrivacy, ledger: Any, fleet: str,
                seed: int | None, rng: np.random.Generator,
                attributes: Sequence[Mapping[str, str] | None] | None = None
                ) -> Contribution | Decline:
    """Take part in a round, or say why not. Never raises for a reason a round can be declined
    for (budget, ledger, no records, not sampled, cannot train); other errors propagate.

    ``attributes`` (per record of ``x``, its stored patient attributes) place each record in its
    patient group when the round asks for per-group counts
    (:mod:`bedside.federation.fairness`)."""
    if ledger is None:
        return Decline("ledger_unavailable", "the privacy ledger could not be opened")
    if len(x) == 0:
        return Decline("no_records", "ingest records with 'bedside edge ingest'")
    if settings.participation_rate < 1.0 and rng.random() >= settings.participation_rate:
        return Decline("not_sampled")  # nothing released, nothing to account
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        plan = plan_round(round_id, settings, privacy, len(x), ledger)
    except DECLINING as exc:
        return declined(exc)
    group_releases, withheld = plan_group_counts(round_id, settings, privacy, ledger, plan)
    if withheld:
        log.info("round %d: per-group counts withheld: %s", round_id, withheld)
    timings["plan"] = time.perf_counter() - t0
    try:
        from bedside.edge.trainer import local_update
    except ImportError as exc:
        return Decline("cannot_train", f"install bedside[train] to train ({exc})")
    t0 = time.perf_counter()
    delta, fit = local_update(manifest, model_bytes, x, y, settings.train, plan.dp,
                              training_seed(seed, round_id))
    timings["train"] = time.perf_counter() - t0
    if plan.dp is not None and (fit.steps, fit.sample_rate) != (plan.dp.steps,
                                                                plan.dp.sample_rate):
        raise PrivacyError(f"training ran {fit.steps} steps at sample rate {fit.sample_rate:.6g}, "
                           f"the ledger plan says {plan.dp.steps} at {plan.dp.sample_rate:.6g}; "
                           "nothing is sent")
    t0 = time.perf_counter()
    priv = privatize(delta, list(manifest.parameters), settings, rng)
    counts = (group_counts(settings, manifest, model_bytes, x, y, attributes, rng)
              if group_releases else None)
    try:
        ledger.record([*plan.releases, *group_releases])  # before anything leaves the device
    except DECLINING as exc:
        return declined(exc)
    record_eps = ledger.spent(UNIT_RECORD) if privacy.record_epsilon is not None else None
    meta = update_meta(fleet, settings, len(x), record_eps, privacy.record_delta, priv.clip_bit,
                       seeded=seed is not None, group_counts=counts)
    timings["privatize_and_record"] = time.perf_counter() - t0
    return Contribution(priv.tensors, meta, fit.steps, priv.norm, timings)


def group_counts(settings: RoundSettings, manifest: Manifest, model_bytes: bytes, x: np.ndarray,
                 y: np.ndarray, attributes: Sequence[Mapping[str, str] | None] | None,
                 rng: np.random.Generator) -> np.ndarray:
    """The round's model (the version it starts from) on this device's trainable records, as
    noised per-group confusion counts (:mod:`bedside.federation.fairness`)."""
    from bedside.federation import fairness
    from bedside.models.onnx_model import OnnxClassifier

    g = settings.group_counts
    assert g is not None
    model = OnnxClassifier(model_bytes, manifest.output, manifest.schema.labels,
                           where=f"model {settings.model_sha256[:12]}")
    predicted = np.argmax(model.probabilities(x), axis=1)
    groups = [fairness.record_group(a, g) for a in (attributes or [None] * len(x))]
    n_classes = len(manifest.schema.labels)
    return fairness.privatize_counts(fairness.counts(y, predicted, groups, g, n_classes), g, rng)


def participate_statistics(round_id: int, settings: RoundSettings, manifest: Manifest,
                           x: np.ndarray, *, privacy: DevicePrivacy, ledger: Any, fleet: str,
                           seed: int | None, rng: np.random.Generator) -> Contribution | Decline:
    """A statistics round (:mod:`bedside.federation.statistics`): the device's noised, clipped
    feature sums, recorded in its ledger first. The noise is the device's own, so the release
    is enforced by the device whatever the aggregator does; its policy sets the least noise it
    accepts (``min_statistics_noise``) and its budget the rest."""
    from bedside.federation.device import check_statistics_policy
    from bedside.federation.statistics import (
        local_statistics,
        released_for,
        statistics_releases,
    )

    assert settings.statistics is not None
    if ledger is None:
        return Decline("ledger_unavailable", "the privacy ledger could not be opened")
    if len(x) == 0:
        return Decline("no_records", "ingest records with 'bedside edge ingest'")
    t0 = time.perf_counter()
    releases = statistics_releases(round_id, settings.statistics, fleet, settings.model_sha256)
    try:
        if released_for(ledger, fleet, settings.model_sha256):
            # once per model: the aggregator still holds the earlier vector (a retried round)
            return Decline("statistics_released")
        check_statistics_policy(settings, privacy)
        ledger.check(releases)
        vector = local_statistics(x, manifest.schema, settings.statistics, rng)
        ledger.record(releases)  # before anything leaves the device
    except DECLINING as exc:
        return declined(exc)
    except InputError as exc:  # the model's schema has no allowed range for some feature
        return Decline("statistics_unavailable", str(exc))
    record_eps = ledger.spent(UNIT_RECORD) if privacy.record_epsilon is not None else None
    meta = update_meta(fleet, settings, len(x), record_eps, privacy.record_delta, None,
                       seeded=seed is not None)
    return Contribution({"stats": vector}, meta, 0, float(np.linalg.norm(vector)),
                        {"statistics": time.perf_counter() - t0})
