"""The aggregator's checks on a device's message, as pure functions over bytes and envelopes.

A driver receives a message on a device's update topic and:

1. :func:`open_update`: size, envelope, signature of an enrolled device, tensor names, dtypes and
   shapes, finite values (the wire decoder); raises a :class:`WireError` with a reason;
2. looks up what its store knows about the message (:class:`Prior`: was this nonce seen, did the
   sender already contribute to the round);
3. :func:`validate_update`: topic matches the signer, replay and duplicate, open round, round and
   model version, fleet, one update per device, decline reason, weight, L2 norm within the bound;
   returns a :class:`Verdict` or raises :class:`ValidationError`;
4. persists the verdict, acknowledges the message, sends a receipt.

Nothing here touches a network or a database, so the MQTT service, Flower's ServerApp and the
in-process simulation run the same checks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bedside.constants import KIND_UPDATE, NOISE_LOCAL, RESERVED_IDS
from bedside.errors import ValidationError
from bedside.federation.settings import RoundSettings
from bedside.privacy.mechanisms import clip_update, l2_norm
from bedside.wire.envelope import Envelope, decode
from bedside.wire.signing import KeyRing

MAX_WEIGHT = float(2**20)
NOISE_TAIL = math.sqrt(2.0 * math.log(1e9))  # P(||N(0, s^2 I_d)|| > s (sqrt d + t)) <= 1e-9
MAX_REASON = 64


def bounded_number(value: Any, lo: float, hi: float) -> float | None:
    """``value`` as a float if it is a JSON number in [lo, hi], else None.

    Never raises: a JSON integer may have thousands of digits, too many for a float.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if math.isfinite(f) and lo <= f <= hi else None


@dataclass(frozen=True)
class OpenRound:
    """The round a driver is collecting for."""

    round: int
    model_version: int
    settings: RoundSettings
    shapes: Mapping[str, tuple[int, ...]]
    classes: int = 2  # the model's output classes (the shape of per-group counts)

    @property
    def parameters(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes.values())

    def norm_bound(self) -> float:
        """The largest L2 norm an honest update can have.

        Central (and no) noise: the clip norm, within float tolerance. Local noise: the clip norm
        plus the noise, ``z C (sqrt(d) + t)`` with ``t`` chosen so that an honest update exceeds
        it with probability below 1e-9 (Gaussian concentration of the norm).
        """
        s = self.settings
        if s.statistics is not None:
            from bedside.federation.statistics import norm_bound

            return norm_bound(self.parameters, s.statistics)
        if s.noise == NOISE_LOCAL:
            z = s.update_noise_multiplier
            return s.clip_norm + z * s.clip_norm * (math.sqrt(self.parameters) + NOISE_TAIL)
        return s.clip_norm * (1.0 + 1e-5)


@dataclass(frozen=True)
class Prior:
    """What the driver's store knows about a message before it is judged."""

    nonce_round: int | None = None  # the round in which this (sender, nonce) was accepted
    nonce_digest: str | None = None  # and the sha256 of that message
    contributed: bool = False  # the sender already has an accepted update in the open round


@dataclass(frozen=True)
class Accepted:
    sender: str
    nonce: str
    digest: str
    weight: float
    norm: float
    tensors: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)  # reported privacy, adaptive-clipping bit


@dataclass(frozen=True)
class Declined:
    sender: str
    nonce: str
    reason: str


@dataclass(frozen=True)
class Duplicate:
    """The same accepted message again in the same round: a re-send, not counted twice."""

    sender: str
    nonce: str


Verdict = Accepted | Declined | Duplicate


def max_update_bytes(shapes: Mapping[str, tuple[int, ...]], cap: int) -> int:
    """An update is the parameters in float32 plus a header: anything much larger is refused
    before it is parsed (``cap`` is the configured upper limit)."""
    expected = 4 * sum(int(np.prod(s)) for s in shapes.values())
    return min(cap, 2 * expected + 256 * 1024)


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def open_update(payload: bytes, devices: KeyRing, shapes: Mapping[str, tuple[int, ...]],
                max_bytes: int) -> Envelope:
    """Decode and authenticate an update (or decline). Raises WireError with a reason."""
    if len(payload) > max_bytes:
        raise ValidationError("too_large", f"{len(payload)} bytes > limit {max_bytes} for this "
                              "model")
    expected = {k: ("float32", s) for k, s in shapes.items()}  # or none at all: a decline
    # NaN and Inf are refused by validate_update, on the norm it computes anyway (one pass over
    # the values instead of two)
    return decode(payload, devices, kinds={KIND_UPDATE}, expected=expected, max_bytes=max_bytes,
                  allow_empty=True, require_finite=False)


def reported_info(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What a device reports beside its update, kept if well-formed (else dropped)."""
    out: dict[str, Any] = {}
    if meta.get("seeded") is True:
        out["seeded"] = True
    eps = bounded_number(meta.get("record_epsilon"), 0.0, 1e6)
    if eps is not None:
        out["record_epsilon"] = round(eps, 4)
        delta = bounded_number(meta.get("record_delta"), 1e-300, 0.5)
        if delta is not None:
            out["record_delta"] = delta
    return out


def validate_update(env: Envelope, *, topic_sender: str, fleet: str, digest: str,
                    current: OpenRound | None, prior: Prior) -> Verdict:
    """Judge an authentic message. Raises ValidationError (with a reason code) to reject it."""
    h = env.header
    if topic_sender.lower() in RESERVED_IDS:
        raise ValidationError("reserved_id", f"{topic_sender!r} is a service's identity, never a "
                              "device's")
    if h.sender != topic_sender:
        raise ValidationError("topic_mismatch", f"signed by {h.sender!r} but published on "
                              f"{topic_sender!r}'s topic")
    if prior.nonce_round is not None:
        if (prior.nonce_digest == digest and current is not None
                and prior.nonce_round == current.round):
            return Duplicate(h.sender, h.nonce)
        raise ValidationError("replay", f"nonce {h.nonce[:12]}... from {h.sender} was already "
                              f"used in round {prior.nonce_round}; not counted again")
    if current is None:
        raise ValidationError("no_open_round", "no round is open")
    if h.round != current.round:
        raise ValidationError("wrong_round", f"update is for round {h.round}; the open round is "
                              f"{current.round} (stale or early)")
    if h.meta.get("fleet") != fleet:
        theirs = str(h.meta.get("fleet"))[:40]
        raise ValidationError("wrong_fleet", f"update is for fleet {theirs!r}, this aggregator "
                              f"serves {fleet!r}")
    if h.model_version != current.model_version:
        raise ValidationError("wrong_model_version", f"update is based on model v"
                              f"{h.model_version}; round {current.round} trains v"
                              f"{current.model_version}")
    if prior.contributed:
        raise ValidationError("already_contributed", f"{h.sender} already has an accepted "
                              f"update in round {current.round}")
    meta = h.meta
    if not env.tensors:
        reason = meta.get("decline")
        if not isinstance(reason, str) or not reason:
            raise ValidationError("empty_update", "an update without tensors must carry a "
                                  "'decline' reason")
        return Declined(h.sender, h.nonce, reason[:MAX_REASON])
    s = current.settings
    info = reported_info(meta)
    tensors = {k: np.asarray(v, dtype=np.float32) for k, v in env.tensors.items()}
    norm = l2_norm(list(tensors.values()))
    if not math.isfinite(norm):  # NaN or Inf somewhere (open_update leaves this check here)
        raise ValidationError("non_finite", "the update holds non-finite values (NaN or Inf); "
                              "refused")
    if s.task == "statistics":  # noised on the device; bounded by its clip plus the noise
        if norm > current.norm_bound():
            raise ValidationError("norm_bound", f"statistics vector L2 norm {norm:.4g} exceeds "
                                  f"the bound {current.norm_bound():.4g}")
        return Accepted(h.sender, h.nonce, digest, 1.0, norm, tensors, info)
    weight = 1.0
    if s.weighting == "examples":
        w = bounded_number(meta.get("weight"), 1.0, MAX_WEIGHT)
        if w is None:
            raise ValidationError("bad_weight", f"weight must be a number in [1, {MAX_WEIGHT:g}]")
        weight = w
    if s.adaptive is not None:
        bit = bounded_number(meta.get("clip_bit"), -1e6, 1e6)
        if bit is None or (s.noise != NOISE_LOCAL and bit not in (0.0, 1.0)):
            raise ValidationError("bad_clip_bit", "adaptive clipping is on: the update must "
                                  "carry 'clip_bit' (0 or 1; in local mode, noised)")
        info["clip_bit"] = bit
    if s.group_counts is not None and s.group_counts.release and "group_counts" in meta:
        from bedside.federation.fairness import parse

        info["group_counts"] = parse(meta["group_counts"], s.group_counts,
                                     current.classes).tolist()
    bound = current.norm_bound()
    if norm > bound:
        raise ValidationError("norm_bound", f"update L2 norm {norm:.4g} exceeds the bound "
                              f"{bound:.4g} for clip norm {s.clip_norm:g}")
    if s.noise != NOISE_LOCAL and norm > s.clip_norm:
        # accepted within float tolerance of C; clip exactly so the accounted bound holds
        names = list(tensors)
        clipped, _ = clip_update([tensors[k] for k in names], s.clip_norm)
        tensors = dict(zip(names, clipped, strict=True))
    return Accepted(h.sender, h.nonce, digest, weight, norm, tensors, info)
