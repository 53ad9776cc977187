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

    def fields(self) -> dict[str, Any]:
        return asdict(self)


#: The one set every task used before the tuning study (chosen on WDBC).
UNTUNED = TaskDefaults()

#: Chosen by benchmarks/tuning.py (validation splits only); keyed by dataset.
TUNED: dict[str, TaskDefaults] = {
    "wdbc": replace(UNTUNED, batch_size=64, clip_norm=0.5),
    "digits": replace(UNTUNED, statistics_share=0.25, server_optimizer="fedadam",
                      server_params={"lr": 0.03}),
    # a linear model over the window beat the 1-D convolution at every size tried (0.953 against
    # 0.866 at best on validation): under DP-SGD, 301 weights carry less noise than 3,041
    "vitals": replace(UNTUNED, batch_size=64, clip_norm=2.0, rounds=25),
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


#: The demo's device-level noise: the noise the aggregator adds to the sum of clipped updates
#: (central mode) is at most this fraction of the clip norm on the averaged update, in L2 over
#: every parameter (``z * sqrt(P) / n``), and never a larger multiplier than DEVICE_NOISE_CAP.
DEVICE_NOISE_TO_CLIP = 0.25
DEVICE_NOISE_CAP = 0.2


def device_noise(parameters: int, clients: int) -> float:
    """The demo's device-level noise multiplier for a model of ``parameters`` weights and
    ``clients`` clinics: ``min(DEVICE_NOISE_CAP, DEVICE_NOISE_TO_CLIP * clients / sqrt(P))``,
    to 2 significant digits.

    Why a rule and not a tuned value: with a handful of clinics no noise that leaves a model
    usable buys a meaningful device-level guarantee (at z = 0.2, 5 clinics and 15 rounds the
    device-level epsilon is about 1e5; benchmarks/README.md, Federation), so the demo's
    device-level noise exercises the mechanism and is reported as a weak guarantee. Its cost is
    not weak: on the averaged update it is ``z * sqrt(P) / n`` times the clip norm, about 1 for a
    650-weight model at z = 0.2 (as large as the update itself). The rule keeps that at a
    quarter, whatever the model's size."""
    if parameters < 1 or clients < 1:
        raise InputError("parameters and clients must be >= 1")
    z = min(DEVICE_NOISE_CAP, DEVICE_NOISE_TO_CLIP * clients / math.sqrt(parameters))
    return float(f"{z:.2g}")


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
