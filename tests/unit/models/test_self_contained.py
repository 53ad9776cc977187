"""A model never makes a device read a file outside it: external data is refused anywhere in the
graph, before onnxruntime sees the model (issue 11, item 11)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bedside.edge.updater import ModelManager
from bedside.errors import ModelError
from bedside.models.onnx_model import OnnxClassifier
from bedside.models.onnx_weights import check_self_contained


def _external(t: TensorProto, location: str = "../../../../etc/passwd") -> TensorProto:
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    t.external_data.add(key="location", value=location)
    t.ClearField("raw_data")
    return t


def _model(where: str) -> onnx.ModelProto:
    """A softmax over [x, c]: ``c`` is a Constant (main graph or inside an If branch) or an
    initializer; ``where`` picks which one holds external data."""
    c = numpy_helper.from_array(np.zeros((1, 1), np.float32), "c")
    if where == "initializer":
        _external(c)
    const = helper.make_node("Constant", [], ["k"], value=_external(numpy_helper.from_array(
        np.zeros((1, 1), np.float32))) if where == "constant" else numpy_helper.from_array(
        np.zeros((1, 1), np.float32)))
    branch_const = helper.make_node("Constant", [], ["b"], value=_external(
        numpy_helper.from_array(np.zeros((1, 1), np.float32)))
        if where == "subgraph" else numpy_helper.from_array(np.zeros((1, 1), np.float32)))
    out = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 1])
    branch = helper.make_graph([branch_const], "branch", [], [out])
    cond = helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(
        np.array(True)))
    iff = helper.make_node("If", ["cond"], ["kk"], then_branch=branch, else_branch=branch)
    nodes = [const, cond, iff,
             helper.make_node("Add", ["k", "kk"], ["k2"]),
             helper.make_node("Add", ["c", "k2"], ["c2"]),
             helper.make_node("Concat", ["x", "c2"], ["z"], axis=1),
             helper.make_node("Softmax", ["z"], ["probabilities"], axis=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [1, 1])],
                          [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                                         [1, 2])], initializer=[c])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("where", ["initializer", "constant", "subgraph"])
def test_external_data_anywhere_is_refused_before_onnxruntime(where, monkeypatch):
    proto = _model(where)
    with pytest.raises(ModelError, match="external data"):
        check_self_contained(proto)
    import onnxruntime

    def no_session(*a, **k):  # onnxruntime must never be asked to load it
        raise AssertionError("onnxruntime saw a model with external data")

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    with pytest.raises(ModelError, match="refers to external data"):
        OnnxClassifier(proto.SerializeToString(), {"input": "x"}, ["a", "b"])


def test_a_self_contained_model_of_the_same_shape_runs():
    model = OnnxClassifier(_model("none").SerializeToString(), {"input": "x"}, ["a", "b"])
    p = model.probabilities(np.zeros((1, 1), np.float32))
    assert p.shape == (1, 2) and np.isclose(p.sum(), 1.0)


def test_a_release_with_external_data_is_not_installed(tmp_path, exported):
    from bedside.manifest import load_manifest, sha256_bytes

    src = exported("logreg", "wdbc")
    m = load_manifest(src)
    proto = onnx.load(src / "model.onnx")
    _external(proto.graph.initializer[0])
    data = proto.SerializeToString()
    manifest = m.to_dict() | {"version": 2, "sha256": sha256_bytes(data)}
    with pytest.raises(ModelError, match="external data"):
        ModelManager(tmp_path / "models").install(data, manifest, 2)
    assert not list((tmp_path / "models").glob("v*"))
