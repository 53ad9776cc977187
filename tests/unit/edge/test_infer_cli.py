"""``bedside edge infer``: output formats, and bad input -> exit 2 naming row and column."""

from __future__ import annotations

import json
import subprocess

import pytest

from bedside.cli import main
from bedside.models import datasets
from bedside.tabular import write_csv
from tests.conftest import bedside_exe


def _wdbc_csv(path, n=5, mutate=None, drop=None):
    ds = datasets.load("wdbc")
    names = [c for c in ds.schema.feature_names if c != drop]
    header = ["patient_id", *names, "diagnosis"]
    rows = []
    for i in range(n):
        vals = {c: f"{v:.6g}" for c, v in zip(ds.schema.feature_names, ds.x[i], strict=True)}
        row = [f"p{i}", *[vals[c] for c in names], ds.schema.labels[ds.y[i]]]
        rows.append(row)
    if mutate:
        mutate(header, rows)
    write_csv(path, header, rows)
    return ds


def test_csv_and_json_output(exported, tmp_path, capsys):
    model = exported("mlp", "wdbc")
    ds = _wdbc_csv(tmp_path / "in.csv")
    assert main(["edge", "infer", "--model", str(model), "--input", str(tmp_path / "in.csv")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "row,label,p_malignant,p_benign"
    assert len(lines) == 6
    assert main(["edge", "infer", "--model", str(model), "--input", str(tmp_path / "in.csv"),
                 "--json", "--output", str(tmp_path / "out.json")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["model"]["version"] == 1
    assert [p["label"] for p in out["predictions"]] == [ds.schema.labels[k] for k in ds.y[:5]]


def _set(row_i, col, value):
    def mutate(header, rows):
        rows[row_i][header.index(col)] = value
    return mutate


@pytest.mark.parametrize(
    ("mutate", "drop", "expect"),
    [
        (None, "mean area", "column 'mean area' is missing"),
        (_set(2, "mean texture", "abc"), None,
         "row 3 (line 4), column 'mean texture': 'abc' is not a number"),
        (_set(1, "worst area", "nan"), None, "row 2 (line 3), column 'worst area'"),
        (_set(0, "mean radius", ""), None, "row 1 (line 2), column 'mean radius'"),
        (_set(3, "mean radius", "-4"), None,
         "row 4 (line 5), column 'mean radius': value -4 is outside"),
        (_set(4, "mean area", "1e9"), None, "row 5 (line 6), column 'mean area'"),
    ],
)
def test_bad_input_exit_2_names_row_and_column(exported, tmp_path, capsys, mutate, drop, expect):
    model = exported("mlp", "wdbc")
    _wdbc_csv(tmp_path / "bad.csv", mutate=mutate, drop=drop)
    rc = main(["edge", "infer", "--model", str(model), "--input", str(tmp_path / "bad.csv")])
    err = capsys.readouterr().err
    assert rc == 2
    assert expect in err
    assert "Traceback" not in err


def test_wrong_window_length(exported, tmp_path, capsys):
    model = exported("cnn1d", "vitals")
    ds = datasets.load("vitals", n_windows=3)
    datasets.to_csv(ds, tmp_path / "v.csv")
    lines = (tmp_path / "v.csv").read_text().splitlines()
    (tmp_path / "short.csv").write_text("\n".join(lines[:-1]) + "\n")  # last window one step short
    assert main(["edge", "infer", "--model", str(model), "--input", str(tmp_path / "v.csv")]) == 0
    capsys.readouterr()
    rc = main(["edge", "infer", "--model", str(model), "--input", str(tmp_path / "short.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "window" in err and "time steps" in err


def test_subprocess_no_traceback(exported, tmp_path, clean_env):
    model = exported("mlp", "wdbc")
    _wdbc_csv(tmp_path / "bad.csv", mutate=_set(0, "mean texture", "x"))
    r = subprocess.run([bedside_exe(), "edge", "infer", "--model", str(model), "--input",
                        str(tmp_path / "bad.csv")], capture_output=True, text=True, env=clean_env,
                       timeout=60)
    assert r.returncode == 2
    assert "row 1 (line 2), column 'mean texture'" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([bedside_exe(), "edge", "infer", "--model", str(tmp_path / "nope"),
                        "--input", str(tmp_path / "bad.csv")], capture_output=True, text=True,
                       env=clean_env, timeout=60)
    assert r.returncode == 1 and "no manifest" in r.stderr
