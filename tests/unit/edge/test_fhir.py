"""FHIR R4 input: a bundle ingests to the same rows as the equivalent CSV; Fahrenheit converts;
an unknown LOINC code or unit is exit 2 naming it; Consent resources decide training."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from bedside.cli import main
from bedside.config import to_toml

LABEL = "http://example.org/bedside|deterioration"
UNITS = {"heart_rate": ("8867-4", "/min"), "resp_rate": ("9279-1", "/min"),
         "spo2": ("59408-5", "%"), "sbp": ("8480-6", "mm[Hg]"), "temp": ("8310-5", "Cel")}


@pytest.fixture
def device(tmp_path, exported):
    """A device (agent.toml, keys) and the vitals model; returns a factory of devices."""
    from bedside.wire.signing import SigningKey

    model = exported("cnn1d", "vitals")
    agg = SigningKey.generate()
    agg.public.save(tmp_path / "aggregator.pub")

    def make(name: str, **extra: object) -> str:
        d = tmp_path / name
        SigningKey.generate().save(d / "keys" / f"{name}.key")
        cfg = {"device_id": name, "fleet": "north", "key": f"keys/{name}.key",
               "aggregator_key": str(tmp_path / "aggregator.pub"),
               "privacy": {"record_epsilon": 8.0}, **extra}
        (d / "agent.toml").write_text(to_toml(cfg))
        return str(d / "agent.toml")

    make.model = str(model)  # type: ignore[attr-defined]
    return make


def _csv_and_bundle(tmp_path, *, fahrenheit=False, panel=False, deny=(), extra_code=None,
                    consents=True):
    from bedside.models import datasets

    ds = datasets.load("vitals", n_windows=3, window=60)
    csv_path = datasets.to_csv(ds, tmp_path / "vitals.csv", label_column="label")
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    t0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    entries: list[dict] = []
    seen: list[str] = []
    for r in rows:
        pid = f"pt-{r['window_id']}"
        if pid not in seen:
            seen.append(pid)
            mr = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                              "code": "MR"}]}
            entries.append({"resource": {"resourceType": "Patient", "id": pid,
                                         "identifier": [{"type": mr, "value": f"MRN-{pid}"}],
                                         "name": [{"family": "Quackenbush", "given": ["Zelda"]}],
                                         "birthDate": "1931-04-17"}})
            if consents:
                entries.append({"resource": {
                    "resourceType": "Consent", "id": f"c-{pid}", "status": "active",
                    "scope": {"coding": [{"code": "research"}]},
                    "category": [{"coding": [{"code": "research"}]}],
                    "patient": {"reference": f"Patient/{pid}"},
                    "provision": {"type": "deny" if pid in deny else "permit"}}})
        when = (t0 + timedelta(minutes=int(r["t"]))).isoformat()
        if int(r["t"]) == 0:
            system, code = LABEL.split("|")
            entries.append({"resource": {
                "resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": system, "code": code}]},
                "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": when,
                "valueString": r["label"]}})
        for name, (loinc, unit) in UNITS.items():
            value = float(r[name])
            if name == "temp" and fahrenheit:
                value, unit = value * 9 / 5 + 32, "[degF]"
            q = {"value": value, "unit": unit, "system": "http://unitsofmeasure.org",
                 "code": unit}
            obs = {"resourceType": "Observation", "status": "final",
                   "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
                   "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": when,
                   "valueQuantity": q}
            if name == "sbp" and panel:
                obs["code"]["coding"][0]["code"] = "85354-9"
                del obs["valueQuantity"]
                obs["component"] = [
                    {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                     "valueQuantity": q},
                    {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                     "valueQuantity": {**q, "value": 70.0}}]
            entries.append({"resource": obs})
    if extra_code:
        entries.append({"resource": {
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": extra_code}]},
            "subject": {"reference": "Patient/" + seen[0]},
            "effectiveDateTime": t0.isoformat(), "valueQuantity": {"value": 1.0}}})
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                  "entry": entries}))
    return csv_path, bundle


def _stored(toml):
    from bedside.edge.config import load
    from bedside.edge.store import RecordStore
    from bedside.models import datasets

    cfg = load(toml)
    store = RecordStore(cfg.records_path)
    try:
        x, y = store.load(datasets.vitals_schema(60))
        return x, y, store.consent_counts(datasets.vitals_schema(60))
    finally:
        store.close()


def test_a_bundle_ingests_to_the_same_rows_as_the_csv(tmp_path, device, capsys):
    csv_path, bundle = _csv_and_bundle(tmp_path, panel=True)
    a, b = device("from-csv"), device("from-fhir")
    assert main(["edge", "ingest", str(csv_path), "--config", a, "--model", device.model]) == 0
    capsys.readouterr()
    assert main(["edge", "ingest", "--fhir", str(bundle), "--label-code", LABEL, "--config", b,
                 "--model", device.model, "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)
    assert report["added"] == 3 and report["columns"]["fhir"]["windows"] == 3
    xa, ya, _ = _stored(a)
    xb, yb, _ = _stored(b)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    from bedside.edge.config import load

    for f in load(b).data.rglob("*"):
        if f.is_file():
            assert b"Quackenbush" not in f.read_bytes() and b"pt-0" not in f.read_bytes(), f


def test_fahrenheit_temperatures_are_converted(tmp_path, device):
    csv_path, bundle = _csv_and_bundle(tmp_path, fahrenheit=True)
    a, b = device("c"), device("f")
    assert main(["edge", "ingest", str(csv_path), "--config", a, "--model", device.model]) == 0
    assert main(["edge", "ingest", "--fhir", str(bundle), "--label-code", LABEL, "--config", b,
                 "--model", device.model]) == 0
    np.testing.assert_allclose(_stored(a)[0], _stored(b)[0], rtol=1e-6)


def test_an_unknown_loinc_code_or_unit_is_refused_naming_it(tmp_path, device, capsys):
    _, bundle = _csv_and_bundle(tmp_path, extra_code="2339-0")  # glucose: not a model input
    toml = device("d")
    rc = main(["edge", "ingest", "--fhir", str(bundle), "--label-code", LABEL, "--config", toml,
               "--model", device.model])
    assert rc == 2 and "http://loinc.org|2339-0 is not one of the model's inputs" in \
        capsys.readouterr().err
    raw = json.loads(bundle.read_text())
    raw["entry"] = [e for e in raw["entry"] if "2339-0" not in json.dumps(e)]
    for e in raw["entry"]:
        q = e["resource"].get("valueQuantity")
        if q and q.get("code") == "Cel":
            q["code"] = q["unit"] = "K"
    bundle.write_text(json.dumps(raw))
    rc = main(["edge", "ingest", "--fhir", str(bundle), "--label-code", LABEL, "--config", toml,
               "--model", device.model])
    assert rc == 2 and "temp in unit 'K'" in capsys.readouterr().err
    from bedside.edge.config import load

    assert not load(toml).records_path.exists()


def test_a_consent_that_denies_keeps_the_patients_windows_out_of_training(tmp_path, device):
    _, bundle = _csv_and_bundle(tmp_path, deny=("pt-0",))
    toml = device("e")
    assert main(["edge", "ingest", "--fhir", str(bundle), "--label-code", LABEL, "--config",
                 toml, "--model", device.model]) == 0
    x, _, counts = _stored(toml)
    assert counts == {"train": 2, "inference_only": 1} and len(x) == 2


def test_without_a_consent_resource_windows_serve_inference_only(tmp_path, device, capsys):
    """Consent is never assumed from silence; and a withdrawal by MRN reaches FHIR rows."""
    _, bundle = _csv_and_bundle(tmp_path, consents=False)
    toml = device("g")
    assert main(["edge", "ingest", "--fhir", str(bundle), "--label-code", LABEL, "--config",
                 toml, "--model", device.model]) == 0
    assert _stored(toml)[2] == {"train": 0, "inference_only": 3}
    _, bundle = _csv_and_bundle(tmp_path / "h", deny=())
    toml = device("h")
    assert main(["edge", "ingest", "--fhir", str(bundle), "--label-code", LABEL, "--config",
                 toml, "--model", device.model]) == 0
    capsys.readouterr()
    assert main(["edge", "consent", "withdraw", "MRN-pt-1", "--config", toml]) == 0
    assert "1 stored record(s) excluded" in capsys.readouterr().out
    assert _stored(toml)[2] == {"train": 2, "inference_only": 1}
    err_bundle = json.loads(bundle.read_text())
    err_bundle["entry"][0]["resource"]["birthDate"] = "17/04/1931"  # invalid: not echoed
    bundle.write_text(json.dumps(err_bundle))
    assert main(["edge", "ingest", "--fhir", str(bundle), "--label-code", LABEL, "--config",
                 toml, "--model", device.model]) == 2
    err = capsys.readouterr().err
    assert "not a valid FHIR R4 Bundle" in err and "1931" not in err
