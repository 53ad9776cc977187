"""Evaluate a model version on the data team's central, labelled reference set (onnxruntime).

The reference set is data the hospital's data team holds centrally (for example a curated
validation cohort); no clinic trains on it. Metrics computed here go into the manifest of every
new model version. Nothing here needs torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bedside.manifest import Manifest
from bedside.metrics import evaluate
from bedside.outputs import to_probabilities
from bedside.tabular import read_csv


class Evaluator:
    def __init__(self, csv_path: Path, label: str, manifest: Manifest) -> None:
        table = read_csv(csv_path, manifest.schema, label)
        assert table.y is not None
        self.x, self.y = table.x, table.y
        self.path = csv_path

    def __call__(self, onnx_bytes: bytes, manifest: Manifest) -> dict[str, Any]:
        return evaluate(self.y, probabilities(onnx_bytes, manifest, self.x))


def probabilities(onnx_bytes: bytes, manifest: Manifest, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    out = manifest.output
    name_in = out.get("input") or sess.get_inputs()[0].name
    name_out = out.get("probabilities") or sess.get_outputs()[0].name
    raw = sess.run([name_out], {name_in: np.ascontiguousarray(x, np.float32)})[0]
    return to_probabilities(out, raw, manifest.schema.labels)
