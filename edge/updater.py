"""Install new model versions on the device: verify, self-test, hot-swap, roll back.

Layout under the agent's data directory::

    models/v<N>/        model.onnx + manifest.json of version N
    models/current      symlink to the version in service (swapped atomically)

A release is installed only if it is signed by the pinned aggregator key (checked by the wire
decoder before this module sees it), its manifest's sha256 matches the ONNX bytes, its version is
newer than the current one (no downgrades from the network), it passes the Predictor's self-test,
and, when the device holds labelled records, it is not much worse on them than the current model
(``quality_tolerance``). Otherwise the current model stays in service. ``rollback`` returns to the
previous version on an operator's request.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from bedside.edge.predictor import Predictor
from bedside.errors import IntegrityError, ModelError
from bedside.manifest import Manifest, sha256_bytes, write_model_dir
from bedside.metrics import accuracy

log = logging.getLogger("bedside.edge.updater")
KEEP_VERSIONS = 3


class ModelManager:
    def __init__(self, root: str | Path, *, threads: int = 1) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.threads = threads
        self._predictor: Predictor | None = None

    @property
    def current_link(self) -> Path:
        return self.root / "current"

    def current_version(self) -> int | None:
        link = self.current_link
        if not link.is_symlink():
            return None
        name = os.readlink(link)
        return int(name[1:]) if name.startswith("v") and name[1:].isdigit() else None

    def predictor(self) -> Predictor | None:
        v = self.current_version()
        if v is None:
            return None
        if self._predictor is None or self._predictor.version != v:
            self._predictor = Predictor(self.root / f"v{v}", threads=self.threads)
        return self._predictor

    def manifest(self) -> Manifest | None:
        p = self.predictor()
        return p.manifest if p else None

    def model_bytes(self) -> bytes | None:
        from bedside.manifest import verify_model_file

        v = self.current_version()
        if v is None:
            return None
        d = self.root / f"v{v}"
        return verify_model_file(d, self.manifest())  # type: ignore[arg-type]

    def install(self, onnx_bytes: bytes, manifest_dict: dict[str, Any], version: int,
                records: tuple[np.ndarray, np.ndarray] | None = None,
                quality_tolerance: float | None = 0.15) -> Manifest:
        """Verify and install ``version``; raises (keeping the current model) if it is bad."""
        m = Manifest.from_dict(manifest_dict, "model release manifest")
        if m.version != version:
            raise IntegrityError(f"release says version {version} but its manifest says "
                                 f"{m.version}; refused")
        cur = self.current_version()
        if cur is not None and m.version <= cur:
            raise ModelError(f"model v{m.version} is not newer than the current v{cur}; refused "
                             "(no downgrades over the network; use 'bedside edge rollback')")
        digest = sha256_bytes(onnx_bytes)
        if digest != m.sha256:
            raise IntegrityError(f"model v{m.version}: sha256 {digest[:16]}... does not match its "
                                 f"signed manifest ({m.sha256[:16]}...); refused")
        staging = self.root / f".v{m.version}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        write_model_dir(staging, onnx_bytes, m)
        try:
            candidate = Predictor(staging, threads=self.threads)
            candidate.self_test()
            if records is not None and quality_tolerance is not None and len(records[0]):
                self._quality_gate(candidate, records, quality_tolerance)
        except Exception:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        final = self.root / f"v{m.version}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        self._point_to(f"v{m.version}")
        self._prune()
        log.info("model v%d installed and in service (was v%s)", m.version, cur)
        return m

    def _quality_gate(self, candidate: Predictor, records: tuple[np.ndarray, np.ndarray],
                      tolerance: float) -> None:
        current = self.predictor()
        if current is None:
            return
        x, y = records
        new_acc = accuracy(y, candidate.predict_proba(x))
        old_acc = accuracy(y, current.predict_proba(x))
        if new_acc < old_acc - tolerance:
            raise ModelError(f"model v{candidate.version} is worse on this device's records "
                             f"(accuracy {new_acc:.3f} vs {old_acc:.3f} for v{current.version}, "
                             f"tolerance {tolerance}); kept v{current.version}")

    def _point_to(self, name: str) -> None:
        tmp = self.root / ".current.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(name, tmp)
        os.replace(tmp, self.current_link)
        self._predictor = None

    def _versions(self) -> list[int]:
        return sorted(int(p.name[1:]) for p in self.root.iterdir()
                      if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit())

    def _prune(self) -> None:
        versions = self._versions()
        for v in versions[:-KEEP_VERSIONS]:
            shutil.rmtree(self.root / f"v{v}", ignore_errors=True)

    def rollback(self) -> int:
        """Put the previous installed version back in service; returns it."""
        cur = self.current_version()
        older = [v for v in self._versions() if cur is None or v < cur]
        if not older:
            raise ModelError("no earlier model version is kept on this device to roll back to")
        target = older[-1]
        Predictor(self.root / f"v{target}", threads=self.threads).self_test()
        self._point_to(f"v{target}")
        log.warning("rolled back from v%s to v%d", cur, target)
        return target
