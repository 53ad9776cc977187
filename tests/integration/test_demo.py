"""``bedside demo`` end to end (separate processes, embedded broker), and loopback-only binding."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time

import numpy as np
import psutil
import pytest

from bedside.transport import free_port
from tests.conftest import bedside_exe

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _loopback(addr: str) -> bool:
    return ipaddress.ip_address(addr.split("%")[0]).is_loopback


def _run_watching_sockets(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess,
                                                                           list[tuple]]:
    """Run ``cmd`` and record every inet socket its process tree opens while it runs."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen: set[tuple] = set()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                for c in p.net_connections(kind="inet"):
                    seen.add((p.pid, c.status, c.laddr.ip if c.laddr else None,
                              c.raddr.ip if c.raddr else None))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), sorted(seen, key=str)


def test_default_demo(tmp_path, clean_env):
    done, sockets = _run_watching_sockets(
        [bedside_exe(), "demo", "--out", str(tmp_path / "demo"), "--noise-seed", "0", "--json"],
        clean_env)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(done.stdout)
    rounds = report["rounds"]
    # round 1 estimates the input scaling from the clinics' noised feature statistics
    assert [r["task"] for r in rounds] == ["statistics"] + ["train"] * 15
    assert all(r["participants"] == 5 and r["accepted"] == 5 for r in rounds)
    assert report["final"]["accuracy"] >= 0.95
    rec, dev = report["privacy"]["record"], report["privacy"]["device"]
    assert rec["epsilon_max"] <= 8.0 and rec["delta"] == 1e-5  # the statistics' share included
    assert rounds[0]["epsilon_record"] > 1.0  # what the statistics alone cost
    final = _final_manifest(tmp_path / "demo")
    stats = final.training["feature_statistics"]
    # a noised, clip-weighted count (a record whose vector is clipped counts partly)
    assert 0.6 * report["data"]["train_rows"] < stats["records"] < report["data"]["train_rows"] + 30
    first = final.schema.features[0]  # mean radius: not the placeholder of its public range
    assert first.loc != pytest.approx(first.max / 2) and first.scale < first.max / 4
    for c in report["data"]["clinics"]:  # every clinic's ledger holds the statistics release
        ledger = _ledger_notes(tmp_path / "demo" / c["id"])
        assert any("feature statistics" in n for n in ledger), c["id"]
    assert dev["epsilon"] > 10 and "weak guarantee" in dev["statement"]
    # central noise: the statement says whose honesty the guarantee rests on
    assert "only if the aggregator is honest" in dev["statement"]
    assert (tmp_path / "demo" / "report.json").exists()
    assert (tmp_path / "demo" / "report.png").stat().st_size > 10_000
    # every clinic holds only its own shard
    for c in report["data"]["clinics"]:
        assert sum(c["labels"]["histogram"].values()) == c["rows"]
    # nothing listened or talked beyond loopback
    assert sockets, "no sockets were observed"
    for pid, status, laddr, raddr in sockets:
        assert laddr is None or _loopback(laddr), (pid, status, laddr)
        assert raddr is None or _loopback(raddr), (pid, status, raddr)


def _final_manifest(work):
    from bedside.models.registry import Registry

    registry = Registry(work / "aggregator" / "data" / "registry")
    return registry.manifest(registry.latest())


def _ledger_notes(clinic_dir):
    import sqlite3

    (path,) = clinic_dir.glob("data/**/ledger.db")
    with sqlite3.connect(path) as db:
        return [n for (n,) in db.execute("SELECT note FROM releases")]


def test_demo_on_a_users_multiclass_csv(tmp_path, clean_env):
    rng = np.random.default_rng(7)
    centres = {"low": [-2, 0, 1, 0], "mid": [0, 2, -1, 1], "high": [2, -1, 0, 3]}
    lines = ["age,score_a,score_b,ratio,outcome"]
    for label, c in centres.items():
        for _ in range(120):
            v = np.array(c, dtype=float) + rng.normal(0, 0.7, 4)
            lines.append(f"{50 + 10 * v[0]:.1f},{v[1]:.3f},{v[2]:.3f},{v[3]:.3f},{label}")
    csv = tmp_path / "cohort.csv"
    csv.write_text("\n".join(lines) + "\n")
    done = subprocess.run([bedside_exe(), "demo", "--data", str(csv), "--label", "outcome",
                           "--clients", "3", "--rounds", "4", "--out", str(tmp_path / "demo"),
                           "--json"], capture_output=True, env=clean_env, timeout=280)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(done.stdout)
    assert report["data"]["dataset"].startswith("cohort")
    assert set(report["data"]["clinics"][0]["labels"]["histogram"]) == {"high", "low", "mid"}
    assert report["final"]["accuracy"] > 0.6  # three classes: chance is 1/3
    # its defaults: those of the built-in task of its shape, the batch from the planner
    assert "tuned for digits" in report["config"]["defaults"]
    assert "privacy planner" in report["config"]["defaults"]
    assert report["privacy"]["record"]["epsilon_max"] <= 8.0
    # allowed ranges inferred from the clinics' training rows, scaling from the noised statistics
    final = _final_manifest(tmp_path / "demo")
    assert "feature_statistics" in final.training
    age = final.schema.features[0]
    assert age.min is not None and age.max is not None and age.min < 40 < 60 < age.max
    assert 35 < age.loc < 65 and 3 < age.scale < 30  # about the cohort's mean and spread


def test_vitals_demo_reports_figures_per_patient_group(tmp_path, clean_env):
    """Per-group figures of the newest version on the data team's reference rows (age band and
    sex), the largest gap, the groups too small to judge, and what they cost: nothing; and of the
    last round's model from the clinics' own noised counts, with the epsilon they cost."""
    done = subprocess.run([bedside_exe(), "demo", "--dataset", "vitals", "--clients", "3",
                           "--rounds", "2", "--out", str(tmp_path / "demo"), "--json"],
                          capture_output=True, env=clean_env, timeout=280)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(done.stdout)
    fair = report["fairness"]["reference"]
    assert fair["group_by"] == ["age_band", "sex"] and fair["epsilon"] == 0.0
    assert sum(g["rows"] for g in fair["groups"].values()) == report["data"]["holdout_rows"]
    assert fair["largest_gap"] in fair["gaps"]
    assert all(not fair["groups"][g]["judged"] for g in fair["small_groups"])
    final = _final_manifest(tmp_path / "demo")
    assert final.metrics["holdout_groups"]["largest_gap"] == fair["largest_gap"]
    # the clinics' own noised counts, with what they cost (part of each clinic's epsilon)
    fleet = report["fairness"]["fleet"]
    assert fleet["devices"] == 3 and fleet["group_by"] == ["age_band", "sex"]
    assert fleet["model_version"] == final.version - 1  # the last round's model
    assert 0 < fleet["epsilon"] <= 0.1 * 8.0 + 1e-6 and fleet["delta"] == 1e-5
    assert fleet["epsilon"] < report["privacy"]["record"]["epsilon_max"] <= 8.0
    assert abs(sum(g["rows"] for g in fleet["groups"].values())
               - report["data"]["train_rows"]) < 10 * fleet["count_noise_std"] * 3
    assert final.metrics["fleet_groups"]["largest_gap"] == fleet["largest_gap"]


def test_demo_bad_input_exit_2(tmp_path, clean_env):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    done = subprocess.run([bedside_exe(), "demo", "--data", str(tmp_path / "x.csv"), "--label",
                           "nope", "--out", str(tmp_path / "d")], capture_output=True, text=True,
                          env=clean_env, timeout=120)
    assert done.returncode == 2
    assert "nope" in done.stderr and "Traceback" not in done.stderr


def test_broker_serve_binds_loopback_by_default(clean_env):
    port = free_port()
    proc = subprocess.Popen([bedside_exe(), "broker", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env)
    try:
        deadline = time.monotonic() + 30
        listening: list = []
        while time.monotonic() < deadline and not listening:
            listening = [c for c in psutil.Process(proc.pid).net_connections(kind="inet")
                         if c.status == psutil.CONN_LISTEN]
            time.sleep(0.1)
        assert listening, "the broker did not listen"
        assert all(_loopback(c.laddr.ip) for c in listening), listening
    finally:
        proc.terminate()
        proc.wait(20)
    assert proc.returncode == 0
