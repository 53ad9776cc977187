"""Demo tuning study: the defaults of ``bedside demo``, chosen on validation splits only.

One run writes ``benchmarks/results/demo_tuning.json`` plus the ``## Demo tuning`` section of
``benchmarks/README.md``. The question: which feature-statistics settings (the round that gives
the model its input scaling from the clinics' noised, accounted sums) and which server optimizer
make the default demo (5 clinics, 15 training rounds, record-level DP-SGD at epsilon 8 with the
statistics included, central noise z = 0.2) reach a high accuracy *reliably*, run after run,
when every noise draw comes from the operating system.

Each federation runs in process on the round core
(:func:`bedside.demo.inprocess.run_demo_in_process`: the same settings, statistics round, device
planning, DP-SGD, privatization, validation and aggregation the MQTT services run, without
broker, SQLite and processes; ``tests/integration/test_core_equivalence.py`` shows it gives the
MQTT federation's weights), so hundreds fit in minutes.

1. **Selection** (validation only): the demo's own split (seed 0) is made, its held-out rows are
   set aside untouched, and inside the *training* rows validation splits are drawn (20 % each;
   the rest is sharded over 5 clinics); every candidate runs several times per split. No
   candidate's scaling sees a validation or held-out row: it comes from the statistics round on
   the clinics' rows, or (the baseline) from the schema's public range alone.
2. **Evaluation** (after the choice, once): the baseline and the chosen default on the demo's
   own held-out split, many unseeded runs each: how often is a run below 0.95?

Run from the repository root: ``.venv/bin/python benchmarks/demo_tuning.py`` (``--splits``,
``--repeats``, ``--evaluation-runs`` set the sizes; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from typing import Any

from benchlib import REPO, finish, log, machine

sys.path.insert(0, str(REPO))

def _statistics(share: float = 0.5, **kw: Any) -> dict[str, Any]:
    from bedside.federation.statistics import noise_for_budget

    return {"noise_multiplier": noise_for_budget(8.0, 1e-5, share), **kw}


#: The candidates: ``statistics`` is the aggregator's ``[statistics]`` table (None: no statistics
#: round; the model keeps the public-range placeholder scaling of its schema); ``server`` the
#: server optimizer. ``private`` False is the reference.
CANDIDATES: dict[str, dict[str, Any]] = {
    "no-statistics": {"label": "no statistics round (public-range scaling), plain FedAvg",
                      "statistics": None, "server": {"name": "sgd"}},
    "statistics-sgd": {"label": "statistics (half the budget, record clip 0.8), plain FedAvg "
                       "(default)", "statistics": _statistics(), "server": {"name": "sgd"}},
    "statistics-allowed-frame": {"label": "statistics computed in the allowed range [0, 2 x max] "
                                 "instead of the typical range, plain FedAvg",
                                 "statistics": _statistics(), "server": {"name": "sgd"},
                                 "frame": "allowed"},
    "statistics-quarter": {"label": "statistics (a quarter of the budget), plain FedAvg",
                           "statistics": _statistics(0.25), "server": {"name": "sgd"}},
    "statistics-clip-0.65": {"label": "statistics (record clip 0.65), plain FedAvg",
                             "statistics": _statistics(record_clip=0.65),
                             "server": {"name": "sgd"}},
    "statistics-clip-0.5": {"label": "statistics (record clip 0.5), plain FedAvg",
                            "statistics": _statistics(record_clip=0.5),
                            "server": {"name": "sgd"}},
    "statistics-fedavgm": {"label": "statistics, server momentum 0.9",
                           "statistics": _statistics(),
                           "server": {"name": "fedavgm", "momentum": 0.9}},
    "statistics-nonprivate": {"label": "statistics, plain FedAvg, no DP-SGD (reference)",
                              "statistics": _statistics(), "server": {"name": "sgd"},
                              "private": False},
}
PREVIOUS, CHOSEN = "no-statistics", "statistics-sgd"
VALIDATION_SPLITS = list(range(1, 17))
REPEATS = 12
EVALUATION_RUNS = 150
THRESHOLD = 0.95


# -- the replica -----------------------------------------------------------------------------------
def federation_data(split_seed: int | None) -> tuple[Any, Any, list[Any]]:
    """(train, test, shards), with the shipped schema. ``split_seed`` None: the demo's own split,
    tested on its held-out rows. Otherwise a validation split drawn inside the demo's training
    rows, the held-out rows never touched."""
    from bedside.demo.run import DemoConfig, _load_data
    from bedside.models import datasets
    from bedside.models.partition import partition

    cfg = DemoConfig()
    if split_seed is None:
        return _load_data(cfg)
    demo_train, _held_out = datasets.train_test_split(datasets.load("wdbc"), cfg.holdout, cfg.seed)
    train, test = datasets.train_test_split(demo_train, cfg.holdout, seed=split_seed)
    shards = partition(train.y, cfg.clients, scheme="dirichlet", alpha=cfg.alpha,
                       min_size=max(4, cfg.batch_size // 2), seed=split_seed)
    return train, test, shards


def federation(train: Any, test: Any, shards: Sequence[Any], server: Mapping[str, Any],
               statistics: Mapping[str, Any] | None, private: bool = True,
               noise_seed: int | None = None) -> list[dict[str, float]]:
    """One federation with the demo's defaults on the round core; test accuracy and AUC after
    every round. ``noise_seed`` None draws every noise from the OS, as ``bedside demo`` does."""
    from bedside.demo.inprocess import run_demo_in_process
    from bedside.demo.run import DemoConfig

    params = {k: v for k, v in server.items() if k != "name"}
    extra: dict[str, Any] = {"aggregator": {"strategy": {"optimizer_params": params},
                                            "statistics": statistics}}
    if not private:
        extra["aggregator"]["privacy"] = {"noise": "none"}
        extra["agent"] = {"privacy": {"record_epsilon": None, "allow_no_record_dp": True,
                                      "device_epsilon": None, "accept_noise": ["none"]}}
    cfg = DemoConfig(server_optimizer=server["name"], noise_seed=noise_seed, extra=extra)
    run = run_demo_in_process(cfg, train, test, shards)
    return [{"accuracy": float(r.metrics["accuracy"]), "auc": float(r.metrics["auc"])}
            for r in run.rounds]


def task(key: str, split_seed: int | None, runs: int) -> dict[str, Any]:
    """``runs`` unseeded replays of candidate ``key`` on one split (a worker process)."""
    warnings.filterwarnings("ignore")  # torch notices
    c = CANDIDATES[key]
    train, test, shards = federation_data(split_seed)
    if c.get("frame") == "allowed":  # the schema without its typical range
        schema = train.schema.without_typical_range()
        train, test = replace(train, schema=schema), replace(test, schema=schema)
    finals = [federation(train, test, shards, c["server"], c["statistics"],
                         c.get("private", True))[-1]["accuracy"] for _ in range(runs)]
    return {"key": key, "split": split_seed, "test_rows": len(test), "accuracy": finals}


# -- summaries -------------------------------------------------------------------------------------
def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    by_split: dict[int | None, list[float]] = {}
    for r in results:  # a split may come in several chunks (the evaluation's one split)
        by_split.setdefault(r["split"], []).extend(r["accuracy"])
    every = [a for accs in by_split.values() for a in accs]
    return {
        "runs": len(every),
        "mean": round(statistics.fmean(every), 4),
        # the spread the noise causes: standard deviation across runs on the same split
        "within_split_sd": round(statistics.fmean(statistics.pstdev(a) for a in by_split.values()),
                                 4),
        "p05": round(sorted(every)[int(0.05 * (len(every) - 1))], 4),
        "min": round(min(every), 4),
        "below_threshold": sum(1 for a in every if a < THRESHOLD),
        "by_split": {str(k): [round(a, 4) for a in v] for k, v in by_split.items()},
    }


def run_pool(jobs: list[tuple[str, int | None, int]], workers: int) -> dict[str, Any]:
    out: dict[str, list[dict[str, Any]]] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for r in pool.map(task, *zip(*jobs, strict=True)):
            out.setdefault(r["key"], []).append(r)
            log(f"{r['key']} split {r['split']}: mean "
                f"{statistics.fmean(r['accuracy']):.4f} over {len(r['accuracy'])} runs")
    return {k: summarize(v) for k, v in out.items()}


# -- report ----------------------------------------------------------------------------------------
def row(label: str, s: Mapping[str, Any]) -> str:
    return (f"| {label} | {s['mean']:.4f} | {s['within_split_sd']:.4f} | {s['p05']:.4f} | "
            f"{s['min']:.4f} | {s['below_threshold']} / {s['runs']} |")


def markdown(res: Mapping[str, Any]) -> str:
    head = ("| setting | mean accuracy | SD across runs (same split) | 5th percentile | min | "
            f"runs below {THRESHOLD} |\n|---|---|---|---|---|---|")
    sel = res["selection"]
    lines = [
        f"Run {res['machine']['date']} on {res['machine']['cpu_model']} "
        f"({res['machine']['usable_cores']} cores); {res['seconds']:.0f} s. "
        "`.venv/bin/python benchmarks/demo_tuning.py`.",
        "",
        "The default `bedside demo` (5 clinics, non-IID, 15 training rounds, logreg, "
        "record-level DP-SGD at epsilon 8 with the feature statistics included, central noise "
        "z = 0.2) run in process on the round core (see the script's docstring); every noise "
        "draw from the operating system. No scaling is fitted on a validation or held-out row "
        "(WDBC's typical range, the statistics' frame, is the published Min/Max of the public "
        "data set).",
        "",
        f"**Selection, on validation splits only**: {len(res['settings']['validation_splits'])} "
        "splits drawn inside the demo's training rows (its held-out rows untouched), "
        f"{res['settings']['repeats']} runs each; 91 validation rows per split.",
        "",
        head,
        *[row(CANDIDATES[k]["label"], sel[k]) for k in CANDIDATES if k in sel],
        "",
        f"**Evaluation, after the choice**: the demo's own held-out split "
        f"({res['evaluation'][CHOSEN]['test_rows']} rows), "
        f"{res['settings']['evaluation_runs']} unseeded runs each.",
        "",
        head,
        *[row(CANDIDATES[k]["label"], res["evaluation"][k]) for k in (PREVIOUS, CHOSEN)],
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 splits x 2 runs")
    p.add_argument("--splits", type=int, default=len(VALIDATION_SPLITS))
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--evaluation-runs", type=int, default=EVALUATION_RUNS)
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--no-write", action="store_true", help="print the JSON, write nothing")
    a = p.parse_args(argv)
    splits = VALIDATION_SPLITS[:2] if a.quick else VALIDATION_SPLITS[:a.splits]
    repeats, eval_runs = (2, 4) if a.quick else (a.repeats, a.evaluation_runs)
    started = time.perf_counter()
    res: dict[str, Any] = {"machine": machine(), "settings": {
        "validation_splits": splits, "repeats": repeats, "evaluation_runs": eval_runs,
        "threshold": THRESHOLD, "candidates": CANDIDATES}}
    log("selection on validation splits")
    res["selection"] = run_pool([(k, s, repeats) for k in CANDIDATES for s in splits], a.jobs)
    log("evaluation on the demo's held-out split")
    per_job = max(1, eval_runs // 10)
    res["evaluation"] = run_pool(
        [(k, None, per_job) for k in (PREVIOUS, CHOSEN) for _ in range(eval_runs // per_job)],
        a.jobs)
    for k in (PREVIOUS, CHOSEN):
        res["evaluation"][k]["test_rows"] = len(federation_data(None)[1])
    return finish("demo_tuning", "## Demo tuning", res, markdown, started, a.no_write)

if __name__ == "__main__":
    raise SystemExit(main())
