"""Bring your own model: a scikit-learn classifier converted with skl2onnx."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bedside.cli import main
from bedside.edge import Predictor
from bedside.errors import SchemaError
from bedside.models import datasets
from bedside.models.importer import import_onnx


def _convert(clf, n_features, zipmap: bool):
    final = clf.steps[-1][1] if hasattr(clf, "steps") else clf
    opts = None if zipmap else {id(final): {"zipmap": False}}
    return to_onnx(clf, initial_types=[("float_input", FloatTensorType([None, n_features]))],
                   options=opts).SerializeToString()


@pytest.mark.parametrize("zipmap", [True, False])
@pytest.mark.parametrize("kind", ["logreg", "forest"])
def test_sklearn_model_predicts_like_sklearn(tmp_path, zipmap, kind):
    ds = datasets.load("wdbc")
    clf = (make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)) if kind == "logreg"
           else RandomForestClassifier(n_estimators=20, random_state=0))
    clf.fit(ds.x, ds.y)
    (tmp_path / "m.onnx").write_bytes(_convert(clf, ds.x.shape[1], zipmap))
    m = import_onnx(tmp_path / "m.onnx", ds.schema, tmp_path / "out")
    assert m.arch is None and not m.trainable
    assert m.output["format"] == ("zipmap" if zipmap else "tensor")
    pred = Predictor(tmp_path / "out")
    p = pred.predict_proba(ds.x)
    np.testing.assert_allclose(p, clf.predict_proba(ds.x), atol=1e-5)
    labels = [r.label for r in pred.predict(ds.x)]
    assert labels == [ds.schema.labels[k] for k in clf.predict(ds.x)]


def test_string_classes_are_matched_by_name(tmp_path):
    ds = datasets.load("wdbc")
    names = np.array(ds.schema.labels)[ds.y]
    clf = LogisticRegression(max_iter=3000).fit(ds.x, names)  # classes sorted: benign, malignant
    (tmp_path / "m.onnx").write_bytes(_convert(clf, ds.x.shape[1], True))
    import_onnx(tmp_path / "m.onnx", ds.schema, tmp_path / "out")
    p = Predictor(tmp_path / "out").predict_proba(ds.x)
    want = clf.predict_proba(ds.x)[:, [list(clf.classes_).index(c) for c in ds.schema.labels]]
    np.testing.assert_allclose(p, want, atol=1e-5)


def test_schema_mismatch_is_refused(tmp_path):
    ds = datasets.load("wdbc")
    clf = LogisticRegression(max_iter=2000).fit(ds.x[:, :10], ds.y)
    (tmp_path / "m.onnx").write_bytes(_convert(clf, 10, True))
    with pytest.raises(SchemaError, match="30 features"):
        import_onnx(tmp_path / "m.onnx", ds.schema, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_cli(tmp_path, capsys):
    ds = datasets.load("wdbc")
    clf = LogisticRegression(max_iter=3000).fit(ds.x, ds.y)
    (tmp_path / "m.onnx").write_bytes(_convert(clf, ds.x.shape[1], True))
    (tmp_path / "schema.json").write_text(json.dumps(ds.schema.to_dict()))
    rc = main(["models", "import", str(tmp_path / "m.onnx"), "--schema",
               str(tmp_path / "schema.json"), "--out", str(tmp_path / "out"), "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["output"]["format"] == "zipmap"
    (tmp_path / "bad.json").write_text("{not json")
    rc = main(["models", "import", str(tmp_path / "m.onnx"), "--schema",
               str(tmp_path / "bad.json"), "--out", str(tmp_path / "out2")])
    assert rc == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_a_schema_written_from_a_csv_imports_a_users_model(tmp_path, capsys):
    """``bedside models schema --from-csv`` writes the schema a user edits and imports with; the
    imported model's privacy is unknown, not 'trained without differential privacy'."""
    ds = datasets.load("wdbc")
    csv = datasets.to_csv(ds, tmp_path / "cohort.csv", label_column="diagnosis")
    out = tmp_path / "schema.json"
    assert main(["models", "schema", "--from-csv", str(csv), "--label", "diagnosis", "--out",
                 str(out)]) == 0
    assert "Edit it before you import" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["labels"] == ["benign", "malignant"]  # the file's classes, sorted
    names = [f["name"] for f in written["features"]]
    assert names == [f.name for f in ds.schema.features]
    for f, col in zip(written["features"], ds.x.T, strict=True):
        assert f["min"] <= col.min() and f["max"] >= col.max()  # every row of the file fits
    assert main(["models", "schema", "--from-csv", str(csv), "--label", "diagnosis", "--out",
                 str(out)]) == 2  # not replaced without --force
    assert "exists" in capsys.readouterr().err
    # the user's own model, trained on the file's labels (scikit-learn orders them by name)
    clf = LogisticRegression(max_iter=3000).fit(ds.x, np.array(ds.schema.labels)[ds.y])
    (tmp_path / "m.onnx").write_bytes(_convert(clf, ds.x.shape[1], True))
    assert main(["models", "import", str(tmp_path / "m.onnx"), "--schema", str(out), "--out",
                 str(tmp_path / "model")]) == 0
    capsys.readouterr()
    np.testing.assert_allclose(Predictor(tmp_path / "model").predict_proba(ds.x),
                               clf.predict_proba(ds.x), atol=1e-5)
    assert main(["models", "inspect", str(tmp_path / "model")]) == 0
    assert "privacy: unknown: imported" in capsys.readouterr().out
    assert main(["models", "schema", "--from-csv", str(csv), "--label", "nope", "--out",
                 str(tmp_path / "x.json")]) == 2
