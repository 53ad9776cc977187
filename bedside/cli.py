"""The ``bedside`` command: the root only dispatches.

Each part owns its sub-commands in its own ``cli`` module, which exposes ``build(parser)``. The root
imports only the module of the group that was asked for, so ``bedside edge infer`` never imports
torch or the privacy accountant. Exit codes: 0 ok, 1 failure, 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from bedside import __version__
from bedside.errors import BedsideError

# group name -> (module that owns it, one-line help). Order is the order of ``bedside --help``.
# A group may be made of several parts' modules (space-separated): the first builds it and returns
# its sub-command table, the others ``register`` their commands in it, so that ``bedside models
# push`` lives with the aggregator it drives while ``bedside.models`` imports nothing above it.
GROUPS: dict[str, tuple[str, str]] = {
    "edge": ("bedside.edge.cli",
             "run on a clinic device: infer, ingest records, enroll, run the agent"),
    "aggregator": ("bedside.aggregator.cli", "run the central aggregator service"),
    "models": ("bedside.models.cli bedside.aggregator.fleet_cli",
               "train, export, import and inspect models; list a registry; push models to the "
               "fleet, watch and roll back rollouts"),
    "privacy": ("bedside.privacy.cli", "plan privacy budgets: epsilon, calibrate, "
                "gaussian-sigma, a device's DP-SGD plan"),
    "keys": ("bedside.wire.cli", "generate and inspect Ed25519 signing keys"),
    "broker": ("bedside.transport.cli", "run the embedded MQTT broker on 127.0.0.1; certificates, "
               "ACL and revocation for Mosquitto"),
    "flower": ("bedside.transport.flower_cli", "run the federation on Flower: superlink, "
               "supernode, run"),
    "audit": ("bedside.audit_cli", "verify a device's or the aggregator's tamper-evident audit "
              "trail; show its last entries"),
    "demo": ("bedside.demo.cli", "run a whole federation on one machine and report it"),
    "simulate": ("bedside.demo.simulate_cli", "many devices in one process, over Mosquitto, "
                 "against the real aggregator: rounds, memory, timings"),
}

Handler = Callable[[argparse.Namespace], int]


def _root_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bedside",
        description="Bedside: privacy-preserving AI at the point of care.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<11} {h}" for n, (_, h) in GROUPS.items())
        + "\n\nRun 'bedside COMMAND --help' for the options of a command.",
    )
    p.add_argument("--version", action="version", version=f"bedside {__version__}")
    p.add_argument("command", nargs="?", choices=list(GROUPS), metavar="COMMAND")
    return p


def configure_logging(verbose: bool) -> None:
    """Bedside's log format on stderr (the CLI, and processes Flower starts for it)."""
    level = logging.DEBUG if verbose or os.environ.get("BEDSIDE_DEBUG") else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Third-party chatter stays at warning level unless debugging.
    for noisy in ("amqtt", "transitions", "onnxscript", "torch", "opacus", "absl", "httpx"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    root = _root_parser()
    if not args_list or args_list[0] not in GROUPS:
        ns = root.parse_args(args_list)  # handles --help, --version and unknown commands (exit 2)
        root.print_help()
        return 0 if ns.command is None and not args_list else 2

    group = args_list[0]
    module_name, help_text = GROUPS[group]
    parser = argparse.ArgumentParser(prog=f"bedside {group}", description=help_text)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    first, *more = module_name.split()
    sub = importlib.import_module(first).build(parser)
    for name in more:
        importlib.import_module(name).register(sub)
    ns = parser.parse_args(args_list[1:])
    func: Handler | None = getattr(ns, "func", None)
    if func is None:
        parser.print_help()
        return 2
    configure_logging(getattr(ns, "verbose", False))
    try:
        return int(func(ns) or 0)
    except BedsideError as exc:
        if os.environ.get("BEDSIDE_DEBUG"):
            raise
        print(f"bedside {group}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"bedside {group}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. '| head'): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def run_until_signalled(run: Callable[[threading.Event], object],
                        close: Callable[[], None] | None = None) -> int:
    """Run a service loop until SIGINT or SIGTERM sets its stop event, then clean up."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        run(stop)
    finally:
        if close is not None:
            close()
    return 0


def print_json(obj: Any) -> None:
    """Print one JSON object on stdout (what ``--json`` promises)."""
    print(json.dumps(obj, indent=None, sort_keys=False, default=_json_default))


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover - numpy is a core dependency
        pass
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
