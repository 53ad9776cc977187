"""Rotating the aggregator's signing key (``bedside aggregator rotate-key``).

The current key signs a statement introducing a new one (:mod:`bedside.wire.rotation`). The bare
statements are kept in ``<data_dir>/keys/rotation-<n>.bsde``; the newest, carrying the bare ones
before it, in ``published.bsde``, which the service publishes (retained, on the fleet's ``key``
topic) every time it starts, before anything signed with the new key. Devices verify the chain
from the key they pinned and pin the new one.

Order of the files, so that a crash at any point leaves a usable state: the new key is written
beside the old one (``<key>.next``), then the statements, then the old key is kept as
``<key>.retired-<n>`` and the new one takes its place. Run again after a crash, the command
finishes an interrupted rotation; the service refuses to start while one is unfinished.
"""

from __future__ import annotations

import os
from pathlib import Path

from bedside.aggregator.config import AggregatorConfig
from bedside.errors import ConfigError
from bedside.files import atomic_write_bytes, fsync_dir, private_dir
from bedside.wire.rotation import introduces, make_statement
from bedside.wire.signing import SigningKey

PUBLISHED = "published.bsde"


def statements_dir(cfg: AggregatorConfig) -> Path:
    return cfg.data_dir / "keys"


def statements(cfg: AggregatorConfig) -> list[bytes]:
    """Every bare rotation statement (no chain inside), oldest first."""
    d = statements_dir(cfg)
    if not d.is_dir():
        return []
    return [p.read_bytes() for p in sorted(d.glob("rotation-*.bsde"))]


def published(cfg: AggregatorConfig) -> bytes | None:
    """What the service publishes: the newest statement carrying the bare ones before it."""
    p = statements_dir(cfg) / PUBLISHED
    return p.read_bytes() if p.exists() else None


def check_current(cfg: AggregatorConfig, key: SigningKey) -> None:
    """Refuse to start when the newest rotation introduces another key than the one in use (a
    rotation interrupted before its key was swapped: devices would pin a key nobody signs with)."""
    latest = published(cfg)
    if latest is not None and introduces(latest) != key.public.fingerprint:
        raise ConfigError(f"{cfg.key}: the newest key rotation ({statements_dir(cfg)}) "
                          f"introduces key {introduces(latest)}, not this one "
                          f"({key.public.fingerprint}): a rotation was interrupted; run "
                          "'bedside aggregator rotate-key' again to finish it")


def rotate_key(cfg: AggregatorConfig) -> tuple[str, str, int]:
    """Replace the aggregator's key; returns (old fingerprint, new fingerprint, sequence).

    Safe to run again after a crash at any point: an interrupted rotation (its statement written,
    its key not yet swapped) is finished, not signed a second time."""
    old = SigningKey.load(cfg.key)
    earlier = statements(cfg)
    nxt = cfg.key.with_name(cfg.key.name + ".next")
    d = private_dir(statements_dir(cfg))
    if nxt.exists():
        new = SigningKey.load(nxt)  # an earlier attempt that stopped halfway
    else:
        new = SigningKey.generate()
        new.save(nxt)
    if new.public.fingerprint == old.public.fingerprint:
        raise ConfigError(f"{nxt}: the same key as {cfg.key}; remove it and try again")
    if earlier and introduces(earlier[-1]) == new.public.fingerprint:
        sequence = len(earlier)  # its statements exist: only the swap is left
    else:
        sequence = len(earlier) + 1
        bare = make_statement(old, new.public, cfg.fleet, sequence, [])
        chained = make_statement(old, new.public, cfg.fleet, sequence, earlier)
        atomic_write_bytes(d / f"rotation-{sequence:04d}.bsde", bare)
        atomic_write_bytes(d / PUBLISHED, chained)
    retired = cfg.key.with_name(f"{cfg.key.name}.retired-{sequence}")
    if not retired.exists():
        atomic_write_bytes(retired, cfg.key.read_bytes(), mode=0o600)  # never readable by others
    os.replace(nxt, cfg.key)
    fsync_dir(cfg.key.parent)
    new.public.save(cfg.key.with_suffix(".pub"))
    return old.public.fingerprint, new.public.fingerprint, sequence
