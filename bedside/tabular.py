"""Read CSV files into arrays according to a :class:`~bedside.schema.Schema`.

Columns are matched by name from the header; extra columns (ids, free text, the label when
predicting) are ignored. Every refusal names the file, the row (1-based data row and its line
number) and the column, and says what to do. No pandas: the edge install stays small.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bedside.errors import DataError, SchemaError
from bedside.schema import Schema

csv.field_size_limit(1 << 20)


@dataclass
class Table:
    """Rows read from a CSV file: ``x`` in the model's input shape, optional labels."""

    x: np.ndarray
    y: np.ndarray | None
    row_ids: list[str]
    #: the file's data rows (0-based) behind each table row: one per row, or a window's rows
    sources: list[list[int]] | None = None


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and non-blank rows of a CSV file, with clear errors for unreadable files."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(f"{path}: the file is empty; expected a header line") from None
            rows = list(reader)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason}); save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a valid CSV file ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    header = [h.strip() for h in header]
    if len(header) == 1:
        for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "vertical bars")):
            if header[0].count(sep) >= 1:
                raise DataError(f"{path}: the header seems to be separated by {name}, not "
                                "commas; save the file as comma-separated CSV")
    seen: dict[str, int] = {}
    for i, name in enumerate(header, start=1):
        if name in seen:
            raise DataError(f"{path}: column {name!r} appears twice in the header (columns "
                            f"{seen[name]} and {i}); rename or remove one, so that no value is "
                            "read from the wrong copy")
        seen[name] = i
    rows = [r for r in rows if any(c.strip() for c in r)]  # blank lines are not rows
    if not rows:
        raise DataError(f"{path}: has a header but no data rows")
    return header, rows


def _column_index(path: Path, header: list[str], name: str, what: str) -> int:
    if name not in header:
        shown = ", ".join(header[:12]) + (" ..." if len(header) > 12 else "")
        raise SchemaError(
            f"{path}: {what} column {name!r} is missing; the header has: {shown}. "
            "Columns are matched by exact name."
        )
    return header.index(name)


def _parse(path: Path, value: str, row: int, column: str) -> float:
    text = value.strip()
    try:
        v = float(text)
    except ValueError:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise SchemaError(
            f"{path}: row {row} (line {row + 1}), column {column!r}: {shown!r} is not a number"
        ) from None
    if math.isnan(v):
        raise SchemaError(
            f"{path}: row {row} (line {row + 1}), column {column!r}: value is {text} (missing); "
            "Bedside does not impute missing values: fill in or drop the row"
        )
    if math.isinf(v):
        raise SchemaError(
            f"{path}: row {row} (line {row + 1}), column {column!r}: {text} is out of range (too "
            "large to be a measurement, or infinite); check the value and its unit"
        )
    return v


def _check_range(path: Path, schema: Schema, x: np.ndarray, where: list[str]) -> None:
    for j, feat in enumerate(schema.features):
        col = x[:, j] if x.ndim == 2 else x[:, j, :]
        lo = -np.inf if feat.min is None else feat.min
        hi = np.inf if feat.max is None else feat.max
        bad = (col < lo) | (col > hi)
        if bad.any():
            pos = np.argwhere(bad)[0]
            value = float(col[tuple(pos)])
            unit = f" {feat.unit}" if feat.unit else ""
            raise SchemaError(
                f"{path}: {where[int(pos[0])]}, column {feat.name!r}: value {value:g} is outside "
                f"the allowed range [{lo:g}, {hi:g}]{unit}; check the value and its unit"
            )


def _labels(path: Path, schema: Schema, raw: list[str], where: list[str],
            column: str) -> np.ndarray:
    index = {name: i for i, name in enumerate(schema.labels)}
    out = np.empty(len(raw), dtype=np.int64)
    for i, value in enumerate(raw):
        v = value.strip()
        if v in index:
            out[i] = index[v]
            continue
        try:
            k = int(float(v))
            if float(v) == k and 0 <= k < len(schema.labels):
                out[i] = k
                continue
        except ValueError:
            pass
        raise SchemaError(
            f"{path}: {where[i]}, column {column!r}: label {v!r} is not one of "
            f"{list(schema.labels)} (or their indices 0..{len(schema.labels) - 1})"
        )
    return out


def read_csv(path: str | Path, schema: Schema, label_column: str | None = None) -> Table:
    """Read ``path`` into a :class:`Table` shaped for ``schema``; labels only if asked for."""
    path = Path(path)
    header, rows = read_rows(path)
    return table_from_rows(path, header, rows, schema, label_column)


def table_from_rows(path: Path, header: list[str], rows: list[list[str]], schema: Schema,
                    label_column: str | None = None) -> Table:
    """:func:`read_csv` on rows already read (``path`` names them in errors)."""
    cols = [_column_index(path, header, f.name, "feature") for f in schema.features]
    label_idx = _column_index(path, header, label_column, "label") if label_column else None
    width = len(header)
    for i, r in enumerate(rows, start=1):
        if len(r) != width:
            raise SchemaError(
                f"{path}: row {i} (line {i + 1}) has {len(r)} fields but the header has {width}; "
                "check for a stray or missing comma"
            )
    if schema.kind == "tabular":
        x = np.empty((len(rows), schema.n_features), dtype=np.float32)
        for i, r in enumerate(rows):
            for j, (c, f) in enumerate(zip(cols, schema.features, strict=True)):
                x[i, j] = _parse(path, r[c], i + 1, f.name)
        where = [f"row {i} (line {i + 1})" for i in range(1, len(rows) + 1)]
        _check_range(path, schema, x, where)
        y = None
        if label_idx is not None:
            y = _labels(path, schema, [r[label_idx] for r in rows], where, header[label_idx])
        return Table(x=x, y=y, row_ids=[str(i) for i in range(1, len(rows) + 1)],
                     sources=[[i] for i in range(len(rows))])
    return _read_windows(path, schema, header, rows, cols, label_idx)


def group_values(path: Path, header: list[str], rows: list[list[str]], table: Table,
                 columns: list[str]) -> list[str]:
    """Per table row (a row, or a window), its patient group: the values of ``columns`` joined by
    "/". A window's rows must agree."""
    missing = [c for c in columns if c not in header]
    if not columns or missing:
        raise SchemaError(f"{path}: group column(s) {missing or columns} not in the file (its "
                          f"header: {', '.join(header[:12])})")
    idx = [header.index(c) for c in columns]
    out = []
    for tid, src in zip(table.row_ids, table.sources or [], strict=True):
        values = {"/".join(rows[i][j].strip() for j in idx) for i in src}
        if len(values) != 1:
            raise SchemaError(f"{path}: window {tid!r} holds several groups {sorted(values)}: a "
                              "window's rows must share their patient attributes")
        out.append(values.pop())
    return out


def _read_windows(
    path: Path, schema: Schema, header: list[str], rows: list[list[str]], cols: list[int],
    label_idx: int | None,
) -> Table:
    assert schema.group_column is not None and schema.window is not None
    g = _column_index(path, header, schema.group_column, "window id")
    o = _column_index(path, header, schema.order_column, "order") if schema.order_column else None
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r[g].strip(), []).append(i)
    sources = [list(m) for m in groups.values()]
    x = np.empty((len(groups), schema.n_features, schema.window), dtype=np.float32)
    labels_raw: list[str] = []
    where: list[str] = []
    for w, (wid, members) in enumerate(groups.items()):
        first, last = members[0] + 1, members[-1] + 1
        span = f"window {wid!r} (rows {first}-{last})"
        if len(members) != schema.window:
            raise SchemaError(
                f"{path}: {span} has {len(members)} rows; the model needs exactly {schema.window} "
                f"time steps per window (column {schema.group_column!r} groups the rows)"
            )
        if o is not None:
            order_col = schema.order_column or ""
            members = sorted(members, key=lambda i: _parse(path, rows[i][o], i + 1, order_col))
        for t, i in enumerate(members):
            for j, (c, f) in enumerate(zip(cols, schema.features, strict=True)):
                x[w, j, t] = _parse(path, rows[i][c], i + 1, f.name)
        if label_idx is not None:
            values = {rows[i][label_idx].strip() for i in members}
            if len(values) != 1:
                raise SchemaError(
                    f"{path}: {span}: column {header[label_idx]!r} must hold one label per window, "
                    f"found {sorted(values)}"
                )
            labels_raw.append(values.pop())
        where.append(span)
    _check_range(path, schema, x, where)
    y = (_labels(path, schema, labels_raw, where, header[label_idx])
         if label_idx is not None else None)
    return Table(x=x, y=y, row_ids=list(groups), sources=sources)


def write_csv(path: str | Path, header: list[str], rows: list[list[object]]) -> None:
    """Write a CSV file (used by the demo, tests and ``bedside edge infer --output``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
