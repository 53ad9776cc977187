"""Fairness across patient groups: per-group metrics, the largest gap, groups too small to
judge; the vitals generator's patient attributes; ``bedside models evaluate``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bedside.cli import main
from bedside.metrics import by_group, calibration_error


def _p(pos):
    pos = np.asarray(pos, dtype=np.float64)
    return np.stack([1 - pos, pos], axis=1)


def test_per_group_figures_and_the_largest_gap_by_hand():
    # group a: 40 rows, perfect; group b: 40 rows, half its positives missed; c: 3 rows
    y = np.array([1] * 20 + [0] * 20 + [1] * 20 + [0] * 20 + [1, 0, 1])
    p = _p([0.9] * 20 + [0.1] * 20 + [0.9] * 10 + [0.2] * 10 + [0.1] * 20 + [0.9, 0.1, 0.9])
    groups = ["a"] * 40 + ["b"] * 40 + ["c"] * 3
    r = by_group(y, p, groups)
    a, b, c = (r["groups"][g] for g in "abc")  # type: ignore[index]
    assert a["accuracy"] == 1.0 and a["sensitivity"] == 1.0 and a["specificity"] == 1.0
    assert b["sensitivity"] == 0.5 and b["specificity"] == 1.0 and b["accuracy"] == 0.75
    assert not c["judged"] and r["small_groups"] == ["c"]
    assert r["gaps"]["sensitivity"] == {"gap": 0.5, "lowest": "b", "highest": "a"}
    assert r["largest_gap"] == "sensitivity"


def test_calibration_error_matches_its_definition():
    y = np.array([1, 1, 0, 0])
    p = _p([0.8, 0.8, 0.8, 0.2])  # bin 8: 3 rows, predicted 0.8, observed 2/3; bin 2: 1 row
    expected = (3 * abs(2 / 3 - 0.8) + 1 * abs(0.0 - 0.2)) / 4
    assert calibration_error(y, p) == pytest.approx(expected)


def test_the_vitals_generator_gives_each_patient_an_age_band_and_a_sex():
    from bedside.models import datasets

    ds = datasets.load("vitals", n_windows=400)
    assert set(ds.attributes) == {"age_band", "sex"}
    assert set(ds.attributes["age_band"]) <= set(datasets.AGE_BANDS)
    assert len(set(ds.attributes["age_band"])) >= 3 and set(ds.attributes["sex"]) == {"F", "M"}
    again = datasets.load("vitals", n_windows=400)
    np.testing.assert_array_equal(ds.x, again.x)
    assert list(ds.attributes["age_band"]) == list(again.attributes["age_band"])
    sub = ds.subset([3, 1])
    assert list(sub.attributes["sex"]) == [ds.attributes["sex"][3], ds.attributes["sex"][1]]


def test_models_evaluate_reports_groups_gaps_and_small_groups(tmp_path, exported, capsys):
    from bedside.models import datasets

    model = exported("cnn1d", "vitals")
    ds = datasets.load("vitals", n_windows=240, seed=5)
    data = datasets.to_csv(ds, tmp_path / "holdout.csv", label_column="label")
    assert main(["models", "evaluate", str(model), "--data", str(data), "--label", "label",
                 "--groups", "age_band,sex", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert sum(g["rows"] for g in r["groups"].values()) == 240
    for g in r["groups"].values():
        assert {"accuracy", "sensitivity", "specificity", "auc", "calibration_error"} <= set(g)
    assert r["largest_gap"] in r["gaps"]
    assert main(["models", "evaluate", str(model), "--data", str(data), "--label", "label",
                 "--groups", "sex", "--min-rows", "1000"]) == 0
    out = capsys.readouterr().out
    assert "too small to judge" in out and "no gap to report" in out
    assert main(["models", "evaluate", str(model), "--data", str(data), "--label", "label",
                 "--groups", "ethnicity"]) == 2
    assert "'ethnicity'" in capsys.readouterr().err


def test_sensitivity_is_about_the_class_named_positive():
    """For labels ("malignant", "benign"), sensitivity is about malignant: --positive 0."""
    y = np.array([0] * 10 + [1] * 10)
    p = _p([0.1] * 8 + [0.9] * 2 + [0.9] * 10)  # 8 of 10 malignant found, every benign right
    r0 = by_group(y, p, ["g"] * 20, min_rows=1, positive=0)["groups"]["g"]  # type: ignore[index]
    r1 = by_group(y, p, ["g"] * 20, min_rows=1, positive=1)["groups"]["g"]  # type: ignore[index]
    assert (r0["sensitivity"], r0["specificity"]) == (0.8, 1.0)
    assert (r1["sensitivity"], r1["specificity"]) == (1.0, 0.8)
    assert r0["auc"] == r1["auc"]
