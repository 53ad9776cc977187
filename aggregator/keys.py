"""Rotating the aggregator's signing key (``bedside aggregator rotate-key``).

The current key signs a statement introducing a new one (:mod:`bedside.wire.rotation`); the
statements are kept in ``<data_dir>/keys/`` and the newest (which carries the earlier ones) is
published, retained, on the fleet's ``key`` topic every time the service starts, before anything
signed with the new key. Devices verify the chain from the key they pinned and pin the new one.

Order of the files, so that a crash at any point leaves a usable state: the new key is written
beside the old one (``<key>.next``), then the statement, then the old key is kept as
``<key>.retired-<n>`` and the new one takes its place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bedside.aggregator.config import AggregatorConfig
from bedside.errors import ConfigError
from bedside.files import atomic_write_bytes, private_dir
from bedside.wire.rotation import make_statement
from bedside.wire.signing import SigningKey


def statements_dir(cfg: AggregatorConfig) -> Path:
    return cfg.data_dir / "keys"


def statements(cfg: AggregatorConfig) -> list[bytes]:
    """Every rotation statement, oldest first."""
    d = statements_dir(cfg)
    if not d.is_dir():
        return []
    return [p.read_bytes() for p in sorted(d.glob("rotation-*.bsde"))]


def rotate_key(cfg: AggregatorConfig) -> tuple[str, str, int]:
    """Replace the aggregator's key; returns (old fingerprint, new fingerprint, sequence)."""
    old = SigningKey.load(cfg.key)
    earlier = statements(cfg)
    sequence = len(earlier) + 1
    nxt = cfg.key.with_name(cfg.key.name + ".next")
    if nxt.exists():
        new = SigningKey.load(nxt)  # an earlier attempt that stopped halfway
    else:
        new = SigningKey.generate()
        new.save(nxt)
    if new.public.fingerprint == old.public.fingerprint:
        raise ConfigError(f"{nxt}: the same key as {cfg.key}; remove it and try again")
    statement = make_statement(old, new.public, cfg.fleet, sequence, earlier)
    d = private_dir(statements_dir(cfg))
    atomic_write_bytes(d / f"rotation-{sequence:04d}.bsde", statement)
    retired = cfg.key.with_name(f"{cfg.key.name}.retired-{sequence}")
    shutil.copy2(cfg.key, retired)
    os.chmod(retired, 0o600)
    os.replace(nxt, cfg.key)
    new.public.save(cfg.key.with_suffix(".pub"))
    return old.public.fingerprint, new.public.fingerprint, sequence
