"""Model releases: what the aggregator signs when it ships a model version, and the device's checks.

A *release* is the signed statement "devices T may run version V, whose ONNX file has this sha256
and size, from release counter C on". Federated rounds and operator pushes (``bedside models
push``, ``bedside models rollback``) produce releases on one version line and one counter line:

* ``counter`` grows with every release the aggregator signs, whatever produced it. A device
  refuses a release whose counter is not above the one it runs (an older release, or a replay of
  its current one with other content), so neither a replayed message nor an aggregator's old
  signature can take a device back. Going back is an explicit operator action
  (``bedside models rollback --to V``), which is a new release with a new, higher counter.
* ``target``: ``all`` or an explicit list of devices (resolved from ``group:NAME`` or
  ``device:ID`` when the release was made); a device not named refuses it (a broker that
  misroutes cannot widen a release).
* ``golden``: input rows and the outputs the ML engineer expects, with a tolerance. Every device
  runs them before it serves the model; a model whose outputs differ on the device's runtime is
  rolled back there and reported. They come from the schema's reference rows and synthetic rows
  within its allowed ranges, never from patient records.
* ``probation``: for how long, after the swap, the device keeps checking the new model on the
  golden rows (errors, latency) and rolls it back on its own when a limit is crossed.
* ``chunks``: the sha256 of every ``chunk_bytes`` slice of the file, so a model larger than one
  message is downloaded in verified pieces and a cut download resumes where it stopped.

This module is pure (no I/O): the aggregator builds releases with :func:`make_release`, the device
judges them with :func:`judge_release` and :func:`check_golden`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bedside.errors import InputError, ValidationError
from bedside.wire.signing import validate_device_id, validate_id

#: Default slice of a chunked download (and the most a device holds of it in memory at once).
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
#: The longest probation a release may ask for (a fleet-wide one holds rounds back meanwhile).
MAX_PROBATION_S = 7 * 24 * 3600
#: Release states a device reports (``report`` messages and its status).
STATES = ("downloading", "verified", "active", "rejected", "rolled_back")


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for p in str(text).split("."):
        digits = "".join(ch for ch in p if ch.isdigit()) if p else ""
        if not digits:
            break
        parts.append(int(digits))
        if not p.isdigit():  # 0.2.0rc1: stop at the pre-release tag
            break
    return tuple(parts)


def agent_version_ok(minimum: str, running: str) -> bool:
    """``running >= minimum`` for dotted release numbers (``0.3.1``); pre-release tags are
    ignored. An empty minimum accepts every agent."""
    if not minimum:
        return True
    return _version_tuple(running) >= _version_tuple(minimum)


@dataclass(frozen=True)
class Target:
    """Who a release is for: everyone, or the named devices."""

    spec: str  # what the operator asked for: all | group:NAME | device:ID
    devices: tuple[str, ...] | None  # None: every device of the fleet

    def includes(self, device_id: str) -> bool:
        return self.devices is None or device_id in self.devices

    @property
    def everyone(self) -> bool:
        return self.devices is None


def parse_target(spec: str, groups: Mapping[str, Sequence[str]],
                 enrolled: Sequence[str] | None = None) -> Target:
    """``all``, ``group:NAME`` (a group of ``aggregator.toml``'s ``[groups]``) or ``device:ID``."""
    spec = spec.strip()
    if spec == "all":
        return Target("all", None)
    kind, _, name = spec.partition(":")
    if kind == "group" and name:
        if name not in groups:
            known = ", ".join(sorted(groups)) or "none"
            raise InputError(f"--to {spec}: no device group {name!r} (groups in aggregator.toml's "
                             f"[groups]: {known})")
        devices = tuple(sorted(set(groups[name])))
    elif kind == "device" and name:
        validate_device_id(name, what=f"--to {spec}")
        devices = (name,)
    else:
        raise InputError(f"--to {spec!r}: expected all, group:NAME or device:ID")
    if not devices:
        raise InputError(f"--to {spec}: the group has no devices")
    if enrolled is not None:
        missing = sorted(set(devices) - set(enrolled))
        if missing:
            raise InputError(f"--to {spec}: not enrolled in this fleet: {', '.join(missing)}; "
                             "enroll them first ('bedside aggregator enroll')")
    return Target(spec, devices)


def check_groups(groups: Mapping[str, Any], where: str) -> None:
    """``[groups]`` of aggregator.toml: NAME = [device ids]."""
    for name, members in groups.items():
        validate_id(str(name), what=f"{where}: group name")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise InputError(f"{where}: group {name!r} must be a list of device ids")
        for m in members:
            validate_device_id(m, what=f"{where}: group {name!r}")


@dataclass(frozen=True)
class Golden:
    """Test vectors: inputs, the outputs expected from them, and the largest allowed difference."""

    inputs: np.ndarray  # [N, *feature shape] float32
    outputs: np.ndarray  # [N, classes] float32
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        if len(self.inputs) == 0 or len(self.inputs) != len(self.outputs):
            raise _bad("golden vectors: inputs and outputs must be non-empty and of "
                                  "the same length")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise _bad("golden vectors: tolerance must be a finite number >= 0")
        if not (np.isfinite(self.inputs).all() and np.isfinite(self.outputs).all()):
            raise _bad("golden vectors must be finite")

    def to_meta(self) -> dict[str, Any]:
        return {"inputs": np.asarray(self.inputs, np.float64).tolist(),
                "outputs": np.asarray(self.outputs, np.float64).tolist(),
                "tolerance": float(self.tolerance)}

    @classmethod
    def from_meta(cls, d: Any) -> Golden:
        if not isinstance(d, dict):
            raise _bad("release: 'golden' must be an object")
        try:
            return cls(np.asarray(d["inputs"], np.float32), np.asarray(d["outputs"], np.float32),
                       float(d.get("tolerance", 1e-4)))
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad(f"release: golden vectors unreadable ({exc})") from None


def check_golden(golden: Golden, probabilities: np.ndarray) -> str:
    """"" if ``probabilities`` match the golden outputs within tolerance, else why not."""
    got = np.asarray(probabilities, np.float64)
    want = np.asarray(golden.outputs, np.float64)
    if got.shape != want.shape:
        return f"golden vectors: output shape {list(got.shape)} != expected {list(want.shape)}"
    if not np.isfinite(got).all():
        return "golden vectors: the model produced non-finite outputs"
    worst = float(np.max(np.abs(got - want)))
    if worst > golden.tolerance:
        return f"golden vectors: largest difference {worst:.3g} > tolerance {golden.tolerance:g}"
    return ""


@dataclass(frozen=True)
class Probation:
    """After the swap: check the model on the golden rows every ``interval`` seconds for
    ``seconds``; roll back when the share of failed checks exceeds ``max_error_rate`` or a
    check's latency exceeds ``max_latency_ms``."""

    seconds: float = 0.0
    max_error_rate: float = 0.0
    max_latency_ms: float = 1000.0
    interval: float = 1.0

    def __post_init__(self) -> None:
        for name in ("seconds", "max_error_rate", "max_latency_ms", "interval"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise _bad(f"release: probation {name} must be a number >= 0")
        if self.seconds > MAX_PROBATION_S:
            raise _bad(f"release: probation of {self.seconds:g} s is longer than "
                       f"{MAX_PROBATION_S} s (7 days)")
        if self.max_error_rate > 1:
            raise _bad("release: probation max_error_rate must be <= 1")

    def to_meta(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "max_error_rate": self.max_error_rate,
                "max_latency_ms": self.max_latency_ms, "interval": self.interval}

    @classmethod
    def from_meta(cls, d: Any) -> Probation:
        if not isinstance(d, dict):
            raise _bad("release: 'probation' must be an object")
        try:
            return cls(**{k: float(d[k]) for k in ("seconds", "max_error_rate", "max_latency_ms",
                                                   "interval") if k in d})
        except (TypeError, ValueError) as exc:
            raise _bad(f"release: probation unreadable ({exc})") from None


@dataclass(frozen=True)
class Release:
    """The signed content of a release (the ``release`` object of a model envelope's meta)."""

    counter: int
    version: int
    sha256: str
    size: int
    origin: str
    target: Target
    golden: Golden | None = None
    probation: Probation = field(default_factory=Probation)
    min_agent_version: str = ""
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    chunks: tuple[str, ...] = ()
    url: str = ""  # where the chunks are served when the file is not inline
    new_schema: bool = False
    pushed_by: str = ""

    def to_meta(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "counter": self.counter, "version": self.version, "sha256": self.sha256,
            "size": self.size, "origin": self.origin, "target": self.target.spec,
            "devices": None if self.target.devices is None else list(self.target.devices),
            "probation": self.probation.to_meta(), "min_agent_version": self.min_agent_version,
            "chunk_bytes": self.chunk_bytes, "chunks": list(self.chunks), "url": self.url,
            "new_schema": self.new_schema, "pushed_by": self.pushed_by,
        }
        if self.golden is not None:
            d["golden"] = self.golden.to_meta()
        return d

    @classmethod
    def from_meta(cls, d: Any) -> Release:
        """Parse what a device received; any defect is a :class:`ValidationError`
        (reason ``bad_release``)."""
        if not isinstance(d, dict):
            raise _bad("model release without a 'release' object")
        try:
            devices = d.get("devices")
            if devices is not None and not (isinstance(devices, list)
                                            and all(isinstance(x, str) for x in devices)):
                raise TypeError("devices must be a list of ids")
            chunks = d.get("chunks", [])
            if not isinstance(chunks, list) or not all(isinstance(c, str) and len(c) == 64
                                                       for c in chunks):
                raise TypeError("chunks must be a list of sha256 hex digests")
            rel = cls(
                counter=_int(d["counter"]), version=_int(d["version"]), sha256=str(d["sha256"]),
                size=_int(d["size"]), origin=str(d.get("origin", "round")),
                target=Target(str(d.get("target", "all")),
                              None if devices is None else tuple(devices)),
                golden=Golden.from_meta(d["golden"]) if d.get("golden") is not None else None,
                probation=Probation.from_meta(d.get("probation", {})),
                min_agent_version=str(d.get("min_agent_version", "")),
                chunk_bytes=_int(d.get("chunk_bytes", DEFAULT_CHUNK_BYTES)),
                chunks=tuple(chunks), url=str(d.get("url", "")),
                new_schema=bool(d.get("new_schema", False)), pushed_by=str(d.get("pushed_by", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad(f"model release unreadable: {exc}") from None
        if rel.counter < 1 or rel.version < 1 or rel.size < 1 or rel.chunk_bytes < 1:
            raise _bad("model release: counter, version, size and chunk_bytes must be "
                                  "positive")
        if len(rel.sha256) != 64:
            raise _bad("model release: sha256 must be 64 hex digits")
        if rel.chunks and len(rel.chunks) != n_chunks(rel.size, rel.chunk_bytes):
            raise _bad("model release: the chunk list does not cover the file")
        return rel

    @property
    def inline_ok(self) -> bool:
        return not self.chunks


def _bad(message: str) -> ValidationError:
    return ValidationError("bad_release", message)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected an integer, got {v!r}")
    return v


def n_chunks(size: int, chunk_bytes: int) -> int:
    return max(1, -(-size // chunk_bytes))


def chunk_digests(data: bytes | memoryview, chunk_bytes: int) -> tuple[str, ...]:
    view = memoryview(data)
    return tuple(hashlib.sha256(view[i:i + chunk_bytes]).hexdigest()
                 for i in range(0, max(len(view), 1), chunk_bytes))


def judge_release(rel: Release, *, device_id: str, fleet: str, release_fleet: Any,
                  last_counter: int | None, last_sha256: str | None, agent_version: str,
                  blocked: set[int]) -> tuple[str, str]:
    """The device's decision on a release it received, before any download: ``("", "")`` to
    proceed, ``("ignore", why)`` for the release it already runs (re-delivered), or
    ``(reason, detail)`` to refuse it.

    Reasons: ``fleet``, ``not_targeted`` (ignored: not an error), ``older_counter``, ``replay``
    (the counter it runs, with other content), ``agent_too_old``, ``blocked``.
    """
    if release_fleet != fleet:
        return "fleet", f"release for fleet {release_fleet!r}"
    if not rel.target.includes(device_id):
        return "not_targeted", f"release {rel.counter} targets {rel.target.spec}"
    if last_counter is not None:
        if rel.counter == last_counter:
            if rel.sha256 == last_sha256:
                return "ignore", f"release {rel.counter} is the one this device runs"
            return "replay", (f"release counter {rel.counter} is the one this device runs, with "
                              "another model: a replay or a forgery")
        if rel.counter < last_counter:
            return "older_counter", (f"release counter {rel.counter} is older than the newest "
                                     f"this device handled ({last_counter}): a replay, or an "
                                     "aggregator that started over (a new federation needs a "
                                     "new fleet name, docs/models.md)")
    if not agent_version_ok(rel.min_agent_version, agent_version):
        return "agent_too_old", (f"needs agent {rel.min_agent_version} or newer (this is "
                                 f"{agent_version}); upgrade bedside on this device")
    if rel.version in blocked:
        return "blocked", f"model v{rel.version} was rolled back on this device"
    return "", ""
