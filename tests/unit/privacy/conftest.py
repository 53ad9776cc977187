"""Fixtures shared by the privacy tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture()
def rng() -> np.random.Generator:
    """A seeded generator: tests are reproducible; production uses ``secure_rng()``."""
    return np.random.default_rng(20240611)


@pytest.fixture()
def ledger_path(tmp_path: Path) -> Path:
    """Where a test's ledger lives (not created yet)."""
    return tmp_path / "device" / "privacy.db"
