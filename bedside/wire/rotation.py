"""Rotating a pinned signing key: the old key signs the new one.

Devices pin the aggregator's public key at enrollment and trust nothing else. To replace that key
without touching every device, the aggregator signs a *rotation statement* with its current key:
"from sequence N on, my key is K". The published statement carries the bare statements before it
(each signed by its own old key, carrying nothing), so the message grows by one link per rotation
and a device that was offline through several rotations walks the chain from the key it pinned,
verifying each link with the key the previous link established, and pins the last key only if
every link verifies. A device never accepts a key that its pinned key did not (transitively)
sign; once it has moved on, the old key signs nothing it accepts.

Pure: :func:`make_statement` builds one, :func:`follow` verifies a chain against a pinned key.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from bedside.constants import AGGREGATOR_ID, KIND_KEY
from bedside.errors import BedsideError, SignatureError, WireError
from bedside.wire.envelope import decode, encode, peek
from bedside.wire.signing import KeyRing, SigningKey, VerifyKey

#: At most this many earlier statements travel with a new one.
MAX_CHAIN = 64


@dataclass(frozen=True)
class Rotation:
    sequence: int
    new_key: VerifyKey


def make_statement(old: SigningKey, new: VerifyKey, fleet: str, sequence: int,
                   previous: list[bytes], sender: str = AGGREGATOR_ID) -> bytes:
    """Statement number ``sequence`` (1, 2, ...): ``old`` introduces ``new``; ``previous`` are the
    earlier statements, oldest first. ``sender``: the aggregator, or a device rotating its own
    key (then the aggregator checks it against the key it enrolled)."""
    if len(previous) >= MAX_CHAIN:
        raise WireError(f"more than {MAX_CHAIN} key rotations: enroll devices again instead")
    return encode(KIND_KEY, sender, old, {}, round=0, model_version=0, meta={
        "fleet": fleet, "sequence": sequence, "old_fingerprint": old.public.fingerprint,
        "new_key": new.to_text(), "new_fingerprint": new.fingerprint,
        "previous": [base64.b64encode(p).decode() for p in previous]})


def _parse(envelope: bytes, key: VerifyKey) -> Rotation:
    ring = KeyRing()
    ring.add(AGGREGATOR_ID, key)
    env = decode(envelope, ring, kinds={KIND_KEY}, expected={})
    m = env.header.meta
    try:
        return Rotation(int(m["sequence"]),
                        VerifyKey.from_text(str(m["new_key"]), source="rotated key"))
    except (KeyError, TypeError, ValueError, BedsideError) as exc:
        raise WireError(f"key rotation statement unreadable: {exc}") from None


def follow(statement: bytes, pinned: VerifyKey, fleet: str) -> tuple[VerifyKey, int] | None:
    """The key to pin after ``statement`` (and its chain), starting from ``pinned``, with the
    sequence reached; None when the statement introduces the pinned key itself (nothing to
    do). Raises :class:`WireError` when no chain of valid signatures leads from ``pinned``."""
    head = peek(statement)
    if head.kind != KIND_KEY or head.meta.get("fleet") != fleet:
        raise WireError("not a key rotation statement of this fleet")
    if head.meta.get("new_fingerprint") == pinned.fingerprint:
        return None
    previous = head.meta.get("previous", [])
    if not isinstance(previous, list) or len(previous) > MAX_CHAIN:
        raise WireError("key rotation statement: malformed chain")
    links: list[bytes] = []
    for p in previous:
        try:
            links.append(base64.b64decode(str(p), validate=True))
        except ValueError:
            raise WireError("key rotation statement: malformed chain") from None
    links.append(statement)
    key, sequence, started = pinned, 0, False
    for link in links:
        meta: Any = peek(link).meta
        if not started:
            if meta.get("old_fingerprint") != key.fingerprint:
                continue  # a rotation before this device pinned its key
            started = True
        r = _parse(link, key)  # signed by the key the previous link established
        if r.sequence <= sequence:
            raise WireError("key rotation statements out of order")
        key, sequence = r.new_key, r.sequence
    if not started:
        raise SignatureError("no key rotation in this chain was signed by the pinned key "
                             f"{pinned.fingerprint}; refused")
    return key, sequence


def device_rotation(statement: bytes, enrolled: KeyRing, device: str, fleet: str) -> VerifyKey:
    """The new key a device's statement introduces, checked against the key enrolled for it
    (``enrolled``); raises :class:`WireError` otherwise."""
    env = decode(statement, enrolled, kinds={KIND_KEY}, expected={})
    m = env.header.meta
    if env.header.sender != device or m.get("fleet") != fleet:
        raise WireError(f"a key rotation from {env.header.sender!r} on {device!r}'s topic (or "
                        "for another fleet)")
    try:
        return VerifyKey.from_text(str(m["new_key"]), source="rotated device key")
    except (KeyError, TypeError, ValueError, BedsideError) as exc:
        raise WireError(f"key rotation statement unreadable: {exc}") from None


def introduces(statement: bytes) -> str:
    """The fingerprint of the key a statement introduces (unverified: for the signer's own
    bookkeeping)."""
    return str(peek(statement).meta.get("new_fingerprint", ""))
