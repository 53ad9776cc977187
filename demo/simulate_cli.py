"""``bedside simulate``: many devices in one process over Mosquitto (see bedside.demo.simulate)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def build(parser: argparse.ArgumentParser) -> None:
    from bedside.demo.simulate import SimConfig

    d = SimConfig()
    parser.add_argument("--devices", type=int, default=d.devices,
                        help=f"simulated devices (default {d.devices})")
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument("--records", type=int, default=d.records,
                        help="records each device holds, drawn from the data set's training split")
    parser.add_argument("--dataset", choices=["wdbc", "digits", "vitals"], default=d.dataset)
    parser.add_argument("--target-epsilon", type=float, default=d.target_epsilon,
                        help="every device's record-level budget (delta 1e-5)")
    parser.add_argument("--out", type=Path, default=Path("simulate-output"),
                        help="working directory (replaced)")
    parser.add_argument("--timeout", type=float, default=d.timeout,
                        help="seconds the whole federation may take")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_simulate)


def _simulate(ns: argparse.Namespace) -> int:
    from bedside.demo.simulate import main_from_args

    if not ns.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    return main_from_args(ns)
