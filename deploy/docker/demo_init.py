"""The compose demo's one-shot set-up: the ``init`` service of ``deploy/docker/compose.yaml``.

It writes into the named volumes mounted at the directories below what a hospital's data team
and its clinics hold before a federation starts, with Bedside's own commands and the defaults
of ``bedside demo`` (WDBC, logistic regression, record-level DP-SGD within epsilon 8, central
noise):

* the aggregator's directory: its signing key; the broker CA (``ca/``: the CA key, which signs
  the broker certificate of each device that enrols, and the broker's, the aggregator's and the
  enrollment endpoint's certificates); version 1 of the model (untrained, exported with torch);
  the held-out reference set; ``aggregator.toml`` with an ``[enrollment]`` endpoint;
* Mosquitto's configuration (``bedside broker config``): TLS only, a client certificate
  required, the fleet's ACL, readable by Mosquitto's group and nobody else;
* each clinic's directory: its share of the records, already in its record store, and a
  single-use enrollment token (``enroll.token``, mode 0600). No clinic key is made here: each
  clinic makes its own when it enrols (``bedside-agent-start``, deploy/docker/agent-start.sh).

Run again on volumes it filled, it changes nothing (remove them to start over:
``docker compose down -v``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

FLEET = "demo"
READY = ".demo-ready"  # written last: the set-up is complete


def bedside(*args: str) -> str:
    """Run a ``bedside`` command; its standard output. A failure stops the set-up."""
    r = subprocess.run([sys.executable, "-m", "bedside", *args], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        raise SystemExit(f"bedside {args[0]} {args[1]} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


def share_with_broker(d: Path, gid: int) -> None:
    """Mosquitto (its own user, group ``gid``) reads the directory; nobody else does. The
    directory is set-group-id, so the ACL and CRL the aggregator rewrites there at each
    enrollment ([enrollment] broker_dir) stay readable by Mosquitto's group."""
    try:
        for p in (d, *d.iterdir()):
            os.chown(p, -1, gid)
    except PermissionError:
        raise SystemExit(f"cannot give group {gid} the broker's files in {d}: run this with that "
                         "group (compose: group_add)") from None
    os.chmod(d, 0o2750)  # noqa: S103 (group: Mosquitto's; others: nothing)
    for p in d.iterdir():
        os.chmod(p, 0o640 if p.suffix == ".key" else 0o644)


def check_empty(dirs: list[Path]) -> None:
    for d in dirs:
        if not d.is_dir():
            raise SystemExit(f"{d} does not exist: mount a volume there")
        if any(d.iterdir()):
            raise SystemExit(f"{d} is not empty, but the set-up did not finish: remove the "
                             "demo's volumes (docker compose down -v) and start again")


def parser() -> argparse.ArgumentParser:
    """The options; the defaults are the paths, names and ports of compose.yaml."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--aggregator-dir", type=Path, default=Path("/var/lib/bedside-demo/aggregator"))
    p.add_argument("--clinics-dir", type=Path, default=Path("/var/lib/bedside-demo"),
                   help="holds clinic-1, clinic-2, ... (one volume each)")
    p.add_argument("--broker-dir", type=Path, default=Path("/etc/bedside/mosquitto"),
                   help="Mosquitto's configuration, at the path Mosquitto reads it from")
    p.add_argument("--broker-gid", type=int, default=1883, help="Mosquitto's group")
    p.add_argument("--broker-data-dir", default="/mosquitto/data")
    p.add_argument("--broker-host", default="mosquitto", help="how clients reach the broker")
    p.add_argument("--broker-port", type=int, default=8883)
    p.add_argument("--broker-bind", default="127.0.0.1",
                   help="the address Mosquitto's TLS listener binds (compose.yaml: 0.0.0.0, "
                   "the container's addresses on the compose network)")
    p.add_argument("--aggregator-host", default="aggregator",
                   help="how devices reach the enrollment endpoint")
    p.add_argument("--enrollment-bind", default="127.0.0.1",
                   help="the address the enrollment endpoint binds (compose.yaml: 0.0.0.0)")
    p.add_argument("--enrollment-port", type=int, default=8471)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    agg, broker = ns.aggregator_dir, ns.broker_dir
    clinics = [ns.clinics_dir / f"clinic-{i}" for i in range(1, ns.clients + 1)]
    if (agg / READY).exists():
        print(f"the demo federation is set up already ({agg / READY}); nothing to do")
        return 0
    check_empty([agg, broker, *clinics])

    from bedside.config import to_toml
    from bedside.demo.run import DemoConfig, agent_table, aggregator_table, prepare
    from bedside.files import atomic_write_bytes

    cfg = DemoConfig(clients=ns.clients, rounds=ns.rounds, quiet=True)
    with tempfile.TemporaryDirectory(prefix="bedside-demo-") as tmp:
        work = Path(tmp)
        plan = prepare(cfg, work)  # data split, model v1, keys, record stores
        # the data team's part: key, model v1, reference set (the clinics' keys made by prepare
        # are not used: each clinic makes its own when it enrols)
        (agg / "keys" / "devices").mkdir(parents=True)
        for name in ("aggregator.key", "aggregator.pub"):
            shutil.copy2(work / "aggregator" / "keys" / name, agg / "keys" / name)
        shutil.copytree(work / "initial-model", agg / "initial-model")
        shutil.copy2(work / "aggregator" / "reference.csv", agg / "reference.csv")
        # each clinic's records, in its own record store (0700 directory, 0600 file)
        for c, info in zip(clinics, plan["clinics"], strict=True):
            (c / "data").mkdir(mode=0o700)
            shutil.copy2(info["dir"] / "data" / "records.db", c / "data" / "records.db")

    ca = agg / "ca"
    bedside("broker", "certs", "--out", str(ca), "--identity", "aggregator", "--broker-host",
            ns.broker_host, "--downloads-host", ns.aggregator_host, "--broker-group", "")
    bedside("broker", "config", "--fleet", FLEET,
            *[a for c in clinics for a in ("--device", c.name)], "--ca", str(ca),
            "--out", str(broker), "--listen", f"{ns.broker_bind}:{ns.broker_port}",
            "--data-dir", ns.broker_data_dir, "--broker-group", "")
    share_with_broker(broker, ns.broker_gid)

    table: dict[str, Any] = aggregator_table(cfg, FLEET, Path("initial-model"),
                                             Path("reference.csv"))
    table["mqtt"] = {"host": ns.broker_host, "port": ns.broker_port, "ca_file": "ca/ca.crt",
                     "cert_file": "ca/aggregator.crt", "key_file": "ca/aggregator.key"}
    table["rounds"]["min_participants"] = ns.clients  # the first round waits for every clinic
    table["enrollment"] = {
        "port": ns.enrollment_port, "host": ns.enrollment_bind,
        "url": f"https://{ns.aggregator_host}:{ns.enrollment_port}",
        "cert_file": "ca/downloads.crt", "key_file": "ca/downloads.key", "ca_dir": "ca",
        "broker": f"{ns.broker_host}:{ns.broker_port}", "broker_dir": str(broker),
        "privacy": agent_table(cfg, 1, FLEET)["privacy"],
    }
    config = agg / "aggregator.toml"
    atomic_write_bytes(config, to_toml(table).encode(), mode=0o640)

    for c in clinics:
        out = json.loads(bedside("aggregator", "invite", "--config", str(config), "--device-id",
                                 c.name, "--json"))
        atomic_write_bytes(c / "enroll.token", (out["token"] + "\n").encode(), mode=0o600)
    fingerprint = out["aggregator_fingerprint"]

    atomic_write_bytes(agg / READY, b"")
    shares = ", ".join(f"{c['id']} {c['rows']} records" for c in plan["clinics"])
    print(f"demo federation {FLEET!r} set up: {shares}, {plan['holdout_rows']} held-out records "
          f"for the aggregator, {ns.rounds} rounds; aggregator key {fingerprint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
