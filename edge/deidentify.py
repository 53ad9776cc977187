"""De-identification and consent at ingest, before anything reaches the record store.

A policy (a TOML file that ``agent.toml``'s ``[deidentify] policy`` names) says what happens to
every column of a clinic's CSV::

    [columns]
    mrn = "pseudonymize"       # the patient key: keyed HMAC-SHA256, the key never leaves the device
    name = "drop"              # direct identifiers (HIPAA Safe Harbor): removed
    age = "top_code_90"        # a model feature whose values over 89 become 90 ("90+")
    heart_rate = "keep"        # model features and the label: kept as they are
    consent = "consent"        # training allowed? yes/no, true/false, 1/0
    consent_date = "consent_date"   # when it was given: generalized to the year
    age_band = "group"         # a coarse patient attribute for per-group figures (never an input)

    [consent]
    default = "inference"      # without a consent column: "train" or "inference" for every row

A column the policy does not name is refused (a new column in an export is never stored by
accident), and so is a kept column that is not a model feature, the label or a window's id or
order column: only those are stored, as numbers, so free text, names, dates, codes and
addresses never reach the store. The record store keeps the features, the label, the patient's
pseudonym, the consent flag and the consent year, and the values of ``group`` columns: coarse
patient attributes (an age band, sex; at most :data:`MAX_GROUP_VALUES` distinct values per file,
so that no identifier is kept as a "group") that place a record in its patient group for
per-group figures (:mod:`bedside.federation.fairness`), never a model input.

Safe Harbor's 18 kinds of identifiers are dropped by naming them ``drop``; the report of
:func:`apply` says, per column, what was removed or changed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bedside.errors import ConfigError, DataError
from bedside.schema import Schema

ACTIONS = ("keep", "drop", "pseudonymize", "top_code_90", "consent", "consent_date", "group")
#: A group attribute is a coarse category: more distinct values in one file is refused.
MAX_GROUP_VALUES = 16
MAX_GROUP_CHARS = 32
YES = {"yes", "y", "true", "1", "granted", "train"}
NO = {"no", "n", "false", "0", "refused", "withdrawn", "inference"}


@dataclass(frozen=True)
class Policy:
    columns: dict[str, str]
    consent_default: bool | None = None  # True: train, False: inference only, None: a column
    source: str = "policy"

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: the de-identification policy does not exist") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{p}: not a readable TOML policy ({exc})") from None
        cols = raw.get("columns")
        if not isinstance(cols, dict) or not cols:
            raise ConfigError(f"{p}: needs a [columns] table naming every column of your CSV")
        for name, action in cols.items():
            if action not in ACTIONS:
                raise ConfigError(f"{p}: column {name!r}: {action!r} is not one of "
                                  f"{', '.join(ACTIONS)}")
        for one in ("pseudonymize", "consent", "consent_date"):
            if sum(1 for a in cols.values() if a == one) > 1:
                raise ConfigError(f"{p}: at most one column may be {one!r}")
        default = (raw.get("consent") or {}).get("default")
        if default not in (None, "train", "inference"):
            raise ConfigError(f"{p}: [consent] default must be \"train\" or \"inference\"")
        if "consent" not in cols.values() and default is None:
            raise ConfigError(f"{p}: say how consent is known: a column marked \"consent\", or "
                              "[consent] default = \"train\" | \"inference\"")
        return cls(columns=dict(cols), consent_default=None if default is None
                   else default == "train", source=str(p))


@dataclass
class Result:
    header: list[str]  # the kept columns
    rows: list[list[str]]
    patients: list[str | None]  # per data row: the pseudonym, if the policy names a key
    consent: list[bool]  # per data row: training allowed
    consent_year: list[int | None]
    report: dict[str, dict[str, Any]] = field(default_factory=dict)
    attributes: list[dict[str, str]] | None = None  # per data row: its group columns' values


def group_attributes(path: Path, header: list[str], rows: list[list[str]],
                     columns: list[str]) -> list[dict[str, str]]:
    """Per data row, the values of the patient-attribute ``columns`` (``group`` in the policy,
    or ``bedside edge ingest --groups``). A column with more than MAX_GROUP_VALUES distinct
    values, or long values, is refused: it is not a coarse category and may identify."""
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}: group column(s) {', '.join(map(repr, missing))} are not in the "
                        "file's header")
    idx = {c: header.index(c) for c in columns}
    for c, j in idx.items():
        values = {r[j].strip() for r in rows}
        if len(values) > MAX_GROUP_VALUES or any(len(v) > MAX_GROUP_CHARS or not v.isprintable()
                                                 for v in values):
            raise DataError(f"{path}: column {c!r} has {len(values)} distinct values (or long "
                            f"ones): a group attribute is a coarse category such as an age band "
                            f"or sex (at most {MAX_GROUP_VALUES} values of at most "
                            f"{MAX_GROUP_CHARS} characters); mark it \"drop\" or band it first. "
                            "Nothing was stored")
        if "" in values:
            raise DataError(f"{path}: column {c!r} has empty values; give every row its group "
                            "(e.g. \"unknown\"). Nothing was stored")
        if any("/" in v for v in values):
            raise DataError(f"{path}: column {c!r} has values with \"/\", which joins the "
                            "values of several group columns into one group name; use another "
                            "character (e.g. 18-44). Nothing was stored")
    return [{c: r[j].strip() for c, j in idx.items()} for r in rows]


def pseudonym(key: bytes, patient_id: str) -> str:
    """The patient key stored on the device: HMAC-SHA256 under the device's own key."""
    return hmac.new(key, patient_id.strip().encode(), hashlib.sha256).hexdigest()[:32]


def apply(policy: Policy, path: Path, header: list[str], rows: list[list[str]], key: bytes,
          schema: Schema, label: str | None) -> Result:
    """De-identify ``rows`` (read from ``path``) under ``policy``; errors name the column or
    row and say what to do (exit 2), and nothing is stored unless every row passes."""
    for n, r in enumerate(rows, start=1):  # before any cell is picked by its position
        if len(r) != len(header):
            raise DataError(f"{path}: row {n} (line {n + 1}) has {len(r)} fields but the header "
                            f"has {len(header)}; check for a stray or missing comma (a comma "
                            "inside a name must be quoted). Nothing was stored")
    for name, action in policy.columns.items():
        if action == "pseudonymize" and name not in header:
            raise DataError(f"{path}: the policy's patient key column {name!r} is missing; "
                            "without it consent cannot be withdrawn per patient. Nothing was "
                            "stored")
    missing = [h for h in header if h not in policy.columns]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise DataError(f"{path}: column(s) {shown} are not in the de-identification policy "
                        f"({policy.source}); add each one, as \"drop\" unless it is a model "
                        "feature or the label. Nothing was stored")
    storable = {f.name for f in schema.features} | {label or ""}
    storable |= {c for c in (schema.group_column, schema.order_column) if c}
    for name in header:
        action = policy.columns[name]
        if action in ("keep", "top_code_90") and name not in storable:
            raise DataError(f"{path}: column {name!r} is marked {action!r} but is not a model "
                            "feature or the label; only those are stored: mark it \"drop\" (free "
                            "text, names and codes never enter the store)")
    report: dict[str, dict[str, Any]] = {}
    group_cols = [h for h in header if policy.columns[h] == "group"]
    attributes = group_attributes(path, header, rows, group_cols) if group_cols else None
    keep = [i for i, h in enumerate(header) if policy.columns[h] in ("keep", "top_code_90")]
    out_rows = [[r[i] for i in keep] for r in rows]
    out_header = [header[i] for i in keep]
    patients: list[str | None] = [None] * len(rows)
    consent = [bool(policy.consent_default)] * len(rows)
    years: list[int | None] = [None] * len(rows)
    for i, name in enumerate(header):
        action = policy.columns[name]
        if action == "drop":
            report[name] = {"action": "removed", "values": sum(1 for r in rows if r[i].strip())}
        elif action == "keep":
            report[name] = {"action": "kept"}
        elif action == "top_code_90":
            j = out_header.index(name)
            changed = 0
            for n, r in enumerate(out_rows, start=1):
                try:
                    if float(r[j]) > 89:
                        r[j], changed = "90", changed + 1
                except ValueError:
                    raise DataError(f"{path}: row {n} (line {n + 1}), column {name!r}: not an "
                                    "age in years (the value is not shown: it may identify)"
                                    ) from None
            report[name] = {"action": "ages over 89 set to 90", "changed": changed}
        elif action == "pseudonymize":
            for n, r in enumerate(rows):
                if not r[i].strip():
                    raise DataError(f"{path}: row {n + 1} (line {n + 2}), column {name!r}: the "
                                    "patient id is empty")
                patients[n] = pseudonym(key, r[i])
            report[name] = {"action": "replaced by a keyed pseudonym (HMAC-SHA256)",
                            "values": len(rows)}
        elif action == "consent":
            for n, r in enumerate(rows):
                v = r[i].strip().lower()
                if v not in YES | NO:
                    raise DataError(f"{path}: row {n + 1} (line {n + 2}), column {name!r}: not "
                                    "a consent answer (yes/no, true/false, 1/0)")
                consent[n] = v in YES
            report[name] = {"action": "training consent read, column removed",
                            "train": sum(consent), "inference_only": len(rows) - sum(consent)}
        elif action == "consent_date":
            for n, r in enumerate(rows):
                m = re.match(r"\s*(\d{4})(?:-\d{2}(?:-\d{2})?)?", r[i])
                if r[i].strip() and m is None:
                    raise DataError(f"{path}: row {n + 1} (line {n + 2}), column {name!r}: not "
                                    "a date in YYYY-MM-DD form (the value is not shown: a "
                                    "person's date identifies)")
                years[n] = int(m.group(1)) if m else None
            report[name] = {"action": "generalized to the year"}
        elif action == "group":
            report[name] = {"action": "kept as a patient group attribute (not a model input)",
                            "groups": len({r[i].strip() for r in rows})}
    if schema.group_column and schema.group_column in out_header:
        # window ids may be built from patient ids: replace them by ordinals (w1, w2, ...), so
        # that no message names them (they are never stored either)
        j = out_header.index(schema.group_column)
        ordinal: dict[str, str] = {}
        for r in out_rows:
            r[j] = ordinal.setdefault(r[j].strip(), f"w{len(ordinal) + 1}")
        report[schema.group_column] = {"action": "replaced by window numbers (w1, w2, ...)"}
    return Result(out_header, out_rows, patients, consent, years, report, attributes)


def load_key(path: Path, *, create: bool) -> bytes:
    """The device's pseudonymization key; created (0600) on the first ingest. It never leaves
    the device: with it, anyone could test guesses of patient ids against the pseudonyms."""
    from bedside.sqlite import read_key, write_key

    if path.exists() or not create:
        if not path.exists():
            raise ConfigError(f"{path}: no pseudonymization key: nothing was ingested with "
                              "patient keys on this device (or [deidentify] key_file is wrong)")
        return read_key(path, "pseudonymization key")
    return write_key(path, "pseudonymization key")
