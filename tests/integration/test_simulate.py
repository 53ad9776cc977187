"""``bedside simulate`` (issue 16, item 1): many devices in one process over Mosquitto, each with
its own records, ledger, key and TLS connection, against the real aggregator service."""

from __future__ import annotations

import json
import subprocess

import pytest

from bedside.demo.simulate import SimConfig, run
from bedside.errors import InputError
from bedside.privacy.ledger import Ledger
from tests.conftest import bedside_exe

pytestmark = pytest.mark.integration


def test_a_simulated_fleet_completes_its_rounds_over_mosquitto(tmp_path):
    report = run(SimConfig(devices=12, rounds=2, records=32, out=tmp_path / "sim", quiet=True,
                           timeout=600))
    assert [(r["status"], r["accepted"]) for r in report["rounds"]] == [("closed", 12)] * 2
    assert report["receipts"] == {"accepted": 24} and report["device_declines"] == {}
    assert report["final_model_version"] == 3 and report["connect_s"] > 0
    assert report["aggregator_peak_rss_mb"] > 50  # the service's own process, measured
    assert report["devices_process"]["per_device_kb"] > 0
    assert 0 < report["rounds"][-1]["record_epsilon_max"] <= 8.0
    # every device kept its own ledger: two DP-SGD releases each, within its budget
    for d in sorted((tmp_path / "sim" / "devices").iterdir()):
        ledger = Ledger(d / "ledger.db", {}, create=False)
        assert {r.round for r in ledger.releases("record")} == {1, 2}
        assert 0 < ledger.spent("record") <= 8.0
        ledger.close()
    assert json.loads((tmp_path / "sim" / "report.json").read_text())["rounds"]


def test_simulate_refuses_nonsense_with_exit_2(tmp_path):
    with pytest.raises(InputError, match="--devices"):
        run(SimConfig(devices=1, out=tmp_path / "x"))
    done = subprocess.run([bedside_exe(), "simulate", "--devices", "0", "--out",
                           str(tmp_path / "y")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--devices must be at least 2" in done.stderr
