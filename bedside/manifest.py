"""Model manifests: the description that travels with every ONNX file.

A model directory holds ``model.onnx`` and ``manifest.json`` (and optionally ``model.int8.onnx``).
The manifest names the model, its integer version and parent, the architecture spec (so any side
can rebuild the same network), the input schema and output labels, the sha256 of every file, the
ONNX opset, the parity check against torch, test metrics and the privacy spent to produce it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bedside.constants import MANIFEST_FILE, MANIFEST_SCHEMA, MODEL_FILE
from bedside.errors import IntegrityError, ModelError
from bedside.files import atomic_write_bytes
from bedside.schema import Schema


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, block: int = 4 * 1024 * 1024) -> str:
    """The sha256 of a file, read ``block`` bytes at a time (memory bounded by the block)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Manifest:
    """What ``manifest.json`` holds. Unknown keys are kept in ``extra`` and written back."""

    name: str
    version: int
    schema: Schema
    sha256: str
    opset: int
    arch: dict[str, Any] | None = None  # None: imported, inference-only
    parent_version: int | None = None
    output: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, list[int]] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def trainable(self) -> bool:
        """A model can take part in federated training if its architecture is known."""
        return self.arch is not None and bool(self.parameters)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "manifest_schema": MANIFEST_SCHEMA,
            "name": self.name,
            "version": self.version,
            "parent_version": self.parent_version,
            "created_at": self.created_at,
            "arch": self.arch,
            "input_schema": self.schema.to_dict(),
            "output": self.output,
            "files": self.files,
            "sha256": self.sha256,
            "opset": self.opset,
            "parameters": self.parameters,
            "parity": self.parity,
            "metrics": self.metrics,
            "training": self.training,
            "privacy": self.privacy,
        }
        d.update(self.extra)
        return d

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n").encode()

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest") -> Manifest:
        if not isinstance(d, dict):
            raise ModelError(f"{source}: not a JSON object")
        if d.get("manifest_schema") != MANIFEST_SCHEMA:
            raise ModelError(
                f"{source}: manifest_schema {d.get('manifest_schema')!r} is not supported "
                f"(expected {MANIFEST_SCHEMA}); re-export the model with this Bedside version"
            )
        try:
            known = {"manifest_schema", "name", "version", "parent_version", "created_at", "arch",
                     "input_schema", "output", "files", "sha256", "opset", "parameters", "parity",
                     "metrics", "training", "privacy"}
            version = d["version"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ModelError(f"{source}: 'version' must be a positive integer, got {version!r}")
            return cls(
                name=str(d["name"]),
                version=version,
                parent_version=d.get("parent_version"),
                created_at=float(d.get("created_at", 0.0)),
                arch=d.get("arch"),
                schema=Schema.from_dict(d["input_schema"], f"{source}: input_schema"),
                output=dict(d.get("output", {})),
                files=dict(d.get("files", {})),
                sha256=str(d["sha256"]),
                opset=int(d["opset"]),
                parameters={k: list(v) for k, v in dict(d.get("parameters", {})).items()},
                parity=dict(d.get("parity", {})),
                metrics=dict(d.get("metrics", {})),
                training=dict(d.get("training", {})),
                privacy=dict(d.get("privacy", {})),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except KeyError as exc:
            raise ModelError(f"{source}: required key {exc.args[0]!r} is missing") from None
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{source}: {exc}") from None

    @classmethod
    def from_json(cls, data: bytes | str, source: str = "manifest") -> Manifest:
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(obj, source)


def load_manifest(model_dir: str | Path) -> Manifest:
    path = Path(model_dir) / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(
            f"{path}: no manifest; a model directory holds {MODEL_FILE} and {MANIFEST_FILE} "
            "(create one with 'bedside models export' or 'bedside models import')"
        ) from None
    return Manifest.from_json(data, str(path))


def verify_model_file(model_dir: str | Path, manifest: Manifest) -> bytes:
    """Read the ONNX file and check its sha256 against the manifest; return its bytes.

    Returning the verified bytes (rather than a path) closes the window in which the file could be
    swapped between the check and its use.
    """
    path = Path(model_dir) / manifest.files.get("model", {}).get("path", MODEL_FILE)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{path}: model file is missing") from None
    digest = sha256_bytes(data)
    if digest != manifest.sha256:
        raise IntegrityError(
            f"{path}: sha256 {digest[:16]}... does not match the manifest's "
            f"{manifest.sha256[:16]}...; the file was altered or belongs to another model. "
            "Refusing to load it: restore the model directory from the registry"
        )
    return data


def write_model_dir(model_dir: str | Path, onnx_bytes: bytes, manifest: Manifest,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write model + manifest into ``model_dir`` (atomically per file), filling in hashes."""
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest.sha256 = sha256_bytes(onnx_bytes)
    manifest.files["model"] = {"path": MODEL_FILE, "sha256": manifest.sha256,
                               "bytes": len(onnx_bytes)}
    for name, data in (extra_files or {}).items():
        atomic_write_bytes(out / name, data)
        key = manifest.files.get(name, {}).get("role") or name
        manifest.files[name] = {"path": name, "sha256": sha256_bytes(data), "bytes": len(data),
                                "role": key}
    atomic_write_bytes(out / MODEL_FILE, onnx_bytes)
    atomic_write_bytes(out / MANIFEST_FILE, manifest.to_json())
    return out
