"""``bedside flower superlink|supernode|run``: Bedside's federation on Flower's Deployment Engine.

Like the CLI root, this group only dispatches (the one place in the core package that names the
parts above it, and only inside a command): the aggregator's side (``superlink``, ``run``) is
``bedside.aggregator.flower`` and the device's (``supernode``) ``bedside.edge.flower``. Each
command reads the ``[flower]`` table of the file it is given and replaces itself with the Flower
process (``flower-superlink``, ``flower-supernode``, ``flwr run``), so signals and exit codes are
Flower's own.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bedside.transport.flower import require_flower


def build(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    p = sub.add_parser("superlink", help="run the federation's SuperLink (aggregator.toml "
                       "[flower]; 127.0.0.1 and TLS by default)")
    p.add_argument("--config", required=True, type=Path, metavar="aggregator.toml")
    p.set_defaults(func=_superlink)

    p = sub.add_parser("supernode", help="run this device's SuperNode (agent.toml [flower]); its "
                       "ClientApp is the edge agent")
    p.add_argument("--config", required=True, type=Path, metavar="agent.toml")
    p.set_defaults(func=_supernode)

    p = sub.add_parser("run", help="submit the federation of aggregator.toml to its SuperLink "
                       "(flwr run); the ServerApp is the aggregator service")
    p.add_argument("--config", required=True, type=Path, metavar="aggregator.toml")
    p.add_argument("--no-stream", action="store_true", help="return once the run is submitted "
                   "instead of streaming its log until it ends")
    p.set_defaults(func=_run)


def _exec(argv: list[str], env: dict[str, str]) -> int:
    print("bedside flower: " + " ".join(argv), file=sys.stderr, flush=True)
    os.execve(argv[0], argv, env)  # noqa: S606 (Flower's own executables, no shell)
    return 1  # pragma: no cover - execve does not return


def _superlink(ns: argparse.Namespace) -> int:
    from bedside.aggregator.config import load
    from bedside.aggregator.flower import superlink_command

    require_flower()
    return _exec(*superlink_command(load(ns.config)))


def _supernode(ns: argparse.Namespace) -> int:
    from bedside.edge.config import load
    from bedside.edge.flower import supernode_command

    require_flower()
    return _exec(*supernode_command(load(ns.config), ns.config.resolve()))


def _run(ns: argparse.Namespace) -> int:
    """``flwr run``, then the federation's own verdict: Flower's CLI exits 0 when the run ends,
    whether or not the ServerApp succeeded, so the aggregator's last status decides."""
    import subprocess
    import time

    from bedside.aggregator.config import load
    from bedside.aggregator.flower import federation_done, run_command, status_dir

    require_flower()
    cfg = load(ns.config)
    argv, env = run_command(cfg, stream=not ns.no_stream)
    print("bedside flower: " + " ".join(argv), file=sys.stderr, flush=True)
    started = time.time()
    code = subprocess.call(argv, env=env)
    if code != 0 or ns.no_stream:
        return code
    if not federation_done(cfg, since=started):
        print(f"bedside flower: error: the run ended but the federation did not finish; see the "
              f"ServerApp's log above and {status_dir(cfg)}", file=sys.stderr)
        return 1
    return 0
