"""Read and replace trainable weights inside an ONNX file, without torch.

ONNX initializer names follow the torch ``state_dict`` keys (checked by the exporter), so the
aggregator can write a new global model into the ONNX file of the previous version with
``onnx.numpy_helper`` and the edge trainer can load the global weights into its torch network.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper

from bedside.errors import ModelError

if TYPE_CHECKING:
    from bedside.federation.statistics import StatisticsSettings
    from bedside.schema import Schema


def load_proto(model_bytes: bytes) -> onnx.ModelProto:
    """Parse an ONNX file that must be self-contained (see :func:`check_self_contained`)."""
    try:
        proto = onnx.load_from_string(model_bytes)
    except Exception as exc:  # onnx raises DecodeError and others; we name the problem once
        raise ModelError(f"not a valid ONNX file ({type(exc).__name__}: {exc})") from None
    check_self_contained(proto)
    return proto


def _external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) > 0


def _tensors_of(attr: onnx.AttributeProto) -> list[tuple[str, onnx.TensorProto]]:
    out = []
    if attr.HasField("t"):
        out.append((attr.name, attr.t))
    out += [(attr.name, t) for t in attr.tensors]
    for sp in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(
            attr.sparse_tensors):
        out += [(f"{attr.name}.values", sp.values), (f"{attr.name}.indices", sp.indices)]
    return out


def _walk(graph: onnx.GraphProto, where: str) -> None:
    for init in graph.initializer:
        if _external(init):
            raise _refused(f"initializer {init.name!r}", where)
    for sp in graph.sparse_initializer:
        if _external(sp.values) or _external(sp.indices):
            raise _refused(f"sparse initializer {sp.values.name!r}", where)
    for node in graph.node:
        for attr in node.attribute:
            for name, t in _tensors_of(attr):
                if _external(t):
                    raise _refused(f"attribute {name!r} of {node.op_type} node "
                                   f"{node.name or '(unnamed)'}", where)
            if attr.HasField("g"):
                _walk(attr.g, f"{where} > {node.op_type}.{attr.name}")
            for i, g in enumerate(attr.graphs):
                _walk(g, f"{where} > {node.op_type}.{attr.name}[{i}]")


def _refused(what: str, where: str) -> ModelError:
    return ModelError(
        f"{what} in {where} refers to external data (a file outside the model); Bedside models "
        "are single self-contained files, and a model must never make the device read another "
        "file. Refused: re-export with external_data=False")


def check_self_contained(proto: onnx.ModelProto) -> None:
    """Refuse a model that references external data anywhere: initializers, sparse
    initializers, tensors in node attributes (``Constant`` and others), in every subgraph
    (``If``, ``Loop``, ``Scan`` bodies) and in every local function. Runs before onnxruntime sees
    the model, whose loader would otherwise open the named file."""
    _walk(proto.graph, "the main graph")
    for fn in proto.functions:
        for node in fn.node:
            for attr in node.attribute:
                for name, t in _tensors_of(attr):
                    if _external(t):
                        raise _refused(f"attribute {name!r} of {node.op_type} node",
                                       f"function {fn.name!r}")
                if attr.HasField("g"):
                    _walk(attr.g, f"function {fn.name!r} > {node.op_type}.{attr.name}")
                for i, g in enumerate(attr.graphs):
                    _walk(g, f"function {fn.name!r} > {node.op_type}.{attr.name}[{i}]")


def read_weights(model_bytes: bytes, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The initializers called ``names`` as numpy arrays (copies)."""
    proto = load_proto(model_bytes)
    by_name = {i.name: i for i in proto.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name not in by_name:
            raise ModelError(f"the ONNX file has no initializer {name!r}; is it the right model?")
        out[name] = np.array(numpy_helper.to_array(by_name[name]))
    return out


def replace_weights(model_bytes: bytes, weights: Mapping[str, np.ndarray]) -> bytes:
    """A copy of the ONNX file with the named initializers replaced (same shapes and dtypes)."""
    proto = load_proto(model_bytes)
    by_name = {i.name: i for i in proto.graph.initializer}
    for name, value in weights.items():
        if name not in by_name:
            raise ModelError(f"cannot replace {name!r}: the ONNX file has no such initializer")
        old = by_name[name]
        arr = np.asarray(value)
        old_arr = numpy_helper.to_array(old)
        if arr.shape != old_arr.shape:
            raise ModelError(f"{name}: new shape {list(arr.shape)} != {list(old_arr.shape)}")
        if not np.isfinite(arr).all():
            raise ModelError(f"{name}: refusing to write non-finite weights into a model")
        new = numpy_helper.from_array(arr.astype(old_arr.dtype, copy=False), name=name)
        old.CopyFrom(new)
    return proto.SerializeToString()


def write_scaling(model_bytes: bytes, loc: np.ndarray, scale: np.ndarray) -> bytes:
    """The model with its input scaling (``Standardize`` initializers) set to ``loc``/``scale``."""
    from bedside.constants import ONNX_INV_SCALE, ONNX_LOC

    shapes = initializer_shapes(model_bytes)
    if ONNX_LOC not in shapes or ONNX_INV_SCALE not in shapes:
        raise ModelError("the model has no input-scaling initializers "
                         f"({ONNX_LOC}, {ONNX_INV_SCALE}): only models Bedside exported can take "
                         "federated statistics")
    return replace_weights(model_bytes, {
        ONNX_LOC: np.asarray(loc, np.float32).reshape(shapes[ONNX_LOC]),
        ONNX_INV_SCALE: (1.0 / np.asarray(scale, np.float64)).astype(np.float32).reshape(
            shapes[ONNX_INV_SCALE])})


def apply_statistics(model_bytes: bytes, schema: Schema, vectors: Sequence[np.ndarray],
                     settings: StatisticsSettings) -> tuple[bytes, Schema, dict[str, Any]]:
    """A statistics round's close (both drivers): the devices' noised vectors -> ``loc`` and
    ``scale`` (:func:`bedside.federation.statistics.combine`), written into the model's
    initializers and its schema. Returns (model bytes, schema, what was estimated)."""
    from bedside.federation.statistics import combine

    loc, scale, info = combine(vectors, schema, settings)
    return write_scaling(model_bytes, loc, scale), schema.with_scaling(loc, scale), info


def initializer_shapes(model_bytes: bytes) -> dict[str, list[int]]:
    proto = load_proto(model_bytes)
    return {i.name: list(i.dims) for i in proto.graph.initializer}
