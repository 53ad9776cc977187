"""Bring your own model: wrap any ONNX classifier into a Bedside model directory.

Works for models exported by Bedside, by ``torch.onnx`` and by converters such as skl2onnx, whose
classifiers output a label tensor plus class probabilities, either as a tensor ``[N, k]`` or as a
sequence of maps (``ZipMap``). The class order is read from the graph (the ``classlabels_*``
attribute of the classifier node) and matched to the schema's labels by name (string classes) or
by index (integer classes 0..k-1). Imported models are inference-only: without an architecture
spec they cannot take part in federated training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bedside.errors import InputError, ModelError, SchemaError
from bedside.manifest import Manifest, write_model_dir
from bedside.models.onnx_weights import load_proto
from bedside.schema import Schema

_FLOAT = onnx.TensorProto.FLOAT


def _class_labels(proto: onnx.ModelProto) -> list[str] | None:
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.name in ("classlabels_int64s", "classlabels_ints", "classlabels_strings"):
                values = onnx.helper.get_attribute_value(attr)
                return [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    return None


def _io(proto: onnx.ModelProto, schema: Schema) -> dict[str, Any]:
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"the model has {len(inputs)} inputs; Bedside needs exactly one "
                         "(a float tensor of features)")
    inp = inputs[0]
    tt = inp.type.tensor_type
    if inp.type.WhichOneof("value") != "tensor_type" or tt.elem_type != _FLOAT:
        raise ModelError(f"input {inp.name!r} must be a float32 tensor (convert the model with "
                         "FloatTensorType inputs)")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    want = schema.input_shape
    if len(dims) != len(want) or any(
        d is not None and w is not None and d != w for d, w in zip(dims[1:], want[1:], strict=True)
    ):
        raise SchemaError(f"the model's input {inp.name!r} has shape {dims}; the schema says "
                          f"{want} ({schema.n_features} features)")
    prob, label, fmt = None, None, "tensor"
    for out in proto.graph.output:
        kind = out.type.WhichOneof("value")
        if kind == "sequence_type":
            prob, fmt = out.name, "zipmap"
        elif kind == "tensor_type":
            ott = out.type.tensor_type
            rank = len(ott.shape.dim)
            if ott.elem_type == _FLOAT and rank == 2 and prob is None:
                prob = out.name
            elif rank == 1 and label is None:
                label = out.name
    if prob is None:
        raise ModelError("no class-probability output found: expected a float tensor [N, classes] "
                         "or a sequence of maps (skl2onnx ZipMap)")
    return {"input": inp.name, "probabilities": prob, "label": label, "format": fmt,
            "input_batch_dynamic": dims[0] is None}


def _class_order(proto: onnx.ModelProto, schema: Schema) -> tuple[list[str], list[str]]:
    """The model's class keys (as its outputs name them) and the schema label of each."""
    classes = _class_labels(proto)
    labels = list(schema.labels)
    if classes is None:
        return [str(i) for i in range(len(labels))], labels
    if len(classes) != len(labels):
        raise SchemaError(f"the model has {len(classes)} classes {classes}; the schema lists "
                          f"{len(labels)} labels {labels}")
    if sorted(classes) == sorted(labels):
        return classes, classes
    if sorted(classes, key=int if all(c.lstrip("-").isdigit() for c in classes) else str) == [
            str(i) for i in range(len(labels))]:
        return classes, [labels[int(c)] for c in classes]  # integer classes index the labels
    raise SchemaError(f"the model's classes {classes} do not match the schema's labels {labels}; "
                      "use the same names, or integer classes 0..k-1 in the schema's order")


def import_onnx(model_file: str | Path, schema: Schema, out_dir: str | Path, *,
                name: str | None = None, version: int = 1) -> Manifest:
    path = Path(model_file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    proto = load_proto(data)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelError(f"{path}: fails onnx.checker ({exc})") from None
    io = _io(proto, schema)
    io["classes"], io["class_labels"] = _class_order(proto, schema)
    io["labels"] = list(schema.labels)
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    manifest = Manifest(
        name=name or path.stem, version=version, schema=schema, sha256="", opset=opset,
        arch=None, output=io, training={"imported_from": path.name},
        privacy={"status": "unknown",
                 "note": "imported: how and on what data it was trained is not known to "
                         "Bedside; no privacy guarantee is claimed"},
    )
    _self_test(data, io, schema)
    write_model_dir(out_dir, data, manifest)
    return manifest


def _self_test(data: bytes, io: dict[str, Any], schema: Schema) -> None:
    """Run the model on valid rows: it must give finite probabilities that sum to one."""
    from bedside.models.onnx_model import OnnxClassifier

    try:
        model = OnnxClassifier(data, io, schema.labels, where="the model")
        rows = schema.reference_rows(2 if io["input_batch_dynamic"] else 1)
        probs = model.probabilities(rows)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"the model does not run on valid input rows: {exc}") from None
    if not (np.isfinite(probs).all() and np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)):
        raise ModelError("the model's probability output does not sum to one per row; is it a "
                         "classifier's probability output (not logits)?")
