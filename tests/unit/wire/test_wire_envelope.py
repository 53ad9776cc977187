"""The envelope: round trips, the documented frame, and every refusal with its typed error."""

from __future__ import annotations

import hashlib
import json
import struct
import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import load as st_load

from bedside.constants import (
    ENVELOPE_KINDS,
    MAX_ENVELOPE_BYTES,
    MAX_HEADER_BYTES,
    MAX_TENSOR_RANK,
    MAX_TENSORS,
    NONCE_BYTES,
)
from bedside.errors import (
    BedsideError,
    EnvelopeError,
    InputError,
    KeyStoreError,
    SignatureError,
    TooLargeError,
    UnknownSenderError,
    ValidationError,
    WireError,
)
from bedside.wire.envelope import (
    MAX_META_DEPTH,
    SUPPORTED_DTYPES,
    Envelope,
    Header,
    decode,
    encode,
    peek,
)
from bedside.wire.signing import KeyRing, SigningKey
from tests.wire_tools import build, canonical, resign, split, st_body, st_split

KEY = SigningKey.generate()
OTHER = SigningKey.generate()
RING = KeyRing({"dev-1": KEY.public, "aggregator": KEY.public})


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layer.0.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "layer.0.bias": rng.standard_normal(4).astype(np.float32),
        "steps": np.array([7], dtype=np.int64),
    }


def _msg(**kw) -> bytes:
    args = {"kind": "update", "sender": "dev-1", "key": KEY, "tensors": _tensors(), "round": 3,
            "model_version": 2, "meta": {"weight": 16}}
    args.update(kw)
    return encode(args.pop("kind"), args.pop("sender"), args.pop("key"), args.pop("tensors"),
                  **args)


# -- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(ENVELOPE_KINDS))
def test_round_trip_every_kind(kind):
    t = _tensors()
    msg = encode(kind, "dev-1", KEY, t, round=5, model_version=9, meta={"k": [1, 2.5, None]},
                 nonce=b"\x01" * NONCE_BYTES, created_at=1700000000.25)
    env = decode(msg, RING, kinds={kind})
    assert isinstance(env, Envelope) and isinstance(env.header, Header)
    assert (env.kind, env.sender, env.round, env.model_version) == (kind, "dev-1", 5, 9)
    assert env.nonce == "01" * NONCE_BYTES and env.created_at == 1700000000.25
    assert env.meta == {"k": [1, 2.5, None]}
    assert set(env.tensors) == set(t)
    for name, arr in t.items():
        assert env.tensors[name].dtype == arr.dtype and np.array_equal(env.tensors[name], arr)
    assert [s.name for s in env.header.tensors] == sorted(t)


@pytest.mark.parametrize("dtype", sorted(SUPPORTED_DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (1, 2, 1, 2), (3, 0, 2)])
def test_round_trip_every_dtype_and_shape(dtype, shape):
    arr = (np.arange(int(np.prod(shape))) % 200).astype(dtype).reshape(shape)
    env = decode(_msg(tensors={"t": arr}), RING)
    out = env.tensors["t"]
    assert out.dtype == np.dtype(dtype) and out.shape == shape and np.array_equal(out, arr)


def test_arrays_are_read_only_views_and_input_is_not_aliased():
    msg = bytearray(_msg())
    env = decode(msg, RING)
    w = env.tensors["layer.0.weight"]
    assert not w.flags.writeable and w.flags.aligned
    with pytest.raises(ValueError):
        w[0, 0] = 1.0
    before = w.copy()
    msg[-40:] = b"\x00" * 40  # the caller's buffer changes after decoding: arrays do not
    assert np.array_equal(w, before)
    writable = w.copy()
    writable[0, 0] = 1.0


def test_non_contiguous_and_big_endian_inputs_are_converted():
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    t = {"strided": base[:, ::2], "transposed": base.T, "be": np.arange(5, dtype=">i4"),
         "fortran": np.asfortranarray(base.astype(np.float32))}
    env = decode(_msg(tensors=t), RING)
    for name, arr in t.items():
        assert np.array_equal(env.tensors[name], arr), name
        assert env.tensors[name].dtype == arr.dtype.newbyteorder("=")


def test_large_tensor_round_trip():
    big = np.random.default_rng(1).standard_normal(8_000_000).astype(np.float32)  # 32 MB
    msg = encode("model", "aggregator", KEY, {"w": big}, round=1, model_version=1)
    env = decode(msg, RING, kinds={"model"})
    assert np.array_equal(env.tensors["w"], big)
    assert env.tensors["w"].base is not None  # a view into the message, not a second copy


def test_onnx_file_travels_as_uint8():
    onnx = bytes(range(256)) * 10 + b"tail"
    msg = encode("model", "aggregator", KEY, {"onnx": np.frombuffer(onnx, dtype=np.uint8)},
                 round=0, model_version=4, meta={"manifest": {"name": "m", "version": 4}})
    env = decode(msg, RING, kinds={"model"})
    assert env.tensors["onnx"].tobytes() == onnx
    assert env.meta["manifest"]["version"] == 4


def test_tensorless_envelope_and_empty_meta():
    msg = encode("announce", "aggregator", KEY, {}, round=0, model_version=0)
    env = decode(msg, RING, kinds={"announce"}, expected={})
    assert env.tensors == {} and env.meta == {} and env.header.tensors == ()
    assert peek(msg).kind == "announce"


def test_meta_numpy_scalars_and_tuples_become_json():
    msg = _msg(meta={"a": np.float32(0.5), "b": np.int64(3), "c": (1, 2), "d": np.bool_(True)})
    assert decode(msg, RING).meta == {"a": 0.5, "b": 3, "c": [1, 2], "d": True}


def test_decode_accepts_memoryview_and_callable_keys():
    msg = _msg()
    env = decode(memoryview(msg), lambda sender: KEY.public)
    assert env.sender == "dev-1"
    assert peek(memoryview(msg)).sender == "dev-1"
    assert decode(msg, RING, kinds="update").kind == "update"  # a lone string is one kind


# -- the documented frame ------------------------------------------------------------------------
def test_frame_layout_matches_the_document():
    msg = _msg()
    assert msg[:4] == b"BSDE" and msg[4] == 1
    (hlen,) = struct.unpack(">I", msg[5:9])
    header_bytes = msg[9:9 + hlen]
    header = json.loads(header_bytes)
    stripped = header_bytes.rstrip(b" ")
    assert stripped == canonical(header) and len(header_bytes) - len(stripped) < 8
    assert (9 + hlen + 64) % 8 == 0  # the body starts at a multiple of 8
    KEY.public.verify(msg[9 + hlen:9 + hlen + 64], msg[:9 + hlen])
    body = msg[9 + hlen + 64:]
    assert header["body_bytes"] == len(body)
    assert header["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert set(header) == {"schema", "kind", "sender", "round", "model_version", "nonce",
                           "created_at", "tensors", "body_sha256", "body_bytes", "meta"}
    loaded = st_load(body)  # the body is a plain safetensors file
    for name, arr in _tensors().items():
        assert np.array_equal(loaded[name], arr)
    assert build(header, body, KEY) == msg  # the test builder reproduces the encoder exactly


def test_frame_is_deterministic_given_nonce_and_time():
    a = _msg(nonce=b"\x00" * NONCE_BYTES, created_at=1.5)
    b = _msg(nonce=b"\x00" * NONCE_BYTES, created_at=1.5)
    assert a == b
    assert peek(_msg()).nonce != peek(_msg()).nonce


# -- size and framing (before the signature) ------------------------------------------------------
def test_oversize_is_refused_before_any_parsing():
    junk = b"\xff" * 1025  # not even an envelope: the size check comes first
    with pytest.raises(TooLargeError, match="1025 bytes"):
        decode(junk, RING, max_bytes=1024)
    with pytest.raises(TooLargeError):
        peek(junk, max_bytes=1024)
    msg = _msg()
    with pytest.raises(TooLargeError) as info:
        decode(msg, RING, max_bytes=len(msg) - 1)
    assert info.value.reason == "too_large"
    decode(msg, RING, max_bytes=len(msg))
    with pytest.raises(TooLargeError):
        decode(memoryview(b"\x00" * (MAX_ENVELOPE_BYTES + 1)), RING)


def test_encode_refuses_what_no_receiver_would_accept():
    with pytest.raises(TooLargeError, match="over the limit"):
        _msg(max_bytes=100)
    with pytest.raises(TooLargeError, match="header"):
        _msg(meta={"blob": "x" * MAX_HEADER_BYTES})


@pytest.mark.parametrize("data, match", [
    (b"", "too short"),
    (b"BSDE", "too short"),
    (b"XXXX\x01" + b"\x00" * 100, "magic"),
    (b"BSDE\x02" + b"\x00" * 100, "version 2"),
    (b"BSDE\x01\xff\xff\xff\xff" + b"\x00" * 100, "over the limit"),
    (b"BSDE\x01\x00\x00\x01\x00" + b"\x00" * 100, "runs past the end"),
    (b"BSDE\x01\x00\x00\x00\x02{}" + b"\x00" * 100, "fields are wrong"),
    (b"BSDE\x01\x00\x00\x00\x02[]" + b"\x00" * 100, "JSON object"),
    (b"BSDE\x01\x00\x00\x00\x02\xff\xfe" + b"\x00" * 100, "not UTF-8"),
    (b"BSDE\x01\x00\x00\x00\x02{," + b"\x00" * 100, "not valid JSON"),
])
def test_framing_errors(data, match):
    with pytest.raises(EnvelopeError, match=match) as info:
        decode(data, RING)
    assert not isinstance(info.value, TooLargeError)
    with pytest.raises(EnvelopeError, match=match):
        peek(data)


def test_unsupported_versions_have_their_own_reason():
    msg = _msg()
    with pytest.raises(EnvelopeError) as info:
        decode(msg[:4] + b"\x02" + msg[5:], RING)
    assert info.value.reason == "unsupported_schema"
    with pytest.raises(EnvelopeError, match="schema 2") as info:
        decode(resign(msg, KEY, edit=lambda h: h.update(schema=2)), RING)
    assert info.value.reason == "unsupported_schema"


def test_not_bytes_is_an_envelope_error():
    with pytest.raises(EnvelopeError, match="str"):
        decode("BSDE", RING)  # type: ignore[arg-type]


# -- header schema (a malicious but enrolled sender re-signs its edits) ----------------------------
def _edit(field, value):
    return lambda h: h.__setitem__(field, value)


@pytest.mark.parametrize("edit, match", [
    (_edit("round", -1), "'round'"),
    (_edit("round", True), "'round'"),
    (_edit("round", 1.0), "'round'"),
    (_edit("round", "3"), "'round'"),
    (_edit("round", 2**63), "'round'"),
    (_edit("model_version", None), "'model_version'"),
    (_edit("schema", "1"), "schema"),
    (_edit("kind", "pickle"), "'kind'"),
    (_edit("kind", ["update"]), "'kind'"),
    (_edit("sender", "dev/1"), "'sender'"),
    (_edit("sender", "+"), "'sender'"),
    (_edit("sender", ""), "'sender'"),
    (_edit("nonce", "AB" * NONCE_BYTES), "'nonce'"),
    (_edit("nonce", "ab" * (NONCE_BYTES - 1)), "'nonce'"),
    (_edit("nonce", 5), "'nonce'"),
    (_edit("created_at", 1700000000), "'created_at'"),
    (_edit("created_at", "now"), "'created_at'"),
    (_edit("body_sha256", "00"), "'body_sha256'"),
    (_edit("body_bytes", -1), "'body_bytes'"),
    (_edit("meta", []), "'meta'"),
    (_edit("meta", "x"), "'meta'"),
    (_edit("tensors", {}), "'tensors'"),
    (lambda h: h.pop("meta"), "missing \\['meta'\\]"),
    (lambda h: h.update(extra=1), "unexpected"),
    (lambda h: h.update(__proto__={}), "unexpected"),
])
def test_header_fields_are_strictly_typed(edit, match):
    with pytest.raises(EnvelopeError, match=match):
        decode(resign(_msg(), KEY, edit=edit), RING)


def _index_edit(fn):
    def edit(h):
        fn(h["tensors"])
    return edit


@pytest.mark.parametrize("edit, match", [
    (_index_edit(lambda t: t[0].update(dtype="bool")), "dtype"),
    (_index_edit(lambda t: t[0].update(dtype="object")), "dtype"),
    (_index_edit(lambda t: t[0].update(shape=[-1])), "shape"),
    (_index_edit(lambda t: t[0].update(shape=[True])), "shape"),
    (_index_edit(lambda t: t[0].update(shape="4")), "shape"),
    (_index_edit(lambda t: t[0].update(shape=[1] * (MAX_TENSOR_RANK + 1))), "dimensions"),
    (_index_edit(lambda t: t[0].update(shape=[2**31, 1])), "shape"),
    (_index_edit(lambda t: t[0].update(name="")), "name"),
    (_index_edit(lambda t: t[0].update(name="__metadata__")), "name"),
    (_index_edit(lambda t: t[0].update(name="a\nb")), "name"),
    (_index_edit(lambda t: t[0].update(extra=1)), "keys name, dtype, shape"),
    (_index_edit(lambda t: t.append(dict(t[0]))), "duplicated or out of order"),
    (_index_edit(lambda t: t.reverse()), "duplicated or out of order"),
    (_index_edit(lambda t: t.append(5)), "must be an object"),
    (_index_edit(lambda t: t.extend([{"name": f"z{i}", "dtype": "uint8", "shape": [0]}
                                     for i in range(MAX_TENSORS)])), "limit"),
])
def test_tensor_index_is_strictly_typed(edit, match):
    with pytest.raises(EnvelopeError, match=match):
        decode(resign(_msg(), KEY, edit=edit), RING)


def test_huge_declared_shapes_are_refused_without_allocating():
    def lie(h):
        h["tensors"][0]["shape"] = [2**31 - 1, 2**31 - 1, 2**31 - 1]

    msg = resign(_msg(), KEY, edit=lie)
    tracemalloc.start()
    try:
        with pytest.raises(EnvelopeError, match="declares"):
            decode(msg, RING)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_zero_sized_tensor_with_huge_other_dims_does_not_allocate():
    env = decode(_msg(tensors={"z": np.zeros((0, 2**31 - 1), dtype=np.float32)}), RING)
    assert env.tensors["z"].shape == (0, 2**31 - 1) and env.tensors["z"].size == 0


def test_non_canonical_headers_are_refused_even_when_signed():
    msg = _msg()
    header, _, body = split(msg)
    spaced = json.dumps(header, sort_keys=True).encode()  # ", " and ": " separators
    with pytest.raises(EnvelopeError, match="canonical"):
        decode(build(spaced + b" " * (-(73 + len(spaced)) % 8), body, KEY, raw_header=True), RING)
    unsorted = json.dumps(dict(reversed(list(header.items()))), separators=(",", ":")).encode()
    with pytest.raises(EnvelopeError, match="canonical"):
        decode(build(unsorted + b" " * (-(73 + len(unsorted)) % 8), body, KEY, raw_header=True),
               RING)
    unpadded = canonical(header)
    if (73 + len(unpadded)) % 8:
        with pytest.raises(EnvelopeError, match="canonical"):
            decode(build(unpadded, body, KEY, raw_header=True), RING)
    too_much = canonical(header) + b" " * 8
    too_much += b" " * (-(73 + len(too_much)) % 8)
    with pytest.raises(EnvelopeError, match="canonical"):
        decode(build(too_much, body, KEY, raw_header=True), RING)


def _raw_header_msg(text: str) -> bytes:
    """A signed frame whose header is exactly ``text`` (padded), with the body of a valid one."""
    _, _, body = split(_msg())
    raw = text.encode()
    return build(raw + b" " * (-(73 + len(raw)) % 8), body, KEY, raw_header=True)


@pytest.mark.parametrize("text, match", [
    ('{"a":1,"a":2}', "duplicate key"),
    ('{"meta":NaN}', "NaN is not allowed"),
    ('{"meta":-Infinity}', "Infinity is not allowed"),
    ('{"meta":1e999}', "out of range"),
    ('{"meta":' + "1" * 5000 + "}", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ('"just a string"', "JSON object"),
    ('{"meta":"\\ud800"}', "fields are wrong"),
])
def test_strict_json(text, match):
    with pytest.raises(EnvelopeError, match=match):
        decode(_raw_header_msg(text), RING)


def test_lone_surrogates_and_deep_meta_are_refused():
    msg = _msg()
    header, _, body = split(msg)
    header["meta"] = {"x": "\ud800"}
    raw = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    with pytest.raises(EnvelopeError, match=r"Unicode|canonical"):
        decode(build(raw + b" " * (-(73 + len(raw)) % 8), body, KEY, raw_header=True), RING)


def _nested(depth: int) -> dict:
    """A dict nested ``depth`` containers deep ({} is 1), with a scalar at the bottom."""
    node: dict = {"leaf": 1}
    for _ in range(depth - 1):
        node = {"d": node}
    return node


def test_meta_nesting_limit_is_the_same_for_encoder_and_decoder():
    ok = _nested(MAX_META_DEPTH)
    assert decode(_msg(meta=ok), RING).meta == ok
    assert decode(resign(_msg(), KEY, edit=_edit("meta", ok)), RING).meta == ok
    deep = _nested(MAX_META_DEPTH + 1)
    with pytest.raises(EnvelopeError, match="nested"):
        decode(resign(_msg(), KEY, edit=_edit("meta", deep)), RING)
    with pytest.raises(EnvelopeError, match="nested"):
        _msg(meta=deep)
    with pytest.raises(EnvelopeError, match="nested"):
        _msg(meta={"a": json.loads("[" * MAX_META_DEPTH + "1" + "]" * MAX_META_DEPTH)})


@pytest.mark.parametrize("depth", [40, 900, 5000])
def test_deeply_nested_values_elsewhere_are_refused(depth):
    deep = "[" * depth + "]" * depth
    header, _, body = split(_msg())
    raw = canonical(header).replace(b'"round":3', b'"round":' + deep.encode())
    msg = build(raw + b" " * (-(73 + len(raw)) % 8), body, KEY, raw_header=True)
    with pytest.raises(EnvelopeError, match=r"nested too deeply|not valid JSON"):
        decode(msg, RING)
    ix, data = st_split(body)
    st_raw = json.dumps(ix, separators=(",", ":")).replace('"shape":[1]', '"shape":' + deep)
    with pytest.raises(EnvelopeError, match=r"nested too deeply|not valid JSON"):
        decode(resign(_msg(), KEY, body=st_body(st_raw.encode(), data)), RING)


# -- kind, keys, signature -------------------------------------------------------------------------
def test_wrong_kind_is_refused_before_the_key_lookup():
    msg = _msg()
    with pytest.raises(EnvelopeError, match="not accepted here") as info:
        decode(msg, KeyRing(), kinds={"model", "announce"})
    assert info.value.reason == "wrong_kind"


def test_unknown_sender():
    msg = _msg(sender="stranger")
    with pytest.raises(UnknownSenderError, match="stranger") as info:
        decode(msg, RING)
    assert info.value.reason == "unknown_sender"

    def raising(sender):
        raise KeyError(sender)

    with pytest.raises(UnknownSenderError, match="lookup failed"):
        decode(msg, raising)

    def unreadable(sender):
        raise KeyStoreError(f"keys/{sender}.pub: cannot read")

    with pytest.raises(UnknownSenderError, match="cannot read"):
        decode(msg, unreadable)
    with pytest.raises(UnknownSenderError, match="no public key"):
        decode(msg, lambda s: None)  # type: ignore[arg-type,return-value]


def test_wrong_key_is_a_signature_error():
    msg = _msg(key=OTHER)
    with pytest.raises(SignatureError, match=KEY.public.fingerprint) as info:
        decode(msg, RING)
    assert not isinstance(info.value, UnknownSenderError)
    assert info.value.reason == "bad_signature"


def test_header_edit_without_resigning_fails_the_signature():
    msg = _msg()
    i = msg.index(b'"round":3')
    forged = msg[:i] + b'"round":4' + msg[i + 9:]
    with pytest.raises(SignatureError):
        decode(forged, RING)


def test_body_edits_fail_the_digest():
    msg = _msg()
    flipped = bytearray(msg)
    flipped[-1] ^= 0x01
    with pytest.raises(SignatureError, match="sha256"):
        decode(bytes(flipped), RING)
    with pytest.raises(SignatureError, match="bytes but the signed header says"):
        decode(msg + b"\x00", RING)
    with pytest.raises(SignatureError, match="bytes but the signed header says"):
        decode(msg[:-1], RING)
    # A re-signed header that lies about the body's length or digest is refused the same way.
    lie = resign(msg, KEY, edit=lambda h: h.update(body_bytes=h["body_bytes"] + 4))
    with pytest.raises(SignatureError, match="body is"):
        decode(lie, RING)
    lie = resign(msg, KEY, edit=lambda h: h.update(body_sha256="0" * 64))
    with pytest.raises(SignatureError, match="sha256"):
        decode(lie, RING)


# -- the safetensors body (after the signature) ----------------------------------------------------
def _body_edit(fn):
    """Re-signed message whose safetensors header was changed by ``fn(index, data) -> body``."""
    msg = _msg()
    _, _, body = split(msg)
    index, data = st_split(body)
    return resign(msg, KEY, body=fn(index, data))


@pytest.mark.parametrize("fn, match", [
    (lambda ix, d: st_body({**ix, "__metadata__": {"a": "b"}}, d), "do not match the signed index"),
    (lambda ix, d: st_body({k: v for k, v in ix.items() if k != "steps"}, d),
     "do not match the signed index"),
    (lambda ix, d: st_body({**ix, "steps": {**ix["steps"], "dtype": "F64"}}, d), "dtype"),
    (lambda ix, d: st_body({**ix, "steps": {**ix["steps"], "dtype": "I32"}}, d), "dtype"),
    (lambda ix, d: st_body({**ix, "layer.0.weight": {**ix["layer.0.weight"], "shape": [3, 4]}},
                           d), "shape"),
    (lambda ix, d: st_body({**ix, "steps": {**ix["steps"], "shape": [True]}}, d), "shape"),
    (lambda ix, d: st_body({**ix, "steps": {**ix["steps"], "data_offsets": [0, 10**12]}}, d),
     "data_offsets"),
    (lambda ix, d: st_body({**ix, "steps": {**ix["steps"], "data_offsets": [-8, 0]}}, d),
     "data_offsets"),
    (lambda ix, d: st_body({**ix, "steps": {**ix["steps"], "data_offsets": [0, 8, 9]}}, d),
     "data_offsets"),
    (lambda ix, d: st_body({**ix, "steps": {**ix["steps"], "data_offsets": [0, 4]}}, d),
     "needs 8"),
    (lambda ix, d: st_body({**ix, "steps": {**ix["steps"], "extra": 1}}, d), "entry"),
    (lambda ix, d: st_body(ix, d + b"\x00" * 8), "not claimed"),
    (lambda ix, d: st_body(ix, d[:-4]), "data_offsets"),
    (lambda ix, d: st_body(b'{"a":1,"a":2}', d), "duplicate key"),
    (lambda ix, d: st_body(b"[]", d), "JSON object"),
    (lambda ix, d: st_body(b'{"x":NaN}', d), "NaN"),
    (lambda ix, d: (10**9).to_bytes(8, "little") + d, "safetensors header length"),
])
def test_safetensors_header_must_agree_with_the_signed_index(fn, match):
    with pytest.raises(EnvelopeError, match=match):
        decode(_body_edit(fn), RING)


@pytest.mark.parametrize("body", [b"", b"\x01\x02", b"\x00" * 7])
def test_body_too_short_for_safetensors(body):
    msg = encode("announce", "aggregator", KEY, {}, round=0, model_version=0)
    with pytest.raises(EnvelopeError, match="too short"):
        decode(resign(msg, KEY, body=body), RING)


def _two_tensor_msg(offsets_a, offsets_b, data_len):
    header, _, _ = split(_msg(tensors={"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)}))
    ix = {"a": {"dtype": "F32", "shape": [4], "data_offsets": offsets_a},
          "b": {"dtype": "F32", "shape": [4], "data_offsets": offsets_b}}
    body = st_body(ix, b"\x00" * data_len)
    header["body_sha256"], header["body_bytes"] = hashlib.sha256(body).hexdigest(), len(body)
    return build(header, body, KEY)


def test_overlapping_offsets_are_refused():
    with pytest.raises(EnvelopeError, match="overlaps"):
        decode(_two_tensor_msg([0, 16], [8, 24], 24), RING)
    with pytest.raises(EnvelopeError, match="overlaps"):
        decode(_two_tensor_msg([0, 16], [0, 16], 32), RING)
    with pytest.raises(EnvelopeError, match="gap"):
        decode(_two_tensor_msg([0, 16], [20, 36], 36), RING)
    env = decode(_two_tensor_msg([16, 32], [0, 16], 32), RING)  # any order, if contiguous
    assert set(env.tensors) == {"a", "b"}


def test_index_lying_about_shape_with_the_same_byte_count():
    def lie(h):
        for t in h["tensors"]:
            if t["name"] == "layer.0.weight":
                t["shape"] = [2, 6]

    with pytest.raises(EnvelopeError, match="body says shape"):
        decode(resign(_msg(), KEY, edit=lie), RING)


def test_index_lying_about_dtype():
    def lie(h):
        for t in h["tensors"]:
            if t["name"] == "layer.0.bias":
                t["dtype"] = "int32"

    with pytest.raises(EnvelopeError, match="body says dtype"):
        decode(resign(_msg(), KEY, edit=lie), RING)


# -- expected shapes and finite values -------------------------------------------------------------
EXPECTED = {"layer.0.weight": ("float32", (4, 3)), "layer.0.bias": ("float32", (4,)),
            "steps": ("int64", (1,))}


def test_expected_passes():
    env = decode(_msg(), RING, expected=EXPECTED)
    assert set(env.tensors) == set(EXPECTED)
    decode(_msg(), RING, expected={**EXPECTED, "steps": (np.int64, [1])})  # type: ignore[dict-item]


@pytest.mark.parametrize("expected, reason, match", [
    ({**EXPECTED, "extra": ("float32", (1,))}, "missing_tensor", "extra"),
    ({k: v for k, v in EXPECTED.items() if k != "steps"}, "unexpected_tensor", "steps"),
    ({**EXPECTED, "layer.0.weight": ("float32", (3, 4))}, "shape_mismatch", "layer.0.weight"),
    ({**EXPECTED, "layer.0.bias": ("float32", (4, 1))}, "shape_mismatch", "layer.0.bias"),
    ({**EXPECTED, "steps": ("int32", (1,))}, "dtype_mismatch", "steps"),
    ({}, "unexpected_tensor", "layer.0.bias"),
])
def test_expected_mismatches(expected, reason, match):
    with pytest.raises(ValidationError, match=match) as info:
        decode(_msg(), RING, expected=expected)
    assert info.value.reason == reason


def test_bad_expected_is_a_caller_error():
    with pytest.raises(InputError):
        decode(_msg(), RING, expected={"steps": ("no-such-dtype", (1,))})
    with pytest.raises(InputError):
        decode(_msg(), RING, expected={"steps": "int64"})  # type: ignore[dict-item]


def _with_value(name: str, index: int, value: float) -> bytes:
    """A re-signed copy of _msg() with one float replaced (encode itself refuses NaN/Inf)."""
    msg = _msg()
    _, _, body = split(msg)
    ix, data = st_split(body)
    begin = ix[name]["data_offsets"][0] + 4 * index
    data = data[:begin] + np.float32(value).tobytes() + data[begin + 4:]
    return resign(msg, KEY, body=st_body(ix, data))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values(value):
    msg = _with_value("layer.0.weight", 5, value)
    with pytest.raises(ValidationError, match=r"layer\.0\.weight.*1 non-finite") as info:
        decode(msg, RING)
    assert info.value.reason == "non_finite"
    env = decode(msg, RING, require_finite=False)
    assert not np.isfinite(env.tensors["layer.0.weight"]).all()


def test_shape_checks_come_before_finite_checks():
    msg = _with_value("layer.0.weight", 0, np.nan)
    with pytest.raises(ValidationError) as info:
        decode(msg, RING, expected={**EXPECTED, "layer.0.weight": ("float32", (1,))})
    assert info.value.reason == "shape_mismatch"


# -- encode refuses caller bugs --------------------------------------------------------------------
@pytest.mark.parametrize("arr", [np.array([1.0, np.nan], np.float32), np.array([np.inf]),
                                 np.array([-np.inf], np.float16)])
def test_encode_refuses_non_finite(arr):
    with pytest.raises(ValidationError, match="non-finite") as info:
        _msg(tensors={"w": arr})
    assert info.value.reason == "non_finite"


@pytest.mark.parametrize("kw, error, match", [
    ({"tensors": {"w": np.array([True])}}, EnvelopeError, "dtype"),
    ({"tensors": {"w": np.array([1 + 2j])}}, EnvelopeError, "dtype"),
    ({"tensors": {"w": np.array(["a"])}}, EnvelopeError, "dtype"),
    ({"tensors": {"w": np.array([object()])}}, EnvelopeError, "dtype"),
    ({"tensors": {"w": np.zeros(2, np.uint16)}}, EnvelopeError, "dtype"),
    ({"tensors": {"w": [1.0, 2.0]}}, EnvelopeError, "numpy array"),
    ({"tensors": [np.zeros(1)]}, EnvelopeError, "mapping"),
    ({"tensors": {"w": np.zeros((1,) * (MAX_TENSOR_RANK + 1))}}, EnvelopeError, "dimensions"),
    ({"tensors": {"": np.zeros(1)}}, EnvelopeError, "name"),
    ({"tensors": {"__metadata__": np.zeros(1)}}, EnvelopeError, "name"),
    ({"tensors": {f"t{i}": np.zeros(0) for i in range(MAX_TENSORS + 1)}}, EnvelopeError, "limit"),
    ({"kind": "pickle"}, EnvelopeError, "kind"),
    ({"sender": "a/b"}, EnvelopeError, "sender"),
    ({"round": -1}, EnvelopeError, "round"),
    ({"round": 1.0}, EnvelopeError, "round"),
    ({"model_version": True}, EnvelopeError, "model_version"),
    ({"nonce": b"short"}, EnvelopeError, "nonce"),
    ({"created_at": float("nan")}, EnvelopeError, "created_at"),
    ({"meta": {1: "a"}}, EnvelopeError, "keys must be strings"),
    ({"meta": {"a": {1, 2}}}, EnvelopeError, "set"),
    ({"meta": {"a": float("inf")}}, ValidationError, "finite"),
    ({"meta": {"a": "\ud800"}}, EnvelopeError, "serialised"),
])
def test_encode_refuses_bad_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        _msg(**kw)


def test_encode_needs_a_signing_key():
    with pytest.raises(TypeError):
        _msg(key=KEY.public)


# -- errors ----------------------------------------------------------------------------------------
def test_every_error_is_a_wire_error_with_a_reason():
    for exc_type in (EnvelopeError, TooLargeError, SignatureError, UnknownSenderError):
        assert issubclass(exc_type, WireError) and issubclass(exc_type, BedsideError)
        assert isinstance(exc_type.reason, str)
