"""Point-of-care inference with onnxruntime only (no torch, no privacy accountant).

:class:`Predictor` is the edge's front door for inference. Loading a model directory it

1. reads ``manifest.json`` and the ONNX file, and checks the file's sha256 against the manifest
   *before* creating a session (a mismatch is refused with :class:`IntegrityError`); the session
   is built from the verified bytes, so the file cannot be swapped between check and use;
2. builds an :class:`~bedside.models.onnx_model.OnnxClassifier` (onnxruntime, tuned for small
   CPU devices: one intra-op thread by default, the memory arena off);
3. validates every batch against the schema (shape, finite values, allowed ranges) before running.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bedside.errors import ModelError
from bedside.manifest import Manifest, load_manifest, verify_model_file
from bedside.models.onnx_model import OnnxClassifier
from bedside.schema import Schema
from bedside.tabular import Table, read_csv


@dataclass(frozen=True)
class Prediction:
    row: str
    label: str
    probabilities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "label": self.label, "probabilities": self.probabilities}


class Predictor:
    """Load a verified model directory and run schema-checked inference."""

    def __init__(self, model_dir: str | Path, *, threads: int = 1, memory_arena: bool = False,
                 model_file: str | None = None) -> None:
        # resolved once: through a 'current' symlink that is swapped meanwhile, the manifest and
        # the model file must still come from the same version
        self.model_dir = Path(model_dir).resolve()
        self.manifest: Manifest = load_manifest(self.model_dir)
        if model_file is None:
            data = verify_model_file(self.model_dir, self.manifest)
        else:  # e.g. the quantized file, checked against its own entry in the manifest
            data = self._verified_extra(model_file)
        self.classifier = OnnxClassifier(data, self.manifest.output, self.schema.labels,
                                         threads=threads, memory_arena=memory_arena,
                                         where=str(self.model_dir))

    def _verified_extra(self, name: str) -> bytes:
        from bedside.errors import IntegrityError
        from bedside.manifest import sha256_bytes

        entry = self.manifest.files.get(name)
        if not entry:
            raise ModelError(f"{self.model_dir}: the manifest lists no file {name!r}")
        data = (self.model_dir / name).read_bytes()
        if sha256_bytes(data) != entry["sha256"]:
            raise IntegrityError(f"{self.model_dir / name}: sha256 does not match the manifest; "
                                 "refusing to load it")
        return data

    # -- properties ------------------------------------------------------------------------------
    @property
    def schema(self) -> Schema:
        return self.manifest.schema

    @property
    def labels(self) -> list[str]:
        return list(self.schema.labels)

    @property
    def version(self) -> int:
        return self.manifest.version

    # -- inference --------------------------------------------------------------------------------
    def predict_proba(self, x: np.ndarray, row_names: list[str] | None = None) -> np.ndarray:
        """Class probabilities ``[N, k]`` in label order, after schema validation."""
        arr = self.schema.validate(x, row_names)
        return self.run_unchecked(arr)

    def run_unchecked(self, arr: np.ndarray) -> np.ndarray:
        """Run on an already validated float32 batch (benchmarks measure this path)."""
        return self.classifier.probabilities(arr)

    def predict(self, x: np.ndarray, row_ids: list[str] | None = None) -> list[Prediction]:
        ids = row_ids or [str(i) for i in range(1, len(x) + 1)]
        probs = self.predict_proba(x, [f"row {r}" for r in ids])
        labels = self.labels
        return [
            Prediction(row=r, label=labels[int(np.argmax(p))],
                       probabilities={lab: round(float(v), 6) for lab, v in zip(labels, p,
                                                                                strict=True)})
            for r, p in zip(ids, probs, strict=True)
        ]

    def predict_csv(self, path: str | Path) -> list[Prediction]:
        table: Table = read_csv(path, self.schema)  # errors name row and column
        return self.predict(table.x, table.row_ids)

    def self_test(self, x: np.ndarray | None = None) -> np.ndarray:
        """Run on valid rows (the schema's reference rows by default) and check the output.

        Raises :class:`ModelError` if the probabilities are not finite or do not sum to one. The
        updater runs this before a new model version replaces the current one.
        """
        rows = self.schema.reference_rows(2) if x is None else x
        try:
            probs = self.predict_proba(rows)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"self-test: the model failed to run: {exc}") from None
        if not np.isfinite(probs).all():
            raise ModelError("self-test: the model produced non-finite probabilities")
        if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
            raise ModelError("self-test: class probabilities do not sum to one")
        return probs
