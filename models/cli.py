"""``bedside models ...``: export, import, schema, inspect; list and show a registry."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bedside.cli import print_json
from bedside.errors import InputError


def _param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (JSON value), got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(
            f"{key}: value {value!r} is not JSON (e.g. hidden=[64,32] or dropout=0.1)"
        ) from None


def build(parser: argparse.ArgumentParser) -> Any:
    """Add the model commands; returns the sub-command table (the CLI root adds the fleet
    commands of ``bedside.aggregator.fleet_cli`` to it: push, status, rollback)."""
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("export",
                       help="train a starting model and export it to ONNX with a manifest")
    p.add_argument("--arch", required=True, choices=["logreg", "mlp", "cnn1d"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["wdbc", "digits", "vitals"],
                     help="a reference data set shipped with Bedside")
    src.add_argument("--data", type=Path, metavar="FILE.csv",
                     help="your own tabular CSV (needs --label)")
    p.add_argument("--label", help="label column of --data")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--epochs", type=int, help="training epochs (default depends on the data set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=JSON",
                   help="architecture hyper-parameter, e.g. hidden=[64,32] (repeatable)")
    p.add_argument("--quantize", choices=["int8"], help="also write a dynamic int8 model")
    p.add_argument("--name", help="model name (default DATASET-ARCH)")
    p.add_argument("--version", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_export)

    p = sub.add_parser("import", help="wrap a foreign ONNX classifier (e.g. from skl2onnx)")
    p.add_argument("file", type=Path, metavar="FILE.onnx")
    p.add_argument("--schema", required=True, type=Path, metavar="schema.json")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--name")
    p.add_argument("--version", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_import)

    p = sub.add_parser("schema", help="write an input schema to edit, from a CSV's columns "
                       "(for 'bedside models import --schema')")
    p.add_argument("--from-csv", required=True, type=Path, metavar="FILE.csv", dest="csv")
    p.add_argument("--label", required=True, help="the label column (its values are the classes)")
    p.add_argument("--out", required=True, type=Path, metavar="schema.json")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_schema)

    p = sub.add_parser("list", help="the versions in an aggregator's registry")
    p.add_argument("--registry", required=True, type=Path, metavar="DIR",
                   help="the aggregator's registry (<data_dir>/registry)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)

    p = sub.add_parser("show", help="one version of a registry: its lineage, privacy, metrics")
    p.add_argument("version", type=int)
    p.add_argument("--registry", required=True, type=Path, metavar="DIR",
                   help="the aggregator's registry (<data_dir>/registry)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_show)

    p = sub.add_parser("inspect", help="show a model directory's manifest and verify its files")
    p.add_argument("model", type=Path, metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("evaluate", help="fairness across patient groups: accuracy, sensitivity, "
                       "specificity, AUC and calibration per group, the largest gap, and the "
                       "groups too small to judge")
    p.add_argument("model", type=Path, metavar="DIR")
    p.add_argument("--data", required=True, type=Path, metavar="FILE.csv")
    p.add_argument("--label", required=True, metavar="COL")
    p.add_argument("--groups", required=True, metavar="COL[,COL]",
                   help="patient attributes that define the groups (e.g. age_band,sex)")
    p.add_argument("--min-rows", type=int, default=30, metavar="N",
                   help="smaller groups are reported but not judged (default 30)")
    p.add_argument("--positive", metavar="LABEL", help="the class sensitivity is about "
                   "(two-label models; default: the second label, e.g. 'deteriorating')")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_evaluate)
    return sub


def _evaluate(ns: argparse.Namespace) -> int:
    """Per-group metrics of a model on a labelled CSV (torch-free: onnxruntime)."""
    from bedside.manifest import load_manifest, verify_model_file
    from bedside.metrics import by_group, evaluate
    from bedside.models.onnx_model import OnnxClassifier
    from bedside.tabular import group_values, read_rows, table_from_rows

    m = load_manifest(ns.model)
    clf = OnnxClassifier(verify_model_file(ns.model, m), m.output, m.schema.labels,
                         where=str(ns.model))
    header, rows = read_rows(ns.data)
    cols = [c.strip() for c in ns.groups.split(",") if c.strip()]
    table = table_from_rows(ns.data, header, rows, m.schema, ns.label)
    assert table.y is not None
    groups = group_values(ns.data, header, rows, table, cols)
    labels = list(m.schema.labels)
    if ns.positive is not None and ns.positive not in labels:
        raise InputError(f"--positive {ns.positive!r}: not one of the model's labels {labels}")
    positive = labels.index(ns.positive) if ns.positive else min(1, len(labels) - 1)
    p = clf.probabilities(table.x)
    report = {"model": f"{m.name} v{m.version}", "data": str(ns.data), "group_by": cols,
              "positive": labels[positive] if len(labels) == 2 else None,
              "overall": evaluate(table.y, p),
              **by_group(table.y, p, groups, ns.min_rows, positive)}
    if ns.json:
        print_json(report)
        return 0
    _print_groups(report)
    return 0


def _print_groups(r: dict[str, Any]) -> None:
    print(f"{r['model']} on {r['data']}, by {'/'.join(r['group_by'])}: overall accuracy "
          f"{r['overall']['accuracy']:.4f}, AUC {r['overall']['auc']:.4f}"
          + (f"; sensitivity is of {r['positive']!r}" if r["positive"] else ""))
    metrics = ["accuracy", "sensitivity", "specificity", "auc", "calibration_error"]
    shown = [k for k in metrics if any(k in g for g in r["groups"].values())]
    print(f"{'group':<16}{'rows':>6}  " + "  ".join(f"{k[:11]:>11}" for k in shown))
    for name, g in r["groups"].items():
        cells = "  ".join(f"{'-' if g[k] is None else format(g[k], '.4f'):>11}" for k in shown)
        print(f"{name:<16}{g['rows']:>6}  {cells}" + ("" if g["judged"] else "  (too small "
                                                      "to judge)"))
    if r["largest_gap"]:
        k = r["largest_gap"]
        gap = r["gaps"][k]
        print(f"largest gap: {k} {gap['gap']:.4f} ({gap['lowest']} lowest, {gap['highest']} "
              "highest)")
    else:
        print("no gap to report: fewer than two groups large enough to judge "
              f"(--min-rows {r['min_rows']})")


def _summary(m: Any, out: Path) -> str:
    lines = [f"{m.name} v{m.version} -> {out}",
             f"  schema: {m.schema.n_features} features ({m.schema.kind}), labels "
             f"{list(m.schema.labels)}",
             f"  onnx: opset {m.opset}, sha256 {m.sha256[:16]}..."]
    if m.parity:
        lines.append(f"  parity vs torch: max abs diff {m.parity['max_abs_diff']:.2e} on "
                     f"{m.parity['rows']} held-out rows (tolerance {m.parity['tolerance']:g})")
    test = m.metrics.get("test")
    if test:
        lines.append(f"  test: accuracy {test['accuracy']:.4f}, AUC {test['auc']:.4f} "
                     f"({test['rows']} rows)")
    q = m.extra.get("quantization")
    if q:
        lat = q["latency"]
        lines.append(
            f"  int8: accuracy {q['accuracy']['int8']:.4f} ({q['accuracy_change']:+.4f}), "
            f"batch-1 p50 {lat['int8']['batch1_p50_ms']:.3f} ms vs fp32 "
            f"{lat['fp32']['batch1_p50_ms']:.3f} ms, {q['bytes']['int8']} vs "
            f"{q['bytes']['fp32']} bytes")
    lines.append(f"  privacy: {_privacy_line(m)}")
    return "\n".join(lines)


def _privacy_line(m: Any) -> str:
    from bedside.models.catalog import privacy_text

    if not m.privacy and m.arch is not None and "round" not in m.training:
        return "none (trained without differential privacy)"
    return privacy_text(m)


def _export(ns: argparse.Namespace) -> int:
    from bedside.models import datasets
    from bedside.models.pipeline import DEFAULT_EPOCHS, export_model
    from bedside.models.train import TrainConfig

    if ns.data is not None:
        if not ns.label:
            raise InputError("--data needs --label COLUMN (the column holding the class)")
        ds = datasets.load_csv(ns.data, ns.label)
    else:
        if ns.label:
            raise InputError("--label goes with --data, not --dataset")
        ds = datasets.load(ns.dataset)
    epochs = ns.epochs if ns.epochs is not None else DEFAULT_EPOCHS.get(ds.name, 30)
    cfg = TrainConfig(epochs=epochs, batch_size=ns.batch_size, lr=ns.lr, seed=ns.seed)
    m = export_model(ds, ns.arch, ns.out, name=ns.name, version=ns.version, train=cfg,
                     params=dict(ns.param), split_seed=ns.seed, quantize=ns.quantize)
    if ns.json:
        print_json(m.to_dict())
    else:
        print(_summary(m, ns.out))
    return 0


def _import(ns: argparse.Namespace) -> int:
    from bedside.models.importer import import_onnx
    from bedside.schema import Schema

    try:
        raw = json.loads(ns.schema.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{ns.schema}: no such file") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{ns.schema}: not valid JSON ({exc})") from None
    schema = Schema.from_dict(raw, str(ns.schema))
    m = import_onnx(ns.file, schema, ns.out, name=ns.name, version=ns.version)
    if ns.json:
        print_json(m.to_dict())
    else:
        print(f"imported {ns.file} as {m.name} v{m.version} -> {ns.out} (inference-only; output "
              f"{m.output['format']}, classes {m.output['classes']})")
    return 0


def _inspect(ns: argparse.Namespace) -> int:
    from bedside.manifest import load_manifest, verify_model_file

    m = load_manifest(ns.model)
    verify_model_file(ns.model, m)
    if ns.json:
        print_json(m.to_dict())
    else:
        print(_summary(m, ns.model) + "\n  files verified: sha256 matches the manifest")
    return 0


def _schema(ns: argparse.Namespace) -> int:
    """A tabular schema from a CSV: every column but the label a numeric feature, the label's
    values the classes, an allowed range per feature from the file's values (widened and rounded
    outward). Meant to be edited: units, descriptions and clinically plausible ranges."""
    from bedside.files import write_output
    from bedside.models import datasets

    if ns.out.exists() and not ns.force:
        raise InputError(f"{ns.out} exists; choose another --out or pass --force")
    ds = datasets.load_csv(ns.csv, ns.label)
    schema = datasets.infer_ranges(ds.schema, ds.x)
    write_output(ns.out, json.dumps(schema.to_dict(), indent=2) + "\n")
    print(f"wrote {ns.out}: {schema.n_features} features, labels {list(schema.labels)} (the "
          f"class order a model's outputs must follow). Edit it before you import: give each "
          f"feature its 'unit', a 'description' and the clinically plausible 'min'/'max' (values "
          f"outside are refused at inference; the ones written here come from {ns.csv.name}'s "
          f"values, widened and rounded outward); 'loc'/'scale' matter only to models Bedside "
          f"exports (an imported model scales inside its own graph). Then: bedside models "
          f"import MODEL.onnx --schema {ns.out} --out DIR (docs/models.md)")
    return 0


def _list(ns: argparse.Namespace) -> int:
    from bedside.models.catalog import summary

    registry = _registry(ns.registry)
    rows = [summary(registry.manifest(v)) for v in registry.versions()]
    if ns.json:
        print_json({"registry": str(ns.registry), "versions": rows})
        return 0
    if not rows:
        print(f"{ns.registry}: no versions yet")
        return 0
    print(f"{'version':>7}  {'parent':>6}  {'created (UTC)':<19}  {'accuracy':>8}  "
          f"{'eps dev':>8}  {'eps rec':>7}  origin")
    for r in rows:
        print(f"{r['version']:>7}  {_dash(r['parent']):>6}  {_when(r['created_at']):<19}  "
              f"{_dash(r['accuracy'], '.4f'):>8}  {_dash(r['epsilon_device'], '.3g'):>8}  "
              f"{_dash(r['epsilon_record_max'], '.3g'):>7}  {r['origin']}")
    return 0


def _show(ns: argparse.Namespace) -> int:
    from bedside.models.catalog import lineage, summary

    chain = lineage(_registry(ns.registry), ns.version)
    m = chain[0]
    if ns.json:
        print_json({"version": summary(m), "manifest": m.to_dict(),
                    "lineage": [summary(a) for a in chain]})
        return 0
    s = summary(m)
    print(f"{m.name} v{m.version}: {s['origin']}, created {_when(m.created_at)} UTC")
    print(f"  sha256 {m.sha256}, {_dash(s['bytes'])} bytes, opset {m.opset}")
    print(f"  accuracy {_dash(s['accuracy'], '.4f')}, AUC {_dash(s['auc'], '.4f')} on the "
          "reference set")
    print(f"  privacy: {s['privacy']}"
          + (f"; record-level epsilon <= {s['epsilon_record_max']:.3g} reported by its "
             "contributors" if s["epsilon_record_max"] is not None else ""))
    print("  lineage: " + " <- ".join(f"v{a.version} ({origin})" for a, origin in
                                      ((a, summary(a)["origin"]) for a in chain)))
    return 0


def _registry(path: Path) -> Any:
    from bedside.models.registry import Registry

    if not (path / "versions").is_dir():
        raise InputError(f"{path}: not a registry (no versions/ inside); the aggregator's is "
                         "<data_dir>/registry")
    return Registry(path)


def _dash(v: Any, fmt: str = "") -> str:
    return "-" if v is None else format(v, fmt)


def _when(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
