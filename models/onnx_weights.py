"""Read and replace trainable weights inside an ONNX file, without torch.

ONNX initializer names follow the torch ``state_dict`` keys (checked by the exporter), so the
aggregator can write a new global model into the ONNX file of the previous version with
``onnx.numpy_helper`` and the edge trainer can load the global weights into its torch network.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from bedside.errors import ModelError


def load_proto(model_bytes: bytes) -> onnx.ModelProto:
    try:
        proto = onnx.load_from_string(model_bytes)
    except Exception as exc:  # onnx raises DecodeError and others; we name the problem once
        raise ModelError(f"not a valid ONNX file ({type(exc).__name__}: {exc})") from None
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelError(
                f"initializer {init.name!r} is stored in an external data file; Bedside models "
                "are single files: re-export with external_data=False"
            )
    return proto


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


def initializer_shapes(model_bytes: bytes) -> dict[str, list[int]]:
    proto = load_proto(model_bytes)
    return {i.name: list(i.dims) for i in proto.graph.initializer}
