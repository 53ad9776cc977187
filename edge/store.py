"""The device's local record store (SQLite). Records never leave the device.

Only what the model needs is kept: the schema's feature values and the label. Every other column of
an ingested file (patient ids, names, dates, free text) is dropped at ingestion and never written
to disk: de-identification by data minimisation. Rows are tied to the schema they were validated
against (a fingerprint of feature names, kind, window and labels), so a model with another schema
never trains on them by mistake.

Ingestion is all-or-nothing per file (one transaction) and idempotent: a row already stored (same
schema and values) is counted as a duplicate, not stored twice. Rows that were accepted before are
never lost by a later failed ingestion.

Consent (``edge/deidentify.py``): each row carries its patient's pseudonym (when the policy names a
patient key), whether training is allowed and the consent year. :meth:`RecordStore.load` returns
the rows that may train: consented, and not of a patient who withdrew
(:meth:`RecordStore.withdraw`); the others serve inference only (they are never loaded).

Patient attributes (``attributes``: coarse group labels such as an age band or sex, marked
``group`` in the de-identification policy or named by ``bedside edge ingest --groups``) are kept
beside a row, never as a model input: they place the row in its patient group when a round asks
for per-group counts (:mod:`bedside.federation.fairness`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bedside.errors import DataError
from bedside.schema import Schema
from bedside.sqlite import open_db, transaction
from bedside.tabular import Table

#: Rows that may train: consented, of no patient who withdrew.
_TRAINABLE = ("consent = 1 AND (patient IS NULL OR patient NOT IN "
              "(SELECT patient FROM withdrawals))")
_LOAD_TRAINABLE = f"SELECT x, y, attributes FROM records WHERE schema = ? AND {_TRAINABLE} ORDER BY id"  # noqa: S608,E501
_COUNT_TRAINABLE = f"SELECT COUNT(*) FROM records WHERE schema = ? AND {_TRAINABLE}"  # noqa: S608
_COUNT_PATIENT = f"SELECT COUNT(*) FROM records WHERE patient = ? AND {_TRAINABLE}"  # noqa: S608


def schema_fingerprint(schema: Schema) -> str:
    return schema.fingerprint()


@dataclass(frozen=True)
class IngestResult:
    added: int
    duplicates: int
    total: int
    consent_revoked: int = 0  # rows stored before whose file now says: no training consent


class RecordStore:
    def __init__(self, path: str | Path, key: bytes | None = None) -> None:
        self.path = Path(path)
        self.db = open_db(
            self.path, "record store",
            "CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY, schema TEXT NOT NULL, "
            "digest TEXT NOT NULL, x BLOB NOT NULL, y INTEGER NOT NULL, source TEXT NOT NULL, "
            "ingested_at REAL NOT NULL, UNIQUE (schema, digest));"
            "CREATE TABLE IF NOT EXISTS withdrawals (patient TEXT PRIMARY KEY, at REAL NOT NULL);",
            private=True, key=key)
        have = {r[1] for r in self.db.execute("PRAGMA table_info(records)")}
        with transaction(self.db):  # stores written before consent existed: consent implied
            for col, ddl in (("patient", "TEXT"), ("consent", "INTEGER NOT NULL DEFAULT 1"),
                             ("consent_year", "INTEGER"), ("attributes", "TEXT")):
                if col not in have:
                    self.db.execute(f"ALTER TABLE records ADD COLUMN {col} {ddl}")

    def close(self) -> None:
        self.db.close()

    def ingest(self, table: Table, schema: Schema, source: str, *,
               patients: list[str | None] | None = None, consent: list[bool] | None = None,
               consent_year: list[int | None] | None = None,
               attributes: list[dict[str, str]] | None = None) -> IngestResult:
        """Store ``table``'s rows; ``patients``, ``consent``, ``consent_year`` and
        ``attributes`` are per data row of the file (``table.sources`` maps a table row, or a
        window, to them)."""
        if table.y is None:
            raise DataError("records for training need labels; pass the label column (--label)")
        fp = schema_fingerprint(schema)
        added = 0
        sources = table.sources or [[i] for i in range(len(table.x))]
        revoked = 0
        with transaction(self.db):
            for x, y, src in zip(table.x, table.y, sources, strict=True):
                blob = np.ascontiguousarray(x, np.float32).tobytes()
                digest = hashlib.sha256(blob + int(y).to_bytes(8, "little")).hexdigest()
                who = patients[src[0]] if patients else None
                if patients and any(patients[i] != who for i in src):
                    raise DataError(f"the window starting at data row {src[0] + 1}: its rows "
                                    "belong to different patients; a window holds one patient's "
                                    "readings")
                ok = all(consent[i] for i in src) if consent else True
                year = consent_year[src[0]] if consent_year else None
                attrs = None
                if attributes:
                    if any(attributes[i] != attributes[src[0]] for i in src):
                        raise DataError(f"the window starting at data row {src[0] + 1}: its "
                                        "rows disagree on the patient attributes (group "
                                        "columns); a window holds one patient's readings")
                    attrs = json.dumps(attributes[src[0]], sort_keys=True)
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO records (schema, digest, x, y, source, ingested_at, "
                    "patient, consent, consent_year, attributes) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (fp, digest, blob, int(y), source, time.time(), who, int(ok), year, attrs))
                added += cur.rowcount
                if not cur.rowcount:  # stored before: a refusal now wins; a patient key fills in
                    upd = self.db.execute(
                        "UPDATE records SET consent = 0 WHERE schema = ? AND digest = ? AND "
                        "consent = 1 AND ?", (fp, digest, int(not ok)))
                    revoked += upd.rowcount
                    self.db.execute("UPDATE records SET patient = ? WHERE schema = ? AND "
                                    "digest = ? AND patient IS NULL", (who, fp, digest))
                    self.db.execute("UPDATE records SET attributes = ? WHERE schema = ? AND "
                                    "digest = ? AND attributes IS NULL", (attrs, fp, digest))
        return IngestResult(added=added, duplicates=len(table.x) - added, total=self.count(schema),
                            consent_revoked=revoked)

    def unkeyed(self) -> int:
        """Rows without a patient key (a withdrawal cannot reach them)."""
        return int(self.db.execute("SELECT COUNT(*) FROM records WHERE patient IS NULL")
                   .fetchone()[0])

    def withdraw(self, patient: str) -> int:
        """No row of ``patient`` (a pseudonym) trains from now on; returns how many rows were
        trainable before."""
        with transaction(self.db):
            n = self.db.execute(_COUNT_PATIENT, (patient,)).fetchone()[0]
            self.db.execute("INSERT OR IGNORE INTO withdrawals VALUES (?, ?)",
                            (patient, time.time()))
        return int(n)

    def consent_counts(self, schema: Schema) -> dict[str, int]:
        fp = schema_fingerprint(schema)
        train = self.db.execute(_COUNT_TRAINABLE, (fp,)).fetchone()[0]
        return {"train": int(train), "inference_only": self.count(schema) - int(train)}

    def count(self, schema: Schema) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM records WHERE schema = ?",
                                   (schema_fingerprint(schema),)).fetchone()[0])

    def load(self, schema: Schema) -> tuple[np.ndarray, np.ndarray]:
        """The rows that may train: features and labels."""
        x, y, _ = self.load_with_attributes(schema)
        return x, y

    def load_with_attributes(self, schema: Schema
                             ) -> tuple[np.ndarray, np.ndarray, list[dict[str, str] | None]]:
        """:meth:`load`, and each row's patient attributes (None where none were stored)."""
        rows = self.db.execute(_LOAD_TRAINABLE, (schema_fingerprint(schema),)).fetchall()
        shape = tuple(int(d) for d in schema.input_shape[1:] if d is not None)
        x = np.empty((len(rows), *shape), dtype=np.float32)
        y = np.empty(len(rows), dtype=np.int64)
        attrs: list[dict[str, str] | None] = []
        for i, (blob, label, a) in enumerate(rows):
            x[i] = np.frombuffer(blob, dtype=np.float32).reshape(shape)
            y[i] = label
            attrs.append(json.loads(a) if a else None)
        return x, y, attrs
