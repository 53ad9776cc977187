"""int8 dynamic quantization (onnxruntime) and a side-by-side report against fp32.

Dynamic quantization stores weights as int8 and quantizes activations on the fly. For the small
models Bedside ships it often makes inference *slower* on x86 CPUs (the quantize/dequantize work
outweighs the smaller matrix products), so the report measures both and says which is faster; the
fp32 model stays the one that is federated and deployed by default.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bedside.errors import ExportError
from bedside.metrics import accuracy
from bedside.models.onnx_model import EXPORTED_OUTPUT, OnnxClassifier


def quantize_int8(onnx_bytes: bytes) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime logs a pre-processing hint on the root logger
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(onnx_bytes)
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
            return dst.read_bytes()
    except Exception as exc:
        raise ExportError(f"int8 dynamic quantization failed: {exc}") from exc
    finally:
        root.setLevel(level)


def _latency_ms(model: OnnxClassifier, x: np.ndarray, repeats: int) -> float:
    for _ in range(5):
        model.raw(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.raw(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000.0)


def compare(fp32: bytes, int8: bytes, x: np.ndarray, y: np.ndarray, labels: Sequence[str],
            repeats: int = 200) -> dict[str, Any]:
    """Accuracy change and median latency (batch 1 and the whole set) of int8 vs fp32."""
    out: dict[str, Any] = {"rows": len(x), "bytes": {"fp32": len(fp32), "int8": len(int8)}}
    models = {k: OnnxClassifier(b, EXPORTED_OUTPUT, labels, where=f"the {k} model")
              for k, b in (("fp32", fp32), ("int8", int8))}
    x = np.ascontiguousarray(x, np.float32)
    probs = {k: m.probabilities(x) for k, m in models.items()}
    out["accuracy"] = {k: round(accuracy(y, p), 6) for k, p in probs.items()}
    out["accuracy_change"] = round(out["accuracy"]["int8"] - out["accuracy"]["fp32"], 6)
    out["max_abs_prob_diff"] = float(np.max(np.abs(probs["int8"] - probs["fp32"])))
    lat = {}
    for k, m in models.items():
        lat[k] = {"batch1_p50_ms": round(_latency_ms(m, x[:1], repeats), 4),
                  f"batch{len(x)}_p50_ms": round(_latency_ms(m, x, max(10, repeats // 10)), 4)}
    out["latency"] = lat
    b1 = {k: v["batch1_p50_ms"] for k, v in lat.items()}
    out["int8_speedup_batch1"] = round(b1["fp32"] / b1["int8"], 3) if b1["int8"] else None
    return out
