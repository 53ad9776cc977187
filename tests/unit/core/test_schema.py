"""Schema: validation, (de)serialisation, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from bedside.errors import SchemaError
from bedside.schema import Feature, Schema


def _schema(**kw):
    base = dict(features=(Feature("hr", "bpm", 20, 250, 80, 40), Feature("spo2", "%", 50, 100)),
                labels=("stable", "deteriorating"))
    base.update(kw)
    return Schema(**base)


def test_round_trip():
    s = _schema()
    assert Schema.from_dict(s.to_dict()) == s
    ts = _schema(kind="timeseries", window=4, group_column="w", order_column="t")
    assert Schema.from_dict(ts.to_dict()) == ts
    assert ts.input_shape == [None, 2, 4]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"features": ()}, "empty"),
        ({"labels": ("a",)}, "two class labels"),
        ({"labels": ("a", "a")}, "unique"),
        ({"kind": "image"}, "kind"),
        ({"kind": "timeseries"}, "window"),
        ({"kind": "timeseries", "window": 5}, "group_column"),
        ({"window": 5}, "only valid"),
        ({"features": (Feature("a"), Feature("a"))}, "repeated: a"),
    ],
)
def test_invalid(kw, match):
    with pytest.raises(SchemaError, match=match):
        _schema(**kw)


def test_feature_checks():
    with pytest.raises(SchemaError, match="positive 'scale'"):
        Feature("x", scale=0)
    with pytest.raises(SchemaError, match="min 5 > max 1"):
        Feature("x", min=5, max=1)
    for lo, hi in ((1.0, None), (None, 2.0), (3.0, 2.0), (1.0, float("inf"))):
        with pytest.raises(SchemaError, match="typical_min"):
            Feature("x", typical_min=lo, typical_max=hi)


def test_typical_range_round_trips_and_is_optional():
    s = _schema(features=(Feature("crp", "mg/L", 0, 500, typical_min=0.1, typical_max=10),
                          Feature("hr", "bpm", 20, 250)))
    d = s.to_dict()
    assert d["features"][0]["typical_max"] == 10 and "typical_min" not in d["features"][1]
    assert Schema.from_dict(d) == s


def test_from_dict_errors():
    with pytest.raises(SchemaError, match="unknown key"):
        Schema.from_dict({"features": ["a"], "labels": ["x", "y"], "colour": 1})
    with pytest.raises(SchemaError, match="features\\[0\\] has unknown"):
        Schema.from_dict({"features": [{"name": "a", "units": "kg"}], "labels": ["x", "y"]})
    with pytest.raises(SchemaError, match="disagrees"):
        Schema.from_dict({"features": ["a"], "labels": ["x", "y"], "shape": [None, 3]})


def test_validate_names_row_and_feature():
    s = _schema()
    ok = s.validate(np.array([[80, 97]], dtype=np.float64))
    assert ok.dtype == np.float32 and ok.flags.c_contiguous
    with pytest.raises(SchemaError, match="row 1, column 'spo2': value 120 is outside"):
        s.validate(np.array([[80, 97], [80, 120]]))
    with pytest.raises(SchemaError, match="patient 7, column 'hr'"):
        s.validate(np.array([[np.inf, 97]]), ["patient 7"])
    with pytest.raises(SchemaError, match="expected numbers"):
        s.validate(np.array([["a", "b"]]))


def test_reference_rows_are_valid():
    s = _schema()
    rows = s.reference_rows(3)
    assert rows.shape == (3, 2)
    s.validate(rows)
