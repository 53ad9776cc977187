"""A content-addressed model registry on disk (the aggregator's source of truth for versions).

Layout::

    registry/
      objects/<sha256>.onnx          every ONNX file once, named by its digest
      versions/<N>/manifest.json     the manifest of version N
      versions/<N>/model.onnx        a hard link (or copy) of the object: each version directory
                                     is a model directory that the Predictor can load
      versions/<N>/server_state.safetensors  the aggregator's server-optimizer state after N
      versions/<N>/release.bsde      the signed release envelope that was announced, if any

Versions are integers and strictly increasing: adding a version that is not newer than the latest
is refused. Files are written atomically, the manifest last: the manifest is a version's commit
point, so a version directory without a manifest is an interrupted write and is ignored (and
overwritten by the next add). Everything a version needs to continue the federation (the model,
the server optimizer's state, the next clip norm in the manifest) is written before it, so a crash
at any moment leaves either the whole version or none of it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bedside.constants import MANIFEST_FILE, MODEL_FILE
from bedside.errors import IntegrityError, ModelError
from bedside.files import atomic_write_bytes, private_dir
from bedside.manifest import (
    Manifest,
    load_manifest,
    sha256_bytes,
    verify_model_file,
)

RELEASE_FILE = "release.bsde"
SERVER_STATE_FILE = "server_state.safetensors"


class Registry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for d in (self.root, self.root / "objects", self.root / "versions"):
            private_dir(d)  # the aggregator's data: its owner only

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

    def add(self, onnx_bytes: bytes, manifest: Manifest,
            server_state: dict[str, np.ndarray] | None = None) -> Path:
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
        if server_state:
            data = pack_tensors(server_state)
            atomic_write_bytes(vdir / SERVER_STATE_FILE, data)
            manifest.files["server_state"] = {"path": SERVER_STATE_FILE,
                                              "sha256": sha256_bytes(data), "bytes": len(data)}
        atomic_write_bytes(vdir / MANIFEST_FILE, manifest.to_json())  # the commit point
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

    def server_state(self, version: int) -> dict[str, np.ndarray]:
        """The server optimizer's state stored with ``version`` (empty if it has none)."""
        entry = self.manifest(version).files.get("server_state")
        if not entry:
            return {}
        data = (self.path(version) / SERVER_STATE_FILE).read_bytes()
        if sha256_bytes(data) != entry.get("sha256"):
            raise IntegrityError(f"{self.path(version) / SERVER_STATE_FILE}: sha256 does not "
                                 "match the manifest; restore the registry from backup")
        return unpack_tensors(data)


def pack_tensors(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return bytes(save({k: np.ascontiguousarray(v) for k, v in tensors.items()}))


def unpack_tensors(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return dict(load(data))
