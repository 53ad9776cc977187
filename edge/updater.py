"""Install new model versions on the device: verify, self-test, hot-swap, roll back.

Layout under the agent's data directory::

    models/<fleet>/v<N>/        model.onnx + manifest.json of version N (the last few are kept)
    models/<fleet>/current      symlink to the version that serves inference (swapped atomically)
    models/<fleet>/blocked.json versions an operator rolled back from: never installed again

A release is installed only if it is signed by the pinned aggregator key (checked by the wire
decoder before this module sees it), its manifest's sha256 matches the ONNX bytes, its version is
newer than every version installed before (no downgrades from the network) and not blocked, and it
passes the Predictor's self-test on the schema's reference rows. Such a version is kept, and the
device trains on it when a round asks for it.

Whether it also *serves* inference is a separate, local decision: when the device holds labelled
records, a version much less accurate on them than the one in service (``quality_tolerance``),
or one the records cannot even be run through (a value outside its allowed ranges), keeps the old
one serving. That comparison is computed on patient records, so its outcome never leaves the
device: it changes neither what the device sends, nor whether it takes part, nor the version its
status reports (the newest verified one); failures are logged without record values.
``rollback`` returns to the previous version on an operator's request and blocks the one left.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bedside.constants import MANIFEST_FILE, MODEL_FILE
from bedside.edge.predictor import Predictor
from bedside.errors import IntegrityError, ModelError
from bedside.federation.release import Golden, check_golden
from bedside.files import atomic_write_bytes, private_dir
from bedside.manifest import (
    Manifest,
    load_manifest,
    sha256_bytes,
    sha256_file,
    verify_model_file,
    write_model_dir,
)
from bedside.metrics import accuracy

log = logging.getLogger("bedside.edge.updater")
KEEP_VERSIONS = 3


class Refused(ModelError):
    """A release refused for a reason the device reports (``reason`` is a short code)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Installed:
    manifest: Manifest
    serving: bool
    note: str = ""


class ModelManager:
    def __init__(self, root: str | Path, *, threads: int = 1) -> None:
        self.root = Path(root)
        private_dir(self.root)
        self.threads = threads
        self._predictor: Predictor | None = None
        # Inference may run on other threads: they take the predictor under this lock and keep
        # using the object they got; a swap replaces it for the next caller only, so in-flight
        # predictions finish on the old session.
        self._lock = threading.Lock()

    # -- what is installed ---------------------------------------------------------------------
    @property
    def current_link(self) -> Path:
        return self.root / "current"

    def current_version(self) -> int | None:
        """The version serving inference."""
        link = self.current_link
        if not link.is_symlink():
            return None
        name = os.readlink(link)
        return int(name[1:]) if name.startswith("v") and name[1:].isdigit() else None

    def versions(self) -> list[int]:
        return sorted(int(p.name[1:]) for p in self.root.iterdir()
                      if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit())

    def latest_version(self) -> int | None:
        """The newest verified version on the device (what it trains on when asked)."""
        v = self.versions()
        return v[-1] if v else None

    def blocked(self) -> set[int]:
        try:
            return set(json.loads((self.root / "blocked.json").read_text()))
        except FileNotFoundError:
            return set()
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{self.root / 'blocked.json'} is unreadable ({exc})") from None

    def predictor(self) -> Predictor | None:
        """The Predictor of the version in service (thread-safe)."""
        with self._lock:
            v = self.current_version()
            if v is None:
                return None
            p = self._predictor
            if p is None or p.version != v:
                p = self._predictor = Predictor(self.root / f"v{v}", threads=self.threads)
            return p

    def manifest(self, version: int | None = None) -> Manifest | None:
        """Manifest of ``version`` (default: the one serving)."""
        v = self.current_version() if version is None else version
        if v is None or not (self.root / f"v{v}").is_dir():
            return None
        return load_manifest(self.root / f"v{v}")

    def model_bytes(self, version: int | None = None) -> bytes | None:
        """Verified ONNX bytes of ``version`` (default: the one serving)."""
        m = self.manifest(version)
        if m is None:
            return None
        return verify_model_file(self.root / f"v{m.version}", m)

    # -- installing ----------------------------------------------------------------------------
    def install(self, onnx_bytes: bytes | Path, manifest_dict: dict[str, Any], version: int,
                records: tuple[np.ndarray, np.ndarray] | None = None,
                quality_tolerance: float | None = 0.15, golden: Golden | None = None) -> Installed:
        """Verify and keep ``version``; serve it unless the local quality gate says otherwise.

        Raises (installing nothing) if the release is not what it claims, fails its self-test or
        its golden vectors (:class:`Refused`, reason ``golden_vectors``). ``onnx_bytes`` may be
        a downloaded file (moved into the staging directory, never held in memory twice).
        """
        m = Manifest.from_dict(manifest_dict, "model release manifest")
        if m.version != version:
            raise IntegrityError(f"release says version {version} but its manifest says "
                                 f"{m.version}; refused")
        latest = self.latest_version()
        if latest is not None and m.version <= latest:
            raise Refused("older_version", f"model v{m.version} is not newer than v{latest} on "
                          "this device; refused (no downgrades over the network: an operator "
                          "rolls back with 'bedside models rollback')")
        if m.version in self.blocked():
            raise Refused("blocked", f"model v{m.version} was rolled back on this device; "
                          "refused")
        digest = (sha256_file(onnx_bytes) if isinstance(onnx_bytes, Path)
                  else sha256_bytes(onnx_bytes))
        if digest != m.sha256:
            raise IntegrityError(f"model v{m.version}: sha256 {digest[:16]}... does not match its "
                                 f"signed manifest ({m.sha256[:16]}...); refused")
        staging = self.root / f".v{m.version}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(onnx_bytes, Path):
            staging.mkdir(parents=True)
            size = onnx_bytes.stat().st_size
            os.replace(onnx_bytes, staging / MODEL_FILE)
            m.files["model"] = {"path": MODEL_FILE, "sha256": digest, "bytes": size}
            atomic_write_bytes(staging / MANIFEST_FILE, m.to_json())
        else:
            write_model_dir(staging, onnx_bytes, m)
        try:
            candidate = Predictor(staging, threads=self.threads)
            candidate.self_test()  # on the schema's reference rows: nothing from the records
            if golden is not None:
                why = run_golden(candidate, golden)[0]
                if why:
                    raise Refused("golden_vectors", f"model v{m.version}: {why}")
        except Exception:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        note = ""
        if records is not None and quality_tolerance is not None and len(records[0]):
            note = self._quality_gate(candidate, records, quality_tolerance)
        final = self.root / f"v{m.version}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        cur = self.current_version()
        serving = not note
        if serving:
            self._point_to(f"v{m.version}")
            log.info("model v%d installed and in service (was v%s)", m.version, cur)
        else:
            log.warning("model v%d installed for training; v%s keeps serving: %s", m.version,
                        cur, note)
        self._prune()
        return Installed(manifest=m, serving=serving, note=note)

    def _quality_gate(self, candidate: Predictor, records: tuple[np.ndarray, np.ndarray],
                      tolerance: float) -> str:
        """A reason to keep the current model serving, or "" (computed and kept locally)."""
        current = self.predictor()
        if current is None:
            return ""
        x, y = records
        try:
            new_acc = accuracy(y, candidate.predict_proba(x))
            old_acc = accuracy(y, current.predict_proba(x))
        except Exception:  # e.g. records outside the new model's allowed ranges
            # The model is still installed (for training: what the device publishes never
            # depends on its records); only serving stays with the old one. No record value
            # reaches the log.
            log.warning("the quality gate could not compare v%d with v%d on this device's "
                        "records (some fall outside the new model's input schema); v%d keeps "
                        "serving", candidate.version, current.version, current.version)
            return "the quality gate could not run on local records"
        if new_acc < old_acc - tolerance:
            return (f"less accurate on this device's records (accuracy {new_acc:.3f} vs "
                    f"{old_acc:.3f} for v{current.version}, tolerance {tolerance})")
        return ""

    def _point_to(self, name: str) -> None:
        tmp = self.root / ".current.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(name, tmp)
        with self._lock:
            os.replace(tmp, self.current_link)
            self._predictor = None

    def _prune(self) -> None:
        cur = self.current_version()
        for v in self.versions()[:-KEEP_VERSIONS]:
            if v != cur:
                shutil.rmtree(self.root / f"v{v}", ignore_errors=True)

    def withdraw(self, version: int, why: str) -> int | None:
        """Take ``version`` out (a release that failed on this device): block it, and if it
        serves, put the newest earlier version back. Returns the version now serving."""
        blocked = sorted(self.blocked() | {version})
        atomic_write_bytes(self.root / "blocked.json", json.dumps(blocked).encode())
        if self.current_version() == version:
            older = [v for v in self.versions() if v < version and v not in blocked]
            if older:
                self._point_to(f"v{older[-1]}")
            else:
                with self._lock:
                    self.current_link.unlink(missing_ok=True)
                    self._predictor = None
        shutil.rmtree(self.root / f"v{version}", ignore_errors=True)
        now = self.current_version()
        log.warning("model v%d withdrawn (%s); v%s serves", version, why, now)
        return now

    def rollback(self) -> int:
        """Put the previous installed version back in service and block the one left."""
        cur = self.current_version()
        older = [v for v in self.versions() if cur is None or v < cur]
        if not older:
            raise ModelError("no earlier model version is kept on this device to roll back to")
        target = older[-1]
        Predictor(self.root / f"v{target}", threads=self.threads).self_test()
        if cur is not None:
            blocked = sorted(self.blocked() | {v for v in self.versions() if v >= cur})
            atomic_write_bytes(self.root / "blocked.json", json.dumps(blocked).encode())
            for v in blocked:  # versions rolled back from are not kept for training either
                shutil.rmtree(self.root / f"v{v}", ignore_errors=True)
        self._point_to(f"v{target}")
        log.warning("rolled back from v%s to v%d (blocked: v%s and newer)", cur, target, cur)
        return target


def run_golden(predictor: Predictor, golden: Golden) -> tuple[str, float]:
    """Run the golden rows: ("" or why they failed, milliseconds taken)."""
    import time

    t0 = time.perf_counter()
    try:
        probs = predictor.predict_proba(golden.inputs)
    except Exception as exc:  # a model that cannot run them fails them
        return f"golden vectors: the model failed to run them ({exc})", \
            (time.perf_counter() - t0) * 1000
    return check_golden(golden, probs), (time.perf_counter() - t0) * 1000

