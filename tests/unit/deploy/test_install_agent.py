"""``deploy/install-agent.sh`` run twice into a throw-away root: a working, enrolled agent, its
service enabled, and nothing done twice."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bedside.cli import main
from bedside.transport import free_port
from tests.fleet import mem_fleet

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "deploy" / "install-agent.sh"
pytestmark = pytest.mark.slow


def _source_copy(dest: Path) -> Path:
    """What a release tarball holds (pip builds in place: keep the checkout clean)."""
    keep = ("bedside", "models", "edge", "aggregator", "demo", "deploy", "pyproject.toml",
            "README.md")
    dest.mkdir()
    for name in keep:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)
    return dest


def _run(root: Path, src: Path, token: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    return subprocess.run(
        ["bash", str(src / "deploy" / "install-agent.sh"), "--root", str(root), "--user",
         getpass.getuser(), "--inference-only", "--encrypt-store", "--python",
         sys.base_prefix + "/bin/python3",
         "--token-file", str(token)],
        capture_output=True, text=True, timeout=600, env=env)


def test_install_agent_twice_leaves_one_working_enrolled_agent(tmp_path, capsys):
    mf = mem_fleet(tmp_path / "fed", clients=2, rounds=1,
                   aggregator={"enrollment": {"port": free_port(),
                                              "privacy": {"record_epsilon": 8.0}}})
    try:
        capsys.readouterr()
        assert main(["aggregator", "invite", "--config", str(mf.fleet.aggregator_toml),
                     "--device-id", "clinic-7"]) == 0
        token = tmp_path / "clinic-7.token"
        token.write_text(capsys.readouterr().out)
        src, root = _source_copy(tmp_path / "src"), tmp_path / "root"
        first = _run(root, src, token)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "enrolling" in first.stdout
        second = _run(root, src, token)  # the token is used up: enrollment must be skipped
        assert second.returncode == 0, second.stdout + second.stderr
        assert "already enrolled" in second.stdout and "enrolling" not in second.stdout
    finally:
        mf.aggregator.close()
    etc, venv = root / "etc/bedside", root / "opt/bedside/venv"
    assert (etc / "agent.toml").is_file()
    assert oct(etc.stat().st_mode & 0o777) == "0o700"
    assert not list(etc.glob(".token.*")), "the token's copy was left behind"
    unit = root / "etc/systemd/system/bedside-agent.service"
    assert unit.is_file()
    wants = root / "etc/systemd/system/multi-user.target.wants/bedside-agent.service"
    assert wants.is_symlink()  # enabled (the link is absolute, inside the installed system)
    assert os.readlink(wants) == "/etc/systemd/system/bedside-agent.service"
    # the venv's own bedside: no torch, the model installed, the agent configured
    r = subprocess.run([str(venv / "bin/python"), "-c", "import torch"], capture_output=True)
    assert r.returncode != 0, "torch in an --inference-only install"
    r = subprocess.run([str(venv / "bin/bedside"), "edge", "status", "--config",
                        str(etc / "agent.toml"), "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert '"clinic-7"' in r.stdout
    r = subprocess.run([str(venv / "bin/bedside"), "edge", "ingest",
                        str(mf.fleet.plan["clinics"][0]["dir"] / "records.csv"), "--config",
                        str(etc / "agent.toml")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # --encrypt-store: the records are encrypted at rest, with a key only the user reads
    assert (root / "var/lib/bedside/records.db").read_bytes()[:6] != b"SQLite"
    assert (etc / "keys/store.key").stat().st_mode & 0o077 == 0


def test_install_agent_explains_a_missing_token(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "--root", str(tmp_path / "root"), "--user",
                        getpass.getuser(), "--python", "/nonexistent/python3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not found" in r.stderr
    r = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr
