"""Shared fixtures. Exported models are built once per session (export takes about a second)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# Flower imported in this process (the in-memory Grid tests) never calls home either; the Flower
# processes the tests start get the same from bedside.transport.flower.flower_env.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"


def bedside_exe() -> str:
    """The ``bedside`` console script of the venv running the tests."""
    return str(VENV_BIN / "bedside")


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``exported(arch, dataset, **kw)`` -> a model directory, built once per argument set."""
    cache: dict[tuple, Path] = {}

    def make(arch: str, dataset: str, **kw: object) -> Path:
        key = (arch, dataset, tuple(sorted(kw.items())))
        if key not in cache:
            from bedside.models import datasets
            from bedside.models.pipeline import export_model

            ds_kw = {"n_windows": 600} if dataset == "vitals" else {}
            ds = datasets.load(dataset, **ds_kw)
            out = tmp_path_factory.mktemp(f"{dataset}-{arch}")
            export_model(ds, arch, out, **kw)  # type: ignore[arg-type]
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture()
def clean_env() -> dict[str, str]:
    """Environment for subprocesses: no debug tracebacks, no user site."""
    env = dict(os.environ)
    env.pop("BEDSIDE_DEBUG", None)
    env["PYTHONNOUSERSITE"] = "1"
    return env


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if the suite damaged the machine: /dev/null must still be a character device.

    (Issue 17: an output path written by rename turned a root-run suite's /dev/null into a regular
    file, after which non-root processes writing to it failed.)
    """
    import stat

    try:
        ok = stat.S_ISCHR(os.stat("/dev/null").st_mode)
    except OSError:
        ok = False
    if not ok:
        sys.stderr.write("\nERROR: /dev/null is no longer a character device after the test run; "
                         "a test or the code under test replaced it. Restore it (as root): "
                         "rm /dev/null; mknod -m 666 /dev/null c 1 3\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def pg() -> Iterator[Any]:
    """A PostgreSQL server for the session (tests.postgres), each test making its own database."""
    from tests.postgres import start_postgres

    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
