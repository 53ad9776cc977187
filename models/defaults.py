"""Federation defaults per task: what ``bedside demo`` trains each built-in dataset with.

A federation's accuracy under record-level DP-SGD depends on settings that differ from task to
task (a 10-class image task needs larger DP-SGD batches than a 2-class one; a 3,000-parameter
convolution is noisier than a 300-weight linear model), so the defaults live here, one entry per
built-in dataset with the architecture it trains, not as one global set.

``TUNED`` was chosen by ``benchmarks/tuning.py`` on validation splits drawn inside the demo's
training rows (never the held-out rows a demo reports on); ``benchmarks/README.md``, section
Tuning, says what was searched and what won. ``UNTUNED`` is the previous single set, where that
search started.

A user's CSV (``bedside demo --data``) gets :func:`for_shape`: the tuned entry of the built-in task
of the same shape (binary tabular, multi-class tabular, time series), with the DP-SGD batch and
local epochs the privacy planner finds for its clinics' size (:func:`bedside.privacy.planner.
better`). Nothing there looks at a clinic's records beyond their count and the schema: searching
hyper-parameters on clinic rows would spend their privacy without accounting for it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bedside.errors import InputError


@dataclass(frozen=True)
class TaskDefaults:
    """The federation settings of one task (the :class:`bedside.demo.run.DemoConfig` fields)."""

    arch: str = "logreg"
    arch_params: dict[str, Any] = field(default_factory=dict)
    rounds: int = 15
    epochs: int = 3
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.5
    lr_decay: float = 1.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # DP-SGD's per-example clip
    clip_norm: float = 1.0  # the update clip
    server_optimizer: str = "sgd"
    server_params: dict[str, Any] = field(default_factory=dict)
    statistics_share: float = 0.5  # of the record budget, what the feature statistics alone cost
    # the demo's device-level (central) noise on the averaged update, as a fraction of the update
    # clip (device_noise): its cost in accuracy, since its guarantee is weak at any usable value
    device_noise_to_clip: float = 0.25

    def fields(self) -> dict[str, Any]:
        return asdict(self)


#: The one set every task used before the tuning study (chosen on WDBC).
UNTUNED = TaskDefaults()

#: Chosen by benchmarks/tuning.py (validation splits only); keyed by dataset.
TUNED: dict[str, TaskDefaults] = {
    # no setting beat the previous defaults by more than the margin on WDBC's validation rows
    "wdbc": UNTUNED,
    # a larger update clip with less device-level noise on it: the devices' DP-SGD updates are
    # mostly noise, so a clip of 1 shrank their signal as much as their noise, and the central
    # noise at a quarter of a larger clip cost more than the clip gained
    # (kept after a comparison on 10 validation splits against the latest search's choice and
    # server momentum, neither of which beat it: benchmarks/README.md, Tuning)
    "digits": replace(UNTUNED, lr=0.25, clip_norm=2.0, device_noise_to_clip=0.1),
    # a linear model over the window beat the 1-D convolution at every size tried (0.959 against
    # 0.877 at best on validation): under DP-SGD, 301 weights carry less noise than 3,041
    "vitals": replace(UNTUNED, batch_size=64, clip_norm=4.0, device_noise_to_clip=0.05,
                      rounds=25),
}

#: Which built-in task a CSV of each shape is like.
LIKE = {("tabular", 2): "wdbc", ("tabular", "multi"): "digits", ("timeseries", 2): "vitals",
        ("timeseries", "multi"): "vitals"}


def for_dataset(name: str, arch: str | None = None) -> TaskDefaults:
    """The tuned defaults of built-in dataset ``name``; with another ``arch`` than the tuned
    one, the tuned training settings with that architecture's own default size."""
    try:
        tuned = TUNED[name]
    except KeyError:
        raise InputError(f"no defaults for dataset {name!r}; built-in: "
                         f"{', '.join(sorted(TUNED))}") from None
    if arch is None or arch == tuned.arch:
        return tuned
    return replace(tuned, arch=arch, arch_params={})


#: The demo's device-level noise: by default the noise the aggregator adds to the sum of clipped
#: updates (central mode) is this fraction of the clip norm on the averaged update, in L2 over
#: every parameter (``z * sqrt(P) / n``), and never a larger multiplier than DEVICE_NOISE_CAP.
DEVICE_NOISE_TO_CLIP = 0.25
DEVICE_NOISE_CAP = 0.2
#: The device-level budget of every demo clinic (``[privacy] device_epsilon`` of its agent.toml):
#: no protection to speak of, a ceiling that makes the devices' own device-level accounting run.
DEMO_DEVICE_EPSILON = 1e6


def device_noise(parameters: int, clients: int, fraction: float = DEVICE_NOISE_TO_CLIP,
                 rounds: int | None = None, delta: float = 1e-5) -> float:
    """The demo's device-level noise multiplier for a model of ``parameters`` weights and
    ``clients`` clinics: ``min(DEVICE_NOISE_CAP, fraction * clients / sqrt(P))`` to 2
    significant digits, and with ``rounds`` never so little that that many rounds would spend
    half of a demo clinic's device-level budget (:func:`least_device_noise`).

    Why a rule and not one tuned value: with a handful of clinics no noise that leaves a model
    usable buys a meaningful device-level guarantee (at z = 0.2 and 15 rounds the device-level
    epsilon is about 900; docs/datasets.md), so the demo's
    device-level noise exercises the mechanism and is reported as a weak guarantee. Its cost is
    not weak: on the averaged update it is ``z * sqrt(P) / n`` times the clip norm, about 1 for a
    650-weight model at z = 0.2 (as large as the update itself), and it grows with the update
    clip while the updates' signal need not. The rule keeps it to ``fraction`` of the clip
    whatever the model's size; ``benchmarks/tuning.py`` chooses each task's fraction
    (:attr:`TaskDefaults.device_noise_to_clip`) together with its update clip."""
    if parameters < 1 or clients < 1:
        raise InputError("parameters and clients must be >= 1")
    if not fraction > 0:
        raise InputError(f"the device noise fraction must be > 0, got {fraction!r}")
    z = float(f"{min(DEVICE_NOISE_CAP, fraction * clients / math.sqrt(parameters)):.2g}")
    if rounds is not None:
        z = max(z, least_device_noise(rounds, DEMO_DEVICE_EPSILON / 2, delta))
    return z


def least_device_noise(rounds: int, epsilon: float, delta: float) -> float:
    """The least central noise multiplier ``z`` (rounded up to 2 significant digits) at which
    ``rounds`` rounds cost at most ``epsilon`` at device level, by the Renyi-DP bound of
    Gaussian composition (Mironov 2017), an upper bound of what a device's ledger records.

    A round is a Gaussian mechanism with multiplier ``s = z / 2`` (replace-one, sensitivity
    2C); ``T`` of them have RDP ``T a / (2 s^2)`` at order ``a``, so ``epsilon <= T a / (2 s^2) +
    ln(1/delta) / (a - 1)``, least at ``a = 1 + s sqrt(2 ln(1/delta) / T)``: ``epsilon <= T u^2 / 2
    + u sqrt(2 T ln(1/delta))`` with ``u = 1/s``, solved for ``u``."""
    if rounds < 1 or not epsilon > 0 or not 0 < delta < 1:
        raise InputError("rounds >= 1, epsilon > 0 and 0 < delta < 1 are needed")
    b = math.sqrt(2.0 * rounds * math.log(1.0 / delta))
    u = (-b + math.sqrt(b * b + 2.0 * rounds * epsilon)) / rounds
    z = 2.0 / u
    digits = 10.0 ** (math.floor(math.log10(z)) - 1)
    return float(f"{math.ceil(z / digits) * digits:.2g}")


def like(kind: str, n_classes: int) -> str:
    """The built-in task a task of this shape (schema kind, number of classes) is like."""
    return LIKE[(kind, 2 if n_classes == 2 else "multi")]


def for_shape(base: TaskDefaults, rows_per_clinic: int, target_epsilon: float, delta: float,
              parameters: int | None = None) -> TaskDefaults:
    """``base`` (the defaults of the built-in task of the same shape) with the DP-SGD batch and
    local epochs the privacy planner prefers for ``rows_per_clinic`` records (the smallest
    clinic) at the budget, for a model of ``parameters`` weights."""
    from bedside.privacy.planner import better, plan

    if rows_per_clinic < 1:
        raise InputError("a clinic needs at least one record")
    asked = plan(target_epsilon, delta, rows_per_clinic, base.rounds, base.batch_size,
                 base.epochs, base.max_grad_norm, account=False)
    alt = better(asked, parameters)
    return base if alt is None else replace(base, batch_size=alt.batch_size, epochs=alt.epochs)
