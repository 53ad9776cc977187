"""The edge inference path never imports torch (nor the privacy accountant).

Two proofs: (1) in the project venv, after ``bedside edge infer`` runs, neither torch nor
dp_accounting is in ``sys.modules``; (2) in ``.venv-edge`` (made by ``make setup`` with only the
``edge`` extra), torch is not even importable and ``bedside edge infer`` still works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bedside.models import datasets
from tests.conftest import ROOT

EDGE_PY = ROOT / ".venv-edge" / "bin" / "python"


@pytest.fixture()
def wdbc_csv(tmp_path):
    ds = datasets.load("wdbc")
    datasets.to_csv(ds.subset(list(range(8))), tmp_path / "in.csv")
    return tmp_path / "in.csv"


def test_infer_does_not_import_torch(exported, wdbc_csv, clean_env, tmp_path):
    model = exported("mlp", "wdbc")
    code = (
        "import sys, json\n"
        "from bedside.cli import main\n"
        f"rc = main(['edge', 'infer', '--model', {str(model)!r}, '--input', {str(wdbc_csv)!r},"
        f" '--json', '--output', {str(tmp_path / 'out.json')!r}])\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'dp_accounting',"
        " 'scipy', 'opacus', 'sklearn'})\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=clean_env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"rc": 0, "heavy": []}


def test_infer_in_edge_only_venv(exported, wdbc_csv, clean_env):
    if not EDGE_PY.exists():
        if os.environ.get("CI"):
            pytest.fail(".venv-edge is missing: 'make setup' creates it")
        pytest.skip(".venv-edge not built (run 'make setup')")
    r = subprocess.run([str(EDGE_PY), "-c", "import torch"], capture_output=True, text=True,
                       env=clean_env, timeout=60)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    model = exported("mlp", "wdbc")
    r = subprocess.run([str(EDGE_PY), "-m", "bedside", "edge", "infer", "--model", str(model),
                        "--input", str(wdbc_csv), "--json"], capture_output=True, text=True,
                       env=clean_env, timeout=120)
    assert r.returncode == 0, r.stderr
    preds = json.loads(r.stdout)["predictions"]
    ds = datasets.load("wdbc")
    assert [p["label"] for p in preds] == [ds.schema.labels[k] for k in ds.y[:8]]
