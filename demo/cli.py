"""``bedside demo``: run a whole federation on one machine (see bedside.demo.run)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bedside.cli import print_json


def build(parser: argparse.ArgumentParser) -> None:
    from bedside.demo.run import MODES, DemoConfig

    d = DemoConfig()
    parser.add_argument("--clients", type=int, default=d.clients, help="number of clinics")
    parser.add_argument("--rounds", type=int, default=None,
                        help="training rounds (default: the task's, models/defaults.py)")
    parser.add_argument("--mode", choices=MODES, default=d.mode,
                        help="where update noise is added (central: aggregator; local: devices)")
    parser.add_argument("--target-epsilon", type=float, default=d.target_epsilon,
                        help="record-level DP-SGD budget of every clinic (delta 1e-5)")
    parser.add_argument("--noise-multiplier", type=float, default=None,
                        help="device-level noise multiplier on clipped updates (default: at most "
                        "0.2, and small enough that its noise on the averaged update is a "
                        "quarter of the clip norm for the model's size)")
    parser.add_argument("--clip-norm", type=float, default=None,
                        help="L2 clip of a clinic's update (default: the task's)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=["wdbc", "digits", "vitals"], default=d.dataset)
    src.add_argument("--data", type=Path, metavar="FILE.csv",
                     help="your own tabular CSV (binary or multi-class); needs --label")
    parser.add_argument("--label", help="label column of --data")
    parser.add_argument("--arch", choices=["logreg", "mlp", "cnn1d"], default=None,
                        help="model architecture (default: the task's, models/defaults.py)")
    parser.add_argument("--alpha", type=float, default=d.alpha,
                        help="Dirichlet concentration of the non-IID split (smaller: more skew)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="local epochs per round (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="expected DP-SGD batch, which sets the sampling rate (default: the "
                        "task's)")
    parser.add_argument("--lr", type=float, default=None,
                        help="local learning rate (default: the task's)")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="seed of the data split, clinic partition and initial weights")
    parser.add_argument("--noise-seed", type=int, default=None,
                        help="also seed every DP noise draw, for a reproducible run (never do this "
                        "in production; by default noise comes from the OS)")
    parser.add_argument("--out", type=Path, help="working directory (default: a new temp dir)")
    parser.add_argument("--transport", choices=["mqtt", "flower"], default=d.transport,
                        help="mqtt: the embedded broker (default); flower: a Flower SuperLink and "
                        "one SuperNode per clinic (Deployment Engine, 127.0.0.1)")
    parser.add_argument("--timeout", type=float, default=d.timeout,
                        help="seconds the whole federation may take (default: 300 over MQTT, "
                        "1200 over Flower)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_demo)


def _demo(ns: argparse.Namespace) -> int:
    import logging

    from bedside.demo.run import for_task, run
    from bedside.errors import InputError

    if not ns.verbose:  # the printed table is the demo's interface; -v shows the logs as well
        logging.getLogger().setLevel(logging.WARNING)

    if ns.label and ns.data is None:
        raise InputError("--label goes with --data FILE.csv")
    chosen = {k: v for k, v in (("arch", ns.arch), ("rounds", ns.rounds), ("epochs", ns.epochs),
                                ("batch_size", ns.batch_size), ("lr", ns.lr),
                                ("clip_norm", ns.clip_norm),
                                ("noise_multiplier", ns.noise_multiplier)) if v is not None}
    cfg = for_task(chosen, clients=ns.clients, mode=ns.mode, target_epsilon=ns.target_epsilon,
                   dataset=ns.dataset, data=ns.data, label=ns.label, alpha=ns.alpha,
                   seed=ns.seed, out=ns.out, timeout=ns.timeout, quiet=ns.json,
                   noise_seed=ns.noise_seed, transport=ns.transport)
    report = run(cfg)
    if ns.json:
        print_json(report)
    return 0
