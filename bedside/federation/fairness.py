"""Fleet-wide figures per patient group, from noised, accounted confusion counts of the devices.

The data team's reference rows (``[evaluation] groups``) show how a model does per patient group
on data the hospital holds centrally. How it does on the clinics' own patients only the devices
can tell, and what they tell must be private. With ``[evaluation] fleet_counts``, a training round
asks every device for *per-group confusion counts* of the round's model (the version it starts
from) on its own records:

1. the device predicts each of its trainable records (training consent, not withdrawn) with the
   round's model, finds the record's group (its stored patient attributes, joined by ``/``, e.g.
   ``65+/F``; a group the announcement does not list counts under ``(other)``), and counts, per
   group, true positives, false positives, true negatives and false negatives (binary tasks), or
   correct and wrong predictions (more classes);
2. it clips the vector of counts to L2 norm ``D = device_records`` (a device with more records is
   scaled down: its own rates unchanged) and adds Gaussian noise of standard deviation ``z`` to
   every count, records the release in its ledger and only then sends it beside its update;
3. the aggregator adds the devices' vectors (:func:`combine`) into fleet-wide counts per group and
   from them accuracy, sensitivity and specificity, the largest gap between groups large enough
   to judge, and the noise level of every figure. They go into the manifest of the version the
   round produces (``metrics.fleet_groups``, naming the version they evaluate) and into the round
   result.

Privacy, described by :func:`count_releases` and accounted in every device's ledger; the noise is
the device's own, so the guarantee holds against the aggregator:

* record level, add/remove one record: a record adds 1 to exactly one count, and clipping the
  vector is a projection (1-Lipschitz), so the sensitivity is 1 and noise ``z`` is one Gaussian
  mechanism with multiplier ``z``;
* device level, replace one device's data: the clipped vector moves by at most ``2D``, multiplier
  ``z / (2 D)``: counts of a whole clinic are not hidden by noise of a few units (the device-level
  epsilon of such a release is large, and reported as it is).

A device reserves its record budget for the releases the federation plans (``releases``) when it
calibrates its DP-SGD noise, withholds the counts (and still trains) when its policy or budget
refuses them, and never releases more than planned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bedside.config import setting
from bedside.constants import UNIT_DEVICE, UNIT_RECORD
from bedside.errors import InputError, ValidationError
from bedside.privacy.ledger import Release

#: The group a record falls into when its attributes match none the announcement lists.
OTHER = "(other)"
#: Bounds on what an announcement may ask for (a hostile aggregator must not make a device build
#: a huge vector, nor split its records so finely that the counts single patients out).
MAX_LEVELS = 64
MAX_LEVEL_CHARS = 160  # up to MAX_ATTRIBUTES values of 32 characters, joined by "/"
MAX_ATTRIBUTES = 4
#: A device's default least noise on a count (``[privacy] min_group_noise``).
MIN_GROUP_NOISE = 2.0
NOTE = "per-group confusion counts"
BINARY_CELLS = ("tp", "fp", "tn", "fn")
MULTICLASS_CELLS = ("correct", "wrong")


def _check_names(values: Sequence[str], where: str, limit: int) -> None:
    if len(values) > limit:
        raise ValidationError("bad_announcement", f"{where}: at most {limit}, got {len(values)}")
    for v in values:
        if not v or len(v) > MAX_LEVEL_CHARS or not v.isprintable():
            raise ValidationError("bad_announcement", f"{where}: {v[:20]!r} is not a short, "
                                  "printable name")
    if len(set(values)) != len(values):
        raise ValidationError("bad_announcement", f"{where}: names repeat")


@dataclass(frozen=True)
class GroupCountSettings:
    """What a training round of a federation with ``[evaluation] fleet_counts`` announces
    (``group_counts`` of the round settings)."""

    attributes: tuple[str, ...] = setting(doc="the record attributes whose values, joined by "
                                          "'/', name a record's group (e.g. age_band, sex)")
    levels: tuple[str, ...] = setting(doc="the groups counted (e.g. '65+/F'); a record in none "
                                      "of them counts under '(other)'")
    noise_multiplier: float = setting(doc="z: noise standard deviation on every count "
                                      "(record-level sensitivity 1)", positive=True, max=1e6)
    device_records: int = setting(doc="D: a device's vector of counts is clipped to L2 norm D",
                                  min=1, max=10**9)
    releases: int = setting(doc="how many such releases the federation plans in all (a device "
                            "reserves its budget for them)", min=1, max=100_000)
    release: bool = setting(doc="this round asks for the counts")
    positive: int = setting(1, "index of the positive class (binary tasks)", min=0, max=1)

    def __post_init__(self) -> None:
        if not self.attributes:
            raise ValidationError("bad_announcement", "group counts name no attribute")
        _check_names(self.attributes, "group count attributes", MAX_ATTRIBUTES)
        _check_names(self.levels, "group count levels", MAX_LEVELS)
        if OTHER in self.levels:
            raise ValidationError("bad_announcement", f"group count levels: {OTHER!r} is "
                                  "reserved for records in no listed group")


def schedule(training_round: int, planned_rounds: int, every: int) -> tuple[bool, int]:
    """Whether training round ``training_round`` (1-based) asks for group counts, and how many
    releases the federation plans in all: every ``every``-th round and the last planned one
    (``every`` 0: the last only). An open-ended federation (``planned_rounds`` 0) needs
    ``every``; its total is then counted over :data:`~bedside.federation.device.ASSUMED_ROUNDS`,
    the horizon its devices calibrate for."""
    from bedside.federation.device import ASSUMED_ROUNDS

    if every == 0:
        if planned_rounds == 0:
            raise InputError("group counts in an open-ended federation need an interval")
        return training_round == planned_rounds, 1
    horizon = planned_rounds or ASSUMED_ROUNDS
    total = horizon // every + (1 if planned_rounds and planned_rounds % every else 0)
    release = training_round % every == 0 or training_round == planned_rounds
    return release, max(1, total)


def cells(n_classes: int) -> tuple[str, ...]:
    return BINARY_CELLS if n_classes == 2 else MULTICLASS_CELLS


def groups_of(settings: GroupCountSettings) -> tuple[str, ...]:
    """The groups of the vector, in its order: the announced levels, then ``(other)``."""
    return (*settings.levels, OTHER)


def dimension(settings: GroupCountSettings, n_classes: int) -> int:
    return len(groups_of(settings)) * len(cells(n_classes))


def record_group(attributes: Mapping[str, str] | None, settings: GroupCountSettings) -> str:
    """The group a record with these stored attributes counts under."""
    if not attributes or any(a not in attributes for a in settings.attributes):
        return OTHER
    name = "/".join(str(attributes[a]).strip() for a in settings.attributes)
    return name if name in settings.levels else OTHER


def counts(y: np.ndarray, predicted: np.ndarray, groups: Sequence[str],
           settings: GroupCountSettings, n_classes: int) -> np.ndarray:
    """The exact per-group confusion counts (they never leave the device unnoised)."""
    y, predicted = np.asarray(y, np.int64), np.asarray(predicted, np.int64)
    if not len(y) == len(predicted) == len(groups):
        raise InputError(f"group counts: {len(y)} labels, {len(predicted)} predictions and "
                         f"{len(groups)} groups")
    order = {g: i for i, g in enumerate(groups_of(settings))}
    width = len(cells(n_classes))
    out = np.zeros(len(order) * width, np.float64)
    pos = settings.positive
    for label, pred, g in zip(y, predicted, groups, strict=True):
        base = order.get(g, order[OTHER]) * width
        if n_classes == 2:
            cell = (0 if pred == pos else 3) if label == pos else (1 if pred == pos else 2)
        else:
            cell = 0 if pred == label else 1
        out[base + cell] += 1.0
    return out


def privatize_counts(exact: np.ndarray, settings: GroupCountSettings,
                     rng: np.random.Generator) -> np.ndarray:
    """Clip the vector to L2 norm ``D`` and add noise ``z`` to every count (the release)."""
    from bedside.privacy.mechanisms import add_gaussian_noise, clip_update

    clipped, _ = clip_update([np.asarray(exact, np.float64)], float(settings.device_records))
    return np.asarray(add_gaussian_noise(clipped, settings.noise_multiplier, 1.0, rng)[0],
                      np.float64)


def count_releases(round_id: int, settings: GroupCountSettings, fleet: str = "",
                   model_sha256: str = "") -> list[Release]:
    """The ledger's description of one release of group counts (see the module docstring)."""
    what = f"{NOTE} of model {model_sha256[:16]}" if model_sha256 else NOTE
    return [
        Release(round=round_id, unit=UNIT_RECORD, mechanism="gaussian",
                noise_multiplier=settings.noise_multiplier, sample_rate=1.0, steps=1,
                note=f"{what}, noised on the device; add/remove one record, sensitivity 1",
                fleet=fleet),
        Release(round=round_id, unit=UNIT_DEVICE, mechanism="gaussian",
                noise_multiplier=settings.noise_multiplier / (2.0 * settings.device_records),
                sample_rate=1.0, steps=1,
                note=f"{what}; replace-one device, sensitivity 2D", fleet=fleet),
    ]


def is_count_release(release: Release) -> bool:
    return release.note.startswith(NOTE)


def made(releases: Sequence[Release], fleet: str) -> int:
    """How many record-level releases of group counts a device made in ``fleet``."""
    return sum(1 for r in releases
               if r.unit == UNIT_RECORD and r.fleet == fleet and is_count_release(r))


def planned(settings: GroupCountSettings, fleet: str) -> list[Release]:
    """The record-level releases the federation plans, for calibrating DP-SGD around them."""
    one = count_releases(0, settings, fleet)[0]
    return [one] * settings.releases


def norm_bound(settings: GroupCountSettings, dim: int) -> float:
    """The largest L2 norm an honest device's noised vector of length ``dim`` has (its clip plus
    a 1e-9 tail bound of its noise)."""
    from bedside.federation.validate import NOISE_TAIL

    return settings.device_records + settings.noise_multiplier * (math.sqrt(dim) + NOISE_TAIL)


def parse(value: Any, settings: GroupCountSettings, n_classes: int) -> np.ndarray:
    """A device's counts as received (``group_counts`` beside its update); ValidationError
    ``bad_group_counts`` unless a list of ``dimension`` finite numbers within the norm bound."""
    dim = dimension(settings, n_classes)
    if not isinstance(value, list) or len(value) != dim or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise ValidationError("bad_group_counts", f"group_counts must be a list of {dim} numbers")
    try:
        a = np.asarray(value, np.float64)
    except OverflowError:
        raise ValidationError("bad_group_counts", "group_counts hold a number too large") from None
    if not np.isfinite(a).all():
        raise ValidationError("bad_group_counts", "group_counts must be finite")
    norm, bound = float(np.linalg.norm(a)), norm_bound(settings, dim)
    if norm > bound:
        raise ValidationError("bad_group_counts", f"group_counts L2 norm {norm:.4g} exceeds the "
                              f"bound {bound:.4g}")
    return a


def _rate(num: float, den: float) -> float | None:
    return round(num / den, 4) if den > 0 else None


def _rate_sd(num: float, other: float, var: float) -> float | None:
    """Standard deviation, from the noise alone, of ``num / (num + other)`` when ``num`` and
    ``other`` each carry noise of variance ``var`` (first-order propagation)."""
    den = num + other
    if den <= 0:
        return None
    return round(math.sqrt(var * (num * num + other * other)) / (den * den), 4)


def combine(vectors: Sequence[np.ndarray], settings: GroupCountSettings, n_classes: int,
            min_rows: int) -> dict[str, Any]:
    """Fleet-wide per-group figures from the devices' noised vectors.

    Counts are summed, then floored at 0 (the noise can make a small count negative). Every
    fleet-wide count carries noise of standard deviation ``s = z sqrt(devices)``
    (``count_noise_std``), and each figure states its own (``noise_sd``, propagated from the
    counts; sampling error comes on top). A group is judged when its noised row count is at
    least ``min_rows`` and three times its noise, and (binary) each class holds at least
    :data:`bedside.metrics.MIN_CLASS_ROWS` rows and three times its noise; the largest gap of
    each figure is taken between judged groups.
    """
    from bedside.metrics import MIN_CLASS_ROWS, largest_gaps

    if not vectors:
        raise InputError("no group counts to combine")
    total = np.maximum(np.sum(np.asarray(vectors, np.float64), axis=0), 0.0)
    names = cells(n_classes)
    var = settings.noise_multiplier ** 2 * len(vectors)  # of every fleet-wide count
    sd = math.sqrt(var)
    out: dict[str, dict[str, Any]] = {}
    for i, g in enumerate(groups_of(settings)):
        c = dict(zip(names, total[i * len(names):(i + 1) * len(names)], strict=True))
        rows = float(sum(c.values()))
        row: dict[str, Any] = {"rows": round(rows, 1)}
        # a figure is judged only when its counts stand well clear of their noise (3 sd)
        small = rows < max(min_rows, 3.0 * sd * math.sqrt(len(names)))
        if n_classes == 2:
            pos, neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
            right, wrong = c["tp"] + c["tn"], c["fp"] + c["fn"]
            row.update(positives=round(pos, 1), accuracy=_rate(right, rows),
                       sensitivity=_rate(c["tp"], pos), specificity=_rate(c["tn"], neg),
                       noise_sd={"accuracy": _rate_sd(right, wrong, 2 * var),
                                 "sensitivity": _rate_sd(c["tp"], c["fn"], var),
                                 "specificity": _rate_sd(c["tn"], c["fp"], var)})
            small = small or min(pos, neg) < max(MIN_CLASS_ROWS, 3.0 * sd * math.sqrt(2.0))
        else:
            row["accuracy"] = _rate(c["correct"], rows)
            row["noise_sd"] = {"accuracy": _rate_sd(c["correct"], c["wrong"], var)}
        row["judged"] = not small
        out[g] = row
    metrics = ["accuracy"] + (["sensitivity", "specificity"] if n_classes == 2 else [])
    gaps, largest = largest_gaps(out, metrics)
    return {"group_by": list(settings.attributes), "groups": out, "gaps": gaps,
            "largest_gap": largest, "min_rows": min_rows,
            "small_groups": sorted(g for g, r in out.items() if not r["judged"]),
            "devices": len(vectors),
            "count_noise_std": round(settings.noise_multiplier * math.sqrt(len(vectors)), 3),
            "noise_multiplier": settings.noise_multiplier,
            "device_records": settings.device_records}


def record_epsilon(settings: GroupCountSettings, delta: float, releases: int | None = None
                   ) -> float:
    """The record-level epsilon (at ``delta``) of ``releases`` releases of group counts alone
    (default: as many as the federation plans)."""
    from bedside.privacy import accountant

    n = settings.releases if releases is None else releases
    return accountant.epsilon(accountant.gaussian(settings.noise_multiplier, n), delta)


def noise_for_budget(epsilon: float, delta: float, releases: int = 1) -> float:
    """The noise multiplier at which ``releases`` releases cost ``epsilon`` (record level, at
    ``delta``), rounded up to 3 decimals."""
    from bedside.privacy.accountant import calibrate

    z = calibrate(epsilon, delta, 1.0, releases)
    return math.ceil(z * 1000.0) / 1000.0
