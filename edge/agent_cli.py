"""``bedside edge enroll | ingest | run | status | rollback`` (registered by bedside.edge.cli)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bedside.cli import print_json, run_until_signalled
from bedside.errors import BedsideError, InputError


def register(sub: Any) -> None:
    p = sub.add_parser("enroll", help="enrol this device: with --token (or --token-file) in "
                       "one step (keys, broker certificate, pinned aggregator key, model, "
                       "agent.toml); with --config, by hand (creates the key, prints what the "
                       "data team needs)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--token", metavar="TOKEN", help="the line 'bedside aggregator invite' "
                   "printed (visible in shell history and ps: prefer --token-file)")
    g.add_argument("--token-file", type=Path, metavar="FILE", help="a file holding the token, "
                   "or an offline bundle ('aggregator invite --offline')")
    g.add_argument("--config", type=Path, metavar="agent.toml",
                   help="enrol by hand with an agent.toml you wrote")
    p.add_argument("--dir", type=Path, metavar="DIR", help="with a token: where agent.toml, "
                   "keys/ and tls/ go (default: the current directory)")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="with a token: records, ledger "
                   "and models (default: DIR/data)")
    p.add_argument("--record-epsilon", type=float, metavar="E", help="with a token: this "
                   "device's record-level budget (default: the federation's suggestion)")
    p.add_argument("--device-epsilon", type=float, metavar="E", help="with a token: this "
                   "device's device-level budget (default: the federation's suggestion)")
    p.add_argument("--encrypt-store", action="store_true", help="with a token: encrypt the "
                   "records and the outbox (SQLCipher; writes keys/store.key)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_enroll)

    p = sub.add_parser("ingest", help="validate a CSV against the model's schema and store its "
                       "rows locally (only features and label are kept)")
    p.add_argument("file", type=Path, metavar="FILE.csv", nargs="?")
    p.add_argument("--fhir", type=Path, metavar="BUNDLE.json", help="a FHIR R4 Bundle of "
                   "Patient, Observation (vital signs by LOINC) and Consent resources instead of "
                   "a CSV (docs/governance.md)")
    p.add_argument("--label-code", metavar="SYSTEM|CODE", help="with --fhir: the code of the "
                   "Observation that carries each window's label")
    p.add_argument("--config", required=True, type=Path, metavar="agent.toml")
    p.add_argument("--label", default="label", help="label column (default: label)")
    p.add_argument("--groups", metavar="COL[,COL]", help="without a de-identification policy: "
                   "patient-attribute columns (e.g. age_band,sex) kept beside each record for "
                   "per-group figures, never as model inputs (with a policy: mark them "
                   "\"group\")")
    p.add_argument("--model", type=Path, metavar="DIR",
                   help="model directory whose schema to use (default: the model in service)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_ingest)

    p = sub.add_parser("run", help="run the agent: serve the model, take part in rounds")
    p.add_argument("--config", required=True, type=Path, metavar="agent.toml")
    p.set_defaults(func=_run)

    p = sub.add_parser("status", help="model in service, privacy spent, outbox (offline)")
    p.add_argument("--config", required=True, type=Path, metavar="agent.toml")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)

    p = sub.add_parser("rotate-key", help="replace this device's signing key: the agent sends "
                       "the new key signed by the old one and switches once the aggregator "
                       "confirms")
    p.add_argument("--config", required=True, type=Path, metavar="agent.toml")
    p.set_defaults(func=_rotate_key)

    p = sub.add_parser("consent", help="withdraw a patient's training consent")
    csub = p.add_subparsers(title="actions", metavar="ACTION")
    c = csub.add_parser("withdraw", help="remove a patient from all future training (models "
                        "already released cannot forget)")
    c.add_argument("patient", metavar="PATIENT_ID", help="the id in the column the policy "
                   "pseudonymizes (e.g. the MRN)")
    c.add_argument("--config", required=True, type=Path, metavar="agent.toml")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_consent_withdraw)

    p = sub.add_parser("encrypt-store", help="encrypt this device's records.db and agent.db "
                       "in place with [storage] key_file (stop the agent first)")
    p.add_argument("--config", required=True, type=Path, metavar="agent.toml")
    p.set_defaults(func=_encrypt_store)

    p = sub.add_parser("rollback", help="put the previous model version back in service")
    p.add_argument("--config", required=True, type=Path, metavar="agent.toml")
    p.set_defaults(func=_rollback)


def _enroll(ns: argparse.Namespace) -> int:
    if ns.config is None:
        return _enroll_token(ns)
    from bedside.edge.config import load
    from bedside.wire.signing import SigningKey, VerifyKey

    cfg = load(ns.config)
    created = False
    if cfg.key.exists():
        key = SigningKey.load(cfg.key)
    else:
        key = SigningKey.generate()
        key.save(cfg.key)
        created = True
    pub_path = cfg.key.with_suffix(".pub")
    key.public.save(pub_path)
    from bedside.privacy.ledger import Ledger

    Ledger(cfg.ledger_path, cfg.budgets()).close()  # created now, with the budgets it enforces
    agg = VerifyKey.load(cfg.aggregator_key)
    info = {"device_id": cfg.device_id, "public_key_file": str(pub_path),
            "fingerprint": key.public.fingerprint, "key_created": created,
            "aggregator_fingerprint": agg.fingerprint,
            "aggregator_command": f"bedside aggregator enroll --config aggregator.toml "
                                  f"--device-id {cfg.device_id} --public-key {pub_path.name}"}
    if ns.json:
        print_json(info)
    else:
        print(f"device {cfg.device_id}: key {'created' if created else 'exists'} "
              f"(fingerprint {info['fingerprint']})\n"
              f"pinned aggregator key fingerprint: {agg.fingerprint} (check it with the "
              "aggregator's operator)\n"
              f"send {pub_path} to the aggregator's operator, who runs:\n  "
              f"{info['aggregator_command']}")
    return 0


def _enroll_token(ns: argparse.Namespace) -> int:
    from bedside.edge.enroll import enroll, read_token_file
    from bedside.enrollment import Package, Token
    from bedside.federation.report import strength

    source = read_token_file(ns.token_file) if ns.token_file else Token.parse(ns.token)
    privacy = {k: v for k, v in (("record_epsilon", ns.record_epsilon),
                                 ("device_epsilon", ns.device_epsilon)) if v is not None}
    info = enroll(source, ns.dir or Path.cwd(), data_dir=ns.data_dir, privacy=privacy,
                  encrypt=ns.encrypt_store)
    if ns.json:
        print_json(info)
        return 0
    if info["already"]:
        print(f"{info['device_id']} is enrolled in fleet {info['fleet']} already ({info['config']}"
              "); nothing done")
        return 0
    budgets = ", ".join(f"{k} {v}" + (f" ({strength(v)})" if k == "record_epsilon" else "")
                        for k, v in info["privacy"].items())
    print(f"enrolled {info['device_id']} in fleet {info['fleet']} (key {info['fingerprint']})\n"
          f"pinned aggregator key: {info['aggregator_fingerprint']}\n"
          f"model v{info['model_version']} installed; broker {info['broker']}"
          f"{' over TLS' if info['tls'] else ' (no TLS)'}\n"
          f"privacy: {budgets}; change it in {info['config']} before the first round if your "
          "privacy officer asks\n"
          + (f"ignored from the federation's suggestion (a device sets these itself): "
             f"{', '.join(info['ignored_privacy'])}\n" if info["ignored_privacy"] else "")
          + f"next: bedside edge ingest FILE.csv --config {info['config']}; then bedside edge run "
          f"--config {info['config']}")
    if isinstance(source, Package):
        print(f"{ns.token_file} holds this device's private keys: destroy it now")
    return 0


def _consent_withdraw(ns: argparse.Namespace) -> int:
    from bedside.edge.config import load
    from bedside.edge.deidentify import pseudonym
    from bedside.edge.store import RecordStore

    cfg = load(ns.config)
    if not ns.patient.strip():
        raise InputError("PATIENT_ID is empty")
    who = pseudonym(cfg.pseudonym_key(), ns.patient)
    store = RecordStore(cfg.records_path, cfg.store_key())
    try:
        rows = store.withdraw(who)
        unkeyed = store.unkeyed()
    finally:
        store.close()
    _audit(cfg, "consent_withdrawn", f"patient {who[:12]}", rows=rows)
    note = ("Models already trained and released cannot forget what they learned from these "
            "records; no future round will use them.")
    warn = (f"{unkeyed} stored record(s) carry no patient key (ingested without a policy that "
            "pseudonymizes one): a withdrawal cannot reach them; re-ingest them under a policy "
            "or remove them" if unkeyed else "")
    if ns.json:
        print_json({"patient": who[:12], "rows_excluded": rows, "rows_without_patient_key":
                    unkeyed, "note": note})
    else:
        found = (f"{rows} stored record(s) excluded" if rows else "no stored record matches "
                 "this id (check it); its records ingested later will be excluded")
        print(f"patient {who[:12]}... (pseudonym): {found} from all future training.\n{note}"
              + (f"\nwarning: {warn}" if warn else ""))
    return 0


def _encrypt_store(ns: argparse.Namespace) -> int:
    from bedside.edge.config import load
    from bedside.sqlite import encrypt_file

    cfg = load(ns.config)
    key = cfg.store_key()
    if key is None:
        raise InputError(f"{ns.config}: set [storage] key_file first (a file of 64 hex digits, "
                         "mode 0600: openssl rand -hex 32 > FILE)")
    for path in (cfg.records_path, cfg.state_path):
        done = encrypt_file(path, key)
        print(f"{path}: {'encrypted' if done else 'encrypted already (or absent)'}")
    print("free pages of the old plaintext files may remain on the disk: full-disk encryption "
          "covers them (docs/deploy.md)")
    return 0


def _rotate_key(ns: argparse.Namespace) -> int:
    from bedside.edge.config import load
    from bedside.wire.signing import SigningKey

    cfg = load(ns.config)
    current = SigningKey.load(cfg.key)
    nxt = cfg.key.with_name(cfg.key.name + ".next")
    if nxt.exists():
        new = SigningKey.load(nxt)
        print(f"a rotation to {new.public.fingerprint} is already pending (from "
              f"{current.public.fingerprint}); the agent sends it when it runs")
        return 0
    new = SigningKey.generate()
    new.save(nxt)
    _audit(cfg, "key_rotation_requested", f"device {cfg.device_id}",
           new=new.public.fingerprint)
    print(f"new key {new.public.fingerprint} written to {nxt}; the running agent (bedside edge "
          f"run) sends it signed by the current key {current.public.fingerprint} and switches "
          "to it once the aggregator confirms (its log says so)")
    return 0


def _ingest(ns: argparse.Namespace) -> int:
    from bedside.edge.config import load
    from bedside.edge.store import RecordStore
    from bedside.edge.updater import ModelManager
    from bedside.manifest import load_manifest

    cfg = load(ns.config)
    if ns.model is not None:
        schema = load_manifest(ns.model).schema
    else:
        m = ModelManager(cfg.models_path).manifest()
        if m is None:
            raise InputError("no model in service yet to validate against: a device enrolled "
                             "with a token has one ('bedside edge enroll --token-file'); "
                             "otherwise start the agent once (it receives the model) or pass "
                             "--model DIR")
        schema = m.schema
    import hashlib
    import json

    from bedside.tabular import read_rows, table_from_rows

    if (ns.file is None) == (ns.fhir is None):
        raise InputError("give a CSV file or --fhir BUNDLE.json (one of them)")
    if ns.groups is not None:
        if ns.fhir is not None:
            raise InputError("--groups names CSV columns; a FHIR bundle carries no group "
                             "columns")
        if cfg.deidentify.policy is not None:
            raise InputError("--groups is for files without a de-identification policy; with "
                             f"one, mark the group columns \"group\" in {cfg.deidentify.policy}")
        if not [c for c in ns.groups.split(",") if c.strip()]:
            raise InputError("--groups names no column; give e.g. --groups age_band,sex")
    extra: dict[str, Any] = {}
    report: dict[str, Any] = {}
    if ns.fhir is not None:
        from bedside.edge.deidentify import Policy
        from bedside.edge.fhir import read_bundle

        if not ns.label_code:
            raise InputError("records for training need labels: --label-code SYSTEM|CODE names "
                             "the Observation that carries each window's label")
        policy = Policy.load(cfg.deidentify.policy) if cfg.deidentify.policy else None
        f = read_bundle(ns.fhir, schema, ns.label_code, cfg.pseudonym_key(create=True),
                        policy.consent_default if policy else None)
        header, rows, ns.file, ns.label = f.header, f.rows, ns.fhir, "label"
        extra = {"patients": f.patients, "consent": f.consent}
        report = {"fhir": {"action": "vital signs read by LOINC code", **f.report}}
    else:
        header, rows = read_rows(ns.file)
    digest = hashlib.sha256(json.dumps([header, *rows]).encode()).hexdigest()  # what was read
    if cfg.deidentify.policy is not None and ns.fhir is None:
        from bedside.edge.deidentify import Policy, apply

        d = apply(Policy.load(cfg.deidentify.policy), ns.file, header, rows,
                  cfg.pseudonym_key(create=True), schema, ns.label)
        header, rows, report = d.header, d.rows, d.report
        extra = {"patients": d.patients, "consent": d.consent, "consent_year": d.consent_year,
                 "attributes": d.attributes}
    elif ns.groups:
        from bedside.edge.deidentify import group_attributes

        cols = [c.strip() for c in ns.groups.split(",") if c.strip()]
        extra["attributes"] = group_attributes(ns.file, header, rows, cols)
        report = {c: {"action": "kept as a patient group attribute (not a model input)"}
                  for c in cols}
    table = table_from_rows(ns.file, header, rows, schema, ns.label)  # all valid, or nothing
    from bedside.wire.signing import SigningKey

    SigningKey.load(cfg.key)  # the audit entry is signed with it: fail before storing, not after
    store = RecordStore(cfg.records_path, cfg.store_key())
    try:
        # the file's digest, never its name (a clinic may have named it after a patient)
        result = store.ingest(table, schema, source=f"sha256:{digest[:16]}", **extra)
        consent = store.consent_counts(schema)
    finally:
        store.close()
    _audit(cfg, "records_ingested", "records", added=result.added, duplicates=result.duplicates,
           total=result.total, file_sha256=digest, **consent)
    if ns.json:
        print_json({"added": result.added, "duplicates": result.duplicates,
                    "total": result.total, "consent": consent, "columns": report})
        return 0
    for name, what in report.items():
        more = ", ".join(f"{k} {v}" for k, v in what.items() if k != "action")
        print(f"  {name}: {what['action']}" + (f" ({more})" if more else ""))
    print(f"{ns.file}: {result.added} record(s) stored, {result.duplicates} already present; "
          f"{result.total} in the store, {consent['train']} of them may train"
          + (f"; {result.consent_revoked} already stored now without training consent"
             if result.consent_revoked else "")
          + ("" if cfg.deidentify.policy is not None or ns.fhir is not None else
             f" (columns other than the model's features, {ns.label!r} and any --groups were not"
             " stored; no de-identification policy: every row counts as consented)"))
    return 0


def _run(ns: argparse.Namespace) -> int:
    from bedside.edge.agent import Agent
    from bedside.edge.config import load

    agent = Agent(load(ns.config))
    return run_until_signalled(agent.run, agent.transport.close)


def _status(ns: argparse.Namespace) -> int:
    from bedside.edge.config import load
    from bedside.edge.outbox import AgentState
    from bedside.edge.updater import ModelManager

    cfg = load(ns.config)
    models = ModelManager(cfg.models_path)
    state = AgentState(cfg.state_path, cfg.fleet, cfg.store_key())
    info: dict[str, Any] = {"device": cfg.device_id,
                            "serving_version": models.current_version(),
                            "latest_version": models.latest_version(),
                            "blocked_versions": sorted(models.blocked()),
                            "last_round": state.last_round(), "outbox": state.counts()}
    contributed = state.contributed()
    try:
        from bedside.privacy.ledger import Ledger

        if not cfg.ledger_path.exists() and not contributed:  # a device that never took part
            info["privacy"] = {"note": "no ledger yet: 'bedside edge enroll' or the agent's "
                                       "first start creates it with its budgets; nothing was "
                                       "released"}
        else:  # read only: the status never creates a ledger
            info["privacy"] = Ledger(cfg.ledger_path, cfg.budgets(), create=False).report()
    except BedsideError as exc:  # show a broken ledger instead of failing the status
        info["privacy"] = {"error": str(exc)}
    if ns.json:
        print_json(info)
    else:
        print(_status_text(cfg, info))
    return 0


def _status_text(cfg: Any, info: dict[str, Any]) -> str:
    """The device's status for a person: model, last round, outbox, both guarantees in words."""
    from bedside.federation.report import strength

    serving, latest = info["serving_version"], info["latest_version"]
    blocked = ", ".join(f"v{v}" for v in info["blocked_versions"]) or "none"
    lines = [f"{cfg.device_id} (fleet {cfg.fleet})",
             f"  model: {f'v{serving} serving' if serving else 'none installed yet'}"
             + (f" (newest v{latest}; blocked: {blocked})" if latest else "")]
    last = info["last_round"]
    lines.append(f"  last round: {f'{last[0]}, {last[1]}' if last else 'none yet'}")
    outbox = info["outbox"]
    lines.append("  outbox: " + (", ".join(f"{k} {v}" for k, v in sorted(outbox.items()))
                                 or "empty"))
    privacy = info["privacy"]
    if "note" in privacy:
        lines.append(f"  privacy: {privacy['note']}")
        return "\n".join(lines)
    if "error" in privacy:
        lines.append(f"  privacy ledger: UNAVAILABLE ({privacy['error']}); this device refuses "
                     "to take part until it is fixed")
        return "\n".join(lines)
    for unit, label in (("record", "record-level"), ("device", "device-level")):
        p = privacy.get(unit) or {}
        eps, budget = p.get("epsilon"), p.get("budget_epsilon")
        spent = "nothing released yet" if not p.get("releases") else (
            f"epsilon {eps:.3g}" if isinstance(eps, int | float) else "epsilon infinite")
        of = f" of a budget of {budget:g}" if budget is not None else " (no budget set)"
        lines.append(f"  {label} privacy: {spent}{of} (delta {p.get('delta', '?')}), "
                     f"{strength(eps) if p.get('releases') else 'no release'}")
        if p.get("guarantee"):
            lines.append(f"    {p['guarantee']}")
    return "\n".join(lines)


def _rollback(ns: argparse.Namespace) -> int:
    from bedside.edge.config import load
    from bedside.edge.updater import ModelManager

    cfg = load(ns.config)
    v = ModelManager(cfg.models_path).rollback()
    _audit(cfg, "model_rolled_back", f"model v{v}")
    print(f"model v{v} is back in service (a running agent picks it up at its next inference)")
    return 0


def _audit(cfg: Any, action: str, subject: str, **detail: Any) -> None:
    """An entry in the device's audit trail (<data_dir>/audit.db) for a command run by hand."""
    from bedside.audit import record

    record(cfg.data / "audit.db", cfg.key, f"device:{cfg.device_id}", action, subject, **detail)
