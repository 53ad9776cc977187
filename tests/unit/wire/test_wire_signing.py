"""Ed25519 keys: files on disk (mode 0600, refusals), text form, fingerprints, key rings, ids."""

from __future__ import annotations

import hashlib
import os
import pickle
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bedside.constants import MAX_ID_LENGTH
from bedside.errors import (
    InputError,
    KeyStoreError,
    SignatureError,
    UnknownSenderError,
)
from bedside.wire.signing import (
    KeyRing,
    SigningKey,
    VerifyKey,
    generate_keypair,
    is_valid_id,
    validate_id,
)

# RFC 8032, section 7.1, test 1 (empty message).
RFC_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIG = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b4"
    "6bd25bf5f0595bbe24655141438e7a100b")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- ids ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["a", "clinic-01", "A_b.c", "aggregator", "x" * MAX_ID_LENGTH,
                                   "dev.1-2_3"])
def test_valid_ids(value):
    assert is_valid_id(value)
    assert validate_id(value) == value


@pytest.mark.parametrize("value", ["", "x" * (MAX_ID_LENGTH + 1), "a/b", "+", "#", "a+b", "a#",
                                   "a b", "..", "a..b", ".hidden", "-rf", "é", "a\n", "a\x00",
                                   None, 5, b"abc"])
def test_invalid_ids(value):
    assert not is_valid_id(value)
    with pytest.raises(InputError, match="device_id"):
        validate_id(value, what="device_id")


# -- signing and verifying ----------------------------------------------------------------------
def test_rfc8032_vector():
    key = SigningKey(Ed25519PrivateKey.from_private_bytes(RFC_SECRET))
    assert key.public.raw == RFC_PUBLIC
    assert key.sign(b"") == RFC_SIG
    key.public.verify(RFC_SIG, b"")
    assert key.public.fingerprint == hashlib.sha256(RFC_PUBLIC).hexdigest()[:16]


def test_sign_verify_and_failures():
    key = SigningKey.generate()
    sig = key.sign(b"hello")
    assert len(sig) == 64
    key.public.verify(sig, b"hello")
    key.public.verify(sig, memoryview(b"hello"))
    with pytest.raises(SignatureError, match=key.public.fingerprint):
        key.public.verify(sig, b"hellO")
    with pytest.raises(SignatureError):
        SigningKey.generate().public.verify(sig, b"hello")
    with pytest.raises(SignatureError, match="64 bytes"):
        key.public.verify(sig[:-1], b"hello")
    bad = bytearray(sig)
    bad[0] ^= 1
    with pytest.raises(SignatureError):
        key.public.verify(bytes(bad), b"hello")


def test_text_form_round_trip_and_fingerprint_stable():
    key = SigningKey.generate()
    text = key.public.to_text()
    assert text.startswith("ed25519:") and len(text) == 8 + 64 and "\n" not in text
    again = VerifyKey.from_text(f"  {text.upper().replace('ED25519', 'ed25519')}\n")
    assert again == key.public and hash(again) == hash(key.public)
    assert again.fingerprint == key.public.fingerprint
    assert key.public.fingerprint == hashlib.sha256(key.public.raw).hexdigest()[:16]
    assert VerifyKey.from_raw(key.public.raw) == key.public
    assert key.public.fingerprint in repr(key.public)


@pytest.mark.parametrize("text", ["", "ed25519:", "ed25519:abcd", "rsa:" + "00" * 32,
                                  "ed25519:" + "zz" * 32, "ed25519:" + "00" * 33,
                                  "ed25519:" + "00" * 32 + " extra"])
def test_from_text_refuses_junk(text):
    with pytest.raises(KeyStoreError, match=r"config\.toml"):
        VerifyKey.from_text(text, source="config.toml")


def test_signing_key_never_shows_or_pickles_its_secret():
    key = SigningKey.generate()
    pem = key.private_pem()
    assert pem.decode() not in repr(key)
    assert key.public.fingerprint in repr(key)
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(key)


# -- private key files --------------------------------------------------------------------------
def test_save_load_round_trip_with_mode_0600(tmp_path):
    key = SigningKey.generate()
    path = key.save(tmp_path / "sub" / "dev.key")
    assert _mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = SigningKey.load(path)
    assert loaded.public == key.public
    assert loaded.sign(b"x") == key.sign(b"x")  # Ed25519 is deterministic
    assert [p.name for p in path.parent.iterdir()] == ["dev.key"]  # no temporary left behind


def test_save_is_0600_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        path = SigningKey.generate().save(tmp_path / "k.key")
    finally:
        os.umask(old)
    assert _mode(path) == 0o600


def test_save_creates_the_file_0600_from_the_first_byte(tmp_path, monkeypatch):
    calls = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *a, **kw):
        calls.append((str(path), flags, mode))
        return real_open(path, flags, mode, *a, **kw)

    monkeypatch.setattr(os, "open", spy)
    SigningKey.generate().save(tmp_path / "k.key")
    creating = [(p, f, m) for p, f, m in calls if f & os.O_CREAT]
    assert creating, calls
    for _, flags, mode in creating:
        assert mode == 0o600 and flags & os.O_EXCL


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "k.key"
    first = SigningKey.generate()
    first.save(path)
    with pytest.raises(KeyStoreError, match="already exists"):
        SigningKey.generate().save(path)
    assert SigningKey.load(path).public == first.public
    second = SigningKey.generate()
    second.save(path, overwrite=True)
    assert SigningKey.load(path).public == second.public
    assert _mode(path) == 0o600


def test_save_refuses_a_dangling_symlink(tmp_path):
    link = tmp_path / "k.key"
    link.symlink_to(tmp_path / "elsewhere.key")
    with pytest.raises(KeyStoreError, match="already exists"):
        SigningKey.generate().save(link)
    assert not (tmp_path / "elsewhere.key").exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o602])
def test_load_refuses_group_or_other_access(tmp_path, mode):
    path = SigningKey.generate().save(tmp_path / "k.key")
    os.chmod(path, mode)
    with pytest.raises(KeyStoreError, match=f"chmod 600 {path}") as info:
        SigningKey.load(path)
    assert f"{mode:04o}" in str(info.value)


def test_load_accepts_0400(tmp_path):
    path = SigningKey.generate().save(tmp_path / "k.key")
    os.chmod(path, 0o400)
    SigningKey.load(path)


def _write(path, data: bytes, mode: int = 0o600):
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def test_load_refuses_wrong_key_type(tmp_path):
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    path = _write(tmp_path / "ec.key", pem)
    with pytest.raises(KeyStoreError, match=r"ec\.key.*Ed25519"):
        SigningKey.load(path)


def test_load_refuses_an_encrypted_key(tmp_path):
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"))
    path = _write(tmp_path / "enc.key", pem)
    with pytest.raises(KeyStoreError, match="encrypted"):
        SigningKey.load(path)


@pytest.mark.parametrize("data", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"
                                  b"-----END PRIVATE KEY-----\n", b"\xff" * 100,
                                  b"ed25519:" + b"00" * 32])
def test_load_refuses_garbage(tmp_path, data):
    path = _write(tmp_path / "junk.key", data)
    with pytest.raises(KeyStoreError, match=r"junk\.key.*bedside keys generate"):
        SigningKey.load(path)


def test_load_refuses_huge_files_missing_files_and_directories(tmp_path):
    big = _write(tmp_path / "big.key", b"A" * 100_000)
    with pytest.raises(KeyStoreError, match="too large"):
        SigningKey.load(big)
    with pytest.raises(KeyStoreError, match=r"nope\.key.*no such"):
        SigningKey.load(tmp_path / "nope.key")
    d = tmp_path / "dir.key"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyStoreError, match="not a regular file"):
        SigningKey.load(d)


# -- public key files ---------------------------------------------------------------------------
def test_public_key_file_round_trip(tmp_path):
    key = SigningKey.generate()
    path = key.public.save(tmp_path / "dev.pub")
    assert path.read_text() == key.public.to_text() + "\n"
    assert _mode(path) == 0o644
    assert VerifyKey.load(path) == key.public
    other = SigningKey.generate()
    other.public.save(path)  # public keys are replaced (enrollment --force relies on it)
    assert VerifyKey.load(path) == other.public


def test_public_key_load_refuses_private_keys_and_junk(tmp_path):
    key_path = SigningKey.generate().save(tmp_path / "dev.key")
    with pytest.raises(KeyStoreError, match="private key"):
        VerifyKey.load(key_path)
    junk = _write(tmp_path / "junk.pub", b"\xff\xfe", 0o644)
    with pytest.raises(KeyStoreError, match=r"junk\.pub"):
        VerifyKey.load(junk)
    with pytest.raises(KeyStoreError, match="no such"):
        VerifyKey.load(tmp_path / "missing.pub")


# -- key rings ----------------------------------------------------------------------------------
def test_keyring_add_get_and_unknown():
    a, b = SigningKey.generate().public, SigningKey.generate().public
    ring = KeyRing({"dev-a": a})
    ring.add("dev-b", b)
    assert ring.get("dev-a") == a and ring("dev-b") == b
    assert "dev-a" in ring and len(ring) == 2 and list(ring) == ["dev-a", "dev-b"]
    with pytest.raises(UnknownSenderError, match="dev-c"):
        ring.get("dev-c")
    with pytest.raises(UnknownSenderError):
        ring.get(None)  # type: ignore[arg-type]
    ring.add("dev-a", a)  # the same key again is fine
    with pytest.raises(KeyStoreError, match="already has key"):
        ring.add("dev-a", b)
    ring.add("dev-a", b, replace=True)
    assert ring.get("dev-a") == b
    with pytest.raises(InputError):
        ring.add("../etc", a)
    assert "dev-a" in ring and "dev-z" not in ring


def test_keyring_from_dir(tmp_path):
    keys = {f"clinic-{i}": SigningKey.generate().public for i in range(3)}
    for name, k in keys.items():
        k.save(tmp_path / f"{name}.pub")
    (tmp_path / "README.txt").write_text("not a key")
    (tmp_path / ".clinic-9.pub.tmp").write_text("half-written")
    (tmp_path / ".hidden.pub").write_text("skipped")
    ring = KeyRing.from_dir(tmp_path)
    assert dict(ring.items()) == keys


def test_keyring_from_dir_fails_closed(tmp_path):
    with pytest.raises(KeyStoreError, match="does not exist"):
        KeyRing.from_dir(tmp_path / "missing")
    (tmp_path / "bad name.pub").write_text(SigningKey.generate().public.to_text())
    with pytest.raises(KeyStoreError, match=r"bad name\.pub.*rename or remove"):
        KeyRing.from_dir(tmp_path)
    (tmp_path / "bad name.pub").unlink()
    (tmp_path / "broken.pub").write_text("ed25519:1234")
    with pytest.raises(KeyStoreError, match=r"broken\.pub"):
        KeyRing.from_dir(tmp_path)


# -- key pairs ----------------------------------------------------------------------------------
def test_generate_keypair(tmp_path):
    key_path, pub_path = generate_keypair(tmp_path / "keys", "aggregator")
    assert (key_path.name, pub_path.name) == ("aggregator.key", "aggregator.pub")
    assert _mode(key_path) == 0o600
    assert SigningKey.load(key_path).public == VerifyKey.load(pub_path)
    with pytest.raises(KeyStoreError, match="--force"):
        generate_keypair(tmp_path / "keys", "aggregator")
    pub_path.unlink()  # a lone private key still blocks: never end up with a mismatched pair
    with pytest.raises(KeyStoreError, match="already exists"):
        generate_keypair(tmp_path / "keys", "aggregator")
    k2, p2 = generate_keypair(tmp_path / "keys", "aggregator", overwrite=True)
    assert SigningKey.load(k2).public == VerifyKey.load(p2)
    with pytest.raises(InputError):
        generate_keypair(tmp_path, "../evil")
