"""Build envelopes byte by byte from the documented format (docs/wire.md), for tests.

Deliberately independent of ``bedside.wire.envelope``'s private helpers: if these agree with the
implementation, the implementation agrees with the document. ``resign`` lets a test play a
malicious but enrolled sender: it edits a valid envelope and signs the result with the right key,
so the checks after the signature are the ones exercised.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from typing import Any

from bedside.wire.signing import SigningKey

MAGIC = b"BSDE"
VERSION = 1
SIG = 64


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def pad_header(header_json: bytes) -> bytes:
    """Header JSON + spaces so that the body starts at a multiple of 8."""
    return header_json + b" " * (-(9 + len(header_json) + SIG) % 8)


def build(header: dict[str, Any] | bytes, body: bytes, key: SigningKey, *,
          magic: bytes = MAGIC, version: int = VERSION, raw_header: bool = False) -> bytes:
    """Frame ``header`` (a dict, canonicalised and padded; or raw bytes) + ``body`` and sign."""
    hbytes = header if raw_header else pad_header(canonical(header))
    assert isinstance(hbytes, bytes)
    signed = magic + struct.pack(">BI", version, len(hbytes)) + hbytes
    return signed + key.sign(signed) + body


def split(msg: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """(header dict, signature, body) of a well-formed message."""
    (hlen,) = struct.unpack(">I", msg[5:9])
    header = json.loads(msg[9:9 + hlen])
    return header, msg[9 + hlen:9 + hlen + SIG], msg[9 + hlen + SIG:]


def st_split(body: bytes) -> tuple[dict[str, Any], bytes]:
    """(safetensors header dict, tensor data) of a body."""
    n = int.from_bytes(body[:8], "little")
    return json.loads(body[8:8 + n]), body[8 + n:]


def st_body(index: dict[str, Any] | bytes, data: bytes) -> bytes:
    """A safetensors body from a header dict (or raw header bytes) and the tensor data."""
    hj = index if isinstance(index, bytes) else json.dumps(index, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    return len(hj).to_bytes(8, "little") + hj + data


def resign(msg: bytes, key: SigningKey, *, edit: Callable[[dict[str, Any]], None] | None = None,
           body: bytes | None = None, fix_digest: bool = True) -> bytes:
    """Edit a valid message's header and/or body and sign it again with ``key``.

    With ``fix_digest`` the header's body_sha256 and body_bytes are set to match the new body
    (before ``edit`` runs, so an edit can still lie about them).
    """
    header, _, old_body = split(msg)
    new_body = old_body if body is None else body
    if fix_digest:
        header["body_sha256"] = hashlib.sha256(new_body).hexdigest()
        header["body_bytes"] = len(new_body)
    if edit is not None:
        edit(header)
    return build(header, new_body, key)


def with_nan(msg: bytes, key: SigningKey) -> bytes:
    """``msg`` with the first float32 of its first tensor set to NaN, correctly signed by ``key``
    (the encoder refuses non-finite values, so tests of the decoder build them here)."""
    _, _, body = split(msg)
    n = int.from_bytes(body[:8], "little")
    start = 8 + n
    nan = struct.pack("<f", float("nan"))
    return resign(msg, key, body=body[:start] + nan + body[start + 4:])
