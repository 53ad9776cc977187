"""Privacy-utility curves: accuracy against record-level epsilon on every built-in dataset.

One run writes ``benchmarks/results/privacy_utility.json``, ``privacy_utility.png`` and the
``## Privacy-utility`` section of ``benchmarks/README.md``. For every built-in dataset (wdbc,
digits, vitals), every privacy level (non-private, record-level epsilon 1, 3 and 8 at delta
1e-5) and each of 5 seeds (``bedside demo --seed``: the held-out split, the non-IID shards, the
initial weights), side by side on the same split:

1. **federated**: ``bedside demo --dataset NAME`` with the task's defaults (``models/defaults.py``,
   chosen by ``benchmarks/tuning.py`` on validation splits), in process on the round core
   (:func:`bedside.demo.inprocess.run_demo_in_process`); accuracy of the final model on the
   held-out rows;
2. **centralized**, the same model on all the clinics' rows pooled: a small grid (epochs,
   optimizer, learning rate, per-example clip) is tried on validation splits carved from the
   training part only, the winner retrained on the whole training part
   (``bedside.models.train.fit``: DP-SGD with Poisson sampling at the target, its noise from
   ``bedside.privacy.accountant.calibrate`` with the feature-statistics release composed in;
   non-private: standardised on the training rows) and tested once on the held-out rows.

The work is spread over a process pool (``--jobs``, default: the usable cores).
``benchmarks/federation.py`` imports :class:`HyperParams` and :func:`train_eval` from here.

Run from the repository root: ``.venv/bin/python benchmarks/privacy_utility.py``
(``--datasets``, ``--seeds``, ``--epsilons`` narrow it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache
from itertools import product
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchlib import README, REPO, load_average, log, machine, write_section

RESULTS_JSON = REPO / "benchmarks" / "results" / "privacy_utility.json"
HEADING = "## Privacy-utility"

DATASET = "wdbc"
TEST_FRACTION = 0.2
VAL_FRACTION = 0.2
VAL_REPEATS = 1  # validation splits per seed (carved from its training part only)
DELTA = 1e-5
EPSILONS: tuple[float, ...] = (1.0, 3.0, 8.0)
SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
DATASETS: tuple[str, ...] = ("wdbc", "digits", "vitals")
BATCH = 64
GRID_EPOCHS = (20, 50)
GRID_OPTIMIZERS = ("sgd", "adam")
GRID_LR = (0.05, 0.2)
GRID_CLIP = (0.5, 1.0)  # per-example clip of DP-SGD (max_grad_norm); unused without DP

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
def dataset(name: str = DATASET) -> Any:
    from bedside.models import datasets

    return datasets.load(name)


def split(seed: int, name: str = DATASET) -> tuple[Any, Any]:
    """(train, test), 80/20 stratified: the same split ``bedside demo --seed`` uses."""
    from bedside.models.datasets import train_test_split

    return train_test_split(dataset(name), TEST_FRACTION, seed=seed)


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
               seed: int, check_privacy: bool = False,
               arch_params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train ``arch`` on ``train`` (DP-SGD at ``level``) and evaluate on ``test``."""
    from bedside.metrics import evaluate
    from bedside.models.spec import ArchSpec
    from bedside.models.train import TrainConfig, fit, predict_proba
    from bedside.models.zoo import build
    from bedside.privacy.dpsgd import DPSGDPlan

    train, statistics_z, scaling = leakage_free_scaling(train, level, seed)
    spec = ArchSpec.for_schema(arch, train.schema, **dict(arch_params or {}))
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
def select(arch: str, level: Level, seed: int, name: str = DATASET,
           arch_params: Mapping[str, Any] | None = None, repeats: int = VAL_REPEATS,
           ) -> tuple[HyperParams, list[dict[str, Any]]]:
    """The grid setting with the best mean validation accuracy (ties: lower log-loss)."""
    train, _ = split(seed, name)
    folds = validation_splits(train, seed)[:repeats]
    scores = []
    for i, hp in enumerate(grid(level is not None)):
        runs = [train_eval(arch, fit_part, val, hp, level, seed=1_000 * seed + 10 * i + r,
                           arch_params=arch_params)
                for r, (fit_part, val) in enumerate(folds)]
        scores.append({"hp": hp.to_dict(), "label": hp.label,
                       "val_accuracy": round(statistics.fmean(r["accuracy"] for r in runs), 4),
                       "val_log_loss": round(statistics.fmean(r["log_loss"] for r in runs), 4)})
    best = min(scores, key=lambda s: (-s["val_accuracy"], s["val_log_loss"]))
    return HyperParams.from_dict(best["hp"]), scores


def evaluate_setting(arch: str, level: Level, seed: int, hp: HyperParams, name: str = DATASET,
                     arch_params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train ``hp`` on seed ``seed``'s whole training part; test-set metrics and epsilon."""
    train, test = split(seed, name)
    run = train_eval(arch, train, test, hp, level, seed=50_000 + seed, check_privacy=True,
                     arch_params=arch_params)
    return {"seed": seed, "hp": hp.to_dict(), "label": hp.label, "train_rows": len(train),
            "test_rows": len(test), **run}


def centralized(name: str, arch: str, arch_params: Mapping[str, Any], level: Level,
                seed: int, repeats: int) -> dict[str, Any]:
    """Centralized training of ``arch`` on seed ``seed``'s training rows (every clinic's rows
    pooled): select on validation, then train on the training part and test once."""
    import torch

    torch.set_num_threads(1)
    t = time.perf_counter()
    hp, scores = select(arch, level, seed, name, arch_params, repeats)
    final = evaluate_setting(arch, level, seed, hp, name, arch_params)
    final["grid"] = scores
    final["task_s"] = round(time.perf_counter() - t, 2)
    return final


def federated(name: str, level: Level, seed: int) -> dict[str, Any]:
    """``bedside demo --dataset name --seed seed`` with the task's defaults at record-level
    ``level`` (None: no DP-SGD and no update noise), in process on the round core; accuracy of
    the final model on the demo's held-out rows (the test rows of :func:`split`)."""
    import torch

    from bedside.demo.inprocess import run_demo_in_process
    from bedside.demo.run import for_task

    torch.set_num_threads(1)
    t = time.perf_counter()
    extra: dict[str, Any] = {}
    if level is None:
        extra = {"aggregator": {"privacy": {"noise": "none"}},
                 "agent": {"privacy": {"record_epsilon": None, "allow_no_record_dp": True,
                                       "device_epsilon": None, "accept_noise": ["none"]}}}
    cfg = for_task({}, dataset=name, seed=seed, extra=extra,
                   target_epsilon=level if level is not None else 8.0)
    run = run_demo_in_process(cfg)
    last = run.rounds[-1].metrics
    return {"seed": seed, "accuracy": float(last.get("accuracy", 0.0)),
            "auc": float(last.get("auc", 0.0)), "rounds": len(run.rounds),
            "task_s": round(time.perf_counter() - t, 2)}


def job(kind: str, name: str, level: Level, seed: int, repeats: int) -> dict[str, Any]:
    warnings.filterwarnings("ignore")  # torch notices
    from bedside.models.defaults import for_dataset

    d = for_dataset(name)
    if kind == "federated":
        return federated(name, level, seed)
    return centralized(name, d.arch, d.arch_params, level, seed, repeats)


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"accuracy": mean_std([r["accuracy"] for r in runs]),
                           "auc": mean_std([r["auc"] for r in runs]),
                           "per_seed": [round(r["accuracy"], 4) for r in runs]}
    priv = [r["privacy"] for r in runs if r.get("privacy")]
    if priv:
        out["epsilon_accounted_max"] = max(p["epsilon"] for p in priv)
        out["epsilon_as_run_max"] = max(p["epsilon_as_run"] for p in priv)
    labels = [r["label"] for r in runs if "label" in r]
    if labels:
        out["chosen"] = {lab: labels.count(lab) for lab in dict.fromkeys(labels)}
    return out


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


#: The issue's acceptance: federated within this many points of centralized non-private training.
WITHIN = {8.0: 3.0, 3.0: 5.0}


def gap_text(fed: float, ref: float, level: Level) -> str:
    gap = 100 * (fed - ref)
    text = f"{gap:+.1f}"
    if level in WITHIN:
        text += " (within)" if gap >= -WITHIN[level] else f" (**not within {WITHIN[level]:g}**)"
    return text


def markdown(results: Mapping[str, Any]) -> str:
    env, cfg = results["environment"], results["config"]
    lines = [
        f"Generated by `benchmarks/privacy_utility.py` on {env['date']}: {env['cpu_model']}, "
        f"{env['usable_cores']} cores, Python {env['python']}, torch {env['torch']}, "
        f"dp-accounting {env['dp-accounting']}; load average {env['load_average_start']} at "
        f"start, {env['load_average_end']} at end. Whole run {results['run_seconds']:.0f} s "
        f"({cfg['jobs']} worker processes). Full numbers: "
        "`benchmarks/results/privacy_utility.json`, plot `benchmarks/results/"
        "privacy_utility.png`. Rerun: `.venv/bin/python benchmarks/privacy_utility.py`.",
        "",
        "Accuracy on the demo's held-out 20 % against record-level epsilon (delta "
        f"{DELTA:g}), mean ± std over {len(cfg['seeds'])} seeds (each seed is `bedside demo "
        "--seed`: the held-out split, the clinics' non-IID shards, the initial weights; every "
        "noise draw from the OS). Side by side, on the same splits:",
        "",
        "- **federated**: `bedside demo --dataset NAME` with the task's defaults "
        "(`models/defaults.py`: 5 clinics, Dirichlet alpha 1, statistics round included in "
        "the budget, central noise on clipped updates by the demo's rule for the model's size, "
        "`device_noise`), in process on the round core; "
        "non-private: no DP-SGD, no update noise;",
        "- **centralized DP-SGD / non-private**: the same model trained on all clinics' rows "
        "pooled (`bedside.models.train.fit`, Poisson sampling, batch "
        f"{BATCH}), the setting chosen per seed on {cfg['val_repeats']} validation split(s) of "
        f"the training part over a grid (epochs {list(GRID_EPOCHS)}, optimizer "
        f"{list(GRID_OPTIMIZERS)}, lr {list(GRID_LR)}, per-example clip {list(GRID_CLIP)} "
        "under DP); DP runs take their scaling from a feature-statistics release that costs half "
        "the target and is composed with DP-SGD within it, non-private runs standardise on "
        "the training rows.",
        "",
        "| dataset (model) | record epsilon | federated | centralized DP-SGD | centralized "
        "non-private | federated - centralized non-private (points) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, d in results["datasets"].items():
        ref = d["levels"]["non-private"]["centralized"]["accuracy"]["mean"]
        for key, lv in d["levels"].items():
            level = None if key == "non-private" else float(key)
            fed = lv["federated"]["accuracy"]
            cen = lv["centralized"]["accuracy"]
            lines.append(f"| {name} ({d['arch']}) | {key} | {fmt_pm(fed)} | "
                         f"{fmt_pm(cen) if level is not None else '-'} | "
                         f"{fmt_pm(d['levels']['non-private']['centralized']['accuracy'])} | "
                         f"{gap_text(fed['mean'], ref, level)} |")
    lines += [
        "",
        "The acceptance of the tuning work: at epsilon 8 every dataset's federated accuracy "
        "within 3 points of centralized non-private training, at epsilon 3 within 5 (the last "
        "column says which hold). Hyper-parameter search on private rows is not accounted in "
        "the centralized columns (as usual in the literature); the federated defaults were "
        "chosen on validation splits by `benchmarks/tuning.py`.",
    ]
    return "\n".join(lines)


def plot(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        d = results["datasets"][name]
        eps = [float(k) for k in d["levels"] if k != "non-private"]
        for kind, style in (("federated", "o-"), ("centralized", "s--")):
            m = [d["levels"][f"{e:g}"][kind]["accuracy"] for e in eps]
            ax.errorbar(eps, [x["mean"] for x in m], yerr=[x["std"] for x in m], fmt=style,
                        capsize=3, label=f"{kind}{' DP-SGD' if kind == 'centralized' else ''}")
        for kind, color in (("federated", "C0"), ("centralized", "C1")):
            ax.axhline(d["levels"]["non-private"][kind]["accuracy"]["mean"], color=color,
                       lw=0.8, ls=":", label=f"{kind}, non-private")
        ax.set_xscale("log")
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("record-level epsilon (delta 1e-5)")
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"{name} ({d['arch']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(names: Sequence[str], levels: Sequence[Level], seeds: Sequence[int], jobs: int,
        repeats: int) -> dict[str, Any]:
    from bedside.models.defaults import for_dataset

    env = environment()
    jobs_list = [(kind, name, level, seed) for name in names for level in levels
                 for seed in seeds for kind in ("federated", "centralized")]
    out: dict[str, list[dict[str, Any]]] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(job, *j, repeats): j for j in jobs_list}
        for done, (fut, (kind, name, level, seed)) in enumerate(futures.items(), start=1):
            r = fut.result()
            out.setdefault(f"{name}/{level_key(level)}/{kind}", []).append(r)
            log(f"{name} {kind} eps {level_key(level)} seed {seed}: {r['accuracy']:.4f} "
                f"({r['task_s']:.0f} s) [{done}/{len(jobs_list)}]")
    env["load_average_end"] = load_average()
    datasets = {name: {"arch": for_dataset(name).arch, "arch_params": for_dataset(name).arch_params,
                       "levels": {level_key(lv): {
                           kind: summarize(sorted(out[f"{name}/{level_key(lv)}/{kind}"],
                                                  key=lambda r: r["seed"]))
                           for kind in ("federated", "centralized")} for lv in levels}}
                for name in names}
    return {"benchmark": "privacy_utility", "environment": env,
            "config": {"datasets": list(names), "delta": DELTA, "seeds": list(seeds),
                       "epsilons": [lv for lv in levels if lv is not None], "jobs": jobs,
                       "val_repeats": repeats, "batch": BATCH, "test_fraction": TEST_FRACTION,
                       "grid": {"epochs": list(GRID_EPOCHS), "optimizers": list(GRID_OPTIMIZERS),
                                "lr": list(GRID_LR), "max_grad_norm": list(GRID_CLIP)}},
            "datasets": datasets}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    p.add_argument("--seeds", type=int, default=len(SEEDS), help="number of seeds (default 5)")
    p.add_argument("--val-repeats", type=int, default=VAL_REPEATS,
                   help="validation splits per seed for the centralized selection")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                   help="worker processes (default: usable cores)")
    p.add_argument("--no-write", action="store_true", help="print the JSON, write nothing")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    levels: list[Level] = [None, *args.epsilons]
    results = run(args.datasets, levels, list(range(args.seeds)), args.jobs, args.val_repeats)
    results["run_seconds"] = round(time.perf_counter() - start, 1)
    if args.no_write:
        print(json.dumps(results, indent=2))
        return 0
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS_JSON.with_suffix(".png"))
    write_section("privacy_utility", HEADING, markdown(results))
    log(f"wrote {RESULTS_JSON.relative_to(REPO)}, its plot and {README.relative_to(REPO)} "
        f"in {results['run_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
