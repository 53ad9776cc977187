"""The edge Predictor: integrity check, schema validation, session settings, self-test."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from bedside.constants import MODEL_FILE
from bedside.edge import Predictor
from bedside.errors import IntegrityError, ModelError, SchemaError
from bedside.models import datasets
from bedside.models.export import onnx_probabilities


def test_predicts_like_raw_onnxruntime(exported):
    out = exported("mlp", "wdbc")
    ds = datasets.load("wdbc")
    pred = Predictor(out)
    p = pred.predict_proba(ds.x[:50])
    np.testing.assert_allclose(p, onnx_probabilities((out / MODEL_FILE).read_bytes(), ds.x[:50],
                                                  ds.schema.labels),
                               atol=1e-7)
    preds = pred.predict(ds.x[:3], ["a", "b", "c"])
    assert [r.row for r in preds] == ["a", "b", "c"]
    assert all(set(r.probabilities) == set(ds.schema.labels) for r in preds)
    assert pred.version == 1


def test_tampered_model_is_refused_before_session(exported, tmp_path):
    src = exported("logreg", "wdbc")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    data = bytearray((bad / MODEL_FILE).read_bytes())
    data[-5] ^= 0x01
    (bad / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        Predictor(bad)


def test_missing_manifest(tmp_path):
    with pytest.raises(ModelError, match="no manifest"):
        Predictor(tmp_path)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda x: x[:, :5], "shape"),
        (lambda x: np.where(np.arange(x.shape[1]) == 3, np.nan, x), "not impute"),
        (lambda x: np.where(np.arange(x.shape[1]) == 0, 1e6, x), "outside the allowed range"),
        (lambda x: np.where(np.arange(x.shape[1]) == 0, -1.0, x), "outside the allowed range"),
    ],
)
def test_schema_validation(exported, mutate, match):
    pred = Predictor(exported("mlp", "wdbc"))
    x = datasets.load("wdbc").x[:4]
    with pytest.raises(SchemaError, match=match):
        pred.predict_proba(mutate(x))


def test_timeseries_window_length(exported):
    pred = Predictor(exported("cnn1d", "vitals"))
    ds = datasets.load("vitals", n_windows=10)
    assert pred.predict_proba(ds.x).shape == (10, 2)
    with pytest.raises(SchemaError, match="time steps"):
        pred.predict_proba(ds.x[:, :, :-2])


def test_threads_and_arena_settings(exported):
    out = exported("mlp", "wdbc")
    x = datasets.load("wdbc").x[:20]
    a = Predictor(out, threads=2, memory_arena=True).predict_proba(x)
    b = Predictor(out).predict_proba(x)
    np.testing.assert_allclose(a, b, atol=1e-7)
    with pytest.raises(ModelError, match="threads"):
        Predictor(out, threads=0)


def test_self_test(exported):
    probs = Predictor(exported("cnn1d", "vitals")).self_test()
    assert probs.shape == (2, 2)
