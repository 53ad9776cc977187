"""``bedside edge ...``: point-of-care inference and the device agent.

This module is imported for every ``bedside edge`` command, so it imports nothing heavy at module
level: ``infer`` loads onnxruntime only; the agent commands import their parts when they run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path


def build(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("infer", help="predict from a CSV file with a local model (no network)")
    p.add_argument("--model", required=True, type=Path, metavar="DIR",
                   help="model directory (model.onnx + manifest.json)")
    p.add_argument("--input", required=True, type=Path, metavar="FILE.csv",
                   help="CSV with a header; columns are matched by name, extra columns ignored")
    p.add_argument("--output", metavar="FILE",
                   help="write here instead of stdout ('-' is stdout; a device or named pipe "
                   "is written in place, a regular file replaced atomically)")
    p.add_argument("--json", action="store_true", help="JSON instead of CSV")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--quantized", action="store_true",
                   help="use the int8 model listed in the manifest (if exported with --quantize)")
    p.set_defaults(func=_infer)

    _agent_commands(sub)


def _infer(ns: argparse.Namespace) -> int:
    from bedside.constants import QUANTIZED_FILE
    from bedside.edge.predictor import Predictor

    predictor = Predictor(ns.model, threads=ns.threads,
                          model_file=QUANTIZED_FILE if ns.quantized else None)
    preds = predictor.predict_csv(ns.input)
    m = predictor.manifest
    if ns.json:
        text = json.dumps({"model": {"name": m.name, "version": m.version, "sha256": m.sha256},
                           "predictions": [p.to_dict() for p in preds]}) + "\n"
    else:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        labels = predictor.labels
        w.writerow(["row", "label", *[f"p_{lab}" for lab in labels]])
        for p in preds:
            w.writerow([p.row, p.label, *[f"{p.probabilities[lab]:.6f}" for lab in labels]])
        text = buf.getvalue()
    if ns.output and ns.output != "-":
        from bedside.files import write_output

        write_output(ns.output, text)
        print(f"wrote {len(preds)} predictions to {ns.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _agent_commands(sub: argparse._SubParsersAction) -> None:
    """Enrollment, record ingestion and the participation agent (see bedside.edge.agent)."""
    try:
        from bedside.edge.agent_cli import register
    except ImportError:  # pragma: no cover - the agent ships with the package
        return
    register(sub)
