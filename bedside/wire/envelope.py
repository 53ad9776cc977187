"""The one envelope Bedside puts on the wire: updates, models, manifests, announcements, receipts.

Frame (all integers big-endian unless said otherwise; ``docs/wire.md`` has the full story)::

    offset  size  field
    0       4     magic  b"BSDE"
    4       1     frame version (1)
    5       4     H = header length (u32)
    9       H     header: canonical JSON (sorted keys, compact, UTF-8) + 0..7 spaces, so that
                  the body starts at a multiple of 8
    9+H     64    Ed25519 signature over bytes [0, 9+H): magic, version, length and header
    73+H    B     body: a safetensors file (u64 little-endian length, JSON, tensor bytes)

The header carries the sha256 and length of the body, so the signature covers the body while
verifying it costs the same whatever the model size; the body is then checked against the digest.

:func:`decode` validates before it allocates and fails closed: size, framing, header, kind, key,
signature, body digest, tensor index, expected shapes, finite values, and only then builds arrays,
as read-only views into the (immutable) message bytes. Every failure is one exception under
:class:`~bedside.errors.WireError` whose ``reason`` is a short code and whose message names the
field or tensor. Received bytes go to ``json`` and ``np.frombuffer`` only: never pickle, eval,
exec or ``torch.load``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import struct
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from bedside.constants import (
    ENVELOPE_KINDS,
    ENVELOPE_SCHEMA,
    MAX_ENVELOPE_BYTES,
    MAX_HEADER_BYTES,
    MAX_ID_LENGTH,
    MAX_TENSOR_RANK,
    MAX_TENSORS,
    NONCE_BYTES,
)
from bedside.errors import (
    BedsideError,
    EnvelopeError,
    InputError,
    SignatureError,
    TooLargeError,
    UnknownSenderError,
    ValidationError,
    WireError,
)
from bedside.wire.signing import SIGNATURE_BYTES, KeyRing, SigningKey, VerifyKey, is_valid_id

__all__ = [
    "FRAME_MAGIC",
    "FRAME_VERSION",
    "SUPPORTED_DTYPES",
    "Envelope",
    "Header",
    "TensorSpec",
    "decode",
    "encode",
    "peek",
]

FRAME_MAGIC: Final = b"BSDE"
FRAME_VERSION: Final = 1
_PREFIX = struct.Struct(">4sBI")  # magic, version, header length
PREFIX_BYTES: Final = _PREFIX.size  # 9
BODY_ALIGN: Final = 8
# Limits of the format beyond those in bedside.constants.
MAX_TENSOR_NAME: Final = 256
MAX_DIM: Final = 2**31 - 1
MAX_META_DEPTH: Final = 32
MAX_INT: Final = 2**63 - 1  # round, model_version, body_bytes: fit a SQLite INTEGER

# numpy dtype name -> (safetensors dtype code, itemsize). Little-endian on the wire.
SUPPORTED_DTYPES: Final[Mapping[str, tuple[str, int]]] = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "uint8": ("U8", 1),
}
_FLOAT_DTYPES: Final = frozenset({"float64", "float32", "float16"})
_HEADER_KEYS: Final = frozenset({
    "schema", "kind", "sender", "round", "model_version", "nonce", "created_at", "tensors",
    "body_sha256", "body_bytes", "meta",
})
_SPEC_KEYS: Final = frozenset({"name", "dtype", "shape"})
_ST_KEYS: Final = frozenset({"dtype", "shape", "data_offsets"})
_NONCE_RE = re.compile(f"[0-9a-f]{{{2 * NONCE_BYTES}}}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_FINITE_CHUNK = 1 << 20  # elements per isfinite() pass: bounded temporary memory


# ---------------------------------------------------------------------------------------------
# Data types
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One entry of the signed tensor index: name, numpy dtype name, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * SUPPORTED_DTYPES[self.dtype][1]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Header:
    """The signed header of an envelope. From :func:`peek` it is untrusted; from :func:`decode`
    it is authentic (signed by ``sender``'s key). ``meta`` is a fresh dict per call."""

    schema: int
    kind: str
    sender: str
    round: int
    model_version: int
    nonce: str
    created_at: float
    tensors: tuple[TensorSpec, ...]
    body_sha256: str
    body_bytes: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The header as it is on the wire (before canonical serialisation)."""
        return {
            "schema": self.schema,
            "kind": self.kind,
            "sender": self.sender,
            "round": self.round,
            "model_version": self.model_version,
            "nonce": self.nonce,
            "created_at": self.created_at,
            "tensors": [t.to_dict() for t in self.tensors],
            "body_sha256": self.body_sha256,
            "body_bytes": self.body_bytes,
            "meta": self.meta,
        }


@dataclass(frozen=True)
class Envelope:
    """A verified envelope: its authentic header and its tensors.

    Arrays are **read-only** views into the message bytes (no copy of a large model); call
    ``.copy()`` on one to get a writable array. Each view keeps the message bytes alive.
    """

    header: Header
    tensors: dict[str, np.ndarray]
    #: sha256 of the signed header and its signature: names this exact message (the header signs
    #: the body's sha256), without hashing the body a second time
    digest: str = ""

    @property
    def kind(self) -> str:
        return self.header.kind

    @property
    def sender(self) -> str:
        return self.header.sender

    @property
    def round(self) -> int:
        return self.header.round

    @property
    def model_version(self) -> int:
        return self.header.model_version

    @property
    def nonce(self) -> str:
        return self.header.nonce

    @property
    def created_at(self) -> float:
        return self.header.created_at

    @property
    def meta(self) -> dict[str, Any]:
        return self.header.meta


# ---------------------------------------------------------------------------------------------
# Errors and strict JSON
# ---------------------------------------------------------------------------------------------
def _malformed(message: str, reason: str = "malformed") -> EnvelopeError:
    exc = EnvelopeError(message)
    exc.reason = reason
    return exc


def _show(value: object, limit: int = 60) -> str:
    """A short, escaped rendering of an untrusted value for a message (no newlines, bounded)."""
    try:
        text = repr(value)
    except Exception:  # an int too long to print, a structure too deep to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Reject(Exception):
    """Raised inside json hooks; turned into an EnvelopeError by :func:`_loads`."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Reject(f"duplicate key {_show(k)}")
            seen.add(k)
    return out


def _no_constant(name: str) -> Any:
    raise _Reject(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Reject(f"number {_show(text)} is out of range")
    return value


def _loads(raw: bytes, what: str) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no overflowing floats, no duplicate keys."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _malformed(f"{what} is not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                          parse_float=_finite_float)
    except _Reject as exc:
        raise _malformed(f"{what}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise _malformed(f"{what} is not valid JSON ({_show(str(exc), 120)})") from None


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _header_pad(canonical_len: int) -> int:
    """Spaces after the header JSON so that the body starts at a multiple of BODY_ALIGN."""
    return -(PREFIX_BYTES + canonical_len + SIGNATURE_BYTES) % BODY_ALIGN


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    if not isinstance(value, dict | list):
        return 0
    deepest, stack = 1, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        for x in v.values() if isinstance(v, dict) else v:
            if isinstance(x, dict | list):  # only containers go on the stack
                stack.append((x, d + 1))
    return deepest


# ---------------------------------------------------------------------------------------------
# Header parsing (shared by peek and decode)
# ---------------------------------------------------------------------------------------------
def _is_int(v: object) -> bool:
    return type(v) is int  # not bool


def _int_field(obj: Mapping[str, Any], key: str, hi: int = MAX_INT) -> int:
    v = obj[key]
    if not _is_int(v) or not 0 <= v <= hi:
        raise _malformed(f"header field '{key}' must be an integer in [0, {hi}], got {_show(v)}")
    return int(v)


def _parse_tensor_index(value: Any) -> tuple[TensorSpec, ...]:
    if not isinstance(value, list):
        raise _malformed(f"header field 'tensors' must be a list, got {type(value).__name__}")
    if len(value) > MAX_TENSORS:
        raise _malformed(f"header lists {len(value)} tensors; the limit is {MAX_TENSORS}")
    specs: list[TensorSpec] = []
    previous: str | None = None
    for i, t in enumerate(value):
        where = f"header 'tensors'[{i}]"
        if not isinstance(t, dict) or set(t) != _SPEC_KEYS:
            got = sorted(t) if isinstance(t, dict) else type(t).__name__
            raise _malformed(f"{where} must be an object with keys name, dtype, shape; got "
                             f"{_show(got)}")
        name, dtype, shape = t["name"], t["dtype"], t["shape"]
        if (not isinstance(name, str) or not 1 <= len(name) <= MAX_TENSOR_NAME
                or not name.isprintable() or name == "__metadata__"):
            raise _malformed(f"{where}: tensor name {_show(name)} is not valid (1 to "
                             f"{MAX_TENSOR_NAME} printable characters, not '__metadata__')")
        if previous is not None and name <= previous:
            raise _malformed(f"{where}: tensor {_show(name)} is duplicated or out of order (the "
                             "index is sorted by name)")
        previous = name
        if not isinstance(dtype, str) or dtype not in SUPPORTED_DTYPES:
            raise _malformed(f"{where}: tensor {_show(name)} has dtype {_show(dtype)}; supported: "
                             f"{', '.join(SUPPORTED_DTYPES)}")
        if not isinstance(shape, list) or len(shape) > MAX_TENSOR_RANK:
            raise _malformed(f"{where}: tensor {_show(name)} shape must be a list of at most "
                             f"{MAX_TENSOR_RANK} dimensions, got {_show(shape)}")
        if not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
            raise _malformed(f"{where}: tensor {_show(name)} shape {_show(shape)} must hold "
                             f"integers in [0, {MAX_DIM}]")
        specs.append(TensorSpec(name, dtype, tuple(shape)))
    return tuple(specs)


def _parse_header(raw: bytes) -> Header:
    obj = _loads(raw, "envelope header")
    if not isinstance(obj, dict):
        raise _malformed(f"envelope header must be a JSON object, got {type(obj).__name__}")
    # Before anything renders or re-serialises it: the header itself is level 1, meta level 2.
    if _depth(obj) > MAX_META_DEPTH + 1:
        raise _malformed(f"envelope header is nested too deeply ('meta' may nest at most "
                         f"{MAX_META_DEPTH} levels)")
    if set(obj) != _HEADER_KEYS:
        missing, extra = sorted(_HEADER_KEYS - set(obj)), sorted(set(obj) - _HEADER_KEYS)
        raise _malformed("envelope header fields are wrong: "
                         + "; ".join(x for x in (f"missing {missing}" if missing else "",
                                                 f"unexpected {_show(extra, 120)}" if extra else "")
                                     if x))
    schema = obj["schema"]
    if not _is_int(schema) or schema != ENVELOPE_SCHEMA:
        raise _malformed(f"envelope schema {_show(schema)} is not supported (this Bedside reads "
                         f"schema {ENVELOPE_SCHEMA}); upgrade the older side", "unsupported_schema")
    kind = obj["kind"]
    if not isinstance(kind, str) or kind not in ENVELOPE_KINDS:
        raise _malformed(f"header field 'kind' is {_show(kind)}; expected one of "
                         f"{', '.join(sorted(ENVELOPE_KINDS))}")
    sender = obj["sender"]
    if not is_valid_id(sender):
        raise _malformed(f"header field 'sender' {_show(sender)} is not a valid id (1 to "
                         f"{MAX_ID_LENGTH} characters from A-Z a-z 0-9 _ . -)")
    round_ = _int_field(obj, "round")
    model_version = _int_field(obj, "model_version")
    nonce = obj["nonce"]
    if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
        raise _malformed(f"header field 'nonce' must be {2 * NONCE_BYTES} lowercase hex digits, "
                         f"got {_show(nonce)}")
    created_at = obj["created_at"]
    if type(created_at) is not float:  # finite: the parser refuses NaN, Infinity and overflow
        raise _malformed(f"header field 'created_at' must be a float (unix seconds), got "
                         f"{_show(created_at)}")
    tensors = _parse_tensor_index(obj["tensors"])
    digest = obj["body_sha256"]
    if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
        raise _malformed(f"header field 'body_sha256' must be 64 lowercase hex digits, got "
                         f"{_show(digest)}")
    body_bytes = _int_field(obj, "body_bytes")
    declared = sum(t.nbytes for t in tensors)
    if declared > body_bytes:
        raise _malformed(f"tensor index declares {declared} bytes of tensor data but the body is "
                         f"{body_bytes} bytes")
    meta = obj["meta"]
    if not isinstance(meta, dict):
        raise _malformed(f"header field 'meta' must be a JSON object, got {type(meta).__name__}")
    try:
        canonical = _canonical(obj)
    except (ValueError, UnicodeEncodeError):
        raise _malformed("envelope header holds text that is not valid Unicode") from None
    if raw != canonical + b" " * _header_pad(len(canonical)):
        raise _malformed("envelope header is not in canonical form (sorted keys, compact "
                         "separators, UTF-8, then padding spaces to an 8-byte boundary)")
    return Header(schema=schema, kind=kind, sender=sender, round=round_,
                  model_version=model_version, nonce=nonce, created_at=created_at,
                  tensors=tensors, body_sha256=digest, body_bytes=body_bytes, meta=meta)


def _check_size(data: object, max_bytes: int) -> int:
    if not _is_int(max_bytes) or max_bytes <= 0:
        raise InputError(f"max_bytes must be a positive integer, got {_show(max_bytes)}")
    if isinstance(data, memoryview):
        n = data.nbytes
    elif isinstance(data, bytes | bytearray):
        n = len(data)
    else:
        raise _malformed(f"expected the message as bytes, got {type(data).__name__}")
    if n > max_bytes:
        raise TooLargeError(f"message is {n} bytes, over the limit of {max_bytes} bytes; "
                            "refused before parsing")
    return n


def parse_frame(view: memoryview) -> tuple[Header, int]:
    """The header of an envelope and where its signed part ends (the signature follows), parsed
    but NOT verified: for tools that time or route, never for trusting a message."""
    return _parse_frame(view)


def _parse_frame(view: memoryview) -> tuple[Header, int]:
    """Framing and header. Returns the header and the offset where the signature starts."""
    n = view.nbytes
    if n < PREFIX_BYTES + SIGNATURE_BYTES:
        raise _malformed(f"message is {n} bytes, too short to be an envelope")
    magic, version, hlen = _PREFIX.unpack_from(view, 0)
    if magic != FRAME_MAGIC:
        raise _malformed(f"not a Bedside envelope (magic {_show(bytes(magic))}, expected "
                         f"{FRAME_MAGIC!r})")
    if version != FRAME_VERSION:
        raise _malformed(f"envelope frame version {version} is not supported (this Bedside reads "
                         f"version {FRAME_VERSION}); upgrade the older side", "unsupported_schema")
    if hlen > MAX_HEADER_BYTES:
        raise _malformed(f"header length {hlen} is over the limit of {MAX_HEADER_BYTES} bytes")
    if hlen > n - PREFIX_BYTES - SIGNATURE_BYTES:
        raise _malformed(f"header length {hlen} runs past the end of the {n}-byte message")
    header = _parse_header(bytes(view[PREFIX_BYTES:PREFIX_BYTES + hlen]))
    return header, PREFIX_BYTES + hlen


# ---------------------------------------------------------------------------------------------
# peek
# ---------------------------------------------------------------------------------------------
def peek(data: bytes | bytearray | memoryview, max_bytes: int = MAX_ENVELOPE_BYTES) -> Header:
    """Parse the framing and header **without verifying anything**.

    For routing only (which key to look up, which round a message claims to be for). Nothing in
    the result may be trusted or acted on: anyone can write any header. Use :func:`decode`.
    Raises :class:`TooLargeError` or :class:`EnvelopeError` on malformed input.
    """
    _check_size(data, max_bytes)
    view = memoryview(data)
    flat = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
    return _parse_frame(flat)[0]


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------
def _lookup(keys: KeyRing | Callable[[str], VerifyKey], header: Header) -> VerifyKey:
    try:
        key = keys.get(header.sender) if isinstance(keys, KeyRing) else keys(header.sender)
    except WireError:
        raise
    except Exception as exc:  # a lookup that cannot answer refuses (fail closed)
        detail = str(exc) if isinstance(exc, BedsideError) else type(exc).__name__
        raise UnknownSenderError(f"{header.kind} from {header.sender}: key lookup failed "
                                 f"({detail}); refused") from exc
    if not isinstance(key, VerifyKey):
        raise UnknownSenderError(f"{header.kind} from {header.sender}: no public key is known "
                                 "for this sender; refused")
    return key


def _parse_body_index(body: memoryview, header: Header, who: str) -> tuple[int, dict[str, int]]:
    """Check the safetensors header against the signed index.

    Returns the offset of the tensor data within ``body`` and each tensor's start offset in it.
    """
    n = body.nbytes
    if n < 8:
        raise _malformed(f"{who}: body is {n} bytes, too short for a safetensors header")
    st_len = int.from_bytes(body[:8], "little")
    if st_len > MAX_HEADER_BYTES or st_len > n - 8:
        raise _malformed(f"{who}: safetensors header length {st_len} is over the limit or runs "
                         f"past the end of the {n}-byte body")
    st = _loads(bytes(body[8:8 + st_len]), f"{who}: safetensors header")
    if not isinstance(st, dict):
        raise _malformed(f"{who}: safetensors header must be a JSON object")
    if _depth(st) > 3:  # {name: {"shape": [...]}}
        raise _malformed(f"{who}: safetensors header is nested too deeply")
    names = {t.name for t in header.tensors}
    if set(st) != names:
        missing, extra = sorted(names - set(st)), sorted(set(st) - names)
        raise _malformed(f"{who}: tensors in the body do not match the signed index (missing "
                         f"{_show(missing, 120)}, unexpected {_show(extra, 120)})")
    data_start = 8 + st_len
    data_len = n - data_start
    spans: list[tuple[int, int, str]] = []
    for spec in header.tensors:
        e = st[spec.name]
        where = f"{who}: tensor {_show(spec.name)}"
        if not isinstance(e, dict) or set(e) != _ST_KEYS:
            raise _malformed(f"{where}: safetensors entry must have keys dtype, shape, "
                             "data_offsets")
        code = SUPPORTED_DTYPES[spec.dtype][0]
        if e["dtype"] != code:
            raise _malformed(f"{where}: body says dtype {_show(e['dtype'])}, the signed index says "
                             f"{spec.dtype} ({code})")
        shape = e["shape"]
        if (not isinstance(shape, list) or not all(_is_int(d) for d in shape)
                or tuple(shape) != spec.shape):
            raise _malformed(f"{where}: body says shape {_show(shape)}, the signed index says "
                             f"{list(spec.shape)}")
        offs = e["data_offsets"]
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise _malformed(f"{where}: data_offsets {_show(offs)} are not within the "
                             f"{data_len} bytes of tensor data")
        begin, end = offs
        if end - begin != spec.nbytes:
            raise _malformed(f"{where}: data_offsets span {end - begin} bytes but shape "
                             f"{list(spec.shape)} of {spec.dtype} needs {spec.nbytes}")
        spans.append((begin, end, spec.name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            problem = "overlaps the previous tensor" if begin < pos else "leaves a gap before it"
            raise _malformed(f"{who}: tensor {_show(name)} at byte {begin} {problem}; tensor data "
                             "must be contiguous")
        pos = end
    if pos != data_len:
        raise _malformed(f"{who}: {data_len - pos} bytes of tensor data are not claimed by any "
                         "tensor")
    return data_start, {name: begin for begin, _, name in spans}


def _normalise_expected(
    expected: Mapping[str, tuple[Any, tuple[int, ...]]],
) -> dict[str, tuple[str, tuple[int, ...]]]:
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, pair in expected.items():
        if (type(pair) is tuple and len(pair) == 2 and pair[0] in SUPPORTED_DTYPES
                and type(pair[1]) is tuple and all(type(d) is int for d in pair[1])):
            out[name] = pair  # already a dtype name and a tuple of ints
            continue
        try:
            dtype, shape = pair
            dt = np.dtype(dtype).name
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError) as exc:
            raise InputError(f"expected[{name!r}] = {pair!r} is not a (dtype, shape) pair "
                             f"({exc})") from None
        out[name] = (dt, dims)
    return out


def _check_expected(header: Header, expected: Mapping[str, tuple[Any, tuple[int, ...]]],
                    who: str) -> None:
    want = _normalise_expected(expected)
    have = {t.name: t for t in header.tensors}
    missing = sorted(set(want) - set(have))
    if missing:
        raise ValidationError("missing_tensor", f"{who}: tensor {missing[0]!r} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(have) - set(want))
    if extra:
        raise ValidationError("unexpected_tensor", f"{who}: unexpected tensor {_show(extra[0])}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name in sorted(want):
        dt, shape = want[name]
        spec = have[name]
        if spec.dtype != dt:
            raise ValidationError("dtype_mismatch", f"{who}: tensor {name!r} is {spec.dtype}, "
                                  f"expected {dt}")
        if spec.shape != shape:
            raise ValidationError("shape_mismatch", f"{who}: tensor {name!r} has shape "
                                  f"{list(spec.shape)}, expected {list(shape)}")


def _count_non_finite(arr: np.ndarray) -> int:
    flat = arr.reshape(-1)
    bad = 0
    for i in range(0, flat.size, _FINITE_CHUNK):
        chunk = flat[i:i + _FINITE_CHUNK]
        bad += chunk.size - int(np.count_nonzero(np.isfinite(chunk)))
    return bad


def decode(
    data: bytes | bytearray | memoryview,
    keys: KeyRing | Callable[[str], VerifyKey],
    *,
    kinds: Collection[str] | None = None,
    expected: Mapping[str, tuple[str, tuple[int, ...]]] | None = None,
    max_bytes: int = MAX_ENVELOPE_BYTES,
    require_finite: bool = True,
    allow_empty: bool = False,
) -> Envelope:
    """Verify and decode one envelope. Fails closed with exactly one typed exception.

    Checks, in this order, before any array is built:

    1. size ``<= max_bytes`` (:class:`TooLargeError`, nothing parsed);
    2. magic, frame version, header length bounds; strict, canonical JSON header with exactly
       the known fields and types (:class:`EnvelopeError`);
    3. ``kind`` in ``kinds`` (:class:`EnvelopeError`, reason ``wrong_kind``);
    4. the sender's key from ``keys`` (:class:`UnknownSenderError`);
    5. the Ed25519 signature over prefix + header, then the body's length and sha256 against the
       signed header (:class:`SignatureError`);
    6. the safetensors header against the signed tensor index: names, dtypes, shapes, offsets
       contiguous and in range (:class:`EnvelopeError`);
    7. ``expected`` names, dtypes and shapes, if given (:class:`ValidationError`, reasons
       ``missing_tensor``, ``unexpected_tensor``, ``dtype_mismatch``, ``shape_mismatch``); an empty
       mapping means "no tensors"; with ``allow_empty``, an envelope without any tensor (a
       decline) is accepted as well;
    8. finite values in float tensors, if ``require_finite`` (:class:`ValidationError`, reason
       ``non_finite``).

    ``keys`` is a :class:`KeyRing` or any ``sender -> VerifyKey`` callable; a callable that raises
    or returns something else refuses the message. Mutable input (``bytearray``, ``memoryview``)
    is copied once into immutable ``bytes`` after the size check, so it cannot change between the
    checks and the use. The returned arrays are read-only views into those bytes.
    """
    _check_size(data, max_bytes)
    if type(data) is bytes:
        buf = data
    elif isinstance(data, memoryview):
        buf = data.tobytes()
    else:
        buf = bytes(data)
    view = memoryview(buf)
    header, signed_end = _parse_frame(view)
    who = f"{header.kind} from {header.sender}"

    allowed = {kinds} if isinstance(kinds, str) else kinds
    if allowed is not None and header.kind not in allowed:
        raise _malformed(f"{who}: kind {header.kind!r} is not accepted here (expected "
                         f"{', '.join(sorted(allowed))})", "wrong_kind")

    key = _lookup(keys, header)
    signature = buf[signed_end:signed_end + SIGNATURE_BYTES]
    try:
        key.verify(signature, view[:signed_end])
    except SignatureError:
        raise SignatureError(f"{who}: signature does not verify against its key "
                             f"{key.fingerprint}; the message was altered or signed with "
                             "another key") from None

    body = view[signed_end + SIGNATURE_BYTES:]
    if body.nbytes != header.body_bytes:
        raise SignatureError(f"{who}: body is {body.nbytes} bytes but the signed header says "
                             f"{header.body_bytes}; the body was altered")
    digest = hashlib.sha256(body).hexdigest()
    if not hmac.compare_digest(digest, header.body_sha256):
        raise SignatureError(f"{who}: body sha256 does not match the signed header; the body was "
                             "altered")

    data_start, offsets = _parse_body_index(body, header, who)
    if expected is not None and not (allow_empty and not header.tensors):
        _check_expected(header, expected, who)

    base = signed_end + SIGNATURE_BYTES + data_start
    tensors: dict[str, np.ndarray] = {}
    for spec in header.tensors:
        dt = np.dtype(spec.dtype).newbyteorder("<")
        arr = np.frombuffer(buf, dtype=dt, count=spec.count,
                            offset=base + offsets[spec.name]).reshape(spec.shape)
        if not arr.flags.aligned:  # only when the caller's bytes object is itself unaligned
            arr = arr.copy()
            arr.flags.writeable = False
        if require_finite and spec.dtype in _FLOAT_DTYPES:
            bad = _count_non_finite(arr)
            if bad:
                raise ValidationError("non_finite", f"{who}: tensor {spec.name!r} has {bad} "
                                      "non-finite value(s) (NaN or Inf); refused")
        tensors[spec.name] = arr
    return Envelope(header=header, tensors=tensors, digest=hashlib.sha256(
        view[:signed_end + SIGNATURE_BYTES]).hexdigest())


# ---------------------------------------------------------------------------------------------
# encode
# ---------------------------------------------------------------------------------------------
def _plain_meta(value: Any, path: str, depth: int) -> Any:
    """Copy ``meta`` into plain JSON types, refusing what would not survive the round trip.

    ``depth`` counts containers (``meta`` itself is 1), as the decoder does.
    """
    if isinstance(value, Mapping | list | tuple) and depth > MAX_META_DEPTH:
        raise _malformed(f"meta is nested deeper than {MAX_META_DEPTH} levels at {path}")
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        value = value.item()
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError("non_finite", f"meta {path} is {value!r}; JSON carries finite "
                                  "numbers only")
        return float(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _malformed(f"meta {path} has key {k!r}; keys must be strings")
            out[k] = _plain_meta(v, f"{path}.{k}", depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_plain_meta(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    raise _malformed(f"meta {path} is a {type(value).__name__}; use JSON types (dict, list, str, "
                     "int, float, bool, None)")


def _prepare(name: object, value: object) -> tuple[TensorSpec, np.ndarray]:
    if (not isinstance(name, str) or not 1 <= len(name) <= MAX_TENSOR_NAME
            or not name.isprintable() or name == "__metadata__"):
        raise _malformed(f"tensor name {_show(name)} is not valid (1 to {MAX_TENSOR_NAME} "
                         "printable characters, not '__metadata__')")
    if not isinstance(value, np.ndarray):
        raise _malformed(f"tensor {name!r} is a {type(value).__name__}; expected a numpy array")
    dtname = value.dtype.name
    if value.dtype.fields is not None or dtname not in SUPPORTED_DTYPES:
        raise _malformed(f"tensor {name!r} has dtype {value.dtype}; supported: "
                         f"{', '.join(SUPPORTED_DTYPES)}")
    if value.ndim > MAX_TENSOR_RANK or any(d > MAX_DIM for d in value.shape):
        raise _malformed(f"tensor {name!r} has shape {value.shape}; at most {MAX_TENSOR_RANK} "
                         f"dimensions of at most {MAX_DIM}")
    # asarray(order="C") rather than ascontiguousarray, which turns a 0-d array into 1-d
    arr = np.asarray(value, dtype=np.dtype(dtname).newbyteorder("<"), order="C")
    if dtname in _FLOAT_DTYPES:
        bad = _count_non_finite(arr)
        if bad:
            raise ValidationError("non_finite", f"tensor {name!r} has {bad} non-finite value(s) "
                                  "(NaN or Inf); refusing to encode it")
    return TensorSpec(name, dtname, tuple(int(d) for d in arr.shape)), arr


def encode(
    kind: str,
    sender: str,
    key: SigningKey,
    tensors: Mapping[str, np.ndarray],
    *,
    round: int,
    model_version: int,
    meta: Mapping[str, Any] | None = None,
    nonce: bytes | None = None,
    created_at: float | None = None,
    max_bytes: int = MAX_ENVELOPE_BYTES,
) -> bytes:
    """Build and sign one envelope.

    ``tensors`` maps names to numpy arrays of a supported dtype (float32, float64, float16, int64,
    int32, uint8); non-contiguous or big-endian arrays are converted, non-finite floats are refused
    (:class:`ValidationError`, reason ``non_finite``). ``meta`` is a JSON object, free-form per
    kind. ``nonce`` (``NONCE_BYTES`` bytes) and ``created_at`` default to fresh random bytes and
    the current time. The result is refused (:class:`TooLargeError`) if no receiver with the same
    ``max_bytes`` would accept it. Bad arguments raise :class:`EnvelopeError`.
    """
    if not isinstance(key, SigningKey):
        raise TypeError(f"key must be a SigningKey, got {type(key).__name__}")
    if not isinstance(tensors, Mapping):
        raise _malformed(f"tensors must be a mapping of name -> array, got "
                         f"{type(tensors).__name__}")
    if kind not in ENVELOPE_KINDS:
        raise _malformed(f"kind {_show(kind)} is not one of {', '.join(sorted(ENVELOPE_KINDS))}")
    if not is_valid_id(sender):
        raise _malformed(f"sender {_show(sender)} is not a valid id (1 to {MAX_ID_LENGTH} "
                         "characters from A-Z a-z 0-9 _ . -)")
    for fname, fvalue in (("round", round), ("model_version", model_version)):
        if not _is_int(fvalue) and not isinstance(fvalue, np.integer):
            raise _malformed(f"{fname} must be an integer, got {_show(fvalue)}")
        if not 0 <= int(fvalue) <= MAX_INT:
            raise _malformed(f"{fname} must be in [0, {MAX_INT}], got {fvalue}")
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise _malformed(f"nonce must be {NONCE_BYTES} bytes")
    stamp: object = time.time() if created_at is None else created_at
    if isinstance(stamp, np.floating | np.integer):
        stamp = stamp.item()
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp):
        raise _malformed(f"created_at must be finite unix seconds, got {_show(stamp)}")
    plain_meta = _plain_meta({} if meta is None else meta, "meta", 1)
    if not isinstance(plain_meta, dict):
        raise _malformed("meta must be a mapping")
    if len(tensors) > MAX_TENSORS:
        raise _malformed(f"{len(tensors)} tensors; the limit is {MAX_TENSORS}")

    prepared = [_prepare(name, value) for name, value in tensors.items()]
    prepared.sort(key=lambda p: p[0].name)
    # Body layout: widest dtype first (then by name), so every tensor is aligned to its itemsize.
    layout = sorted(prepared, key=lambda p: (-SUPPORTED_DTYPES[p[0].dtype][1], p[0].name))
    st_index: dict[str, Any] = {}
    pos = 0
    for spec, _ in layout:
        st_index[spec.name] = {"dtype": SUPPORTED_DTYPES[spec.dtype][0], "shape": list(spec.shape),
                               "data_offsets": [pos, pos + spec.nbytes]}
        pos += spec.nbytes
    st_json = _canonical(st_index)
    st_json += b" " * (-len(st_json) % BODY_ALIGN)
    if len(st_json) > MAX_HEADER_BYTES:
        raise TooLargeError(f"the tensor index is {len(st_json)} bytes, over the limit of "
                            f"{MAX_HEADER_BYTES}; send fewer or shorter-named tensors")
    st_len = len(st_json).to_bytes(8, "little")
    chunks: list[Any] = [st_len, st_json] + [arr.reshape(-1).view(np.uint8) for _, arr in layout]
    body_bytes = 8 + len(st_json) + pos
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)

    header = {
        "schema": ENVELOPE_SCHEMA,
        "kind": kind,
        "sender": sender,
        "round": int(round),
        "model_version": int(model_version),
        "nonce": nonce.hex(),
        "created_at": float(stamp),
        "tensors": [spec.to_dict() for spec, _ in prepared],
        "body_sha256": digest.hexdigest(),
        "body_bytes": body_bytes,
        "meta": plain_meta,
    }
    try:
        canonical = _canonical(header)
    except (ValueError, UnicodeEncodeError) as exc:
        raise _malformed(f"header cannot be serialised ({exc})") from None
    header_bytes = canonical + b" " * _header_pad(len(canonical))
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise TooLargeError(f"the envelope header is {len(header_bytes)} bytes, over the limit of "
                            f"{MAX_HEADER_BYTES}; make meta smaller")
    total = PREFIX_BYTES + len(header_bytes) + SIGNATURE_BYTES + body_bytes
    if total > max_bytes:
        raise TooLargeError(f"the envelope would be {total} bytes, over the limit of {max_bytes}; "
                            "receivers would refuse it")
    signed = _PREFIX.pack(FRAME_MAGIC, FRAME_VERSION, len(header_bytes)) + header_bytes
    return b"".join([signed, key.sign(signed), *chunks])


# ---------------------------------------------------------------------------------------------
# Replay protection
# ---------------------------------------------------------------------------------------------
