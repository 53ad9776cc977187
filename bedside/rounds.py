"""Round settings: what a round announcement carries, validated field by field.

The aggregator writes these settings into every signed announcement; devices read them with
:meth:`RoundSettings.from_meta`, which accepts only well-typed values in sane ranges. A signature
proves who sent an announcement, not that its contents are sensible: a misconfigured or
compromised aggregator must not be able to crash a device, make it divide by zero, or burn its CPU
with absurd local training. Anything out of range is a :class:`ValidationError` with reason
``bad_announcement``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from bedside.constants import NOISE_MODES
from bedside.errors import ValidationError

MAX_LOCAL_EPOCHS = 100
MAX_BATCH = 65_536
MAX_ROUNDS = 100_000
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def _num(meta: dict[str, Any], key: str, lo: float, hi: float) -> float:
    v = bounded_number(meta.get(key), lo, hi)
    if v is None:
        raise ValidationError("bad_announcement",
                              f"announcement field {key!r} must be a number in [{lo:g}, {hi:g}], "
                              f"got {str(meta.get(key))[:40]!r}")
    return v


def _int(meta: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValidationError("bad_announcement",
                              f"announcement field {key!r} must be an integer in [{lo}, {hi}], "
                              f"got {str(v)[:40]!r}")
    return v


def _choice(meta: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    v = meta.get(key)
    if v not in choices:
        raise ValidationError("bad_announcement",
                              f"announcement field {key!r} must be one of {choices}, got "
                              f"{str(v)[:40]!r}")
    return str(v)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "optimizer": self.optimizer}


@dataclass(frozen=True)
class RoundSettings:
    """An open round's settings, as a device may rely on them."""

    fleet: str
    deadline: float
    model_sha256: str
    clip_norm: float
    noise: str
    noise_multiplier: float
    participation_rate: float
    planned_rounds: int
    weighting: str
    train: TrainSettings

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> RoundSettings:
        train = meta.get("train")
        if not isinstance(train, dict):
            raise ValidationError("bad_announcement", "announcement field 'train' is missing")
        sha = meta.get("model_sha256")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ValidationError("bad_announcement", "announcement field 'model_sha256' is not "
                                  "a sha256 hex digest")
        noise = _choice(meta, "noise", NOISE_MODES)
        z = _num(meta, "noise_multiplier", 0.0, 1e6)
        if noise != "none" and z <= 0:
            raise ValidationError("bad_announcement", f"noise {noise!r} needs a positive "
                                  "noise_multiplier")
        return cls(
            fleet=str(meta.get("fleet", "")),
            deadline=_num(meta, "deadline", 0.0, 1e13),
            model_sha256=sha,
            clip_norm=_num(meta, "clip_norm", 1e-12, 1e6),
            noise=noise,
            noise_multiplier=z,
            participation_rate=_num(meta, "participation_rate", 1e-9, 1.0),
            planned_rounds=_int(meta, "planned_rounds", 0, MAX_ROUNDS),
            weighting=_choice(meta, "weighting", ("uniform", "examples")),
            train=TrainSettings(
                epochs=_int(train, "epochs", 1, MAX_LOCAL_EPOCHS),
                batch_size=_int(train, "batch_size", 1, MAX_BATCH),
                lr=_num(train, "lr", 1e-9, 100.0),
                optimizer=_choice(train, "optimizer", ("sgd", "adam")),
            ),
        )
