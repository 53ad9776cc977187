"""FHIR R4 input: vital signs from a Bundle of Patient, Observation and Consent resources.

``bedside edge ingest --fhir BUNDLE.json --config agent.toml --label-code SYSTEM|CODE`` reads a
bundle with ``fhir.resources`` (the ``fhir`` extra; R4B models, which read R4 bundles) and turns
it into the rows a CSV of the same records would give, for a time-series model such as the
``vitals`` one:

* vital signs by LOINC code: heart rate 8867-4, respiratory rate 9279-1, oxygen saturation
  59408-5 and 2708-6, systolic blood pressure 8480-6 (alone, or as a component of the blood
  pressure panel 85354-9), body temperature 8310-5; each with its UCUM unit checked and
  converted (``[degF]`` to ``Cel``, ``{beats}/min`` to ``/min``...);
* observations grouped by patient and minute into the model's windows (``window`` consecutive
  minutes each, every feature present in every minute; Bedside does not impute, so an
  incomplete window is reported and not stored);
* each window's label from the Observation coded ``--label-code`` (its value: a string, a code,
  or a boolean for a two-label model) whose time falls inside the window;
* the patient key is the Patient's medical record number (its ``identifier`` typed ``MR``;
  else its first identifier; else its id), pseudonymized with the device's key, so that
  ``bedside edge consent withdraw MRN`` reaches the patient whichever way the records came;
  nothing else of the Patient (name, birth date, address, telecom) is read;
* consent: active ``Consent`` resources of research scope; any ``deny`` wins over a ``permit``;
  without one, the de-identification policy's ``[consent] default`` applies, and without that,
  the patient's windows serve inference only (consent is never assumed from silence).

Messages name resources by their position in the bundle, never by a patient's id or values.

Any other Observation code, an unknown unit, a value without a number, or a reference to an
unknown Patient is an error that names the resource (exit 2): nothing of the bundle is stored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bedside.errors import ConfigError, DataError
from bedside.schema import Schema

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
BP_PANEL = "85354-9"
#: A bigger bundle is refused unread (split the export).
MAX_BUNDLE_BYTES = 256 * 1024 * 1024
#: One patient's readings span at most this long (a reading years away is a data error).
MAX_SPAN_MINUTES = 31 * 24 * 60


@dataclass(frozen=True)
class Vital:
    feature: str  # the model's input name
    codes: tuple[str, ...]
    units: dict[str, Any]  # UCUM code -> conversion to the model's unit


def _same(v: float) -> float:
    return v


def _fahrenheit(v: float) -> float:
    return (v - 32.0) * 5.0 / 9.0


PER_MIN = {"/min": _same, "1/min": _same, "{beats}/min": _same, "{breaths}/min": _same,
           "{Beats}/min": _same, "{Breaths}/min": _same}
VITALS = (
    Vital("heart_rate", ("8867-4",), PER_MIN),
    Vital("resp_rate", ("9279-1",), PER_MIN),
    Vital("spo2", ("59408-5", "2708-6"), {"%": _same}),
    Vital("sbp", ("8480-6",), {"mm[Hg]": _same}),
    Vital("temp", ("8310-5",), {"Cel": _same, "[degF]": _fahrenheit}),
)
BY_CODE = {code: v for v in VITALS for code in v.codes}


@dataclass
class FhirRows:
    header: list[str]
    rows: list[list[str]]
    patients: list[str | None]
    consent: list[bool]
    report: dict[str, Any]


def read_bundle(path: Path, schema: Schema, label_code: str | None, key: bytes,
                consent_default: bool | None) -> FhirRows:
    """The bundle at ``path`` as CSV-like rows for ``schema`` (see the module's docstring)."""
    try:
        from fhir.resources.R4B.bundle import Bundle
    except ImportError:
        raise ConfigError("FHIR input needs fhir.resources: pip install 'bedside[fhir]'") from None
    from pydantic import ValidationError

    from bedside.edge.deidentify import pseudonym

    if schema.kind != "timeseries" or schema.window is None or not schema.group_column:
        raise DataError("FHIR input fills a time-series model's windows of vital signs (such as "
                        "'vitals'); this model is tabular: export its records as CSV")
    wanted = {f.name for f in schema.features}
    unknown_features = wanted - {v.feature for v in VITALS}
    if unknown_features:
        raise DataError(f"the model's inputs {sorted(unknown_features)} have no LOINC mapping; "
                        f"FHIR input knows {[v.feature for v in VITALS]}")
    try:
        if path.stat().st_size > MAX_BUNDLE_BYTES:
            raise DataError(f"{path}: over {MAX_BUNDLE_BYTES >> 20} MiB; split the export")
        raw = json.loads(path.read_text(encoding="utf-8"))
        bundle = Bundle.model_validate(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except ValidationError as exc:  # its locations and reasons, never the values (identifiers)
        where = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
                          for e in exc.errors(include_input=False)[:3])
        raise DataError(f"{path}: not a valid FHIR R4 Bundle ({where})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not JSON ({type(exc).__name__})") from None
    label_system, _, label_value = (label_code or "").rpartition("|")
    patients: dict[str, str] = {}  # FHIR id -> pseudonym, in bundle order
    consent: dict[str, bool] = {}  # research consents: False once any denies
    readings: dict[str, dict[int, dict[str, float]]] = {}
    labels: dict[str, list[tuple[int, str]]] = {}
    for n, entry in enumerate(bundle.entry or [], start=1):
        res: Any = entry.resource  # typed by its resourceType: read dynamically
        if res is None:
            continue
        kind = res.get_resource_type()
        where = f"{path}: entry {n} ({kind})"
        if kind == "Patient":
            if not res.id:
                raise DataError(f"{where}: a Patient without an id")
            patients[res.id] = pseudonym(key, _patient_key(res))
        elif kind == "Consent":
            who = _ref(res.patient, where)
            ptype = res.provision.type if res.provision is not None else None
            scopes = {c.code for c in (res.scope.coding or [])} if res.scope else set()
            if res.status == "active" and "research" in scopes and ptype in ("permit", "deny"):
                consent[who] = consent.get(who, True) and ptype == "permit"
        elif kind == "Observation":
            if res.status in ("entered-in-error", "cancelled"):
                continue
            who = _ref(res.subject, where)
            minute = _minute(res, where)
            codes = [c.code for c in (res.code.coding or []) if c.system == LOINC]
            if label_value and any(c.code == label_value and (c.system or "") == label_system
                                   for c in (res.code.coding or [])):
                labels.setdefault(who, []).append((minute, _label(res, schema, where)))
                continue
            if BP_PANEL in codes:
                for comp in res.component or []:
                    ccodes = [c.code for c in (comp.code.coding or []) if c.system == LOINC]
                    if "8480-6" in ccodes and "sbp" in wanted:
                        _put(readings, who, minute, BY_CODE["8480-6"], comp.valueQuantity,
                             where)
                continue
            vital = next((BY_CODE[c] for c in codes if c in BY_CODE), None)
            if vital is None:
                shown = ", ".join(f"{c.system}|{c.code}" for c in (res.code.coding or []))
                raise DataError(f"{where}: code {shown or '(none)'} is not one of the model's "
                                f"inputs (LOINC {', '.join(sorted(BY_CODE))}, panel {BP_PANEL})"
                                + (f" or the label code {label_code}" if label_code else
                                   "; a label code is given with --label-code SYSTEM|CODE"))
            if vital.feature in wanted:
                _put(readings, who, minute, vital, res.valueQuantity, where)
    return _windows(path, schema, patients, consent, readings, labels, label_code,
                    consent_default)


def _patient_key(res: Any) -> str:
    """The id a clinic knows its patient by: the medical record number, else the first
    identifier, else the resource id."""
    ids = [i for i in (res.identifier or []) if i.value]
    for i in ids:
        if i.type is not None and any(c.code == "MR" for c in (i.type.coding or [])):
            return str(i.value)
    return str(ids[0].value) if ids else str(res.id)


def _ref(ref: Any, where: str) -> str:
    text = getattr(ref, "reference", None) or ""
    if not text.startswith("Patient/"):
        raise DataError(f"{where}: its subject must reference a Patient (Patient/ID)")
    return str(text[len("Patient/"):])


def _minute(res: Any, where: str) -> int:
    t = res.effectiveDateTime or (res.effectivePeriod.start if res.effectivePeriod else None)
    if not isinstance(t, datetime):
        raise DataError(f"{where}: no effectiveDateTime (with a time of day)")
    if t.tzinfo is None:
        raise DataError(f"{where}: effectiveDateTime {t} has no time zone")
    return int(t.timestamp() // 60)


def _put(readings: dict[str, dict[int, dict[str, float]]], who: str, minute: int, vital: Vital,
         q: Any, where: str) -> None:
    if q is None or q.value is None:
        raise DataError(f"{where}: {vital.feature} has no valueQuantity with a number")
    unit = q.code or q.unit
    if q.system not in (None, UCUM) or unit not in vital.units:
        raise DataError(f"{where}: {vital.feature} in unit {unit!r} (system {q.system}); "
                        f"expected UCUM {', '.join(vital.units)}")
    value = vital.units[unit](float(q.value))
    if not math.isfinite(value):
        raise DataError(f"{where}: {vital.feature} value {q.value} is not a finite number")
    slot = readings.setdefault(who, {}).setdefault(minute, {})
    if vital.feature in slot and slot[vital.feature] != value:
        raise DataError(f"{where}: a second {vital.feature} reading in the same minute with "
                        "another value; keep one reading per minute")
    slot[vital.feature] = value


def _label(res: Any, schema: Schema, where: str) -> str:
    if res.valueString is not None:
        return str(res.valueString)
    if res.valueCodeableConcept is not None and res.valueCodeableConcept.coding:
        return str(res.valueCodeableConcept.coding[0].code)
    if res.valueBoolean is not None and len(schema.labels) == 2:
        return schema.labels[int(bool(res.valueBoolean))]
    raise DataError(f"{where}: the label observation has no valueString, valueCodeableConcept "
                    "or valueBoolean")


def _windows(path: Path, schema: Schema, patients: dict[str, str], consent: dict[str, bool],
             readings: dict[str, dict[int, dict[str, float]]],
             labels: dict[str, list[tuple[int, str]]], label_code: str | None,
             consent_default: bool | None) -> FhirRows:
    assert schema.window is not None and schema.group_column is not None
    names = [f.name for f in schema.features]
    order = schema.order_column or "t"
    header = [schema.group_column, order, *names, "label"]
    out_rows: list[list[str]] = []
    who_rows: list[str | None] = []
    ok_rows: list[bool] = []
    incomplete = 0
    strangers = [fid for fid in readings if fid not in patients]
    if strangers:
        raise DataError(f"{path}: observations reference {len(strangers)} Patient(s) the bundle "
                        "does not hold; include their Patient resources")
    for number, (fid, alias) in enumerate(patients.items(), start=1):
        minutes = readings.get(fid, {})
        if not minutes:
            continue
        start, end = min(minutes), max(minutes)
        if end - start > MAX_SPAN_MINUTES:
            raise DataError(f"{path}: patient {number} (in bundle order) has readings "
                            f"{(end - start) // 1440} days apart; one export holds at most "
                            f"{MAX_SPAN_MINUTES // 1440} days per patient (check the dates)")
        for k, w0 in enumerate(range(start, end + 1, schema.window)):
            span = range(w0, w0 + schema.window)
            if not all(m in minutes and all(n in minutes[m] for n in names) for m in span):
                incomplete += 1
                continue
            found = {lab for m, lab in labels.get(fid, []) if m in span}
            if label_code and len(found) != 1:
                raise DataError(f"{path}: patient {number} (in bundle order), window {k + 1}: "
                                f"{len(found)} label observations ({label_code}) inside it; "
                                "expected one")
            label = found.pop() if found else ""
            for t, m in enumerate(span):
                out_rows.append([f"{alias[:16]}-{k}", str(t),
                                 *(repr(minutes[m][n]) for n in names), label])
                who_rows.append(alias)
                ok_rows.append(consent.get(fid, bool(consent_default)))
    if not out_rows:
        raise DataError(f"{path}: no complete window of {schema.window} minutes with "
                        f"{', '.join(names)} every minute")
    report = {"patients": len(patients), "windows": len(out_rows) // schema.window,
              "incomplete_windows_not_stored": incomplete,
              "patient_key": "the Patient's MRN identifier (else its first identifier, else its "
                             "id), replaced by a keyed pseudonym (HMAC-SHA256)",
              "inference_only_windows": sum(1 for i in range(0, len(ok_rows), schema.window)
                                            if not ok_rows[i]),
              "not_read": "every other element of Patient (name, birthDate, address, telecom)"}
    return FhirRows(header, out_rows, who_rows, ok_rows, report)
