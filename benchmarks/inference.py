"""Inference benchmark: torch eager vs onnxruntime (fp32, int8) vs the edge Predictor.

One run measures, side by side, and writes ``benchmarks/results/inference.json`` plus the
``## Inference`` section of ``benchmarks/README.md``:

1. latency (p50, p95) and throughput at batch 1 and batch 256 for each model: the trained torch
   network (eager, ``inference_mode``, 1 thread), a raw onnxruntime session on the fp32 and the
   int8 file (1 intra-op thread), and ``Predictor.predict_proba`` (schema validation + decoding).
   The engines are interleaved in blocks, so load from other processes hits all of them alike;
2. the Predictor with the onnxruntime memory arena on and off, each in a fresh subprocess
   (latency and resident-memory growth);
3. cold start of ``bedside edge infer`` (edge-only venv, no torch) vs an equivalent torch script;
4. peak RSS of those two processes;
5. the size of the edge-only venv vs the full one;
6. the environment (CPU, cores, versions, load average).

Run from the repository root: ``.venv/bin/python benchmarks/inference.py``. Linux only (reads
``/proc``). The script also runs itself as a child (``--child ...``) for the subprocess
measurements, so its top level imports only the standard library and numpy, which the edge-only
venv has too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import README, REPO, load_average, log, machine, write_section

RESULTS_JSON = REPO / "benchmarks" / "results" / "inference.json"
MAIN_VENV = REPO / ".venv"
EDGE_VENV = REPO / ".venv-edge"

BATCHES = (1, 256)
CALLS = {1: 2000, 256: 200}  # measured calls per engine
WARMUP = {1: 200, 256: 20}
BLOCKS = 10  # engines take turns in this many blocks
ARENA_REPEATS = 5  # fresh subprocesses per arena setting (RSS growth varies between runs)
COLD_RUNS = 7  # measured runs per command (after one warm-up run each)
SAMPLE_SEED = 0
MB = 1_000_000

# engine key -> label; the last two are diagnostics that split the Predictor's overhead.
ENGINES: dict[str, str] = {
    "torch_eager": "torch eager",
    "ort_fp32": "onnxruntime fp32",
    "ort_int8": "onnxruntime int8",
    "predictor": "Predictor.predict_proba",
    "predictor_unchecked": "Predictor.run_unchecked",
}
DIAGNOSTICS: dict[str, str] = {
    "schema_validate": "Schema.validate",
    "to_probabilities": "to_probabilities",
}

Call = Callable[[np.ndarray], object]


@dataclass(frozen=True)
class ModelCase:
    dataset: str
    arch: str
    load_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.dataset}-{self.arch}"


CASES: tuple[ModelCase, ...] = (
    ModelCase("wdbc", "mlp"),
    ModelCase("wdbc", "logreg"),
    ModelCase("vitals", "cnn1d", {"n_windows": 600}),
)
PRIMARY = CASES[0].key  # the model the cold-start, RSS and goal figures are about


@dataclass
class PreparedCase:
    """An exported model directory plus everything the measurements need."""

    case: ModelCase
    dir: Path
    model_dir: Path
    manifest: Any
    fp32: bytes
    int8: bytes
    test_x: np.ndarray
    one_row_csv: Path
    weights_pt: Path
    inputs_npy: Path
    export_s: float
    parity_max_abs_diff: float = float("nan")


# -------------------------------------------------------------------------------------------------
# small helpers
# -------------------------------------------------------------------------------------------------


def edge_python() -> tuple[Path, bool]:
    """The edge-only venv's interpreter, or this one (and False) if that venv is missing."""
    candidate = EDGE_VENV / "bin" / "python"
    return (candidate, True) if candidate.exists() else (Path(sys.executable), False)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("BEDSIDE_DEBUG", None)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def proc_memory_kib() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in KiB, from /proc/self/status."""
    fields: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def batch_inputs(x: np.ndarray, batch: int, count: int = 8) -> list[np.ndarray]:
    """Held-out rows one by one (batch 1), or ``count`` batches sampled with replacement."""
    if batch == 1:
        return [np.ascontiguousarray(x[i : i + 1]) for i in range(len(x))]
    rng = np.random.default_rng(SAMPLE_SEED)
    return [np.ascontiguousarray(x[rng.integers(0, len(x), batch)]) for _ in range(count)]


def time_calls(engines: Mapping[str, Call], inputs: Sequence[np.ndarray], calls: int,
               warmup: int, blocks: int = BLOCKS) -> dict[str, np.ndarray]:
    """Per-call wall times (ns) of each engine, interleaved in ``blocks`` rotating turns.

    Every engine sees the same inputs in the same order; the garbage collector is off while
    timing (as in ``timeit``).
    """
    per_block = max(1, calls // blocks)
    names = list(engines)
    times = {name: np.empty(per_block * blocks, dtype=np.int64) for name in names}
    for name in names:
        for i in range(warmup):
            engines[name](inputs[i % len(inputs)])
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for b in range(blocks):
            for name in names[b % len(names):] + names[: b % len(names)]:
                fn, out = engines[name], times[name]
                for k in range(b * per_block, (b + 1) * per_block):
                    x = inputs[k % len(inputs)]
                    t = time.perf_counter_ns()
                    fn(x)
                    out[k] = time.perf_counter_ns() - t
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def summarize(ns: np.ndarray, batch: int) -> dict[str, float]:
    ms = ns / 1e6
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 5),
        "p95_ms": round(float(np.percentile(ms, 95)), 5),
        "mean_ms": round(float(ms.mean()), 5),
        "rows_per_s": round(batch * len(ns) / (float(ns.sum()) / 1e9), 1),
        "calls": len(ns),
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# -------------------------------------------------------------------------------------------------
# 0. export the models
# -------------------------------------------------------------------------------------------------
def prepare_case(case: ModelCase, root: Path) -> PreparedCase:
    """Export ``case`` with int8, and write the held-out rows, a one-row CSV and torch weights."""
    import torch

    from bedside.constants import QUANTIZED_FILE
    from bedside.manifest import verify_model_file
    from bedside.models import datasets
    from bedside.models.pipeline import export_model

    work = root / case.key
    model_dir = work / "model"
    ds = datasets.load(case.dataset, **case.load_kwargs)
    t = time.perf_counter()
    manifest = export_model(ds, case.arch, model_dir, quantize="int8")
    export_s = time.perf_counter() - t
    split = manifest.training
    _, test = datasets.train_test_split(ds, test_fraction=split["test_fraction"],
                                        seed=split["split_seed"])
    one_row = datasets.to_csv(test.subset([0]), work / "one_row.csv")
    inputs_npy = work / "test_x.npy"
    np.save(inputs_npy, test.x)
    prepared = PreparedCase(
        case=case, dir=work, model_dir=model_dir, manifest=manifest,
        fp32=verify_model_file(model_dir, manifest),
        int8=(model_dir / QUANTIZED_FILE).read_bytes(), test_x=test.x, one_row_csv=one_row,
        weights_pt=work / "weights.pt", inputs_npy=inputs_npy, export_s=export_s,
    )
    net = torch_net(prepared)
    torch.save(net.state_dict(), prepared.weights_pt)
    return prepared


def torch_net(prepared: PreparedCase) -> Any:
    """The trained network, rebuilt from the manifest's arch spec and the ONNX initializers.

    ``export_model`` does not return its torch module; the initializers are its trained
    parameters under the same names (checked at export), so this is the same network. The parity
    against onnxruntime is measured and stored in ``prepared``.
    """
    import torch

    from bedside.models.onnx_weights import read_weights
    from bedside.models.spec import ArchSpec
    from bedside.models.zoo import build

    m = prepared.manifest
    net = build(ArchSpec.from_dict(m.arch), m.schema)
    weights = read_weights(prepared.fp32, m.parameters)
    with torch.no_grad():
        for name, param in net.named_parameters():
            param.copy_(torch.from_numpy(weights[name]))
    net.eval()
    net.probabilities = True  # softmax inside, like the ONNX file
    with torch.inference_mode():
        torch_p = net(torch.from_numpy(prepared.test_x)).numpy()
    onnx_p = ort_session(prepared.fp32).run(None, {m.output["input"]: prepared.test_x})[0]
    prepared.parity_max_abs_diff = float(np.max(np.abs(torch_p - onnx_p)))
    return net


def ort_session(data: bytes) -> Any:
    """A raw onnxruntime session: 1 intra-op thread, everything else at onnxruntime's defaults."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


# -------------------------------------------------------------------------------------------------
# 1. latency and throughput, in process
# -------------------------------------------------------------------------------------------------
def engines_for(prepared: PreparedCase) -> dict[str, Call]:
    import torch

    from bedside.edge.predictor import Predictor
    from bedside.models.onnx_model import to_probabilities

    net = torch_net(prepared)
    out = prepared.manifest.output
    in_name, out_names = out["input"], [out["probabilities"]]
    fp32, int8 = ort_session(prepared.fp32), ort_session(prepared.int8)
    predictor = Predictor(prepared.model_dir)
    schema, labels = predictor.schema, predictor.schema.labels
    raw_by_batch: dict[int, np.ndarray] = {}  # one raw output per batch size, for decoding

    def torch_eager(x: np.ndarray) -> object:
        return net(torch.from_numpy(x)).numpy()

    def decode_only(x: np.ndarray) -> object:
        if len(x) not in raw_by_batch:  # first (warm-up) call only
            raw_by_batch[len(x)] = fp32.run(out_names, {in_name: x})[0]
        return to_probabilities(out, raw_by_batch[len(x)], labels)

    return {
        "torch_eager": torch_eager,
        "ort_fp32": lambda x: fp32.run(out_names, {in_name: x})[0],
        "ort_int8": lambda x: int8.run(out_names, {in_name: x})[0],
        "predictor": predictor.predict_proba,
        "predictor_unchecked": predictor.run_unchecked,
        "schema_validate": schema.validate,
        "to_probabilities": decode_only,
    }


def measure_latency(prepared: PreparedCase) -> dict[str, dict[str, dict[str, float]]]:
    import torch

    engines = engines_for(prepared)
    result: dict[str, dict[str, dict[str, float]]] = {}
    with torch.inference_mode():
        for batch in BATCHES:
            inputs = batch_inputs(prepared.test_x, batch)
            times = time_calls(engines, inputs, CALLS[batch], WARMUP[batch])
            result[f"batch{batch}"] = {k: summarize(v, batch) for k, v in times.items()}
    return result


def derived_figures(latency: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
    """Overhead and speed-up ratios from the p50 latencies."""
    out: dict[str, Any] = {}
    for batch in BATCHES:
        lat = {k: v["p50_ms"] for k, v in latency[f"batch{batch}"].items()}
        out[f"batch{batch}"] = {
            "predictor_overhead_pct": round((lat["predictor"] / lat["ort_fp32"] - 1) * 100, 1),
            "predictor_unchecked_overhead_pct":
                round((lat["predictor_unchecked"] / lat["ort_fp32"] - 1) * 100, 1),
            "predictor_added_us": round((lat["predictor"] - lat["ort_fp32"]) * 1000, 2),
            # the split of the added time: validation, then decoding + session settings
            "predictor_validation_us":
                round((lat["predictor"] - lat["predictor_unchecked"]) * 1000, 2),
            "predictor_decoding_us":
                round((lat["predictor_unchecked"] - lat["ort_fp32"]) * 1000, 2),
            "ort_fp32_speedup_vs_torch": round(lat["torch_eager"] / lat["ort_fp32"], 2),
            "int8_over_fp32_latency": round(lat["ort_int8"] / lat["ort_fp32"], 2),
        }
    return out


# -------------------------------------------------------------------------------------------------
# 2. memory arena on/off, in fresh subprocesses
# -------------------------------------------------------------------------------------------------
def child_arena(model_dir: Path, inputs_npy: Path, arena: bool) -> dict[str, Any]:
    """Runs in a fresh process: RSS growth of creating and running a Predictor, and latency."""
    import onnxruntime  # noqa: F401  (imported before the baseline, like the Predictor module)

    from bedside.edge.predictor import Predictor

    x = np.load(inputs_npy)
    inputs = {b: batch_inputs(x, b) for b in BATCHES}
    gc.collect()
    rss_start, _ = proc_memory_kib()
    predictor = Predictor(model_dir, memory_arena=arena)
    rss_created, _ = proc_memory_kib()
    latency = {}
    for b in BATCHES:
        times = time_calls({"p": predictor.predict_proba}, inputs[b], CALLS[b], WARMUP[b])
        latency[f"batch{b}_p50_ms"] = summarize(times["p"], b)["p50_ms"]
    rss_end, rss_peak = proc_memory_kib()
    return {
        **latency,
        "rss_delta_create_mb": (rss_created - rss_start) * 1024 / MB,
        "rss_delta_create_run_mb": (rss_end - rss_start) * 1024 / MB,
        "rss_end_mb": rss_end * 1024 / MB,
        "peak_rss_mb": rss_peak * 1024 / MB,
    }


def measure_arena(prepared: PreparedCase) -> dict[str, Any]:
    python, _ = edge_python()
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for _ in range(ARENA_REPEATS):
        for setting in ("on", "off"):
            cmd = [str(python), str(Path(__file__).resolve()), "--child", "arena",
                   "--model", str(prepared.model_dir), "--inputs", str(prepared.inputs_npy),
                   "--arena", setting]
            r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(),
                               cwd=prepared.dir, timeout=300, check=True)
            runs[setting].append(json.loads(r.stdout))
    return {setting: summarize_arena(rs) for setting, rs in runs.items()}


def summarize_arena(runs: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Medians of every figure, plus the spread of the RSS growth (it is not always the same)."""
    out: dict[str, Any] = {k: round(median([r[k] for r in runs]), 4) for k in runs[0]}
    growth = [round(r["rss_delta_create_run_mb"], 2) for r in runs]
    return out | {"rss_delta_create_run_mb_max": max(growth),
                  "rss_delta_create_run_mb_all": growth, "runs": len(runs)}


# -------------------------------------------------------------------------------------------------
# 3 + 4. cold start and peak RSS of `bedside edge infer` vs a torch script
# -------------------------------------------------------------------------------------------------
def child_torch_infer(model_dir: Path, csv_path: Path, weights: Path) -> None:
    """The torch equivalent of ``bedside edge infer --json``: rebuild, load weights, predict."""
    import torch

    from bedside.manifest import load_manifest
    from bedside.models.spec import ArchSpec
    from bedside.models.zoo import build
    from bedside.tabular import read_csv

    torch.set_num_threads(1)
    m = load_manifest(model_dir)
    net = build(ArchSpec.from_dict(m.arch), m.schema)
    net.load_state_dict(torch.load(weights, weights_only=True))
    net.eval()
    net.probabilities = True
    table = read_csv(csv_path, m.schema)
    with torch.inference_mode():
        probs = net(torch.from_numpy(table.x)).numpy()
    labels = list(m.schema.labels)
    preds = [{"row": r, "label": labels[int(np.argmax(p))],
              "probabilities": {lab: round(float(v), 6) for lab, v in zip(labels, p, strict=True)}}
             for r, p in zip(table.row_ids, probs, strict=True)]
    sys.stdout.write(json.dumps({"model": {"name": m.name, "version": m.version},
                                 "predictions": preds}) + "\n")


@dataclass(frozen=True)
class ProcessRun:
    first_output_s: float
    exit_s: float
    max_rss_mb: float
    stdout: str
    stderr: str


# A stdlib-only launcher, run as `python -I -S -c LAUNCHER ERR_FILE CMD...`. It spawns CMD and
# reports its timings and ru_maxrss. Spawning CMD from this (big, torch-importing) process would
# report *our* peak RSS: on Linux a child's ru_maxrss starts from the hiwater mark of the address
# space it was forked (or vforked) from. The launcher's own ~10 MB is the floor it can report.
LAUNCHER = """
import json, os, subprocess, sys, time
with open(sys.argv[1], "wb") as err:
    start = time.perf_counter()
    proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=err)
    first = proc.stdout.read(1)
    first_s = time.perf_counter() - start
    rest = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    exit_s = time.perf_counter() - start
print(json.dumps({"first_output_s": first_s, "exit_s": exit_s, "max_rss_kib": usage.ru_maxrss,
                  "returncode": os.waitstatus_to_exitcode(status),
                  "stdout": (first + rest).decode(errors="replace")}))
"""


def timed_process(cmd: Sequence[str], cwd: Path) -> ProcessRun:
    """Wall time from spawn to the first byte on stdout and to exit, and the child's max RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        err_file = Path(tmp) / "stderr"
        r = subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, str(err_file), *cmd],
                           cwd=cwd, env=child_env(), capture_output=True, text=True,
                           timeout=300, check=True)
        stderr = err_file.read_text(errors="replace")
    out = json.loads(r.stdout)
    if out["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out['returncode']}):\n{stderr}")
    return ProcessRun(out["first_output_s"], out["exit_s"], out["max_rss_kib"] * 1024 / MB,
                      out["stdout"], stderr)


def edge_infer_cmd(prepared: PreparedCase, *extra: str) -> list[str]:
    python, _ = edge_python()
    return [str(python), *extra, "-m", "bedside", "edge", "infer", "--model",
            str(prepared.model_dir), "--input", str(prepared.one_row_csv), "--json"]


def torch_infer_cmd(prepared: PreparedCase) -> list[str]:
    return [str(MAIN_VENV / "bin" / "python"), str(Path(__file__).resolve()), "--child",
            "torch-infer", "--model", str(prepared.model_dir), "--input",
            str(prepared.one_row_csv), "--weights", str(prepared.weights_pt)]


def import_breakdown(prepared: PreparedCase, top: int = 6) -> list[dict[str, Any]]:
    """Import time of ``bedside edge infer`` per top-level package (``-X importtime``).

    Sums each module's own ("self") time under its first dotted component, so ``numpy`` holds
    all of numpy's submodules whoever imported them.
    """
    run = timed_process(edge_infer_cmd(prepared, "-X", "importtime"), prepared.dir)
    per_package: dict[str, int] = {}
    for line in run.stderr.splitlines():
        # "import time:  self_us | cumulative_us | <2 spaces per nesting level>name"
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        head, _, name = line.split("|", 2)
        package = name.strip().split(".")[0]
        per_package[package] = per_package.get(package, 0) + int(head.split(":")[1])
    rows = sorted(per_package.items(), key=lambda kv: -kv[1])[:top]
    return [{"package": pkg, "self_ms": round(us / 1000, 1)} for pkg, us in rows] + [
        {"package": "(all imports)", "self_ms": round(sum(per_package.values()) / 1000, 1)}]


def measure_cold_start(prepared: PreparedCase) -> dict[str, Any]:
    commands = {"edge_infer": edge_infer_cmd(prepared), "torch_script": torch_infer_cmd(prepared)}
    runs: dict[str, list[ProcessRun]] = {k: [] for k in commands}
    for cmd in commands.values():  # warm the page cache; not counted
        timed_process(cmd, prepared.dir)
    for _ in range(COLD_RUNS):
        for name, cmd in commands.items():
            runs[name].append(timed_process(cmd, prepared.dir))
    outputs = {k: json.loads(v[0].stdout)["predictions"][0] for k, v in runs.items()}
    labels = list(outputs["edge_infer"]["probabilities"])
    agree = max(abs(outputs["edge_infer"]["probabilities"][lab]
                    - outputs["torch_script"]["probabilities"][lab]) for lab in labels)
    _, edge_is_edge_venv = edge_python()
    floor = timed_process(["true"], prepared.dir).max_rss_mb
    return {
        "model": prepared.case.key,
        "input": "one-row CSV from the held-out split",
        "runs": COLD_RUNS,
        "page_cache": "warm (one unmeasured run of each command first)",
        "edge_venv_used": edge_is_edge_venv,
        "edge_python": str(edge_python()[0]),
        "prediction_max_abs_diff_edge_vs_torch": agree,
        "peak_rss_floor_mb": round(floor, 2),
        **{name: {
            "command": " ".join(Path(c).name if i == 0 else c for i, c in
                                enumerate(commands[name])),
            "first_output_s_median": round(median([r.first_output_s for r in rs]), 4),
            "exit_s_median": round(median([r.exit_s for r in rs]), 4),
            "first_output_s_all": [round(r.first_output_s, 4) for r in rs],
            "peak_rss_mb_median": round(median([r.max_rss_mb for r in rs]), 2),
            "peak_rss_mb_max": round(max(r.max_rss_mb for r in rs), 2),
        } for name, rs in runs.items()},
        "edge_infer_import_breakdown": import_breakdown(prepared),
    }


# -------------------------------------------------------------------------------------------------
# 5. venv sizes
# -------------------------------------------------------------------------------------------------
def disk_usage(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (like ``du``: blocks, hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def top_distributions(venv: Path, top: int = 5) -> list[dict[str, Any]]:
    """The largest installed distributions (all files their RECORD lists, on disk)."""
    from importlib.metadata import distributions

    site = next(venv.glob("lib/python*/site-packages"))
    sizes: list[dict[str, Any]] = []
    for dist in distributions(path=[str(site)]):
        total = 0
        for f in dist.files or []:
            p = Path(str(dist.locate_file(f)))
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_blocks * 512
        sizes.append({"name": dist.metadata["Name"], "version": dist.version,
                      "mb": round(total / MB, 1)})
    sizes.sort(key=lambda d: -d["mb"])
    return sizes[:top]


def measure_venvs() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, venv in (("edge", EDGE_VENV), ("full", MAIN_VENV)):
        if not venv.exists():
            out[name] = {"path": str(venv), "exists": False}
            continue
        out[name] = {"path": str(venv), "exists": True,
                     "total_mb": round(disk_usage(venv) / MB, 1),
                     "top_distributions": top_distributions(venv)}
    if out["edge"].get("exists") and out["full"].get("exists"):
        out["edge_fraction_of_full"] = round(out["edge"]["total_mb"] / out["full"]["total_mb"], 3)
    return out


# -------------------------------------------------------------------------------------------------
# 6. environment
# -------------------------------------------------------------------------------------------------
def edge_venv_versions() -> dict[str, Any]:
    python, is_edge = edge_python()
    code = ("import json, platform, numpy, onnxruntime; print(json.dumps({'python': "
            "platform.python_version(), 'numpy': numpy.__version__, "
            "'onnxruntime': onnxruntime.__version__}))")
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True,
                       env=child_env())
    versions: dict[str, Any] = json.loads(r.stdout)
    versions["torch_importable"] = subprocess.run(
        [str(python), "-c", "import torch"], capture_output=True, env=child_env()).returncode == 0
    versions["venv"] = str(EDGE_VENV) if is_edge else f"{sys.prefix} (edge venv missing)"
    return versions


def environment() -> dict[str, Any]:
    import onnxruntime
    import torch

    return {
        **machine(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "edge_venv": edge_venv_versions(),
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_intra_op_threads": 1,
    }


# -------------------------------------------------------------------------------------------------
# goals and reporting
# -------------------------------------------------------------------------------------------------
def evaluate_goals(models: Mapping[str, Any], cold: Mapping[str, Any]) -> list[dict[str, Any]]:
    goals = []
    for key, m in models.items():
        b1 = m["derived"]["batch1"]
        goals.append({"goal": f"Predictor overhead over raw onnxruntime fp32, batch 1 ({key})",
                      "target": "<= 20 %", "measured": f"{b1['predictor_overhead_pct']:.0f} %",
                      "pass": b1["predictor_overhead_pct"] <= 20})
        goals.append({"goal": f"onnxruntime fp32 speed-up over torch eager, batch 1 ({key})",
                      "target": ">= 3x", "measured": f"{b1['ort_fp32_speedup_vs_torch']:.2f}x",
                      "pass": b1["ort_fp32_speedup_vs_torch"] >= 3})
    edge = cold["edge_infer"]
    goals.append({"goal": f"cold start of `bedside edge infer` to first output ({cold['model']})",
                  "target": "< 0.5 s", "measured": f"{edge['first_output_s_median']:.3f} s",
                  "pass": edge["first_output_s_median"] < 0.5})
    goals.append({"goal": f"peak RSS of `bedside edge infer` ({cold['model']})",
                  "target": "< 100 MB", "measured": f"{edge['peak_rss_mb_median']:.1f} MB",
                  "pass": edge["peak_rss_mb_median"] < 100})
    return goals


def int8_verdict(models: Mapping[str, Any]) -> str:
    parts = []
    for key, m in models.items():
        ratios = [m["derived"][f"batch{b}"]["int8_over_fp32_latency"] for b in BATCHES]
        words = ["slower" if r > 1.05 else "faster" if r < 0.95 else "about as fast"
                 for r in ratios]
        parts.append(f"{key}: int8 is {words[0]} than fp32 at batch 1 "
                     f"({ratios[0]:.2f}x the fp32 p50) and {words[1]} at batch 256 "
                     f"({ratios[1]:.2f}x)")
    return "; ".join(parts) + "."


def fmt_ms(v: float) -> str:
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def latency_table(models: Mapping[str, Any]) -> list[str]:
    lines = ["| model | engine | b1 p50 ms | b1 p95 ms | b1 rows/s | b256 p50 ms | b256 p95 ms "
             "| b256 rows/s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, m in models.items():
        for engine, label in ENGINES.items():
            b1, b256 = m["latency"]["batch1"][engine], m["latency"]["batch256"][engine]
            lines.append(f"| {key} | {label} | {fmt_ms(b1['p50_ms'])} | {fmt_ms(b1['p95_ms'])} "
                         f"| {b1['rows_per_s']:,.0f} | {fmt_ms(b256['p50_ms'])} "
                         f"| {fmt_ms(b256['p95_ms'])} | {b256['rows_per_s']:,.0f} |")
    return lines


def derived_table(models: Mapping[str, Any]) -> list[str]:
    lines = ["| model | Predictor overhead b1 | added: validation | added: decoding + session "
             "| Predictor overhead b256 | ort speed-up vs torch b1 | b256 "
             "| int8/fp32 latency b1 | b256 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, m in models.items():
        d1, d256 = m["derived"]["batch1"], m["derived"]["batch256"]
        lines.append(f"| {key} | {d1['predictor_overhead_pct']:.0f} % "
                     f"(+{d1['predictor_added_us']:.1f} us) "
                     f"| {d1['predictor_validation_us']:.1f} us "
                     f"| {d1['predictor_decoding_us']:.1f} us "
                     f"| {d256['predictor_overhead_pct']:.0f} % "
                     f"| {d1['ort_fp32_speedup_vs_torch']:.2f}x "
                     f"| {d256['ort_fp32_speedup_vs_torch']:.2f}x "
                     f"| {d1['int8_over_fp32_latency']:.2f} "
                     f"| {d256['int8_over_fp32_latency']:.2f} |")
    return lines


def diagnostics_line(models: Mapping[str, Any]) -> str:
    parts = []
    for key, m in models.items():
        b1 = m["latency"]["batch1"]
        parts.append(f"{key}: " + ", ".join(f"{label} {b1[k]['p50_ms'] * 1000:.1f} us"
                                            for k, label in DIAGNOSTICS.items()))
    return "; ".join(parts)


def goals_table(goals: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["| goal | target | measured | pass |", "|---|---|---|---|"]
    lines += [f"| {g['goal']} | {g['target']} | {g['measured']} | "
              f"{'pass' if g['pass'] else '**fail**'} |" for g in goals]
    return lines


def arena_table(arena: Mapping[str, Any]) -> list[str]:
    lines = ["| model | arena | b1 p50 ms | b256 p50 ms | RSS growth: create (MB) "
             "| RSS growth: create + run (MB), median (max) | process peak RSS (MB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for key, settings in arena.items():
        for setting, r in settings.items():
            lines.append(f"| {key} | {setting} | {fmt_ms(r['batch1_p50_ms'])} "
                         f"| {fmt_ms(r['batch256_p50_ms'])} | {r['rss_delta_create_mb']:.2f} "
                         f"| {r['rss_delta_create_run_mb']:.2f} "
                         f"({r['rss_delta_create_run_mb_max']:.2f}) | {r['peak_rss_mb']:.1f} |")
    return lines


def cold_table(cold: Mapping[str, Any]) -> list[str]:
    venv = ".venv-edge" if cold["edge_venv_used"] else ".venv (edge venv missing)"
    lines = ["| command | venv | first output s (median) | exit s (median) | peak RSS MB |",
             "|---|---|---:|---:|---:|"]
    for name, label, where in (("edge_infer", "`bedside edge infer --json`", venv),
                               ("torch_script", "torch script (same CSV, same output)", ".venv")):
        r = cold[name]
        lines.append(f"| {label} | {where} | {r['first_output_s_median']:.3f} "
                     f"| {r['exit_s_median']:.3f} | {r['peak_rss_mb_median']:.1f} |")
    return lines


def venv_table(venvs: Mapping[str, Any]) -> list[str]:
    lines = ["| venv | total MB | largest distributions (MB) |", "|---|---:|---|"]
    for name in ("edge", "full"):
        v = venvs[name]
        if not v.get("exists"):
            lines.append(f"| {name} | missing | |")
            continue
        top = ", ".join(f"{d['name']} {d['mb']:.0f}" for d in v["top_distributions"])
        lines.append(f"| {name} (`{Path(v['path']).name}`) | {v['total_mb']:.0f} | {top} |")
    return lines


def markdown(results: Mapping[str, Any]) -> str:
    env, cold = results["environment"], results["cold_start"]
    imports = ", ".join(f"{r['package']} {r['self_ms']:.0f} ms"
                        for r in cold["edge_infer_import_breakdown"])
    lines = [
        f"Generated by `benchmarks/inference.py` on {env['date']}: {env['cpu_model']}, "
        f"{env['cores']} cores, Python {env['python']}, torch {env['torch']}, onnxruntime "
        f"{env['onnxruntime']}; load average {env['load_average_start']} at start, "
        f"{env['load_average_end']} at end (other processes were running). Whole run "
        f"{results['run_seconds']:.0f} s. Full numbers: `benchmarks/results/inference.json`. "
        "Rerun: `.venv/bin/python benchmarks/inference.py`.",
        "",
        "### Latency and throughput",
        "",
        "One thread everywhere (torch `set_num_threads(1)`, onnxruntime `intra_op_num_threads=1`). "
        f"{CALLS[1]} calls at batch 1 (held-out rows in turn), {CALLS[256]} at batch 256 (held-out "
        "rows sampled with replacement), after warm-up; the engines take turns in "
        f"{BLOCKS} blocks so background load hits them alike. rows/s = rows / total time. "
        "`Predictor.run_unchecked` is the Predictor without schema validation (diagnostic); "
        "the Predictor's added time splits into validation (`predict_proba` - `run_unchecked`) "
        "and decoding plus its session settings (`run_unchecked` - raw fp32). Ratios use p50.",
        "",
        *latency_table(results["models"]),
        "",
        *derived_table(results["models"]),
        "",
        f"Alone, at batch 1 (p50): {diagnostics_line(results['models'])}.",
        "",
        f"**int8 vs fp32:** {results['int8_verdict']}",
        "",
        "### Goals",
        "",
        *goals_table(results["goals"]),
        "",
        "### Memory arena (Predictor, a fresh process each in the edge venv, median of "
        f"{ARENA_REPEATS})",
        "",
        "RSS growth is measured from after `import onnxruntime` to after creating the Predictor, "
        "and to after the latency runs at batch 1 and 256.",
        "",
        *arena_table(results["memory_arena"]),
        "",
        f"### Cold start and peak RSS ({cold['model']}, one-row CSV, median of {cold['runs']})",
        "",
        "Wall time from spawning the process to the first byte of its output (and to its exit), "
        "warm page cache. Peak RSS is the child's `ru_maxrss`, spawned by a small stdlib-only "
        f"launcher (floor: {cold['peak_rss_floor_mb']:.1f} MB, what it reports for `true`). "
        "The torch script imports torch, "
        "rebuilds the network from the manifest's arch spec, loads a `state_dict` "
        "(`torch.load(weights_only=True)`), reads the same CSV and prints the same JSON.",
        "",
        *cold_table(cold),
        "",
        "Import time of `bedside edge infer` by package (`-X importtime`, one run; it slows "
        f"imports itself): {imports}.",
        "",
        "### Install size",
        "",
        *venv_table(results["venv_size"]),
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------------
def run(cases: Sequence[ModelCase]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # fairness with onnxruntime's one thread; also keeps training quick
    env = environment()
    models: dict[str, Any] = {}
    arena: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bedside-bench-") as tmp:
        prepared = []
        for case in cases:
            log(f"exporting {case.key} (train, ONNX, int8)")
            prepared.append(prepare_case(case, Path(tmp)))
        for p in prepared:
            log(f"latency {p.case.key}")
            latency = measure_latency(p)
            models[p.case.key] = {
                "dataset": p.case.dataset, "arch": p.case.arch, "load": dict(p.case.load_kwargs),
                "rows_test": len(p.test_x), "input_shape": list(p.test_x.shape[1:]),
                "export_s": round(p.export_s, 2),
                "bytes": {"fp32": len(p.fp32), "int8": len(p.int8)},
                "torch_vs_onnx_max_abs_diff": p.parity_max_abs_diff,
                "latency": latency, "derived": derived_figures(latency),
            }
        for p in prepared:
            log(f"memory arena on/off {p.case.key} ({2 * ARENA_REPEATS} processes)")
            arena[p.case.key] = measure_arena(p)
        primary = next((p for p in prepared if p.case.key == PRIMARY), prepared[0])
        log(f"cold start and peak RSS {primary.case.key} ({2 * (COLD_RUNS + 1) + 1} processes)")
        cold = measure_cold_start(primary)
    log("venv sizes")
    venvs = measure_venvs()
    env["load_average_end"] = load_average()
    return {
        "benchmark": "inference",
        "environment": env,
        "config": {"calls": CALLS, "warmup": WARMUP, "blocks": BLOCKS,
                   "arena_repeats": ARENA_REPEATS, "cold_runs": COLD_RUNS,
                   "sample_seed": SAMPLE_SEED, "mb": "10^6 bytes",
                   "raw_onnxruntime": "InferenceSession, intra_op_num_threads=1, defaults "
                                      "otherwise (memory arena on)",
                   "predictor": "Predictor(model_dir): threads=1, memory arena off"},
        "models": models,
        "memory_arena": arena,
        "cold_start": cold,
        "venv_size": venvs,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=[c.key for c in CASES],
                   default=[c.key for c in CASES], help="models to measure (default: all)")
    p.add_argument("--no-write", action="store_true", help="print the JSON, write nothing")
    # internal: the subprocess measurements run this file again
    p.add_argument("--child", choices=["arena", "torch-infer"], help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--arena", choices=["on", "off"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "arena":
        print(json.dumps(child_arena(args.model, args.inputs, args.arena == "on")))
        return 0
    if args.child == "torch-infer":
        child_torch_infer(args.model, args.input, args.weights)
        return 0
    start = time.perf_counter()
    results = run([c for c in CASES if c.key in args.models])
    results["run_seconds"] = round(time.perf_counter() - start, 1)
    results["goals"] = evaluate_goals(results["models"], results["cold_start"])
    results["int8_verdict"] = int8_verdict(results["models"])
    if args.no_write:
        print(json.dumps(results, indent=2))
        return 0
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(results, indent=2) + "\n")
    write_section("inference", "## Inference", markdown(results))
    log(f"wrote {RESULTS_JSON.relative_to(REPO)} and {README.relative_to(REPO)} "
        f"in {results['run_seconds']:.0f} s")
    for g in results["goals"]:
        log(f"{'PASS' if g['pass'] else 'FAIL'} {g['goal']}: {g['measured']} "
            f"(target {g['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
