"""Export a torch network to a single-file ONNX model and prove it computes the same thing.

Checks made on every export (any failure is an :class:`ExportError`, nothing is written):

* single file: no external data, ``onnx.checker`` passes, dynamic batch dimension;
* names: every trainable parameter is an initializer of the same name and shape, which is what
  lets the aggregator update weights inside the ONNX file without torch;
* parity: onnxruntime and torch agree on held-out rows, max abs difference of the class
  probabilities <= ``tolerance`` (1e-5 by default).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from bedside.constants import ONNX_INPUT, ONNX_OPSET, ONNX_OUTPUT
from bedside.errors import ExportError
from bedside.models.onnx_model import EXPORTED_OUTPUT, OnnxClassifier
from bedside.models.onnx_weights import initializer_shapes, load_proto
from bedside.models.train import predict_proba
from bedside.models.zoo import BedsideNet, trainable_shapes
from bedside.schema import Schema

PARITY_TOLERANCE = 1e-5
log = logging.getLogger(__name__)


def to_onnx_bytes(net: BedsideNet, schema: Schema, opset: int = ONNX_OPSET) -> bytes:
    """Export ``net`` (softmax output, dynamic batch) and return the ONNX file's bytes."""
    loc, _ = schema.loc_scale()
    shape = (2, *(int(d) for d in schema.input_shape[1:] if d is not None))
    example = torch.from_numpy(
        np.broadcast_to(loc.reshape((1, -1, 1) if schema.kind == "timeseries" else (1, -1)),
                        shape).copy()
    )
    net.eval()
    net.probabilities = True
    # The exporter logs one warning per torchvision operator it cannot register; not our concern.
    for noisy in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            path = Path(tmp) / "model.onnx"
            torch.onnx.export(
                net, (example,), str(path), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), opset_version=opset,
                dynamo=True, external_data=False, verbose=False,
            )
            written = sorted(p.name for p in Path(tmp).iterdir())
            if written != ["model.onnx"]:
                raise ExportError(f"export wrote more than one file ({written}); expected a "
                                  "single self-contained ONNX file")
            data = path.read_bytes()
    except ExportError:
        raise
    except Exception as exc:  # torch.onnx raises many kinds; report one clear error
        raise ExportError(f"torch.onnx.export failed for {net.spec.name}: {exc}") from exc
    finally:
        net.probabilities = False
    proto = load_proto(data)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported model fails onnx.checker: {exc}") from exc
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if not dims or not dims[0].dim_param:
        raise ExportError("the exported model has a fixed batch size; expected a dynamic one")
    return data


def check_parameter_names(net: BedsideNet, onnx_bytes: bytes) -> dict[str, list[int]]:
    """Every trainable parameter must be an initializer with the same name and shape."""
    inits = initializer_shapes(onnx_bytes)
    params = trainable_shapes(net)
    problems = [
        f"{n} (torch {s}, onnx {inits.get(n, 'missing')})"
        for n, s in params.items() if inits.get(n) != s
    ]
    if problems:
        raise ExportError(
            "ONNX initializers do not follow the torch parameter names, so the aggregator could "
            "not update this model: " + "; ".join(problems)
        )
    return params


def onnx_probabilities(onnx_bytes: bytes, x: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """Class probabilities of an exported model (onnxruntime, through OnnxClassifier)."""
    return OnnxClassifier(onnx_bytes, EXPORTED_OUTPUT, labels).probabilities(x)


def check_parity(net: BedsideNet, onnx_bytes: bytes, x: np.ndarray,
                 tolerance: float = PARITY_TOLERANCE) -> dict[str, Any]:
    """Max abs difference of class probabilities between torch and onnxruntime on ``x``."""
    torch_p = predict_proba(net, x)
    onnx_p = onnx_probabilities(onnx_bytes, x, [str(i) for i in range(net.spec.n_classes)])
    diff = float(np.max(np.abs(torch_p - onnx_p))) if len(x) else 0.0
    result = {"rows": len(x), "max_abs_diff": diff, "tolerance": tolerance,
              "passed": bool(diff <= tolerance)}
    if not result["passed"]:
        raise ExportError(
            f"parity check failed: torch and onnxruntime differ by {diff:.3g} on {len(x)} "
            f"held-out rows (tolerance {tolerance:g}); the ONNX model is not trustworthy"
        )
    return result
