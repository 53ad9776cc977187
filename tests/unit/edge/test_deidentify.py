"""De-identification and consent at ingest: no Safe Harbor identifier reaches the store, the
logs, the outbox, the audit trail or the wire; a record without training consent never
influences an update."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest

from bedside.cli import main
from bedside.config import to_toml
from tests.fleet import seeded_fleet, start_mem

# One value of every Safe Harbor kind (45 CFR 164.514(b)(2)), each one unique and searchable.
IDENTIFIERS = {
    "name": "Zelda Quackenbush",
    "street": "742 Evergreen Terrace",
    "city": "Springfieldton",
    # ZIP+4: five bare digits turn up by chance in the hex digests records.db holds (a run
    # found "90210" inside one), which would fail the raw-byte search below for nothing
    "zip": "90210-4321",
    "birth_date": "1931-04-17",
    "admit_date": "2026-11-29",
    "phone": "+1-555-867-5309",
    "fax": "+1-555-867-5310",
    "email": "zelda.q@example.org",
    "ssn": "078-05-1120",
    "mrn": "MRN-77-31337",
    "health_plan": "HPB-99887766",
    "account": "ACCT-4455667788",
    "license": "DL-X9Y8Z7",
    "vehicle": "VIN1HGCM82633A004352",
    "device_serial": "SN-PACEMAKER-0042",
    "url": "https://zelda.example.org/me",
    "ip": "203.0.113.77",
    "fingerprint": "biometric-minutiae-7f3a",
    "photo": "photo-zelda-front.jpg",
    "other_code": "UNIQUE-CODE-Q1W2E3",
}


def _policy(tmp_path, features, label, extra=""):
    cols = {k: "drop" for k in IDENTIFIERS}
    cols["mrn"] = "pseudonymize"
    cols.update({f: "keep" for f in features})
    cols[label] = "keep"
    cols["consent"] = "consent"
    p = tmp_path / "deid.toml"
    p.write_text(to_toml({"columns": cols}) + extra)
    return p


def _with_identifiers(src, dest, consent=lambda i: "yes", mrn=lambda i: f"MRN-77-31337-{i}"):
    with src.open() as fh:
        rows = list(csv.reader(fh))
    header = rows[0] + [*IDENTIFIERS, "consent"]
    out = [header]
    for i, r in enumerate(rows[1:]):
        ids = {**IDENTIFIERS, "mrn": mrn(i)}
        out.append(r + [ids[k] for k in IDENTIFIERS] + [consent(i)])
    with dest.open("w", newline="") as fh:
        csv.writer(fh).writerows(out)
    return dest


def _fleet(tmp_path, i=0):
    fleet = seeded_fleet(tmp_path / "fed", clients=2, rounds=1)
    clinic = fleet.plan["clinics"][i]
    schema_names = _schema_names(fleet)
    policy = _policy(tmp_path, schema_names, "label")
    clinic["config"]["deidentify"] = {"policy": str(policy)}
    fleet.agent_toml(i).write_text(to_toml(clinic["config"]))
    (clinic["dir"] / "data" / "records.db").unlink()  # the demo stored it without a policy
    return fleet


def _ingest(fleet, data, *extra):
    return main(["edge", "ingest", str(data), "--config", str(fleet.agent_toml(0)), "--model",
                 str(fleet.work / "initial-model"), *extra])


def _schema_names(fleet):
    from bedside.manifest import load_manifest

    return [f.name for f in load_manifest(fleet.work / "initial-model").schema.features]


def _run(fleet):
    mf = start_mem(fleet)
    mf.run()
    return mf


def test_no_safe_harbor_identifier_is_stored_logged_audited_or_sent(tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    fleet = _fleet(tmp_path)
    clinic = fleet.plan["clinics"][0]
    data = _with_identifiers(clinic["dir"] / "records.csv", tmp_path / "zelda.csv")
    assert _ingest(fleet, data, "--json") == 0
    out = capsys.readouterr().out
    report = json.loads(out)
    assert report["added"] == clinic["rows"] and report["consent"]["train"] == clinic["rows"]
    assert report["columns"]["name"]["action"] == "removed"
    assert report["columns"]["mrn"]["action"].startswith("replaced by a keyed pseudonym")
    mf = _run(fleet)
    assert len(mf.aggregator.state.accepted(1)) == 2
    data_dir = clinic["dir"] / "data"
    places = {p.name: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    places.update({f"wire:{t}": payload for t, payload in mf.broker.published})
    places["stdout"] = out.encode()
    places["logs"] = "\n".join(r.getMessage() for r in caplog.records).encode()
    assert "audit.db" in places and "agent.db" in places and "records.db" in places
    for kind, value in IDENTIFIERS.items():
        needles = {value, value.lower()}
        if kind == "mrn":
            needles |= {f"{value}-{i}" for i in range(3)}
        for where, blob in places.items():
            for n in needles:
                assert n.encode() not in blob, f"{kind} ({n}) found in {where}"


def test_a_column_the_policy_does_not_name_is_refused_and_nothing_stored(tmp_path, capsys):
    fleet = _fleet(tmp_path)
    clinic = fleet.plan["clinics"][0]
    data = _with_identifiers(clinic["dir"] / "records.csv", tmp_path / "x.csv")
    text = data.read_text().splitlines()
    text = [text[0] + ",diagnosis_notes"] + [t + ",feels dizzy" for t in text[1:]]
    data.write_text("\n".join(text) + "\n")
    rc = _ingest(fleet, data)
    assert rc == 2
    assert "'diagnosis_notes' are not in the de-identification policy" in capsys.readouterr().err
    assert not (clinic["dir"] / "data" / "records.db").exists()


def test_a_kept_column_that_is_not_a_feature_is_refused(tmp_path, capsys):
    from bedside.edge.deidentify import Policy, apply
    from bedside.errors import DataError
    from bedside.schema import Feature, Schema

    p = tmp_path / "p.toml"
    p.write_text(to_toml({"columns": {"hr": "keep", "name": "keep", "y": "keep"},
                          "consent": {"default": "train"}}))
    schema = Schema(features=(Feature("hr"),), labels=("a", "b"))
    with pytest.raises(DataError, match="'name' is marked 'keep' but is not a model feature"):
        apply(Policy.load(p), p, ["hr", "name", "y"], [["1", "Zelda", "a"]], b"k" * 32, schema,
              "y")


def test_ages_over_89_are_top_coded_and_consent_dates_kept_as_years(tmp_path):
    from bedside.edge.deidentify import Policy, apply, pseudonym
    from bedside.schema import Feature, Schema

    p = tmp_path / "p.toml"
    p.write_text(to_toml({"columns": {"age": "top_code_90", "y": "keep", "mrn": "pseudonymize",
                                      "ok": "consent", "when": "consent_date"}}))
    schema = Schema(features=(Feature("age"),), labels=("a", "b"))
    r = apply(Policy.load(p), p, ["age", "y", "mrn", "ok", "when"],
              [["95", "a", "M1", "yes", "2024-03-02"], ["40", "b", "M2", "no", ""]],
              b"k" * 32, schema, "y")
    assert r.rows == [["90", "a"], ["40", "b"]] and r.header == ["age", "y"]
    assert r.report["age"]["changed"] == 1
    assert r.consent == [True, False] and r.consent_year == [2024, None]
    assert r.patients == [pseudonym(b"k" * 32, "M1"), pseudonym(b"k" * 32, "M2")]
    assert pseudonym(b"j" * 32, "M1") != r.patients[0]  # keyed: another device, another key


def test_a_record_without_training_consent_never_influences_an_update(tmp_path, capsys):
    """Seeded: clinic-1's round-1 update is identical with and without an extra record whose
    patient did not consent; that record is not among the training rows."""
    updates = []
    for with_extra in (False, True):
        fleet = _fleet(tmp_path / ("b" if with_extra else "a"))
        clinic = fleet.plan["clinics"][0]
        src = clinic["dir"] / "records.csv"
        if with_extra:  # one more row (a copy with other values), refused consent
            lines = src.read_text().splitlines()
            first = lines[1].split(",")
            first[0] = str(float(first[0]) * 1.01)
            src.write_text("\n".join([*lines, ",".join(first)]) + "\n")
        n = clinic["rows"]
        data = _with_identifiers(src, tmp_path / f"d{with_extra}.csv",
                                 consent=lambda i, n=n: "no" if i >= n else "yes")
        assert _ingest(fleet, data) == 0
        mf = _run(fleet)
        x, _ = mf.agents[0].store.load(mf.agents[0].models.manifest().schema)
        assert len(x) == n
        counts = mf.agents[0].store.consent_counts(mf.agents[0].models.manifest().schema)
        assert counts == {"train": n, "inference_only": 1 if with_extra else 0}
        from bedside.wire.envelope import decode

        mine = [p for t, p in mf.broker.published if t.endswith("/update/clinic-1")]
        updates.append(decode(mine[-1], mf.aggregator.devices).tensors)
        capsys.readouterr()
    assert updates[0] and updates[0].keys() == updates[1].keys()
    for k in updates[0]:
        np.testing.assert_array_equal(updates[0][k], updates[1][k])


def test_withdrawing_consent_removes_a_patient_from_future_training(tmp_path, capsys):
    fleet = _fleet(tmp_path)
    clinic = fleet.plan["clinics"][0]
    data = _with_identifiers(clinic["dir"] / "records.csv", tmp_path / "z.csv",
                             mrn=lambda i: "MRN-A" if i < 3 else f"MRN-{i}")
    toml = str(fleet.agent_toml(0))
    assert _ingest(fleet, data) == 0
    capsys.readouterr()
    assert main(["edge", "consent", "withdraw", "MRN-A", "--config", toml]) == 0
    out = capsys.readouterr().out
    assert "3 stored record(s) excluded" in out and "cannot forget" in out
    assert "MRN-A" not in out
    from bedside.edge.config import load
    from bedside.edge.store import RecordStore
    from bedside.manifest import load_manifest

    cfg = load(toml)
    schema = load_manifest(fleet.work / "initial-model").schema
    store = RecordStore(cfg.records_path)
    assert store.consent_counts(schema) == {"train": clinic["rows"] - 3, "inference_only": 3}
    store.close()
    from bedside.audit import tail

    assert tail(cfg.data / "audit.db", 1)[0]["action"] == "consent_withdrawn"
    assert b"MRN-A" not in (cfg.data / "audit.db").read_bytes()


def test_a_misaligned_row_is_refused_before_any_cell_is_picked(tmp_path):
    """An unquoted comma in a dropped name shifts every cell: refused, never stored shifted."""
    from bedside.edge.deidentify import Policy, apply
    from bedside.errors import DataError
    from bedside.schema import Feature, Schema

    p = tmp_path / "p.toml"
    p.write_text(to_toml({"columns": {"name": "drop", "mrn": "pseudonymize", "hr": "keep",
                                      "y": "keep"}, "consent": {"default": "train"}}))
    schema = Schema(features=(Feature("hr"),), labels=("a", "b"))
    header = ["name", "mrn", "hr", "y"]
    with pytest.raises(DataError, match=r"row 1 .* 5 fields but the header has 4") as e:
        apply(Policy.load(p), p, header, [["Quackenbush", " Zelda", "MRN-1", "80", "a"]],
              b"k" * 32, schema, "y")
    assert "Zelda" not in str(e.value) and "MRN-1" not in str(e.value)
    with pytest.raises(DataError, match="patient key column 'mrn' is missing"):
        apply(Policy.load(p), p, ["name", "hr", "y"], [["Z", "80", "a"]], b"k" * 32, schema,
              "y")
    p.write_text(to_toml({"columns": {"hr": "keep", "y": "keep", "when": "consent_date"},
                          "consent": {"default": "train"}}))
    with pytest.raises(DataError, match="not a date") as e:
        apply(Policy.load(p), p, ["hr", "y", "when"], [["80", "a", "17/04/1931"]], b"k" * 32,
              schema, "y")
    assert "1931" not in str(e.value)


def test_a_later_export_that_refuses_consent_wins_over_an_earlier_yes(tmp_path, capsys):
    fleet = _fleet(tmp_path)
    clinic = fleet.plan["clinics"][0]
    yes = _with_identifiers(clinic["dir"] / "records.csv", tmp_path / "yes.csv")
    no = _with_identifiers(clinic["dir"] / "records.csv", tmp_path / "no.csv",
                           consent=lambda i: "no" if i < 4 else "yes")
    assert _ingest(fleet, yes, "--json") == 0
    assert json.loads(capsys.readouterr().out)["consent"]["train"] == clinic["rows"]
    assert _ingest(fleet, no, "--json") == 0
    r = json.loads(capsys.readouterr().out)
    assert r["added"] == 0 and r["consent"] == {"train": clinic["rows"] - 4,
                                                "inference_only": 4}


def test_group_columns_are_kept_beside_trainable_records_only_and_must_be_coarse(tmp_path,
                                                                                 capsys):
    from bedside.edge.deidentify import MAX_GROUP_VALUES, Policy, apply
    from bedside.edge.store import RecordStore
    from bedside.errors import DataError
    from bedside.schema import Feature, Schema
    from bedside.tabular import table_from_rows

    p = tmp_path / "p.toml"
    p.write_text(to_toml({"columns": {"hr": "keep", "y": "keep", "band": "group", "sex": "group",
                                      "ok": "consent"}}))
    schema = Schema(features=(Feature("hr"),), labels=("a", "b"))
    header = ["hr", "y", "band", "sex", "ok"]
    rows = [["70", "a", "18-44", "F", "yes"], ["80", "b", "80+", "M", "no"],
            ["90", "b", "80+", "F", "yes"]]
    r = apply(Policy.load(p), p, header, rows, b"k" * 32, schema, "y")
    assert r.header == ["hr", "y"]  # never a model input
    assert r.attributes == [{"band": "18-44", "sex": "F"}, {"band": "80+", "sex": "M"},
                            {"band": "80+", "sex": "F"}]
    assert r.report["band"]["groups"] == 2
    store = RecordStore(tmp_path / "r.db")
    store.ingest(table_from_rows(p, r.header, r.rows, schema, "y"), schema, "t",
                 consent=r.consent, attributes=r.attributes)
    x, y, attrs = store.load_with_attributes(schema)  # the refused consent is not loaded
    assert x[:, 0].tolist() == [70.0, 90.0] and y.tolist() == [0, 1]
    assert attrs == [{"band": "18-44", "sex": "F"}, {"band": "80+", "sex": "F"}]
    store.close()
    many = [[str(i), "a", f"id-{i}", "F", "yes"] for i in range(MAX_GROUP_VALUES + 1)]
    with pytest.raises(DataError, match="'band' has 17 distinct values"):
        apply(Policy.load(p), p, header, many, b"k" * 32, schema, "y")


def test_ingest_groups_flag_without_a_policy(tmp_path, capsys):
    fleet = seeded_fleet(tmp_path / "fed", clients=2, rounds=1)
    clinic = fleet.plan["clinics"][0]
    src = clinic["dir"] / "records.csv"
    lines = src.read_text().splitlines()
    banded = [lines[0] + ",band"] + [f"{r},{'old' if i % 2 else 'young'}"
                                     for i, r in enumerate(lines[1:])]
    (tmp_path / "g.csv").write_text("\n".join(banded) + "\n")
    assert _ingest(fleet, tmp_path / "g.csv", "--groups", "band", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["columns"]["band"]["action"].startswith("kept as a patient group attribute")
    from bedside.edge.config import load
    from bedside.edge.store import RecordStore
    from bedside.manifest import load_manifest

    store = RecordStore(load(fleet.agent_toml(0)).records_path)
    _, _, attrs = store.load_with_attributes(load_manifest(fleet.work / "initial-model").schema)
    store.close()
    assert {a["band"] for a in attrs if a} == {"old", "young"}  # filled in on stored rows too
    assert _ingest(fleet, tmp_path / "g.csv", "--groups", "nope") == 2
    assert "'nope'" in capsys.readouterr().err
