"""The wire: one signed envelope for everything Bedside sends, and the keys that sign it.

* :mod:`bedside.wire.envelope`: :func:`encode`, :func:`decode`, :func:`peek`, :class:`Envelope`,
  :class:`Envelope`. A versioned frame of a canonical JSON header and a safetensors body,
  signed with Ed25519. Received bytes only ever reach ``json`` and ``np.frombuffer``.
* :mod:`bedside.wire.signing`: :class:`SigningKey`, :class:`VerifyKey`, :class:`KeyRing`,
  key files and :func:`validate_id`.
* :mod:`bedside.wire.cli`: ``bedside keys generate`` and ``bedside keys show``.

The frame layout and the order of checks are documented in ``docs/wire.md``.
"""

from __future__ import annotations

from bedside.wire.envelope import (
    FRAME_MAGIC,
    FRAME_VERSION,
    SUPPORTED_DTYPES,
    Envelope,
    Header,
    TensorSpec,
    decode,
    encode,
    peek,
)
from bedside.wire.signing import (
    KeyRing,
    SigningKey,
    VerifyKey,
    generate_keypair,
    is_valid_id,
    validate_id,
)

__all__ = [
    "FRAME_MAGIC",
    "FRAME_VERSION",
    "SUPPORTED_DTYPES",
    "Envelope",
    "Header",
    "KeyRing",
    "SigningKey",
    "TensorSpec",
    "VerifyKey",
    "decode",
    "encode",
    "generate_keypair",
    "is_valid_id",
    "peek",
    "validate_id",
]
