"""Record store (minimisation, idempotent all-or-nothing ingestion) and model updater."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bedside.constants import MANIFEST_FILE, MODEL_FILE
from bedside.edge.store import RecordStore
from bedside.edge.updater import ModelManager
from bedside.errors import IntegrityError, ModelError, SchemaError
from bedside.manifest import load_manifest
from bedside.models import datasets
from bedside.models.onnx_weights import read_weights, replace_weights
from bedside.tabular import read_csv


def test_ingest_keeps_only_features_and_label(tmp_path):
    ds = datasets.load("wdbc")
    names = ds.schema.feature_names
    lines = ["patient_name,mrn," + ",".join(f'"{n}"' for n in names) + ",label"]
    for i in range(5):
        lines.append(f"Jane Doe {i},MRN00{i}," + ",".join(str(v) for v in ds.x[i]) + ","
                     + ds.schema.labels[ds.y[i]])
    (tmp_path / "visits.csv").write_text("\n".join(lines) + "\n")
    store = RecordStore(tmp_path / "records.db")
    table = read_csv(tmp_path / "visits.csv", ds.schema, "label")
    r = store.ingest(table, ds.schema, "visits.csv")
    assert (r.added, r.duplicates, r.total) == (5, 0, 5)
    r = store.ingest(table, ds.schema, "visits.csv")  # idempotent
    assert (r.added, r.duplicates, r.total) == (0, 5, 5)
    x, y = store.load(ds.schema)
    np.testing.assert_array_equal(x, ds.x[:5])
    np.testing.assert_array_equal(y, ds.y[:5])
    store.close()
    raw = (tmp_path / "records.db").read_bytes()
    for wal in tmp_path.glob("records.db-*"):
        raw += wal.read_bytes()
    assert b"Jane Doe" not in raw and b"MRN00" not in raw


def test_bad_file_stores_nothing(tmp_path):
    ds = datasets.load("wdbc")
    store = RecordStore(tmp_path / "records.db")
    datasets.to_csv(ds.subset(range(10)), tmp_path / "ok.csv")
    store.ingest(read_csv(tmp_path / "ok.csv", ds.schema, "label"), ds.schema, "ok.csv")
    lines = (tmp_path / "ok.csv").read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[0], "oops", 1)
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(SchemaError, match="row 3"):
        read_csv(tmp_path / "bad.csv", ds.schema, "label")
    assert store.count(ds.schema) == 10  # what was accepted before is untouched


def _release(src, version, bump=0.0):
    m = load_manifest(src)
    data = (src / MODEL_FILE).read_bytes()
    if bump:
        w = read_weights(data, m.parameters)
        data = replace_weights(data, {k: v + bump for k, v in w.items()})
    d = json.loads((src / MANIFEST_FILE).read_text())
    from bedside.manifest import sha256_bytes

    d["version"], d["sha256"] = version, sha256_bytes(data)
    return data, d


def test_install_verify_swap_and_rollback(exported, tmp_path):
    src = exported("mlp", "wdbc")
    mm = ModelManager(tmp_path / "models")
    assert mm.current_version() is None and mm.predictor() is None
    data, d = _release(src, 1)
    assert mm.install(data, d, 1).serving
    data2, d2 = _release(src, 2, bump=1e-3)
    mm.install(data2, d2, 2)
    assert mm.current_version() == 2 and mm.predictor().version == 2
    with pytest.raises(ModelError, match="not newer"):
        mm.install(data, d, 1)
    assert mm.rollback() == 1 and mm.current_version() == 1
    # the version rolled back from is blocked: the retained release cannot bring it back
    assert mm.blocked() == {2}
    with pytest.raises(ModelError, match="rolled back"):
        mm.install(data2, d2, 2)
    assert mm.current_version() == 1
    data3, d3 = _release(src, 3, bump=2e-3)
    mm.install(data3, d3, 3)  # a newer version is welcome again
    assert mm.current_version() == 3
    assert ModelManager(tmp_path / "models").blocked() == {2}  # persisted


def test_install_refuses_tampered_or_mislabelled(exported, tmp_path):
    src = exported("mlp", "wdbc")
    mm = ModelManager(tmp_path / "models")
    data, d = _release(src, 1)
    with pytest.raises(IntegrityError, match="sha256"):
        mm.install(data[:-1] + bytes([data[-1] ^ 1]), d, 1)
    with pytest.raises(IntegrityError, match="version"):
        mm.install(data, d, 7)
    assert mm.current_version() is None and mm.latest_version() is None
    assert not list((tmp_path / "models").glob(".v*"))  # no staging left behind


def test_quality_gate_decides_serving_only(exported, tmp_path):
    src = exported("mlp", "wdbc")
    ds = datasets.load("wdbc")
    mm = ModelManager(tmp_path / "models")
    data, d = _release(src, 1)
    mm.install(data, d, 1)
    m = load_manifest(src)
    w = read_weights(data, m.parameters)
    last = list(m.parameters)[-2]  # output layer weight: flip the decision
    bad = replace_weights(data, {last: -w[last]})
    from bedside.manifest import sha256_bytes

    d2 = dict(d, version=2, sha256=sha256_bytes(bad))
    got = mm.install(bad, d2, 2, records=(ds.x, ds.y), quality_tolerance=0.15)
    assert not got.serving and "less accurate" in got.note
    assert mm.current_version() == 1  # v1 keeps serving ...
    assert mm.latest_version() == 2 and mm.model_bytes(2) == bad  # ... v2 is kept for training
    d3 = dict(d, version=3, sha256=sha256_bytes(bad))
    assert mm.install(bad, d3, 3, records=None).serving  # no local records: self-test only
    assert mm.current_version() == 3
