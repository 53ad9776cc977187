"""A content-addressed model registry on disk (the aggregator's source of truth for versions).

Layout::

    registry/
      objects/<sha256>.onnx          every ONNX file once, named by its digest
      versions/<N>/manifest.json     the manifest of version N
      versions/<N>/model.onnx        a hard link (or copy) of the object: each version directory
                                     is a model directory that the Predictor can load
      versions/<N>/release.bsde      the signed release envelope that was announced, if any

Versions are integers and strictly increasing: adding a version that is not newer than the latest
is refused. Files are written atomically, the manifest last, so a version directory without a
manifest is an interrupted write and is ignored (and overwritten by the next add).
"""

from __future__ import annotations

import os
from pathlib import Path

from bedside.constants import MANIFEST_FILE, MODEL_FILE
from bedside.errors import IntegrityError, ModelError
from bedside.files import atomic_write_bytes
from bedside.manifest import (
    Manifest,
    load_manifest,
    sha256_bytes,
    verify_model_file,
)

RELEASE_FILE = "release.bsde"


class Registry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "versions").mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[int]:
        out = []
        for p in (self.root / "versions").iterdir():
            if p.name.isdigit() and (p / MANIFEST_FILE).exists():
                out.append(int(p.name))
        return sorted(out)

    def latest(self) -> int | None:
        v = self.versions()
        return v[-1] if v else None

    def path(self, version: int) -> Path:
        return self.root / "versions" / str(version)

    def add(self, onnx_bytes: bytes, manifest: Manifest) -> Path:
        latest = self.latest()
        if latest is not None and manifest.version <= latest:
            raise ModelError(
                f"registry {self.root}: version {manifest.version} is not newer than the latest "
                f"({latest}); versions are monotonic"
            )
        digest = sha256_bytes(onnx_bytes)
        obj = self.root / "objects" / f"{digest}.onnx"
        if not obj.exists():
            atomic_write_bytes(obj, onnx_bytes)
        vdir = self.path(manifest.version)
        vdir.mkdir(parents=True, exist_ok=True)
        link = vdir / MODEL_FILE
        link.unlink(missing_ok=True)
        try:
            os.link(obj, link)
        except OSError:
            atomic_write_bytes(link, onnx_bytes)
        manifest.sha256 = digest
        manifest.files["model"] = {"path": MODEL_FILE, "sha256": digest, "bytes": len(onnx_bytes)}
        atomic_write_bytes(vdir / MANIFEST_FILE, manifest.to_json())
        return vdir

    def manifest(self, version: int) -> Manifest:
        return load_manifest(self.path(version))

    def model_bytes(self, version: int) -> bytes:
        """The verified ONNX bytes of ``version`` (sha256 checked against its manifest)."""
        return verify_model_file(self.path(version), self.manifest(version))

    def put_release(self, version: int, envelope: bytes) -> None:
        atomic_write_bytes(self.path(version) / RELEASE_FILE, envelope)

    def release(self, version: int) -> bytes | None:
        p = self.path(version) / RELEASE_FILE
        return p.read_bytes() if p.exists() else None

    def verify_all(self) -> list[str]:
        """Check every version's file against its manifest; return the problems found."""
        problems = []
        for v in self.versions():
            try:
                self.model_bytes(v)
            except (IntegrityError, ModelError) as exc:
                problems.append(str(exc))
        return problems
