"""Property tests for the envelope decoder: whatever the bytes, it answers with one typed error.

Strategies: random bytes; random bytes behind a valid prefix; bit flips, truncations,
extensions and splices of valid envelopes; and edits re-signed with the right key (a malicious
but enrolled sender), which get past the signature and exercise the checks after it. The only
exceptions allowed out of ``decode`` are :class:`~bedside.errors.BedsideError` subclasses; an
accepted message must be internally consistent. Bounded so the suite stays fast.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bedside.errors import BedsideError, EnvelopeError, SignatureError
from bedside.wire.envelope import SUPPORTED_DTYPES, Envelope, decode, encode
from bedside.wire.signing import KeyRing, SigningKey
from tests.wire_tools import build, resign, split, st_body, st_split

KEY = SigningKey.generate()
RING = KeyRing({"dev-1": KEY.public, "aggregator": KEY.public})
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _base_messages() -> list[bytes]:
    rng = np.random.default_rng(7)
    return [
        encode("update", "dev-1", KEY, {
            "w": rng.standard_normal((3, 4)).astype(np.float32),
            "b": rng.standard_normal(4).astype(np.float64),
            "h": np.ones(3, np.float16),
            "n": np.arange(5, dtype=np.int64),
            "i": np.arange(2, dtype=np.int32),
            "u": np.frombuffer(b"onnx", np.uint8),
            "z": np.zeros((0, 2), np.float32),
        }, round=3, model_version=2, meta={"weight": 8, "tags": ["a", 1.5, None]}),
        encode("announce", "aggregator", KEY, {}, round=7, model_version=1,
               meta={"state": "open", "deadline": 1.7e9}),
        encode("model", "aggregator", KEY, {"onnx": np.arange(100, dtype=np.uint8)}, round=1,
               model_version=5),
    ]


BASES = _base_messages()
MESSAGE = st.sampled_from(BASES)

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
JSON_SCALAR = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
               | st.integers(-4, 2**32) | st.floats(allow_nan=False, allow_infinity=False)
               | _text)
JSON = st.recursive(
    JSON_SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=10,
)


def _decode_or_typed_error(data: bytes, **kw: Any) -> Envelope | None:
    """Decode; a BedsideError is an answer, any other exception fails the test."""
    try:
        env = decode(data, RING, **kw)
    except BedsideError:
        return None
    _assert_consistent(env)
    return env


def _assert_consistent(env: Envelope) -> None:
    assert [t.name for t in env.header.tensors] == sorted(env.tensors)
    for spec in env.header.tensors:
        arr = env.tensors[spec.name]
        assert arr.shape == spec.shape and arr.dtype == np.dtype(spec.dtype)
        assert not arr.flags.writeable
        if spec.dtype.startswith("float"):
            assert np.isfinite(arr).all()


# -- arbitrary bytes -------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    assert _decode_or_typed_error(data) is None


@FUZZ
@given(st.integers(0, 2**32 - 1), st.binary(max_size=2048), st.sampled_from([0, 1, 2, 255]))
def test_random_bytes_behind_a_valid_prefix(hlen, rest, version):
    data = b"BSDE" + struct.pack(">BI", version, hlen) + rest
    assert _decode_or_typed_error(data) is None


@FUZZ
@given(st.one_of(JSON, st.dictionaries(_text, JSON, max_size=12)), st.binary(max_size=256))
def test_signed_random_headers(header, body):
    """Any JSON at all in a correctly framed and signed header is refused with a typed error."""
    try:
        msg = build(header, body, KEY)
    except (TypeError, ValueError):
        return  # not serialisable by the test builder (e.g. mixed key types): nothing to send
    assert _decode_or_typed_error(msg) is None


# -- mutations of valid envelopes: all must fail verification --------------------------------------
@FUZZ
@given(MESSAGE, st.data())
def test_any_flipped_bit_fails(msg, data):
    pos = data.draw(st.integers(0, len(msg) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    mutated = bytearray(msg)
    mutated[pos] ^= 1 << bit
    try:
        decode(bytes(mutated), RING)
    except (SignatureError, EnvelopeError):
        return
    raise AssertionError(f"a flipped bit at byte {pos} was accepted")


@FUZZ
@given(MESSAGE, st.data())
def test_truncation_fails(msg, data):
    cut = data.draw(st.integers(0, len(msg) - 1))
    try:
        decode(msg[:cut], RING)
    except (SignatureError, EnvelopeError):
        return
    raise AssertionError(f"a message truncated to {cut} bytes was accepted")


@FUZZ
@given(MESSAGE, st.binary(min_size=1, max_size=64))
def test_extension_fails(msg, tail):
    try:
        decode(msg + tail, RING)
    except SignatureError:
        return
    raise AssertionError("an extended message was accepted")


@FUZZ
@given(MESSAGE, MESSAGE, st.data())
def test_splices_fail_unless_they_rebuild_an_original(a, b, data):
    i = data.draw(st.integers(0, len(a)))
    j = data.draw(st.integers(0, len(b)))
    spliced = a[:i] + b[j:]
    env = _decode_or_typed_error(spliced)
    if env is not None:
        assert spliced in BASES


@FUZZ
@given(MESSAGE, st.data())
def test_random_overwrites_fail(msg, data):
    start = data.draw(st.integers(0, len(msg) - 1))
    patch = data.draw(st.binary(min_size=1, max_size=16))
    mutated = msg[:start] + patch + msg[start + len(patch):]
    env = _decode_or_typed_error(mutated)
    if env is not None:
        assert mutated == msg


# -- edits re-signed with the right key: the checks after the signature ----------------------------
HEADER_FIELDS = ["schema", "kind", "sender", "round", "model_version", "nonce", "created_at",
                 "tensors", "body_sha256", "body_bytes", "meta"]
INDEX_VALUE = st.one_of(
    JSON,
    st.lists(st.integers(-2, 2**31 + 1), max_size=10),
    st.sampled_from([*SUPPORTED_DTYPES, "bool", "F32", "float128"]),
)


@FUZZ
@given(MESSAGE, st.data())
def test_resigned_header_edits(msg, data):
    action = data.draw(st.sampled_from(["set", "delete", "add", "index"]))
    field = data.draw(st.sampled_from(HEADER_FIELDS))
    value = data.draw(JSON)

    def edit(h: dict[str, Any]) -> None:
        if action == "set":
            h[field] = value
        elif action == "delete":
            h.pop(field)
        elif action == "add":
            h[data.draw(_text.filter(lambda k: k not in h))] = value
        elif h["tensors"]:
            spec = data.draw(st.sampled_from(h["tensors"]))
            spec[data.draw(st.sampled_from(["name", "dtype", "shape", "other"]))] = data.draw(
                INDEX_VALUE)

    _decode_or_typed_error(resign(msg, KEY, edit=edit))


@FUZZ
@given(st.data())
def test_resigned_safetensors_edits(data):
    msg = BASES[0]
    _, _, body = split(msg)
    index, tensor_data = st_split(body)
    name = data.draw(st.sampled_from(sorted(index)))
    action = data.draw(st.sampled_from(["offsets", "shape", "dtype", "entry", "drop", "add",
                                        "data"]))
    if action == "offsets":
        index[name]["data_offsets"] = data.draw(st.lists(st.integers(-4, 200), max_size=3))
    elif action == "shape":
        index[name]["shape"] = data.draw(st.lists(st.integers(-1, 2**31), max_size=9))
    elif action == "dtype":
        index[name]["dtype"] = data.draw(st.sampled_from(["F32", "F64", "F16", "I64", "I32", "U8",
                                                          "BOOL", "BF16", "f32"]))
    elif action == "entry":
        index[name] = data.draw(JSON)
    elif action == "drop":
        index.pop(name)
    elif action == "add":
        index[data.draw(_text)] = data.draw(JSON)
    else:
        tensor_data = data.draw(st.binary(max_size=len(tensor_data) + 16))
    new_body = st_body(index, tensor_data)
    env = _decode_or_typed_error(resign(msg, KEY, body=new_body))
    if env is not None and action != "data":
        assert new_body == body  # an edit that changed something was accepted


@FUZZ
@given(st.data())
def test_resigned_body_bytes(data):
    msg = data.draw(MESSAGE)
    _, _, body = split(msg)
    start = data.draw(st.integers(0, len(body)))
    patch = data.draw(st.binary(max_size=24))
    _decode_or_typed_error(resign(msg, KEY, body=body[:start] + patch + body[start + len(patch):]))


# -- the codec round-trips whatever it accepts -----------------------------------------------------
_finite = {"allow_nan": False, "allow_infinity": False}
ARRAY = st.sampled_from(sorted(SUPPORTED_DTYPES)).flatmap(
    lambda dt: hnp.arrays(
        np.dtype(dt),
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
        elements=(st.floats(width=np.dtype(dt).itemsize * 8, **_finite)
                  if dt.startswith("float") else None),
    ))
NAMES = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_categories=("Cs",)),
                min_size=1, max_size=20).filter(lambda s: s.isprintable() and s != "__metadata__")


@FEW
@given(st.dictionaries(NAMES, ARRAY, max_size=6), st.dictionaries(_text, JSON, max_size=4),
       st.integers(0, 2**63 - 1))
def test_round_trip(tensors, meta, round_):
    msg = encode("update", "dev-1", KEY, tensors, round=round_, model_version=0, meta=meta)
    env = decode(msg, RING)
    assert env.round == round_ and env.meta == meta
    assert set(env.tensors) == set(tensors)
    for name, arr in tensors.items():
        out = env.tensors[name]
        assert out.dtype == arr.dtype and out.shape == arr.shape
        assert out.tobytes() == np.ascontiguousarray(arr).tobytes()
    assert hashlib.sha256(split(msg)[2]).hexdigest() == env.header.body_sha256
