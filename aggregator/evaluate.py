"""Evaluate a model version on the data team's central, labelled reference set (onnxruntime).

The reference set is data the hospital's data team holds centrally (for example a curated
validation cohort); no clinic trains on it. Metrics computed here go into the manifest of every
new model version. Nothing here needs torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bedside.manifest import Manifest
from bedside.metrics import evaluate
from bedside.models.onnx_model import OnnxClassifier
from bedside.tabular import read_csv


class Evaluator:
    def __init__(self, csv_path: Path, label: str, manifest: Manifest) -> None:
        table = read_csv(csv_path, manifest.schema, label)
        assert table.y is not None
        self.x, self.y = table.x, table.y
        self.path = csv_path

    def __call__(self, onnx_bytes: bytes, manifest: Manifest) -> dict[str, Any]:
        model = OnnxClassifier(onnx_bytes, manifest.output, manifest.schema.labels,
                               where=f"model v{manifest.version}")
        return evaluate(self.y, model.probabilities(self.x))
