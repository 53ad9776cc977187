"""CSV reading: columns by name, extras ignored, errors name row and column."""

from __future__ import annotations

import numpy as np
import pytest

from bedside.errors import DataError, SchemaError
from bedside.schema import Feature, Schema
from bedside.tabular import read_csv

S = Schema(features=(Feature("a", min=0, max=10), Feature("b")), labels=("no", "yes"))


def _w(tmp_path, text):
    p = tmp_path / "f.csv"
    p.write_text(text)
    return p


def test_reads_by_name_and_ignores_extras(tmp_path):
    t = read_csv(_w(tmp_path, "id,b,a,label\nx,2,1,yes\ny,4,3,0\n\n"), S, "label")
    np.testing.assert_array_equal(t.x, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(t.y, [1, 0])
    assert t.row_ids == ["1", "2"]


@pytest.mark.parametrize(
    ("text", "err", "match"),
    [
        ("b\n1\n", SchemaError, "column 'a' is missing"),
        ("a,b\n1,2\n1\n", SchemaError, "row 2 \\(line 3\\) has 1 fields"),
        ("a,b\n1,x\n", SchemaError, "row 1 \\(line 2\\), column 'b': 'x' is not a number"),
        ("a,b\n11,1\n", SchemaError, "row 1 \\(line 2\\), column 'a': value 11 is outside"),
        ("a,b\n1,NaN\n", SchemaError, "not impute"),
        ("a,b\n1,\n", SchemaError, "'' is not a number"),
        ("a,b\n1,1e400\n", SchemaError, "column 'b': 1e400 is out of range"),
        ("a,b\n1,-inf\n", SchemaError, "column 'b': -inf is out of range"),
        ("a,b,a\n1,2,3\n", DataError, "column 'a' appears twice .*columns 1 and 3"),
        ("a;b\n1;2\n", DataError, "separated by semicolons"),
        ("a\tb\n1\t2\n", DataError, "separated by tabs"),
        ("", DataError, "empty"),
        ("a,b\n", DataError, "no data rows"),
    ],
)
def test_errors(tmp_path, text, err, match):
    with pytest.raises(err, match=match):
        read_csv(_w(tmp_path, text), S)


def test_bad_label(tmp_path):
    with pytest.raises(SchemaError, match="label 'maybe' is not one of"):
        read_csv(_w(tmp_path, "a,b,y\n1,2,maybe\n"), S, "y")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_csv(tmp_path / "nope.csv", S)


def test_windows(tmp_path):
    ts = Schema(features=(Feature("hr"),), labels=("s", "d"), kind="timeseries", window=3,
                group_column="w", order_column="t")
    text = "w,t,hr,y\nA,2,30,d\nA,0,10,d\nA,1,20,d\nB,0,1,s\nB,1,2,s\nB,2,3,s\n"
    t = read_csv(_w(tmp_path, text), ts, "y")
    np.testing.assert_array_equal(t.x[:, 0, :], [[10, 20, 30], [1, 2, 3]])
    assert t.row_ids == ["A", "B"] and t.y.tolist() == [1, 0]
    with pytest.raises(SchemaError, match="window 'B' \\(rows 4-5\\) has 2 rows"):
        read_csv(_w(tmp_path, "w,t,hr\nA,0,1\nA,1,1\nA,2,1\nB,0,1\nB,1,1\n"), ts)
