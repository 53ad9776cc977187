"""The device's local record store (SQLite). Records never leave the device.

Only what the model needs is kept: the schema's feature values and the label. Every other column of
an ingested file (patient ids, names, dates, free text) is dropped at ingestion and never written
to disk: de-identification by data minimisation. Rows are tied to the schema they were validated
against (a fingerprint of feature names, kind, window and labels), so a model with another schema
never trains on them by mistake.

Ingestion is all-or-nothing per file (one transaction) and idempotent: a row already stored (same
schema and values) is counted as a duplicate, not stored twice. Rows that were accepted before are
never lost by a later failed ingestion.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bedside.errors import DataError
from bedside.schema import Schema
from bedside.sqlite import open_db, transaction
from bedside.tabular import Table


def schema_fingerprint(schema: Schema) -> str:
    return schema.fingerprint()


@dataclass(frozen=True)
class IngestResult:
    added: int
    duplicates: int
    total: int


class RecordStore:
    def __init__(self, path: str | Path, key: bytes | None = None) -> None:
        self.path = Path(path)
        self.db = open_db(
            self.path, "record store",
            "CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY, schema TEXT NOT NULL, "
            "digest TEXT NOT NULL, x BLOB NOT NULL, y INTEGER NOT NULL, source TEXT NOT NULL, "
            "ingested_at REAL NOT NULL, UNIQUE (schema, digest))", private=True, key=key)

    def close(self) -> None:
        self.db.close()

    def ingest(self, table: Table, schema: Schema, source: str) -> IngestResult:
        if table.y is None:
            raise DataError("records for training need labels; pass the label column (--label)")
        fp = schema_fingerprint(schema)
        added = 0
        with transaction(self.db):
            for x, y in zip(table.x, table.y, strict=True):
                blob = np.ascontiguousarray(x, np.float32).tobytes()
                digest = hashlib.sha256(blob + int(y).to_bytes(8, "little")).hexdigest()
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO records (schema, digest, x, y, source, ingested_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)", (fp, digest, blob, int(y), source, time.time()))
                added += cur.rowcount
        return IngestResult(added=added, duplicates=len(table.x) - added, total=self.count(schema))

    def count(self, schema: Schema) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM records WHERE schema = ?",
                                   (schema_fingerprint(schema),)).fetchone()[0])

    def load(self, schema: Schema) -> tuple[np.ndarray, np.ndarray]:
        rows = self.db.execute("SELECT x, y FROM records WHERE schema = ? ORDER BY id",
                               (schema_fingerprint(schema),)).fetchall()
        shape = tuple(int(d) for d in schema.input_shape[1:] if d is not None)
        x = np.empty((len(rows), *shape), dtype=np.float32)
        y = np.empty(len(rows), dtype=np.int64)
        for i, (blob, label) in enumerate(rows):
            x[i] = np.frombuffer(blob, dtype=np.float32).reshape(shape)
            y[i] = label
        return x, y
