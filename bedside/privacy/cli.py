"""``bedside privacy ...``: plan privacy budgets and read a device's ledger.

Commands::

    bedside privacy epsilon --noise-multiplier Z --sample-rate Q --steps T --delta D
    bedside privacy calibrate --target-epsilon E --delta D --sample-rate Q --steps T
    bedside privacy gaussian-sigma --epsilon E --delta D [--sensitivity S]
    bedside privacy report --ledger PATH
    bedside privacy plan --epsilon E --delta D --records N --rounds R [--batch B] [--epochs K]

Every command takes ``--json``. This module imports only argparse at load time: dp-accounting is
imported when a command runs. Bad values raise :class:`~bedside.errors.InputError` naming the
option, which the CLI root prints cleanly and turns into exit code 2.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from bedside.constants import DEFAULT_DELTA
from bedside.errors import InputError

ACCOUNTANT_CHOICES = ("auto", "rdp", "pld")


# ---------------------------------------------------------------------------------------------
# Option parsing: argparse ``type=`` callables whose errors name the problem; argparse prefixes
# the option ("argument --delta: must be a number, got 'abc'") and exits 2.
# ---------------------------------------------------------------------------------------------
def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _g(x: float) -> str:
    return f"{x:g}"


def _check_delta(value: float, option: str = "--delta") -> None:
    if not 0.0 < value < 1.0:
        raise InputError(f"{option} must be in (0, 1), got {_g(value)}")


def _check_sample_rate(value: float, option: str = "--sample-rate") -> None:
    if not 0.0 < value <= 1.0:
        raise InputError(f"{option} must be in (0, 1], got {_g(value)}")


def _check_steps(value: int, option: str = "--steps", minimum: int = 0) -> None:
    if value < minimum:
        raise InputError(f"{option} must be an integer >= {minimum}, got {value}")


def _check_positive(value: float, option: str) -> None:
    if not value > 0.0:
        raise InputError(f"{option} must be > 0, got {_g(value)}")


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------
def build(parser: argparse.ArgumentParser) -> None:
    """Add the ``privacy`` sub-commands to ``parser`` (called by the CLI root)."""
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser(
        "epsilon",
        help="epsilon of DP-SGD / DP-FedAvg: Poisson-sampled Gaussian steps",
        description="Epsilon of STEPS Poisson-sampled Gaussian steps (DP-SGD on a device, or "
        "rounds of DP-FedAvg), at DELTA. The noise multiplier is the noise standard deviation "
        "divided by the L2 sensitivity (the clip norm).",
    )
    _sampled_gaussian_options(p, noise=True)
    _accountant_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_epsilon)

    p = sub.add_parser(
        "calibrate",
        help="smallest noise multiplier that meets a target epsilon",
        description="Smallest noise multiplier whose epsilon after STEPS Poisson-sampled "
        "Gaussian steps is at most TARGET at DELTA.",
    )
    p.add_argument("--target-epsilon", required=True, type=_number, metavar="E",
                   help="the epsilon to stay within (> 0)")
    _sampled_gaussian_options(p, noise=False)
    _accountant_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser(
        "gaussian-sigma",
        help="noise of one analytic Gaussian release (Balle & Wang 2018)",
        description="Standard deviation of the analytic Gaussian mechanism (Balle and Wang, "
        "ICML 2018) for one (EPSILON, DELTA)-DP release of a value with L2 sensitivity S.",
    )
    p.add_argument("--epsilon", required=True, type=_number, metavar="E", help="epsilon (> 0)")
    p.add_argument("--delta", type=_number, default=DEFAULT_DELTA, metavar="D",
                   help=f"delta in (0, 1) (default {DEFAULT_DELTA:g})")
    p.add_argument("--sensitivity", type=_number, default=1.0, metavar="S",
                   help="L2 sensitivity of the released value (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_gaussian_sigma)

    p = sub.add_parser(
        "plan",
        help="a device's record-level DP-SGD plan, and a better one within the same budget",
        description="The noise multiplier, sample rate and steps a device with N records uses "
        "for R rounds of K local epochs at batch B within a record-level budget (the same "
        "planner the devices use), the noise on a step's averaged gradient, and, when the plan "
        "has too little data per step, a less noisy one within the same budget.",
    )
    p.add_argument("--epsilon", required=True, type=_number, metavar="E",
                   help="the record-level budget (> 0)")
    p.add_argument("--delta", type=_number, default=DEFAULT_DELTA, metavar="D",
                   help=f"delta in (0, 1) (default {DEFAULT_DELTA:g})")
    p.add_argument("--records", required=True, type=_integer, metavar="N",
                   help="the device's trainable records")
    p.add_argument("--rounds", required=True, type=_integer, metavar="R",
                   help="training rounds the federation plans")
    p.add_argument("--batch", type=_integer, default=16, metavar="B",
                   help="expected DP-SGD batch size (default 16, [training] batch_size)")
    p.add_argument("--epochs", type=_integer, default=1, metavar="K",
                   help="local epochs a round (default 1, [training] epochs)")
    p.add_argument("--parameters", type=_integer, metavar="P",
                   help="the model's parameter count: also judge a step's noise against the "
                   "largest gradient it can carry")
    _accountant_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_plan)

    p = sub.add_parser(
        "report",
        help="what a device's privacy ledger has spent, per unit",
        description="Epsilon spent, budget and remaining budget per privacy unit, read from a "
        "device's ledger file (read only; a missing or corrupt ledger is an error).",
    )
    p.add_argument("--ledger", required=True, type=Path, metavar="PATH",
                   help="the ledger file (privacy.db in the agent's data directory)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_report)


def _sampled_gaussian_options(p: argparse.ArgumentParser, *, noise: bool) -> None:
    if noise:
        p.add_argument("--noise-multiplier", required=True, type=_number, metavar="Z",
                       help="noise std / L2 sensitivity (> 0)")
    p.add_argument("--sample-rate", required=True, type=_number, metavar="Q",
                   help="probability that a unit takes part in a step, in (0, 1] "
                   "(batch size / records, or devices per round / devices)")
    p.add_argument("--steps", required=True, type=_integer, metavar="T",
                   help="number of steps (DP-SGD steps, or rounds)")
    p.add_argument("--delta", type=_number, default=DEFAULT_DELTA, metavar="D",
                   help=f"delta in (0, 1) (default {DEFAULT_DELTA:g})")


def _accountant_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--accountant", choices=ACCOUNTANT_CHOICES, default="auto",
                   help="rdp, pld, or auto: the tighter of the two (default)")


# ---------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------
def _epsilon(ns: argparse.Namespace) -> int:
    from bedside.cli import print_json
    from bedside.privacy.accountant import epsilon_report, sampled_gaussian

    _check_positive(ns.noise_multiplier, "--noise-multiplier")
    _check_sample_rate(ns.sample_rate)
    _check_steps(ns.steps)
    _check_delta(ns.delta)
    rep = epsilon_report(
        sampled_gaussian(ns.noise_multiplier, ns.sample_rate, ns.steps), ns.delta, ns.accountant
    )
    out: dict[str, Any] = {
        "epsilon": rep["epsilon"],
        "delta": rep["delta"],
        "accountant": rep["accountant"],
        "noise_multiplier": ns.noise_multiplier,
        "sample_rate": ns.sample_rate,
        "steps": ns.steps,
    }
    if "epsilon_rdp" in rep:
        out["epsilon_rdp"] = rep["epsilon_rdp"]
        out["epsilon_pld"] = rep["epsilon_pld"]
    if ns.json:
        print_json(out)
        return 0
    print(
        f"{ns.steps} step(s) of the Gaussian mechanism with noise multiplier "
        f"{_g(ns.noise_multiplier)} and sample rate {_g(ns.sample_rate)} satisfy "
        f"({_eps(out['epsilon'])}, {_g(ns.delta)})-differential privacy "
        f"({out['accountant'].upper()} accountant{_other(out)})."
    )
    return 0


def _calibrate(ns: argparse.Namespace) -> int:
    from bedside.cli import print_json
    from bedside.privacy.accountant import calibrate, epsilon_report, sampled_gaussian

    _check_positive(ns.target_epsilon, "--target-epsilon")
    _check_sample_rate(ns.sample_rate)
    _check_steps(ns.steps, minimum=1)
    _check_delta(ns.delta)
    z = calibrate(ns.target_epsilon, ns.delta, ns.sample_rate, ns.steps, ns.accountant)
    rep = epsilon_report(sampled_gaussian(z, ns.sample_rate, ns.steps), ns.delta, ns.accountant)
    out = {
        "noise_multiplier": z,
        "epsilon": rep["epsilon"],
        "target_epsilon": ns.target_epsilon,
        "delta": ns.delta,
        "accountant": rep["accountant"],
        "sample_rate": ns.sample_rate,
        "steps": ns.steps,
    }
    if ns.json:
        print_json(out)
        return 0
    print(
        f"noise multiplier {z:.4f} keeps {ns.steps} step(s) at sample rate {_g(ns.sample_rate)} "
        f"within epsilon {_g(ns.target_epsilon)} at delta {_g(ns.delta)} (achieved epsilon "
        f"{_eps(rep['epsilon'])}, {str(rep['accountant']).upper()} accountant)."
    )
    return 0


def _gaussian_sigma(ns: argparse.Namespace) -> int:
    from bedside.cli import print_json
    from bedside.privacy.accountant import gaussian_sigma

    _check_positive(ns.epsilon, "--epsilon")
    _check_delta(ns.delta)
    _check_positive(ns.sensitivity, "--sensitivity")
    sigma = gaussian_sigma(ns.epsilon, ns.delta, ns.sensitivity)
    out = {"sigma": sigma, "epsilon": ns.epsilon, "delta": ns.delta,
           "sensitivity": ns.sensitivity, "mechanism": "analytic_gaussian"}
    if ns.json:
        print_json(out)
        return 0
    print(
        f"add N(0, sigma^2) with sigma = {sigma:.6g} to a value with L2 sensitivity "
        f"{_g(ns.sensitivity)} for one ({_g(ns.epsilon)}, {_g(ns.delta)})-DP release "
        "(analytic Gaussian mechanism, Balle & Wang 2018)."
    )
    return 0


def _plan(ns: argparse.Namespace) -> int:
    from bedside.cli import print_json
    from bedside.errors import PrivacyError
    from bedside.privacy.planner import better, plan, poor

    _check_positive(ns.epsilon, "--epsilon")
    _check_delta(ns.delta)
    for option, value in (("--records", ns.records), ("--rounds", ns.rounds),
                          ("--batch", ns.batch), ("--epochs", ns.epochs)):
        _check_steps(value, option, minimum=1)
    if ns.parameters is not None:
        _check_steps(ns.parameters, "--parameters", minimum=1)
    try:
        asked = plan(ns.epsilon, ns.delta, ns.records, ns.rounds, ns.batch, ns.epochs,
                     accountant=ns.accountant)
    except PrivacyError as exc:
        raise InputError(f"no DP-SGD plan fits epsilon {_g(ns.epsilon)}: {exc}") from None
    alternative = better(asked, ns.parameters, accountant=ns.accountant)
    why = poor(asked, ns.parameters)
    if ns.json:
        print_json({"plan": asked.to_dict(ns.parameters), "poor": why or None,
                    "better": alternative.to_dict(ns.parameters) if alternative else None})
        return 0
    print(f"record-level DP-SGD for {ns.records:,} records, {ns.rounds} round(s), epsilon "
          f"{_g(ns.epsilon)} at delta {_g(ns.delta)}:")
    print("  " + _plan_text(asked, ns.parameters))
    if why:
        print(f"  poor: {why}")
    elif ns.parameters is not None:
        print("  a sound plan: a step's noise is below the largest gradient it can carry")
    else:
        print("  (give --parameters, the model's parameter count, to judge a step's noise "
              "against the largest gradient)")
    if alternative is not None:
        print("within the same budget, " + ("better:" if why else "less noisy per step:"))
        print("  " + _plan_text(alternative, ns.parameters))
    elif why:
        print("  no batch size or number of epochs fixes it within this budget: more records, "
              "fewer rounds or a larger budget would")
    return 0


def _plan_text(p: Any, parameters: int | None) -> str:
    text = (f"batch {p.batch_size} (sample rate {p.sample_rate:.4g}, expected batch "
            f"{p.expected_batch}), {p.epochs} epoch(s) a round: {p.steps_per_round} step(s) a "
            f"round, {p.total_steps:,} in all; noise multiplier {p.noise_multiplier:.4f} "
            f"(epsilon {_eps(p.achieved_epsilon)}); noise on each coordinate of a step's averaged "
            f"gradient {p.noise_per_coordinate:.4g} x the clip norm")
    if parameters is not None:
        text += (f", {p.noise_to_signal(parameters):.3g} x over {parameters:,} parameters "
                 "(1: as large as the largest gradient)")
    return text


def _report(ns: argparse.Namespace) -> int:
    from bedside.cli import print_json
    from bedside.privacy.ledger import Ledger

    path: Path = ns.ledger
    if not path.exists():
        raise InputError(f"--ledger: no such file: {path}")
    if not path.is_file():
        raise InputError(f"--ledger: not a file: {path}")
    with Ledger(path) as ledger:
        units = ledger.report()
    if ns.json:
        print_json({"ledger": str(path), "units": units})
        return 0
    print(f"privacy ledger {path}")
    if not units:
        print("  no budgets configured: every release is refused")
    for unit, u in units.items():
        last = "" if u["last_round"] is None else f", last round {u['last_round']}"
        print(
            f"  {unit:<7} epsilon {u['epsilon']:.4f} of {_g(u['budget_epsilon'])} at delta "
            f"{_g(u['delta'])} (remaining {u['remaining_epsilon']:.4f}); {u['releases']} "
            f"release(s) over {u['rounds']} round(s){last}; {u['accountant'].upper()} accountant"
        )
    return 0


def _eps(x: Any) -> str:
    return "inf" if math.isinf(float(x)) else f"{float(x):.4f}"


def _other(out: dict[str, Any]) -> str:
    if "epsilon_rdp" not in out:
        return ""
    other = "rdp" if out["accountant"] == "pld" else "pld"
    return f"; {other.upper()} gives {_eps(out['epsilon_' + other])}"
