"""Evaluate a model version on the data team's central, labelled reference set (onnxruntime).

The reference set is data the hospital's data team holds centrally (for example a curated
validation cohort); no clinic trains on it. Metrics computed here go into the manifest of every
new model version. Nothing here needs torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bedside.manifest import Manifest
from bedside.metrics import by_group, evaluate
from bedside.models.onnx_model import OnnxClassifier
from bedside.tabular import group_values, read_rows, table_from_rows


class Evaluator:
    """``metrics(model, manifest)``: ``holdout`` (accuracy, AUC, log loss) and, with group
    columns, ``holdout_groups`` (per-group figures and the largest gap; the reference rows are
    the data team's own, so they cost no device any privacy)."""

    def __init__(self, csv_path: Path, label: str, manifest: Manifest,
                 groups: list[str] | None = None) -> None:
        header, rows = read_rows(csv_path)
        table = table_from_rows(csv_path, header, rows, manifest.schema, label)
        assert table.y is not None
        self.x, self.y = table.x, table.y
        self.groups = group_values(csv_path, header, rows, table, groups) if groups else None
        self.group_by = list(groups or [])
        self.path = csv_path

    def levels(self) -> tuple[str, ...]:
        """The reference set's patient groups (values of the group columns joined by "/"),
        sorted: the groups devices count when the federation asks them for per-group counts."""
        return tuple(sorted(set(self.groups or ())))

    def metrics(self, onnx_bytes: bytes, manifest: Manifest) -> dict[str, Any]:
        model = OnnxClassifier(onnx_bytes, manifest.output, manifest.schema.labels,
                               where=f"model v{manifest.version}")
        p = model.probabilities(self.x)
        out: dict[str, Any] = {"holdout": evaluate(self.y, p)}
        if self.groups is not None:
            out["holdout_groups"] = {"group_by": self.group_by,
                                     "source": "the data team's reference rows (no device "
                                               "record: no privacy spent)",
                                     **by_group(self.y, p, self.groups)}
        return out
