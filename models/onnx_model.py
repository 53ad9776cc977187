"""One torch-free ONNX classifier: an onnxruntime session that returns class probabilities.

:class:`OnnxClassifier` is the only place Bedside creates an onnxruntime session for a classifier:
the edge :class:`~bedside.edge.predictor.Predictor`, the aggregator's evaluation, ``bedside models
import``'s self-test, export's parity check and the quantization report all use it, so they can
never disagree about how a model's outputs are read.

Bedside-exported models output one float tensor ``[N, k]`` already in label order. Imported models
may output a ZipMap (a sequence of ``{class: probability}`` maps, as skl2onnx does by default) or a
tensor in the classifier's own class order; the manifest's ``output`` block says which
(``format``, ``classes``), and :func:`to_probabilities` normalises both.

The session is tuned for small CPU devices: ``threads`` intra-op threads (1 by default: a clinic
box serves one request at a time and stays responsive for other work), one inter-op thread,
sequential execution, and the CPU memory arena off by default (for small models it costs resident
memory and buys no measurable latency, see benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bedside.constants import ONNX_INPUT, ONNX_OUTPUT
from bedside.errors import ModelError

#: The output block of a model Bedside exported (input and output names, tensor in label order).
EXPORTED_OUTPUT: dict[str, Any] = {"input": ONNX_INPUT, "probabilities": ONNX_OUTPUT,
                                   "format": "tensor"}


class OnnxClassifier:
    """An onnxruntime session over ``onnx_bytes`` that returns probabilities in label order.

    ``output`` is the manifest's output block (input and probability output names, ``format``,
    ``classes``); ``labels`` the schema's labels. Raises ModelError if onnxruntime cannot load
    the model.
    """

    def __init__(self, onnx_bytes: bytes, output: Mapping[str, Any], labels: Sequence[str], *,
                 threads: int = 1, memory_arena: bool = False, where: str = "model") -> None:
        import onnxruntime as ort

        from bedside.models.onnx_weights import load_proto

        if threads < 1:
            raise ModelError(f"threads must be >= 1, got {threads}")
        try:
            load_proto(onnx_bytes)  # self-contained, before onnxruntime sees it
        except ModelError as exc:
            raise ModelError(f"{where}: {exc}") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.enable_cpu_mem_arena = memory_arena
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(onnx_bytes, opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"{where}: onnxruntime cannot load the model: {exc}") from None
        self.output = dict(output)
        self.labels = [str(label) for label in labels]
        self.input_name = self.output.get("input") or self.session.get_inputs()[0].name
        self.output_name = self.output.get("probabilities") or self.session.get_outputs()[0].name
        self._names = [self.output_name]
        # Bedside-exported models output probabilities in label order: no decoding needed.
        self.plain = self.output.get("format", "tensor") == "tensor" and [
            str(c) for c in self.output.get("class_labels", self.output.get("classes",
                                                                            self.labels))
        ] == self.labels

    def raw(self, x: np.ndarray) -> Any:
        """The model's probability output as it is (float32 batch in)."""
        return self.session.run(self._names, {self.input_name: x})[0]

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities ``[N, k]`` (float64) in label order. ``x`` is not validated."""
        raw = self.raw(np.ascontiguousarray(x, np.float32))
        if self.plain:
            return np.asarray(raw, dtype=np.float64)
        return to_probabilities(self.output, raw, self.labels)


def to_probabilities(output: Mapping[str, Any], raw: Any, labels: Sequence[str]) -> np.ndarray:
    """``raw`` is the value of the probability output; returns float64 ``[N, len(labels)]``.

    ``output["classes"]`` are the model's own class keys in its output order (ZipMap keys, or the
    column order of a tensor) and ``output["class_labels"]`` the schema label of each; both
    default to the schema's labels (a Bedside-exported model).
    """
    classes = [str(c) for c in output.get("classes", labels)]
    class_labels = [str(c) for c in output.get("class_labels", classes)]
    if output.get("format", "tensor") == "zipmap":
        if not isinstance(raw, list):
            raise ModelError("model output: expected a sequence of maps (ZipMap)")
        try:
            probs = np.array([[float(m[_key(m, c)]) for c in classes] for m in raw],
                             dtype=np.float64).reshape(len(raw), len(classes))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model output: ZipMap does not hold the classes {classes} ({exc})"
                             ) from None
    else:
        probs = np.asarray(raw, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ModelError(f"model output: probabilities of shape {list(probs.shape)}, expected "
                         f"[N, {len(classes)}]")
    if class_labels != [str(label) for label in labels]:
        try:
            order = [class_labels.index(str(label)) for label in labels]
        except ValueError:
            raise ModelError(f"model output: classes {class_labels} do not cover the labels "
                             f"{list(labels)}") from None
        probs = probs[:, order]
    return probs


def _key(m: Mapping[Any, Any], cls: str) -> Any:
    if cls in m:
        return cls
    for k in m:  # integer class keys
        if str(k) == cls:
            return k
    raise KeyError(cls)
