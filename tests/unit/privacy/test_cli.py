"""``bedside privacy ...`` (bedside.privacy.cli), through the real CLI root."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bedside.cli import main
from bedside.privacy import accountant as acct
from bedside.privacy.ledger import Budget, Ledger, Release

pytest.importorskip("dp_accounting")

BEDSIDE = str(Path(sys.executable).parent / "bedside")


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    rc = main(["privacy", *args, "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def test_epsilon_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "epsilon", "--noise-multiplier", "1.1", "--sample-rate", "0.01",
                   "--steps", "1000", "--delta", "1e-5")
    event = acct.sampled_gaussian(1.1, 0.01, 1000)
    assert out["epsilon"] == acct.epsilon(event, 1e-5)
    assert out["delta"] == 1e-5
    assert out["accountant"] == "pld"
    assert (out["noise_multiplier"], out["sample_rate"], out["steps"]) == (1.1, 0.01, 1000)
    assert out["epsilon_rdp"] == acct.epsilon(event, 1e-5, "rdp") > out["epsilon"]

    rdp = run_json(capsys, "epsilon", "--noise-multiplier", "1.1", "--sample-rate", "0.01",
                   "--steps", "1000", "--accountant", "rdp")
    assert rdp["accountant"] == "rdp" and rdp["epsilon"] == out["epsilon_rdp"]
    assert "epsilon_pld" not in rdp
    assert rdp["delta"] == 1e-5  # the default


def test_epsilon_text(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["privacy", "epsilon", "--noise-multiplier", "1.1", "--sample-rate", "0.01",
               "--steps", "1000"])
    out = capsys.readouterr().out
    assert rc == 0
    eps = acct.epsilon(acct.sampled_gaussian(1.1, 0.01, 1000), 1e-5)
    assert f"({eps:.4f}, 1e-05)-differential privacy" in out
    assert "PLD accountant; RDP gives" in out


def test_calibrate_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "calibrate", "--target-epsilon", "2", "--delta", "1e-5",
                   "--sample-rate", "0.01", "--steps", "500")
    z = out["noise_multiplier"]
    assert 0.99 * 2 <= out["epsilon"] <= 2.0
    assert acct.epsilon(acct.sampled_gaussian(z, 0.01, 500), 1e-5) == out["epsilon"]
    assert acct.epsilon(acct.sampled_gaussian(z * 0.99, 0.01, 500), 1e-5) > 2.0
    assert out["target_epsilon"] == 2.0 and out["accountant"] == "pld"

    rc = main(["privacy", "calibrate", "--target-epsilon", "2", "--sample-rate", "1",
               "--steps", "1"])
    assert rc == 0
    z1 = acct.calibrate(2.0, 1e-5, 1.0, 1)
    assert f"noise multiplier {z1:.4f} keeps 1 step(s)" in capsys.readouterr().out


def test_gaussian_sigma_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "gaussian-sigma", "--epsilon", "2.25", "--delta", "0.00040834087")
    assert out["sigma"] == pytest.approx(math.sqrt(2), rel=1e-6)  # pfl-research's test value
    out = run_json(capsys, "gaussian-sigma", "--epsilon", "1", "--sensitivity", "2")
    assert out["sigma"] == pytest.approx(2 * acct.gaussian_sigma(1.0, 1e-5))
    assert main(["privacy", "gaussian-sigma", "--epsilon", "1"]) == 0
    assert "Balle & Wang" in capsys.readouterr().out


def test_report(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "privacy.db"
    with Ledger(path, {"device": Budget(2.0, 1e-5), "record": Budget(8.0, 1e-6)}) as lg:
        lg.record([Release(0, "device", "gaussian", 5.0, 1.0, 1),
                   Release(0, "record", "sampled_gaussian", 1.0, 0.02, 50)])
        expected = lg.report()
    out = run_json(capsys, "report", "--ledger", str(path))
    assert out == {"ledger": str(path), "units": expected}
    assert main(["privacy", "report", "--ledger", str(path)]) == 0
    text = capsys.readouterr().out
    assert "device" in text and "of 2 at delta 1e-05" in text and "1 release(s)" in text


def test_report_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["privacy", "report", "--ledger", str(tmp_path / "missing.db")]) == 2
    assert "--ledger: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 100)
    assert main(["privacy", "report", "--ledger", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "unreadable or corrupt" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "10",
          "--delta", "2"], "--delta must be in (0, 1), got 2"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "10",
          "--delta", "0"], "--delta must be in (0, 1), got 0"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "1.5", "--steps", "10"],
         "--sample-rate must be in (0, 1], got 1.5"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0", "--steps", "10"],
         "--sample-rate must be in (0, 1], got 0"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "-3"],
         "--steps must be an integer >= 0, got -3"),
        (["epsilon", "--noise-multiplier", "0", "--sample-rate", "0.1", "--steps", "3"],
         "--noise-multiplier must be > 0, got 0"),
        (["calibrate", "--target-epsilon", "0", "--sample-rate", "0.1", "--steps", "3"],
         "--target-epsilon must be > 0, got 0"),
        (["calibrate", "--target-epsilon", "1", "--sample-rate", "0.1", "--steps", "0"],
         "--steps must be an integer >= 1, got 0"),
        (["gaussian-sigma", "--epsilon", "-1"], "--epsilon must be > 0, got -1"),
        (["gaussian-sigma", "--epsilon", "1", "--sensitivity", "0"],
         "--sensitivity must be > 0, got 0"),
    ],
)
def test_bad_values_exit_2_naming_the_option(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["privacy", *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["epsilon", "--noise-multiplier", "abc", "--sample-rate", "0.1", "--steps", "10"],
         "argument --noise-multiplier: must be a number, got 'abc'"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "nan", "--steps", "10"],
         "argument --sample-rate: must be a finite number, got 'nan'"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "1.5"],
         "argument --steps: must be an integer, got '1.5'"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "10",
          "--accountant", "moments"], "argument --accountant: invalid choice"),
        (["epsilon", "--sample-rate", "0.1", "--steps", "10"],
         "the following arguments are required: --noise-multiplier"),
    ],
)
def test_unparsable_values_exit_2_naming_the_option(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["privacy", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_no_subcommand_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["privacy"]) == 2
    out = capsys.readouterr().out
    for cmd in ("epsilon", "calibrate", "gaussian-sigma", "report"):
        assert cmd in out


def test_real_console_script(clean_env: dict[str, str]) -> None:
    res = subprocess.run(
        [BEDSIDE, "privacy", "epsilon", "--noise-multiplier", "1.1", "--sample-rate",
         str(256 / 60000), "--steps", "14063", "--delta", "1e-5", "--json"],
        capture_output=True, text=True, env=clean_env, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["epsilon"] == pytest.approx(2.39, abs=0.01)  # see test_accountant (TF-Privacy 3.01)
    assert out["epsilon_rdp"] == pytest.approx(2.597, abs=0.001)
    assert res.stderr == ""

    bad = subprocess.run([BEDSIDE, "privacy", "epsilon", "--noise-multiplier", "1",
                          "--sample-rate", "0.1", "--steps", "10", "--delta", "2"],
                         capture_output=True, text=True, env=clean_env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "bedside privacy: error: --delta must be in (0, 1), got 2"
