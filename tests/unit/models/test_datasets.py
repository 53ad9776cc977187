"""Reference data sets, the vitals generator, CSV in and out, scaling and splits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bedside.errors import DataError, InputError, SchemaError
from bedside.models import datasets
from bedside.models.datasets import Dataset
from bedside.schema import Feature, Schema
from bedside.tabular import read_csv, write_csv
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def wdbc() -> Dataset:
    return datasets.load("wdbc")


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return datasets.load("digits")


@pytest.fixture(scope="module")
def vitals() -> Dataset:
    return datasets.load("vitals")


# -- WDBC ---------------------------------------------------------------------------------------
def test_wdbc_shape_and_labels(wdbc):
    from sklearn.datasets import load_breast_cancer

    raw = load_breast_cancer()
    assert wdbc.x.shape == (569, 30) and wdbc.x.dtype == np.float32
    assert wdbc.y.shape == (569,) and wdbc.y.dtype == np.int64
    assert wdbc.schema.labels == ("malignant", "benign")
    np.testing.assert_array_equal(wdbc.y, raw.target)
    assert wdbc.schema.feature_names == [str(n) for n in raw.feature_names]
    assert np.bincount(wdbc.y).tolist() == [212, 357]
    assert wdbc.schema.kind == "tabular" and len(wdbc) == 569
    assert wdbc.description and "UCI" in wdbc.source


def test_wdbc_scaling_and_ranges(wdbc):
    f = {feat.name: feat for feat in wdbc.schema.features}
    r = f["mean radius"]
    # midpoint and half-width of the published (typical) range
    assert (r.loc, r.scale) == (pytest.approx(17.5455), pytest.approx(10.5645))
    assert (r.typical_min, r.typical_max) == (6.981, 28.11)
    assert (r.min, r.max, r.unit) == (0.0, pytest.approx(56.22), "px")  # 2 x published max
    a = f["worst area"]
    assert a.loc == pytest.approx((185.2 + 4254.0) / 2) and a.max == pytest.approx(8508.0)
    assert a.unit == "px^2"
    assert f["mean texture"].unit == "gray level"
    assert f["mean smoothness"].unit == "" and f["concavity error"].min == 0.0
    assert "no units" in f["mean radius"].description
    # scaling is a placeholder from the published range alone: [0, 0.427] -> [-1, 1]
    assert f["mean concavity"].loc == pytest.approx(0.2135)
    assert f["mean concavity"].scale == pytest.approx(0.2135)


def test_wdbc_table_matches_installed_descr():
    from sklearn.datasets import load_breast_cancer

    parsed = datasets.parse_summary_statistics(load_breast_cancer().DESCR)
    assert parsed == datasets.WDBC_SUMMARY_STATISTICS
    assert len(parsed) == 30


def test_wdbc_scaling_uses_no_row_of_the_data_set(wdbc):
    # Issue 11: the schema's loc/scale came from all 569 rows, test rows included. Now they come
    # from the published range alone, and change when the data do not.
    for f in wdbc.schema.features:
        lo, hi = datasets.WDBC_SUMMARY_STATISTICS[f.name]
        assert (f.min, f.max, f.typical_min, f.typical_max) == (0.0, 2 * hi, lo, hi)
        assert (f.loc, f.scale) == (pytest.approx((lo + hi) / 2), pytest.approx((hi - lo) / 2))
    x = wdbc.x.astype(np.float64)
    loc, scale = wdbc.schema.loc_scale()
    assert not np.allclose(loc, x.mean(0), rtol=1e-3)
    assert not np.allclose(scale, x.std(0), rtol=1e-3)


def test_wdbc_published_range_is_close_to_the_data(wdbc):
    # The published table rounds to about 3 significant digits; it describes the same data.
    lo = np.array([v[0] for v in datasets.WDBC_SUMMARY_STATISTICS.values()])
    hi = np.array([v[1] for v in datasets.WDBC_SUMMARY_STATISTICS.values()])
    np.testing.assert_allclose(wdbc.x.max(0), hi, rtol=0.02, atol=1e-3)
    np.testing.assert_allclose(wdbc.x.min(0), lo, rtol=0.02, atol=1e-3)


# -- digits -------------------------------------------------------------------------------------
def test_digits(digits):
    assert digits.x.shape == (1797, 64) and digits.x.dtype == np.float32
    assert digits.schema.labels == tuple("0123456789")
    assert digits.schema.feature_names[:2] == ["pixel_r0_c0", "pixel_r0_c1"]
    assert digits.schema.feature_names[-1] == "pixel_r7_c7"
    assert {(f.loc, f.scale, f.min, f.max) for f in digits.schema.features} == {(8, 8, 0, 16)}
    assert set(np.unique(digits.y)) == set(range(10))


# -- every data set -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", datasets.DATASETS)
def test_values_inside_allowed_range(name, wdbc, digits, vitals):
    ds = {"wdbc": wdbc, "digits": digits, "vitals": vitals}[name]
    ds.schema.validate(ds.x)  # raises on a value outside [min, max] or non-finite
    assert ds.name == name
    assert ds.y.min() == 0 and ds.y.max() == ds.schema.n_classes - 1


def test_load_unknown_and_bad_options():
    with pytest.raises(InputError, match="wdbc, digits, vitals"):
        datasets.load("mnist")
    with pytest.raises(InputError, match="n_windows"):
        datasets.load("wdbc", n_windows=3)


def test_importing_needs_neither_torch_nor_sklearn():
    code = (
        "import sys, json\n"
        "from bedside.models import datasets, partition\n"
        "datasets.wdbc_schema(); ds = datasets.make_vitals(20, window=8)\n"
        "datasets.train_test_split(ds); partition.partition(ds.y, 2)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'sklearn'})))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


# -- vitals -------------------------------------------------------------------------------------
def test_vitals_shape_and_schema(vitals):
    s = vitals.schema
    assert vitals.x.shape == (2000, 5, 60) and vitals.x.dtype == np.float32
    assert s.feature_names == ["heart_rate", "resp_rate", "spo2", "sbp", "temp"]
    assert [f.unit for f in s.features] == ["bpm", "breaths/min", "%", "mmHg", "degC"]
    assert [(f.min, f.max, f.loc, f.scale) for f in s.features] == [
        (20, 250, 80, 40), (4, 60, 16, 8), (50, 100, 95, 5), (50, 250, 120, 30), (30, 43, 37, 1)]
    assert (s.kind, s.window, s.group_column, s.order_column) == (
        "timeseries", 60, "window_id", "t")
    assert s.labels == ("stable", "deteriorating")


def test_vitals_reproducible_by_seed():
    a = datasets.make_vitals(200, window=30, seed=7)
    b = datasets.make_vitals(200, window=30, seed=7)
    c = datasets.make_vitals(200, window=30, seed=8)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 1.0])
def test_vitals_positive_rate(rate):
    ds = datasets.make_vitals(300, window=10, positive_rate=rate)
    assert int(ds.y.sum()) == round(300 * rate)


def test_vitals_physiology_is_plausible(vitals):
    x, y = vitals.x, vitals.y
    # Typical values near the clinical centre.
    med = np.median(x, axis=(0, 2))
    assert 70 < med[0] < 90 and 13 < med[1] < 19 and 94 < med[2] < 99 and 110 < med[3] < 140
    assert 36.5 < med[4] < 37.5
    # Deteriorating windows move the way an early warning score does, on average.
    change = x[:, :, -10:].mean(2) - x[:, :, :10].mean(2)
    pos, neg = change[y == 1].mean(0), change[y == 0].mean(0)
    assert pos[0] > neg[0] + 5 and pos[1] > neg[1] + 2
    assert pos[2] < neg[2] - 1 and pos[3] < neg[3] - 5
    # Artefacts: SpO2 dropouts happen in stable windows too, and are clipped, never NaN.
    dropped = x[:, 2, :].min(1) < 88
    assert dropped[y == 0].any() and dropped[y == 1].any()
    assert np.isfinite(x).all()
    # Within-window autocorrelation (AR(1)): neighbouring minutes are alike.
    hr = x[y == 0, 0, :] - x[y == 0, 0, :].mean(1, keepdims=True)
    lag1 = (hr[:, 1:] * hr[:, :-1]).sum() / (hr * hr).sum()
    assert lag1 > 0.5


def _summary(x: np.ndarray) -> np.ndarray:
    first, last = x[:, :, :10].mean(2), x[:, :, -10:].mean(2)
    return np.concatenate([last - first, x.mean(2), x.std(2)], axis=1)


def _accuracy(features, train, test) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(features(train.x), train.y)
    return float((model.predict(features(test.x)) == test.y).mean())


def test_vitals_learnable_but_not_trivial():
    ds = datasets.make_vitals(1500, positive_rate=0.5, seed=3)
    train, test = datasets.train_test_split(ds, seed=1)
    acc = _accuracy(_summary, train, test)
    last_only = _accuracy(lambda x: x[:, :, -1], train, test)
    assert 0.75 <= acc <= 0.99
    assert last_only < acc - 0.03  # the trend, not the last reading, carries the label


def test_vitals_bad_arguments():
    for kw, name in [({"n_windows": 0}, "n_windows"), ({"window": 1}, "window"),
                     ({"positive_rate": 1.5}, "positive_rate"),
                     ({"n_windows": 2.5}, "n_windows")]:
        with pytest.raises(InputError, match=name):
            datasets.make_vitals(**kw)


# -- CSV out and back ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["wdbc", "digits", "vitals"])
def test_csv_round_trip(name, tmp_path, wdbc, digits):
    if name == "vitals":
        ds = datasets.make_vitals(25, window=12, seed=1, positive_rate=0.4)
    else:
        ds = {"wdbc": wdbc, "digits": digits}[name]
        ds = ds.subset(np.arange(0, len(ds), 7))
    path = datasets.to_csv(ds, tmp_path / f"{name}.csv")
    table = read_csv(path, ds.schema, "label")
    np.testing.assert_array_equal(table.x, ds.x)
    np.testing.assert_array_equal(table.y, ds.y)
    back = datasets.load_csv(path, "label", schema=ds.schema)
    np.testing.assert_array_equal(back.x, ds.x)
    np.testing.assert_array_equal(back.y, ds.y)


def test_vitals_long_format(tmp_path):
    ds = datasets.make_vitals(3, window=4)
    lines = datasets.to_csv(ds, tmp_path / "v.csv", label_column="outcome").read_text().splitlines()
    # the patient attributes (fairness groups, not model inputs) follow the label
    assert lines[0] == "window_id,t,heart_rate,resp_rate,spo2,sbp,temp,outcome,age_band,sex"
    assert len(lines) == 1 + 3 * 4
    assert [ln.split(",")[:2] for ln in lines[1:5]] == [["0", "0"], ["0", "1"], ["0", "2"],
                                                        ["0", "3"]]
    assert all(ln.split(",")[-3] in ds.schema.labels for ln in lines[1:])
    assert all(ln.split(",")[-1] in ("F", "M") for ln in lines[1:])
    with pytest.raises(InputError, match="clashes"):
        datasets.to_csv(ds, tmp_path / "x.csv", label_column="t")


def test_csv_round_trip_default_vitals(tmp_path, vitals):
    ds = vitals.subset(range(40))
    table = read_csv(datasets.to_csv(ds, tmp_path / "v.csv"), ds.schema, "label")
    np.testing.assert_array_equal(table.x, ds.x)
    np.testing.assert_array_equal(table.y, ds.y)


# -- a user's CSV -------------------------------------------------------------------------------
def _user_csv(tmp_path, header, rows, name="clinic.csv"):
    path = tmp_path / name
    write_csv(path, header, rows)
    return path


def test_load_csv_infers_schema(tmp_path):
    rows = [[f"{i * 1.5:g}", str(i % 3), ["no", "yes"][i % 2]] for i in range(10)]
    ds = datasets.load_csv(_user_csv(tmp_path, ["age", "visits", "readmitted"], rows),
                           "readmitted")
    assert ds.schema.feature_names == ["age", "visits"]
    assert ds.schema.labels == ("no", "yes")
    assert ds.x.shape == (10, 2) and ds.x[3, 0] == pytest.approx(4.5)
    np.testing.assert_array_equal(ds.y, [0, 1] * 5)
    assert all(f.loc == 0 and f.scale == 1 and f.min is None and f.max is None
               for f in ds.schema.features)
    assert ds.name == "clinic" and ds.source.endswith("clinic.csv")


def test_load_csv_integer_labels_sort_numerically(tmp_path):
    rows = [[str(i), str([2, 10, 1][i % 3])] for i in range(9)]
    ds = datasets.load_csv(_user_csv(tmp_path, ["a", "grade"], rows), "grade")
    assert ds.schema.labels == ("1", "2", "10")
    np.testing.assert_array_equal(ds.y, [1, 2, 0] * 3)


@pytest.mark.parametrize(
    ("header", "rows", "label", "err", "match"),
    [
        (["patient_id", "a", "y"], [["p1", "1", "0"], ["p2", "2", "1"], ["p3", "3", "1"]], "y",
         DataError, r"row 1 \(line 2\), column 'patient_id': 'p1' is not a number.*drop"),
        (["a", "note", "y"], [["1", "3", "0"], ["2", "4", "1"], ["3", "high", "1"]], "y",
         DataError, r"row 3 \(line 4\), column 'note': 'high' is not a number"),
        (["a", "y"], [["1", "0"], ["", "1"], ["3", "1"]], "y",
         DataError, r"row 2 \(line 3\), column 'a': is empty"),
        (["a", "y"], [["1", "0"], ["2", "1"]], "label",
         DataError, "label column 'label' is missing"),
        (["a", "y"], [["1", "0"], ["2", "0"]], "y", DataError, "only one class"),
        (["a", "y"], [["1", "0"], ["2", "1"], ["3", "1"]], "y", DataError, "'0' \\(1 row\\)"),
        (["a", "y"], [["1", "0"], ["2", ""], ["3", "1"]], "y", DataError,
         r"row 2 \(line 3\), column 'y': the label is empty"),
        (["y"], [["0"], ["1"]], "y", DataError, "no feature columns"),
        (["a", "a", "y"], [["1", "1", "0"]], "y", DataError, "'a' appears twice"),
        (["a", "y"], [["1", "0"], ["2", "1", "9"]], "y", DataError,
         r"row 2 \(line 3\) has 3 fields"),
        (["a", "y"], [["1", "0"], ["nan", "0"], ["2", "1"], ["3", "1"]], "y", SchemaError,
         r"row 2 \(line 3\), column 'a'.*not impute"),
    ],
)
def test_load_csv_errors_name_row_and_column(tmp_path, header, rows, label, err, match):
    with pytest.raises(err, match=match):
        datasets.load_csv(_user_csv(tmp_path, header, rows), label)


def test_load_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        datasets.load_csv(tmp_path / "nope.csv", "y")


# -- scaling from a reference -------------------------------------------------------------------
def _small_schema(**kw) -> Schema:
    return Schema(features=(Feature("a", min=0, max=100), Feature("b")), labels=("n", "y"), **kw)


def test_fit_scaling_range_and_standard():
    ref = np.array([[0.0, 5.0], [10.0, 5.0], [4.0, 5.0]], np.float32)
    s = datasets.fit_scaling(_small_schema(), ref)
    assert [(f.loc, f.scale) for f in s.features] == [(5.0, 5.0), (5.0, 1.0)]  # constant -> 1
    assert (s.features[0].min, s.features[0].max) == (0, 100)  # the allowed range is kept
    st = datasets.fit_scaling(_small_schema(), ref, method="standard")
    assert st.features[0].loc == pytest.approx(14 / 3)
    assert st.features[0].scale == pytest.approx(np.std([0, 10, 4]))
    assert st.features[1].scale == 1.0


def test_fit_scaling_timeseries_and_errors():
    ds = datasets.make_vitals(50, window=10)
    s = datasets.fit_scaling(ds.schema, ds.x)
    hr = ds.x[:, 0, :]
    assert s.features[0].loc == pytest.approx((hr.min() + hr.max()) / 2)
    with pytest.raises(InputError, match="shape"):
        datasets.fit_scaling(ds.schema, ds.x[:, :, :5])
    with pytest.raises(InputError, match="NaN"):
        datasets.fit_scaling(_small_schema(), np.array([[1.0, np.nan]]))
    with pytest.raises(InputError, match="method"):
        datasets.fit_scaling(_small_schema(), np.ones((2, 2)), method="minmax")  # type: ignore[arg-type]


# -- the container and splits -------------------------------------------------------------------
def _indexed(n: int, y: np.ndarray) -> Dataset:
    x = np.stack([np.arange(n), np.zeros(n)], axis=1)
    return Dataset("t", x, y, _small_schema())


def test_dataset_checks_shapes():
    with pytest.raises(InputError, match="shape"):
        Dataset("t", np.zeros((3, 3)), np.zeros(3), _small_schema())
    with pytest.raises(InputError, match="one label per row"):
        Dataset("t", np.zeros((3, 2)), np.zeros(2), _small_schema())
    with pytest.raises(InputError, match="class indices"):
        Dataset("t", np.zeros((2, 2)), np.array([0, 2]), _small_schema())
    ds = _indexed(5, np.array([0, 1, 0, 1, 0]))
    sub = ds.subset([4, 1])
    np.testing.assert_array_equal(sub.x[:, 0], [4, 1])
    np.testing.assert_array_equal(sub.y, [0, 1])
    assert sub.schema is ds.schema and len(sub) == 2
    with pytest.raises(InputError, match="out of range"):
        ds.subset([5])


@pytest.mark.parametrize("stratify", [True, False])
def test_train_test_split(stratify):
    y = np.array([0] * 70 + [1] * 30)
    ds = _indexed(100, y)
    train, test = datasets.train_test_split(ds, test_fraction=0.2, seed=3, stratify=stratify)
    ids_train, ids_test = set(train.x[:, 0]), set(test.x[:, 0])
    assert not ids_train & ids_test and len(ids_train | ids_test) == 100
    assert len(test) == 20
    if stratify:
        assert int(test.y.sum()) == 6
    again = datasets.train_test_split(ds, test_fraction=0.2, seed=3, stratify=stratify)
    np.testing.assert_array_equal(again[1].x, test.x)
    other = datasets.train_test_split(ds, test_fraction=0.2, seed=4, stratify=stratify)
    assert not np.array_equal(other[1].x, test.x)


def test_train_test_split_small_classes_and_errors():
    ds = _indexed(5, np.array([0, 0, 0, 1, 1]))
    train, test = datasets.train_test_split(ds, test_fraction=0.1)
    assert sorted(test.y.tolist()) == [0, 1]  # every class with >= 2 rows is in both parts
    assert sorted(train.y.tolist()) == [0, 0, 1]
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(InputError, match="test_fraction"):
            datasets.train_test_split(ds, test_fraction=bad)
    with pytest.raises(DataError, match="row"):
        datasets.train_test_split(ds.subset([0]))


def test_schema_of_is_the_loaded_data_sets_schema():
    for name in datasets.DATASETS:
        assert datasets.schema_of(name) == datasets.load(name).schema
    with pytest.raises(InputError, match="wdbc, digits, vitals"):
        datasets.schema_of("mnist")
