"""Tuning study: each built-in task's federation defaults, chosen on validation splits only.

One run writes ``benchmarks/results/tuning.json`` plus the ``## Tuning`` section of
``benchmarks/README.md``. For every built-in dataset and each architecture tried on it, the
question is which federation settings make the default demo (5 non-IID clinics, Dirichlet alpha
1, record-level DP-SGD at epsilon 8 and delta 1e-5 with the feature-statistics round included,
central noise by the demo's rule for the model's size) most accurate. The result is the table
``TUNED`` in ``models/defaults.py``, which ``bedside demo`` uses.

How, honestly:

1. **Validation splits only.** For each split seed the demo's own split (seed 0) is made and its
   held-out rows are set aside, never read; inside the demo's *training* rows a validation split
   (20 %) is drawn and the rest is sharded over the 5 clinics (the demo's partition rule). Every
   candidate is scored by the final global model's accuracy on those validation rows, mean over
   the splits.
2. **Coordinate search** from the shipped defaults: one dimension at a time (model size, batch
   size i.e. the DP-SGD sample rate, local optimizer and learning rate, local epochs, learning-rate
   decay over rounds, per-example clip, update clip with the device-level noise, server
   optimizer, rounds), every value of that dimension with the others at the best so far; a value
   replaces the current one only when it beats it by more than ``MARGIN`` (noise between runs is
   about a point). The order and the values are in ``DIMENSIONS``.
3. Each federation runs in process on the round core
   (:func:`bedside.demo.inprocess.run_demo_in_process`), with every noise draw from the OS: the
   same settings, statistics round, planning, DP-SGD, privatization, validation and aggregation
   the MQTT services run.

The search itself is not private: it reads clinic rows (validation splits of them) many times.
That is what a benchmark on public data may do and a deployment may not; ``bedside demo --data``
therefore never searches (its defaults come from the task's shape, ``models/defaults.py``).

4. **Comparison on more splits** (``--compare``): a coordinate search on 3 splits moves by about
   a point between runs, so finalists (the search's choice, the shipped defaults, a setting the
   search could not reach one dimension at a time) can be scored side by side on
   ``COMPARE_SPLITS`` (10) validation splits. The comparison is kept in the results beside the
   search, and ``TUNED`` takes an override that beats the shipped defaults by more than
   ``MARGIN`` (:func:`verdict`).

Run from the repository root: ``.venv/bin/python benchmarks/tuning.py`` (``--tasks digits:logreg``
to tune one: the other tasks of the last run stay in the results, marked with their date;
``--splits N``, ``--quick`` for a smoke run). A comparison: ``--tasks digits:logreg --compare
'{}' '{"server_optimizer": "fedavgm", "server_params": {"lr": 1.0, "momentum": 0.5}}'`` (each
JSON object overrides the shipped defaults, ``{}`` is them; ``target_epsilon`` may be one of the
overrides, and ``what_if_dpsgd_noise_factor``, a what-if that is not a setting: ``WHAT_IF_NOISE``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

from benchlib import REPO, RESULTS, finish, log, machine, write_section

sys.path.insert(0, str(REPO))

#: Tasks tuned: (dataset, architecture).
TASKS: tuple[tuple[str, str], ...] = (("wdbc", "logreg"), ("digits", "logreg"),
                                      ("vitals", "logreg"), ("vitals", "cnn1d"))
SPLITS: tuple[int, ...] = (1, 2, 3)
COMPARE_SPLITS: tuple[int, ...] = tuple(range(1, 11))
MARGIN = 0.005  # a value must beat the current one by more than this (accuracy) to replace it

#: The search, in order: the name of each dimension and its values (DemoConfig fields).
DIMENSIONS: tuple[tuple[str, tuple[dict[str, Any], ...]], ...] = (
    ("model size", ()),  # filled per architecture (ARCH_SIZES)
    ("batch size", tuple({"batch_size": b} for b in (32, 64, 128))),
    ("local optimizer and lr", (
        *({"optimizer": "sgd", "lr": lr} for lr in (0.25, 0.5, 1.0, 2.0)),
        *({"optimizer": "adam", "lr": lr} for lr in (0.02, 0.05)))),
    ("local epochs", tuple({"epochs": e} for e in (1, 2, 3))),
    ("lr decay per round", tuple({"lr_decay": d} for d in (1.0, 0.9, 0.8))),
    ("weight decay", tuple({"weight_decay": w} for w in (0.0, 1e-3))),
    ("statistics share of the budget", tuple({"statistics_share": f} for f in (0.5, 0.25))),
    ("per-example clip", tuple({"max_grad_norm": c} for c in (0.5, 1.0, 2.0))),
    # together: the device-level noise is a fraction of the update clip on the averaged update
    ("update clip and device-level noise", tuple(
        {"clip_norm": c, "device_noise_to_clip": f}
        for c in (0.5, 1.0, 2.0, 4.0, 8.0) for f in (0.25, 0.1, 0.05))),
    ("server optimizer", (
        {"server_optimizer": "sgd", "server_params": {}},
        {"server_optimizer": "fedavgm", "server_params": {"lr": 0.5, "momentum": 0.5}},
        {"server_optimizer": "fedavgm", "server_params": {"lr": 1.0, "momentum": 0.5}},
        {"server_optimizer": "fedadam", "server_params": {"lr": 0.03}},
        {"server_optimizer": "fedadam", "server_params": {"lr": 0.1}})),
    ("rounds", tuple({"rounds": r} for r in (10, 15, 25))),
)
#: Dimensions searched for each architecture (default: all). The convolution is slow to train
#: and was far behind from the start: its size and the main training settings only.
ARCH_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "cnn1d": ("model size", "batch size", "local optimizer and lr",
              "update clip and device-level noise"),
}
ARCH_SIZES: dict[str, tuple[dict[str, Any], ...]] = {
    "logreg": ({"arch_params": {}},),
    "mlp": ({"arch_params": {"hidden": [16]}}, {"arch_params": {"hidden": [32, 16]}}),
    "cnn1d": ({"arch_params": {"channels": [8], "kernel_size": 5}},
              {"arch_params": {"channels": [8, 16], "kernel_size": 5}},
              {"arch_params": {"channels": [16, 32], "kernel_size": 5}}),
}


def start_point(dataset: str, arch: str) -> dict[str, Any]:
    """The defaults the search starts from: the previous demo defaults (before this study)."""
    from bedside.models.defaults import UNTUNED

    return {**UNTUNED.fields(), "arch": arch, "arch_params": ARCH_SIZES[arch][-1]["arch_params"]}


def split(dataset: str, split_seed: int) -> tuple[Any, Any, list[Any]]:
    """(train, validation, shards) inside the demo's training rows; its held-out rows unread."""
    from bedside.demo.run import MIN_CLINIC_ROWS, DemoConfig
    from bedside.models import datasets
    from bedside.models.partition import partition

    cfg = DemoConfig(dataset=dataset)
    demo_train, _held_out = datasets.train_test_split(datasets.load(dataset), cfg.holdout,
                                                      cfg.seed)
    train, val = datasets.train_test_split(demo_train, cfg.holdout, seed=split_seed)
    shards = partition(train.y, cfg.clients, scheme="dirichlet", alpha=cfg.alpha,
                       min_size=MIN_CLINIC_ROWS, seed=split_seed)
    return train, val, shards


def score(dataset: str, settings: Mapping[str, Any], split_seed: int) -> float:
    """Final validation accuracy of one federation (a worker process)."""
    warnings.filterwarnings("ignore")  # torch notices
    import torch

    from bedside.demo.inprocess import run_demo_in_process
    from bedside.demo.run import for_task

    torch.set_num_threads(1)
    chosen = dict(settings)
    _what_if_noise(float(chosen.pop(WHAT_IF_NOISE, 1.0)))
    cfg = for_task(chosen, dataset=dataset)  # the device-level noise follows its rule
    train, val, shards = split(dataset, split_seed)
    run = run_demo_in_process(cfg, train, val, shards)
    return float(run.rounds[-1].metrics.get("accuracy", 0.0))


#: A --compare override that is not a setting: every clinic's DP-SGD noise multiplier times this
#: factor, with the ledgers' budget checks off. ``1 / sqrt(K)`` is what distributed DP over secure
#: aggregation would let each of K clinics add (docs/privacy.md, "What the device's own noise
#: costs"); Bedside has no such mode, so its privacy is not what the ledgers would report.
WHAT_IF_NOISE = "what_if_dpsgd_noise_factor"
_noise_factor = [1.0]


def _what_if_noise(factor: float) -> None:
    """Scale the clinics' DP-SGD noise in this worker process (1.0: as the devices plan it)."""
    import dataclasses

    from bedside.federation import device
    from bedside.privacy.ledger import Ledger

    _noise_factor[0] = factor  # checked by compare() before any worker runs
    if not hasattr(device, "_planned_record_noise"):  # patch once per worker, then set the factor
        planned = device.record_noise
        check = Ledger._check_locked
        device._planned_record_noise = planned  # type: ignore[attr-defined]

        def record_noise(*a: Any, **k: Any) -> Any:
            dp = planned(*a, **k)
            return dp if _noise_factor[0] == 1.0 else dataclasses.replace(
                dp, noise_multiplier=dp.noise_multiplier * _noise_factor[0])

        def check_locked(self: Any, items: Any) -> None:
            if _noise_factor[0] == 1.0:
                check(self, items)

        device.record_noise = record_noise  # type: ignore[assignment]
        Ledger._check_locked = check_locked  # type: ignore[method-assign]


def evaluate(pool: ProcessPoolExecutor, dataset: str, candidates: Sequence[Mapping[str, Any]],
             splits: Sequence[int]) -> list[dict[str, Any]]:
    futures = [[pool.submit(score, dataset, c, s) for s in splits] for c in candidates]
    out = []
    for c, fs in zip(candidates, futures, strict=True):
        accs = [f.result() for f in fs]
        out.append({"settings": dict(c), "accuracy": [round(a, 4) for a in accs],
                    "mean": round(statistics.fmean(accs), 4)})
    return out


def tune(pool: ProcessPoolExecutor, dataset: str, arch: str,
         splits: Sequence[int]) -> dict[str, Any]:
    best = start_point(dataset, arch)
    steps = []
    base = evaluate(pool, dataset, [best], splits)[0]
    best_mean = base["mean"]
    log(f"{dataset}/{arch}: start {best_mean:.4f}")
    for name, values in DIMENSIONS:
        values = ARCH_SIZES[arch] if name == "model size" else values
        if len(values) < 2 or name not in ARCH_DIMENSIONS.get(arch, (name,)):
            continue
        candidates = [{**best, **v} for v in values if {**best, **v} != best]
        results = evaluate(pool, dataset, candidates, splits)
        top = max(results, key=lambda r: r["mean"])
        changed = top["mean"] > best_mean + MARGIN
        steps.append({"dimension": name, "current": best_mean,
                      "tried": [{"values": {k: r["settings"][k] for k in values[0]},
                                 "mean": r["mean"], "accuracy": r["accuracy"]} for r in results],
                      "changed": changed})
        if changed:
            best, best_mean = top["settings"], top["mean"]
        log(f"{dataset}/{arch}: {name}: best {best_mean:.4f}"
            f"{' (changed)' if changed else ''}")
    return {"dataset": dataset, "arch": arch, "start": base, "chosen": best,
            "validation_accuracy": best_mean, "steps": steps}


def compare(pool: ProcessPoolExecutor, dataset: str, arch: str, overrides: Sequence[str],
            splits: Sequence[int]) -> dict[str, Any]:
    """Score the shipped defaults with each of ``overrides`` (JSON objects) on ``splits``."""
    from bedside.models.defaults import for_dataset

    base = {**for_dataset(dataset, arch).fields()}
    parsed = []
    for text in overrides:
        try:
            o = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"tuning: --compare {text!r} is not JSON: {exc}") from None
        unknown = (sorted(set(o) - set(base) - {"target_epsilon", WHAT_IF_NOISE})
                   if isinstance(o, dict) else [])
        if not isinstance(o, dict) or unknown:
            raise SystemExit(f"tuning: --compare {text!r} must be a JSON object of settings "
                             f"(unknown: {', '.join(unknown) or 'not an object'}; known: "
                             f"{', '.join(sorted(base))}, target_epsilon, {WHAT_IF_NOISE})")
        factor = o.get(WHAT_IF_NOISE, 1.0)
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 0:
            raise SystemExit(f"tuning: {WHAT_IF_NOISE} must be a number > 0, got {factor!r}")
        parsed.append(o)
    results = evaluate(pool, dataset, [{**base, **o} for o in parsed], splits)
    for o, r in zip(parsed, results, strict=True):
        r["overrides"] = o
        log(f"{dataset}/{arch}: {r['mean']:.4f} {json.dumps(o)}")
    return {"dataset": dataset, "arch": arch, "splits": list(splits), "base": base,
            "candidates": results}


# -- report ----------------------------------------------------------------------------------------
def _fmt(settings: Mapping[str, Any]) -> str:
    s = dict(settings)
    parts = [f"{s['arch']} {json.dumps(s['arch_params'])}" if s["arch_params"] else s["arch"],
             f"batch {s['batch_size']}", f"{s['optimizer']} lr {s['lr']:g}",
             f"{s['epochs']} epoch(s)", f"lr decay {s['lr_decay']:g}",
             f"weight decay {s['weight_decay']:g}",
             f"statistics {s['statistics_share']:g} of the budget",
             f"per-example clip {s['max_grad_norm']:g}", f"update clip {s['clip_norm']:g}",
             f"device-level noise {s['device_noise_to_clip']:g} of the clip",
             s["server_optimizer"] + (f" {json.dumps(s['server_params'])}"
                                      if s["server_params"] else ""),
             f"{s['rounds']} rounds"]
    return ", ".join(parts)


def markdown(res: Mapping[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"Generated by `benchmarks/tuning.py` on {m['date']}: {m['cpu_model']}, "
        f"{m['usable_cores']} cores; {res['seconds']:.0f} s. Full numbers: "
        "`benchmarks/results/tuning.json`. Rerun: `.venv/bin/python benchmarks/tuning.py`.",
        "",
        "The default demo (5 non-IID clinics, record-level DP-SGD at epsilon 8, delta 1e-5, the "
        "statistics round included, central noise) in process on the round core, scored "
        f"on validation splits drawn inside the demo's training rows (split seeds "
        f"{', '.join(map(str, res['splits']))}; the held-out rows the demo reports on are never "
        "read). The device-level (central) noise follows the demo's rule for the model's size "
        "(`models/defaults.py`, `device_noise`): its norm on the averaged update is a fraction of "
        "the update clip, searched together with the clip. Coordinate search from the "
        "previous defaults, one dimension at a time, in this "
        "order: " + "; ".join(
            (f"{name} (per architecture: " + ", ".join(f"{k} {len(x)}" for k, x in
                                                         ARCH_SIZES.items()) + " values)")
            if name == "model size" else f"{name} ({len(v)} values)"
            for name, v in DIMENSIONS) + f". A value wins when it beats the current one by "
        f"more than {MARGIN:g}. Scores move by about a point between runs (every noise draw "
        "comes from the operating system), so where candidates lie within that a rerun may "
        "choose differently (WDBC's batch and update clip did between two runs).",
        "",
        "| task | validation accuracy: start | chosen | chosen settings |",
        "|---|---:|---:|---|",
    ]
    for t in res["tasks"]:
        when = t.get("measured", m["date"])
        note = "" if when == m["date"] else f" (tuned {when[:10]}, an earlier run)"
        lines.append(f"| {t['dataset']} / {t['arch']}{note} | {t['start']['mean']:.4f} | "
                     f"{t['validation_accuracy']:.4f} | {_fmt(t['chosen'])} |")
    lines += ["", "What each step changed (mean validation accuracy of the best value, and of "
              "the current one):", ""]
    for t in res["tasks"]:
        changes = [f"{s['dimension']} {s['current']:.4f} -> "
                   f"{max(x['mean'] for x in s['tried']):.4f}" for s in t["steps"] if s["changed"]]
        lines.append(f"- {t['dataset']} / {t['arch']}: "
                     + ("; ".join(changes) if changes else "no change beat the start"))
    for c in res.get("comparisons", []):
        lines += ["", f"Comparison on {len(c['splits'])} validation splits (seeds "
                  f"{c['splits'][0]}-{c['splits'][-1]}), {c['dataset']} / {c['arch']}, "
                  f"{c['measured'][:10]}, {c['seconds']:.0f} s: the shipped defaults then "
                  f"({_fmt(c['base'])}) with each override; epsilon 8 unless the override "
                  "says otherwise.", "",
                  "| override | mean validation accuracy | per split |", "|---|---:|---|"]
        for r in c["candidates"]:
            lines.append(f"| `{json.dumps(r['overrides']) if r['overrides'] else 'none'}` | "
                         f"{r['mean']:.4f} | {', '.join(f'{a:.4f}' for a in r['accuracy'])} |")
        if any(WHAT_IF_NOISE in r["overrides"] for r in c["candidates"]):
            lines += ["", f"`{WHAT_IF_NOISE}` is a what-if, not a setting: every clinic's "
                      "DP-SGD noise multiplier times that factor, with the ledgers' budget checks "
                      "off (1/sqrt(5): what distributed DP over secure aggregation would let each "
                      "of 5 clinics add; docs/privacy.md)."]
        lines += ["", verdict(c)]
    lines += ["", "The per-dataset defaults in `models/defaults.py` (`TUNED`) are the best task "
              "of each dataset, with its architecture (or what a comparison decided, where one was "
              "run); `bedside demo --dataset NAME` uses them.", ""]
    return "\n".join(lines)


def verdict(comparison: Mapping[str, Any]) -> str:
    """What a comparison decides: an override replaces the shipped defaults only when it beats
    them (``{}``) at epsilon 8 by more than ``MARGIN``, as a value does in the search."""
    at8 = [r for r in comparison["candidates"]
           if not {"target_epsilon", WHAT_IF_NOISE} & set(r["overrides"])]  # what-ifs never win
    shipped = [r for r in at8 if not r["overrides"]]
    if not at8 or not shipped:
        return "No decision: the comparison does not score the shipped defaults at epsilon 8."
    top = max(at8, key=lambda r: r["mean"])
    gain = top["mean"] - shipped[0]["mean"]
    if not top["overrides"]:
        return "At epsilon 8 nothing beat the shipped defaults: they stay."
    if gain > MARGIN:
        return (f"At epsilon 8 `{json.dumps(top['overrides'])}` beat the shipped defaults by "
                f"{gain:.4f}: it replaces them.")
    return (f"At epsilon 8 `{json.dumps(top['overrides'])}` scored highest, {gain:.4f} above the "
            f"shipped defaults: within the margin ({MARGIN:g}), so the shipped defaults stay.")


def carried(previous: Mapping[str, Any] | None, tuned: Sequence[tuple[str, str]],
            ) -> list[dict[str, Any]]:
    """The tasks of an earlier run that this one does not tune (``--tasks`` names a subset),
    kept as they were measured, with their date, so that the results and the README keep every
    task."""
    if not previous:
        return []
    out = []
    for t in previous.get("tasks", []):
        if (t["dataset"], t["arch"]) not in tuned:
            out.append({**t, "measured": t.get("measured", previous["machine"]["date"])})
    return out


def parse_tasks(names: Sequence[str]) -> list[tuple[str, str]]:
    """``dataset:arch`` pairs, each a built-in dataset and an architecture with sizes."""
    from bedside.models.defaults import TUNED

    out = []
    for name in names:
        dataset, sep, arch = name.partition(":")
        if not sep or dataset not in TUNED or arch not in ARCH_SIZES:
            raise SystemExit(f"tuning: --tasks {name!r} is not dataset:arch (datasets: "
                             f"{', '.join(sorted(TUNED))}; architectures: "
                             f"{', '.join(sorted(ARCH_SIZES))})")
        out.append((dataset, arch))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--tasks", nargs="*", default=[f"{d}:{a}" for d, a in TASKS],
                   help="dataset:arch pairs (default: all); the other tasks of the last run "
                        "stay in the results as they were measured")
    p.add_argument("--splits", type=int, default=None,
                   help=f"validation splits (default {len(SPLITS)}; {len(COMPARE_SPLITS)} with "
                        "--compare)")
    p.add_argument("--quick", action="store_true", help="one split, for a smoke run")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--no-write", action="store_true", help="print the JSON, write nothing")
    p.add_argument("--compare", nargs="+", metavar="JSON",
                   help="instead of searching, score the shipped defaults with each of these "
                        "overrides (JSON objects; '{}' is the defaults) on --splits splits "
                        f"(default {len(COMPARE_SPLITS)}), for one --tasks entry")
    a = p.parse_args(argv)
    tasks = parse_tasks(a.tasks)
    if a.compare:
        return compare_main(a, tasks)
    splits = list(SPLITS[:1] if a.quick else SPLITS[:a.splits or len(SPLITS)])
    started = time.perf_counter()
    res: dict[str, Any] = {"machine": machine(), "splits": splits, "margin": MARGIN,
                           "dimensions": [[n, list(v)] for n, v in DIMENSIONS],
                           "arch_sizes": ARCH_SIZES, "tasks": []}
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=get_context("spawn")) as pool:
        for dataset, arch in tasks:
            res["tasks"].append({**tune(pool, dataset, arch, splits),
                                 "measured": res["machine"]["date"]})
    path = RESULTS / "tuning.json"
    previous = json.loads(path.read_text()) if path.exists() else None
    order = {t: i for i, t in enumerate(TASKS)}
    res["tasks"] = sorted(res["tasks"] + carried(previous, tasks),
                          key=lambda t: order.get((t["dataset"], t["arch"]), len(order)))
    return finish("tuning", "## Tuning", res, markdown, started, a.no_write)


def compare_main(a: argparse.Namespace, tasks: Sequence[tuple[str, str]]) -> int:
    """``--compare``: add a comparison to the last run's results (earlier ones stay, with their
    dates) and rewrite the README section."""
    if len(tasks) != 1:
        raise SystemExit("tuning: --compare needs exactly one --tasks entry (dataset:arch)")
    path = RESULTS / "tuning.json"
    if not path.exists():
        raise SystemExit(f"tuning: --compare adds to the results of a search; run "
                         f"benchmarks/tuning.py first ({path} is missing)")
    res = json.loads(path.read_text())
    count = a.splits or len(COMPARE_SPLITS)
    splits = list(COMPARE_SPLITS[:1] if a.quick else range(1, count + 1))
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=get_context("spawn")) as pool:
        (dataset, arch), = tasks
        entry = compare(pool, dataset, arch, a.compare, splits)
    entry.update(measured=machine()["date"], seconds=round(time.perf_counter() - started, 1))
    if a.no_write:
        print(json.dumps(entry, indent=2))
        return 0
    res["comparisons"] = [*res.get("comparisons", []), entry]
    path.write_text(json.dumps(res, indent=2) + "\n")
    write_section("tuning", "## Tuning", markdown(res))
    log(f"wrote {path} and the README section")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
