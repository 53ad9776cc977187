"""Privacy-utility benchmark: centralized record-level DP-SGD on WDBC, by epsilon.

One run writes ``benchmarks/results/privacy_utility.json`` plus the ``## Privacy-utility
(centralized DP-SGD)`` section of ``benchmarks/README.md``. For each model (``logreg``, ``mlp``)
and each privacy level (non-private, epsilon 0.5, 1, 3, 8 at delta 1e-5) and each of 5 seeds:

1. split WDBC 80/20, stratified (``train_test_split(ds, 0.2, seed=s)``): the 20 % is the test set
   and is used once, for the final figure;
2. carve validation splits out of the training part only, train every setting of a small fixed
   grid (epochs, optimizer, learning rate, per-example clip) on the rest and keep the setting with
   the best mean validation accuracy (ties: lower validation log-loss). Selection is nested per
   seed, so no test row of any split is ever seen while choosing;
3. retrain the chosen setting on the whole training part with Bedside's own code
   (``bedside.models.train.fit`` with a ``DPSGDPlan``: DP-SGD, Poisson sampling), the noise
   multiplier from ``bedside.privacy.accountant.calibrate`` for that target epsilon, and evaluate
   on the test set (``bedside.metrics.evaluate``);
4. re-check the guarantee with the accountant: the epsilon of ``sampled_gaussian(z, q, steps)``
   with Bedside's plan (``q = dpsgd.sample_rate(n, batch)``, ``steps = dpsgd.steps(n, batch,
   epochs)``) and with the sample rate and number of steps training actually ran
   (``FitResult.sample_rate``,
   ``FitResult.steps``); the two must agree.

The work is spread over a process pool (``--jobs``, default: the usable cores). Other benchmarks
import :func:`run_arch` and :class:`HyperParams` from here (``benchmarks/federation.py``).

Run from the repository root: ``.venv/bin/python benchmarks/privacy_utility.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache
from itertools import product
from multiprocessing import get_context
from typing import Any

from benchlib import README, REPO, load_average, log, machine, write_section

RESULTS_JSON = REPO / "benchmarks" / "results" / "privacy_utility.json"
HEADING = "## Privacy-utility (centralized DP-SGD)"

DATASET = "wdbc"
TEST_FRACTION = 0.2
VAL_FRACTION = 0.2
VAL_REPEATS = 2  # validation splits per seed (carved from its training part only)
DELTA = 1e-5
EPSILONS: tuple[float, ...] = (0.5, 1.0, 3.0, 8.0)
SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
ARCHS: tuple[str, ...] = ("logreg", "mlp")
BATCH = 64
GRID_EPOCHS = (20, 50)
GRID_OPTIMIZERS = ("sgd", "adam")
GRID_LR = (0.05, 0.2)
GRID_CLIP = (0.5, 1.0)  # per-example clip of DP-SGD (max_grad_norm); unused without DP

# The literature anchors: centralized DP-SGD logistic regression on WDBC.
ANCHORS: dict[float, float] = {1.0: 0.93, 3.0: 0.965}
ANCHOR_SOURCE = ("anchor given in the project's issue (no citable source with exactly this "
                 "setting was found; see the notes)")

Level = float | None  # target epsilon, or None for non-private


# -------------------------------------------------------------------------------------------------
# small helpers
# -------------------------------------------------------------------------------------------------


def level_key(level: Level) -> str:
    return "non-private" if level is None else f"{level:g}"


def mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "n": len(values)}


@dataclass(frozen=True)
class HyperParams:
    """One setting of the grid. ``max_grad_norm`` is None for non-private training."""

    epochs: int
    optimizer: str
    lr: float
    max_grad_norm: float | None
    batch_size: int = BATCH

    @property
    def label(self) -> str:
        clip = "" if self.max_grad_norm is None else f", C {self.max_grad_norm:g}"
        return f"{self.epochs} ep, {self.optimizer} lr {self.lr:g}{clip}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HyperParams:
        return cls(**dict(d))


def grid(private: bool) -> list[HyperParams]:
    clips: Iterable[float | None] = GRID_CLIP if private else (None,)
    return [HyperParams(e, o, lr, c)
            for e, o, lr, c in product(GRID_EPOCHS, GRID_OPTIMIZERS, GRID_LR, clips)]


# -------------------------------------------------------------------------------------------------
# data, noise and one training run
# -------------------------------------------------------------------------------------------------
@cache
def dataset() -> Any:
    from bedside.models import datasets

    return datasets.load(DATASET)


def split(seed: int) -> tuple[Any, Any]:
    """(train, test) of WDBC, 80/20 stratified: the same split ``bedside demo --seed`` uses."""
    from bedside.models.datasets import train_test_split

    return train_test_split(dataset(), TEST_FRACTION, seed=seed)


def validation_splits(train: Any, seed: int) -> list[tuple[Any, Any]]:
    from bedside.models.datasets import train_test_split

    return [train_test_split(train, VAL_FRACTION, seed=10_000 + 100 * seed + r)
            for r in range(VAL_REPEATS)]


@cache
def noise_multiplier(epsilon: float, rows: int, batch: int, epochs: int,
                     statistics_z: float) -> float:
    """The DP-SGD noise multiplier that meets ``epsilon`` at DELTA (Bedside's accountant)
    together with the feature-statistics release (a Gaussian with ``statistics_z``)."""
    from bedside.privacy.accountant import calibrate, gaussian
    from bedside.privacy.dpsgd import sample_rate as dp_sample_rate
    from bedside.privacy.dpsgd import steps as dp_steps

    return calibrate(epsilon, DELTA, dp_sample_rate(rows, batch), dp_steps(rows, batch, epochs),
                     base=gaussian(statistics_z))


def accounted(z: float, statistics_z: float, rows: int, hp: HyperParams, q_run: float,
              steps_run: int) -> dict[str, Any]:
    """Epsilon re-checked with the accountant, statistics release included: Bedside's
    (q, steps) and what training ran."""
    from bedside.privacy.accountant import compose, epsilon, gaussian, sampled_gaussian
    from bedside.privacy.dpsgd import sample_rate as dp_sample_rate
    from bedside.privacy.dpsgd import steps as dp_steps

    q, steps = dp_sample_rate(rows, hp.batch_size), dp_steps(rows, hp.batch_size, hp.epochs)

    def eps(q_: float, t: int) -> float:
        return round(epsilon(compose([gaussian(statistics_z), sampled_gaussian(z, q_, t)]),
                             DELTA), 4)

    return {
        "noise_multiplier": round(z, 5), "statistics_noise_multiplier": statistics_z,
        "sample_rate": round(q, 6), "steps": steps, "epsilon": eps(q, steps),
        "sample_rate_run": round(q_run, 6), "steps_run": steps_run,
        "epsilon_as_run": eps(q_run, steps_run),
    }


def leakage_free_scaling(train: Any, level: Level, seed: int) -> tuple[Any, float | None, str]:
    """``train`` with an input scaling that sees neither test rows nor unaccounted data.

    Non-private: standardised on the training rows. DP: Bedside's feature-statistics release
    (:mod:`bedside.federation.statistics`, the mechanism of a federation's statistics round, here
    with every training row on one device) at the noise whose release alone would cost half of
    ``level``; DP-SGD then gets the rest of the budget (composed by the accountant).
    Returns (train, statistics noise multiplier or None, description)."""
    from dataclasses import replace

    import numpy as np

    from bedside.federation import statistics as st
    from bedside.models.datasets import fit_scaling

    if level is None:
        schema = fit_scaling(train.schema, train.x, method="standard")
        return replace(train, schema=schema), None, "standardised on the training rows"
    z = st.noise_for_budget(level, DELTA)
    settings = st.StatisticsSettings(noise_multiplier=z, device_records=max(1, len(train)))
    vector = st.local_statistics(train.x, train.schema, settings,
                                 np.random.default_rng(90_000 + seed))
    loc, scale, _ = st.combine([vector], train.schema, settings)
    return (replace(train, schema=train.schema.with_scaling(loc, scale)), z,
            f"DP feature statistics, noise multiplier {z:g}")


def train_eval(arch: str, train: Any, test: Any, hp: HyperParams, level: Level,
               seed: int, check_privacy: bool = False) -> dict[str, Any]:
    """Train ``arch`` on ``train`` (DP-SGD at ``level``) and evaluate on ``test``."""
    from bedside.metrics import evaluate
    from bedside.models.spec import ArchSpec
    from bedside.models.train import TrainConfig, fit, predict_proba
    from bedside.models.zoo import build
    from bedside.privacy.dpsgd import DPSGDPlan

    train, statistics_z, scaling = leakage_free_scaling(train, level, seed)
    spec = ArchSpec.for_schema(arch, train.schema)
    net = build(spec, train.schema, seed=seed)
    dp = None
    if level is not None:
        assert hp.max_grad_norm is not None and statistics_z is not None
        z = noise_multiplier(level, len(train), hp.batch_size, hp.epochs, statistics_z)
        dp = DPSGDPlan.for_records(len(train), hp.batch_size, hp.epochs, z, hp.max_grad_norm)
    cfg = TrainConfig(epochs=hp.epochs, batch_size=hp.batch_size, lr=hp.lr,
                      optimizer=hp.optimizer, seed=seed)
    t = time.perf_counter()
    result = fit(net, train.x, train.y, cfg, dp)
    seconds = time.perf_counter() - t
    metrics = evaluate(test.y, predict_proba(net, test.x))
    out: dict[str, Any] = {"accuracy": float(metrics["accuracy"]), "auc": float(metrics["auc"]),
                           "log_loss": float(metrics["log_loss"]), "fit_s": round(seconds, 3),
                           "scaling": scaling}
    if not math.isfinite(out["log_loss"]):
        out["log_loss"] = 1e9  # a diverged run sorts last
    if check_privacy and dp is not None:
        assert statistics_z is not None
        out["privacy"] = accounted(dp.noise_multiplier, statistics_z, len(train), hp,
                                   float(result.sample_rate), result.steps)
    return out


# -------------------------------------------------------------------------------------------------
# nested selection and the final run (one task per model, level and seed)
# -------------------------------------------------------------------------------------------------
def select(arch: str, level: Level, seed: int) -> tuple[HyperParams, list[dict[str, Any]]]:
    """The grid setting with the best mean validation accuracy (ties: lower log-loss)."""
    train, _ = split(seed)
    folds = validation_splits(train, seed)
    scores = []
    for i, hp in enumerate(grid(level is not None)):
        runs = [train_eval(arch, fit_part, val, hp, level, seed=1_000 * seed + 10 * i + r)
                for r, (fit_part, val) in enumerate(folds)]
        scores.append({"hp": hp.to_dict(), "label": hp.label,
                       "val_accuracy": round(statistics.fmean(r["accuracy"] for r in runs), 4),
                       "val_log_loss": round(statistics.fmean(r["log_loss"] for r in runs), 4)})
    best = min(scores, key=lambda s: (-s["val_accuracy"], s["val_log_loss"]))
    return HyperParams.from_dict(best["hp"]), scores


def evaluate_setting(arch: str, level: Level, seed: int, hp: HyperParams) -> dict[str, Any]:
    """Train ``hp`` on seed ``seed``'s whole training part; test-set metrics and epsilon."""
    train, test = split(seed)
    run = train_eval(arch, train, test, hp, level, seed=50_000 + seed, check_privacy=True)
    return {"seed": seed, "hp": hp.to_dict(), "label": hp.label, "train_rows": len(train),
            "test_rows": len(test), **run}


def task(arch: str, level: Level, seed: int) -> dict[str, Any]:
    """Select on validation, then train on the training part and test once."""
    import torch

    torch.set_num_threads(1)
    t = time.perf_counter()
    hp, scores = select(arch, level, seed)
    final = evaluate_setting(arch, level, seed, hp)
    final["grid"] = scores
    final["task_s"] = round(time.perf_counter() - t, 2)
    return final


def summarize(arch: str, level: Level, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    labels = [r["label"] for r in runs]
    out: dict[str, Any] = {
        "arch": arch, "epsilon_target": level, "delta": DELTA if level is not None else None,
        "accuracy": mean_std([r["accuracy"] for r in runs]),
        "auc": mean_std([r["auc"] for r in runs]),
        "chosen": {lab: labels.count(lab) for lab in dict.fromkeys(labels)},
    }
    if level is not None:
        priv = [r["privacy"] for r in runs]
        out["epsilon_accounted_max"] = max(p["epsilon"] for p in priv)
        out["epsilon_as_run_max"] = max(p["epsilon_as_run"] for p in priv)
        out["noise_multipliers"] = sorted({p["noise_multiplier"] for p in priv})
    if arch == "logreg" and level in ANCHORS:
        out["anchor_accuracy"] = ANCHORS[level]
    return out


def run_arch(arch: str, levels: Sequence[Level], seeds: Sequence[int],
             jobs: int | None = None) -> dict[str, Any]:
    """Nested selection + final test run for every level and seed (in a process pool).

    Returns ``{"levels": {level_key: summary}, "runs": {level_key: [per-seed results]}}``.
    """
    tasks = [(arch, level, s) for level in levels for s in seeds]
    jobs = jobs or len(os.sched_getaffinity(0))
    results: dict[str, list[dict[str, Any]]] = {level_key(lv): [] for lv in levels}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(task, *t): t for t in tasks}
        for done, (fut, (a, level, s)) in enumerate(futures.items(), start=1):
            r = fut.result()
            results[level_key(level)].append(r)
            log(f"{a} eps {level_key(level)} seed {s}: test acc {r['accuracy']:.4f} "
                f"({r['label']}; task {r['task_s']:.1f} s) [{done}/{len(tasks)}]")
    summaries = {level_key(lv): summarize(arch, lv, sorted(results[level_key(lv)],
                                                           key=lambda r: r["seed"]))
                 for lv in levels}
    return {"levels": summaries, "runs": results}


# -------------------------------------------------------------------------------------------------
# environment and reporting
# -------------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "dp-accounting", "numpy",
                                             "onnxruntime", "bedside")}


def environment() -> dict[str, Any]:
    return {**machine(), **versions(), "torch_threads_per_worker": 1}


def fmt_pm(s: Mapping[str, float]) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def chosen_text(chosen: Mapping[str, int], seeds: int) -> str:
    return "; ".join(f"{lab} ({n}/{seeds})" for lab, n in
                     sorted(chosen.items(), key=lambda kv: -kv[1]))


def result_row(arch: str, key: str, s: Mapping[str, Any], seeds: int) -> str:
    if s["epsilon_target"] is None:
        privacy = "none (non-private) | - | - | -"
    else:
        z = ", ".join(f"{v:.3g}" for v in s["noise_multipliers"])
        privacy = f"{key} | {s['epsilon_accounted_max']:.3f} | {s['epsilon_as_run_max']:.3f} | {z}"
    return (f"| {arch} | {privacy} | {fmt_pm(s['accuracy'])} | {fmt_pm(s['auc'])} | "
            f"{s.get('anchor_accuracy', '-')} | {chosen_text(s['chosen'], seeds)} |")


def results_table(models: Mapping[str, Any], seeds: int) -> list[str]:
    rows = ["| model | epsilon target | epsilon accounted (max over seeds) | epsilon as "
            "training ran it (max) | noise multiplier | test accuracy (mean ± std) | "
            "test AUC (mean ± std) | anchor accuracy | chosen setting (seeds) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for arch, m in models.items():
        rows += [result_row(arch, key, s, seeds) for key, s in m["levels"].items()]
    return rows


def as_run_verdict(models: Mapping[str, Any]) -> str:
    """Whether what training ran stays within the accounted epsilon, for every private level."""
    worst = max((s["epsilon_as_run_max"] / s["epsilon_accounted_max"], arch, key)
                for arch, m in models.items() for key, s in m["levels"].items()
                if s["epsilon_target"] is not None)
    ratio, arch, key = worst
    if abs(ratio - 1.0) <= 1e-3:
        return ("What training ran is what was accounted: the same sample rate and number of steps "
                "for every run (`fit` refuses to train anything but the plan).")
    if ratio < 1.0:
        return (f"What training ran stays within the accounted figure (largest ratio {ratio:.3f}, "
                f"{arch} at epsilon {key}).")
    return (f"What training ran exceeds the accounted figure by up to {100 * (ratio - 1):.1f} % "
            f"({arch} at epsilon {key}).")


def anchor_lines(models: Mapping[str, Any]) -> list[str]:
    lines = []
    lr = models.get("logreg", {}).get("levels", {})
    for eps, anchor in ANCHORS.items():
        s = lr.get(level_key(eps))
        if s:
            diff = s["accuracy"]["mean"] - anchor
            lines.append(f"logreg at epsilon {eps:g}: {s['accuracy']['mean']:.4f} ± "
                         f"{s['accuracy']['std']:.4f} vs anchor {anchor:g} "
                         f"({'+' if diff >= 0 else ''}{100 * diff:.1f} points)")
    return lines


def markdown(results: Mapping[str, Any]) -> str:
    env, cfg = results["environment"], results["config"]
    seeds = len(cfg["seeds"])
    g = cfg["grid"]
    lines = [
        f"Generated by `benchmarks/privacy_utility.py` on {env['date']}: {env['cpu_model']}, "
        f"{env['usable_cores']} cores, Python {env['python']}, torch {env['torch']}, "
        f"dp-accounting {env['dp-accounting']}; load average "
        f"{env['load_average_start']} at start, {env['load_average_end']} at end. Whole run "
        f"{results['run_seconds']:.0f} s ({cfg['jobs']} worker processes). Full numbers: "
        "`benchmarks/results/privacy_utility.json`. Rerun: "
        "`.venv/bin/python benchmarks/privacy_utility.py`.",
        "",
        f"Centralized record-level DP-SGD (`bedside.models.train.fit`, Poisson "
        f"sampling, batch {BATCH}) on WDBC ({cfg['rows']} rows), 80/20 stratified split, delta "
        f"{DELTA:g}. **Input scaling without leakage**: non-private runs standardise on the "
        "training rows; DP runs take it from Bedside's feature-statistics release "
        "(`bedside.federation.statistics`, the mechanism of a federation's statistics round, "
        "with every training row on one device) at the noise whose release alone costs half "
        "the target, and the target covers both: the DP-SGD noise multiplier comes from "
        "`bedside.privacy.accountant.calibrate(target, delta, q = 1 / ceil(n / batch), "
        "steps = dp_steps(n, batch, epochs), base = gaussian(z_statistics))`. No test row "
        "touches the scaling. Mean ± std over "
        f"{seeds} seeds; each seed changes the test split, the validation splits, the initial "
        "weights and the DP noise.",
        "",
        *results_table(results["models"], seeds),
        "",
        "**Against the anchors** (" + ANCHOR_SOURCE + "): "
        + "; ".join(anchor_lines(results["models"])) + ".",
        "",
        "How the setting was chosen: for every seed, the grid (epochs "
        f"{set(g['epochs'])}, optimizer {set(g['optimizers'])}, lr {set(g['lr'])}, per-example "
        f"clip {set(g['max_grad_norm'])} under DP; {len(grid(True))} settings, "
        f"{len(grid(False))} without DP) was trained on {VAL_REPEATS} validation splits "
        f"({VAL_FRACTION:.0%} of that seed's **training** part each, the noise recalibrated for "
        "the smaller set) and the setting with the best mean validation accuracy (ties: lower "
        "log-loss) was retrained on the whole training part and tested once. The test rows never "
        "took part in the choice. The last column lists the chosen settings and for how many "
        "seeds each won.",
        "",
        "Notes:",
        "",
        "1. *epsilon accounted* is what Bedside reports: "
        "`epsilon(compose([gaussian(z_statistics), sampled_gaussian(z, q = 1 / ceil(n / batch), "
        "dp_steps(n, batch, epochs))]), delta)`. "
        "*epsilon as training ran it* uses the sample rate and number of steps training actually "
        f"used, `FitResult.sample_rate` and `FitResult.steps` (here n = {cfg['train_rows']}: "
        f"q = {', '.join(f'{q:.4f}' for q in results['plan_vs_run']['q_run'])} for "
        f"{', '.join(f'{n:g}' for n in results['plan_vs_run']['steps_per_epoch_run'])} "
        "steps an epoch in every final run, against "
        f"Bedside's q = {results['plan_vs_run']['q']:.4f} for "
        f"{results['plan_vs_run']['steps_per_epoch']}). "
        + as_run_verdict(results["models"]),
        "2. Hyper-parameter search itself consumes privacy in principle: every grid point was "
        "trained on private rows and the choice depends on them. The epsilons above cover the "
        "final training run only, as is usual in the literature; accounting for the search "
        "needs a private selection mechanism (Liu and Talwar, STOC 2019; Papernot and Steinke, "
        "ICLR 2022) and would raise them.",
        "3. Anchor source: the figures 0.93 at epsilon 1 and 0.965 at epsilon 3 are the ones "
        "given in the project's issue. A search for a citable DP-SGD result on WDBC with the "
        "same setting found none; the nearest published figure uses another method (Chen et "
        "al., Appl. Sci. 13(19) 10755, 2023: full-batch gradient descent with Gaussian noise "
        "on 17 selected features, accuracy 0.972 at epsilon 0.8, hyper-parameters chosen by "
        "grid search and cross-validation) and is not comparable one to one.",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------------
def plan_vs_run(rows: int, models: Mapping[str, Any]) -> dict[str, Any]:
    """Bedside's DP-SGD plan for ``rows`` records beside what training ran (from every final run's
    ``FitResult``: sample rate, and steps divided by epochs)."""
    from bedside.privacy.dpsgd import sample_rate as dp_sample_rate
    from bedside.privacy.dpsgd import steps as dp_steps

    ran = [r["privacy"] | {"epochs": r["hp"]["epochs"]} for m in models.values()
           for runs in m["runs"].values() for r in runs if r.get("privacy")]
    return {"rows": rows, "batch": BATCH, "q": dp_sample_rate(rows, BATCH),
            "steps_per_epoch": dp_steps(rows, BATCH, 1),
            "q_run": sorted({p["sample_rate_run"] for p in ran}),
            "steps_per_epoch_run": sorted({p["steps_run"] / p["epochs"] for p in ran})}


def run(archs: Sequence[str], levels: Sequence[Level], seeds: Sequence[int],
        jobs: int) -> dict[str, Any]:
    env = environment()
    train, test = split(seeds[0])
    models = {}
    for arch in archs:
        log(f"{arch}: {len(levels)} privacy levels x {len(seeds)} seeds, nested selection over "
            f"{len(grid(True))} settings x {VAL_REPEATS} validation splits")
        models[arch] = run_arch(arch, levels, seeds, jobs)
    env["load_average_end"] = load_average()
    return {
        "benchmark": "privacy_utility",
        "environment": env,
        "config": {"dataset": DATASET, "rows": len(dataset()), "train_rows": len(train),
                   "test_rows": len(test), "test_fraction": TEST_FRACTION,
                   "val_fraction": VAL_FRACTION, "val_repeats": VAL_REPEATS, "delta": DELTA,
                   "epsilons": [lv for lv in levels if lv is not None], "seeds": list(seeds),
                   "batch": BATCH, "jobs": jobs,
                   "grid": {"epochs": list(GRID_EPOCHS), "optimizers": list(GRID_OPTIMIZERS),
                            "lr": list(GRID_LR), "max_grad_norm": list(GRID_CLIP)},
                   "selection": "nested per seed: best mean validation accuracy over the "
                                "validation splits of that seed's training part (ties: lower "
                                "validation log-loss); test set used once",
                   "anchors": {f"{k:g}": v for k, v in ANCHORS.items()},
                   "anchor_source": ANCHOR_SOURCE},
        "plan_vs_run": plan_vs_run(len(train), models),
        "models": models,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    p.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    p.add_argument("--seeds", type=int, default=len(SEEDS), help="number of seeds (default 5)")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                   help="worker processes (default: usable cores)")
    p.add_argument("--no-write", action="store_true", help="print the JSON, write nothing")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    levels: list[Level] = [None, *args.epsilons]
    results = run(args.archs, levels, list(range(args.seeds)), args.jobs)
    results["run_seconds"] = round(time.perf_counter() - start, 1)
    if args.no_write:
        print(json.dumps(results, indent=2))
        return 0
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(results, indent=2) + "\n")
    write_section("privacy_utility", HEADING, markdown(results))
    log(f"wrote {RESULTS_JSON.relative_to(REPO)} and {README.relative_to(REPO)} "
        f"in {results['run_seconds']:.0f} s")
    for line in anchor_lines(results["models"]):
        log(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
