"""``bedside models push | status | rollback``: ship model versions to the fleet.

Registered into the ``bedside models`` group by the CLI root (``bedside.models`` imports nothing
above it). Each command reads ``aggregator.toml``; ``push`` and ``rollback`` stage a rollout in
the aggregator's ``state.db`` and the running service releases it (docs/models.md, *Pushing a
model to the fleet*).
"""

from __future__ import annotations

import argparse
import getpass
import time
from pathlib import Path
from typing import Any

from bedside.cli import print_json


def register(sub: Any) -> None:
    p = sub.add_parser("push", help="release a model directory to the fleet (signed, staged: "
                       "canary first, abort on failures)")
    p.add_argument("model", type=Path, metavar="DIR", help="model directory (model.onnx + "
                   "manifest.json, from 'bedside models export' or 'import')")
    _common(p, "--to")
    p.add_argument("--golden", type=Path, metavar="FILE.json",
                   help="test vectors: {\"inputs\": [[...]], \"outputs\": [[...]], "
                   "\"tolerance\": 1e-4} (default: the schema's reference rows and this model's "
                   "outputs on them)")
    p.add_argument("--tolerance", type=float, help="largest allowed difference on the golden "
                   "vectors (default: the file's, or 1e-4)")
    p.add_argument("--new-federation", action="store_true",
                   help="start a new federation on this model (another architecture or schema "
                   "allowed): released to every device, then its rounds count from 1 with a "
                   "fresh server optimizer; devices keep their records and their privacy ledger")
    p.add_argument("--min-agent-version", default="", metavar="X.Y.Z",
                   help="devices with an older bedside refuse the release")
    p.set_defaults(func=_push)

    p = sub.add_parser("rollback", help="release an earlier version again (a new version with "
                       "a higher counter: devices never go back on their own)")
    p.add_argument("--to", dest="version", required=True, type=int, metavar="VERSION")
    _common(p, "--target")
    p.set_defaults(func=_rollback)

    p = sub.add_parser("status", help="each device's model version and release state; the "
                       "rollouts' progress")
    p.add_argument("--config", required=True, type=Path, metavar="aggregator.toml")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)


def _common(p: argparse.ArgumentParser, target_flag: str) -> None:
    p.add_argument("--config", required=True, type=Path, metavar="aggregator.toml")
    p.add_argument(target_flag, dest="to", default="all", metavar="all|group:NAME|device:ID",
                   help="who gets it (default: all)")
    p.add_argument("--canary", metavar="N|P%", help="release to N devices (or P%% of the "
                   "target) first, the rest only if they succeed")
    p.add_argument("--abort-on-failure-rate", type=float, default=0.0, metavar="R",
                   help="stop the rollout when more than this share of the canary fails "
                   "(default 0: any failure)")
    p.add_argument("--probation", type=float, default=0.0, metavar="SECONDS",
                   help="after the swap, each device checks the model on the golden vectors "
                   "this long and rolls it back on failure")
    p.add_argument("--max-error-rate", type=float, default=0.0, metavar="R",
                   help="during probation: the share of failed checks that rolls back")
    p.add_argument("--max-latency-ms", type=float, default=1000.0, metavar="MS",
                   help="during probation: a check slower than this rolls back")
    p.add_argument("--new-schema", action="store_true",
                   help="the model's input schema differs from the federation's, on purpose "
                   "(devices then need records of the new schema to train)")
    p.add_argument("--wait", action="store_true", help="wait until the service has completed "
                   "or aborted the rollout (exit 1 if aborted or timed out)")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS")
    p.add_argument("--json", action="store_true")


def _open(config: Path) -> tuple[Any, Any, Any]:
    from bedside.aggregator.config import load
    from bedside.aggregator.releases import ReleaseStore
    from bedside.aggregator.state import State
    from bedside.models.registry import Registry

    cfg = load(config)
    return cfg, ReleaseStore(State(cfg.state_path).db), Registry(cfg.registry_path)


def _options(ns: argparse.Namespace) -> Any:
    from bedside.aggregator.rollout import PushOptions
    from bedside.errors import InputError
    from bedside.federation.release import Probation

    try:
        probation = Probation(seconds=ns.probation, max_error_rate=ns.max_error_rate,
                              max_latency_ms=ns.max_latency_ms)
    except Exception as exc:
        raise InputError(f"--probation/--max-error-rate/--max-latency-ms: {exc}") from None
    return PushOptions(to=ns.to, canary=ns.canary, abort_on_failure_rate=ns.abort_on_failure_rate,
                       probation=probation, new_schema=getattr(ns, "new_schema", False),
                       min_agent_version=getattr(ns, "min_agent_version", ""),
                       pushed_by=getpass.getuser(),
                       new_federation=getattr(ns, "new_federation", False))


def _push(ns: argparse.Namespace) -> int:
    from bedside.aggregator.releases import read_golden
    from bedside.aggregator.rollout import stage_push

    cfg, store, registry = _open(ns.config)
    golden = read_golden(ns.golden, ns.tolerance) if ns.golden else None
    rid = stage_push(cfg, store, registry, ns.model, _options(ns), golden)
    from bedside.aggregator.cli import audit_entry

    audit_entry(cfg, "push_staged", f"rollout {rid}", to=ns.to, canary=ns.canary,
           model=str(ns.model.name))
    return _staged(ns, store, rid)


def _rollback(ns: argparse.Namespace) -> int:
    from bedside.aggregator.rollout import stage_rollback

    cfg, store, registry = _open(ns.config)
    rid = stage_rollback(cfg, store, registry, ns.version, _options(ns))
    from bedside.aggregator.cli import audit_entry

    audit_entry(cfg, "rollback_staged", f"rollout {rid}", to=ns.to, version=ns.version)
    return _staged(ns, store, rid)


def _staged(ns: argparse.Namespace, store: Any, rid: int) -> int:
    from bedside.aggregator.releases import wait_for_rollout

    r = store.get(rid)
    if ns.wait:
        r = wait_for_rollout(store, rid, ns.timeout)
    if ns.json:
        print_json(r.to_dict())
    elif not ns.wait:
        print(f"rollout {rid} staged ({r.origin} to {r.target.spec}"
              f"{f', canary {ns.canary}' if ns.canary else ''}). The aggregator service releases "
              "it (start it with 'bedside aggregator serve' if it is not running); follow it "
              f"with 'bedside models status --config {ns.config}'")
    else:
        print(f"rollout {rid}: {r.status}" + (f" ({r.reason})" if r.reason else "")
              + (f", release {r.counter}, model v{r.version}" if r.counter else ""))
    return 0 if not ns.wait or r.status == "complete" else 1


def _status(ns: argparse.Namespace) -> int:
    from bedside.aggregator.rollout import status

    cfg, store, _ = _open(ns.config)
    enrolled = sorted(p.stem for p in cfg.devices.glob("*.pub")) if cfg.devices.is_dir() else []
    st = status(store, enrolled)
    if ns.json:
        print_json(st)
        return 0
    print(f"{'device':<20} {'version':>7} {'release':>7}  state")
    for d in st["devices"]:
        state = d["state"] or "no report yet"
        if d["reason"]:
            state += f" ({d['reason']})"
        if not d["enrolled"]:
            state += " [not enrolled]"
        print(f"{d['device']:<20} {_dash(d['version']):>7} {_dash(d['counter']):>7}  {state}")
    if st["rollouts"]:
        print(f"\n{'rollout':>7} {'status':<9} {'origin':<8} {'release':>7} {'version':>7}  "
              "target, progress")
    for r in st["rollouts"]:
        rep = r.get("reports") or {}
        progress = ", ".join(f"{n} {k}" for k, n in rep.items() if n)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"]))
        print(f"{r['id']:>7} {r['status']:<9} {r['origin']:<8} {_dash(r['counter']):>7} "
              f"{_dash(r['version']):>7}  {r['target']}"
              + (f", canary {', '.join(r['canary'])}" if r["canary"] else "")
              + (f": {progress}" if progress else "") + f" (staged {when})"
              + (f"\n{'':>17}{r['reason']}" if r["reason"] else ""))
    return 0


def _dash(v: Any) -> str:
    return "-" if v is None else str(v)
