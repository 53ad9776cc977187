"""Ed25519 keys: signing keys, verify keys, key rings and the files they live in.

Every envelope on the wire is signed with the sender's Ed25519 key (RFC 8032, through the
``cryptography`` package). Devices sign updates with their own key; the aggregator signs models,
manifests, announcements and receipts with its key, which each device pins at enrollment.

Files
-----
* ``NAME.key``: the private key, PEM PKCS#8, unencrypted, mode 0600. It is created with mode
  0600 from the first byte (``os.open(..., 0o600)``), written to a temporary file and moved into
  place, so it is never readable by group or others, not even for an instant.
  :meth:`SigningKey.load` refuses a key file that group or others can read or write.
* ``NAME.pub``: the public key as one line of text, ``ed25519:<64 hex digits>``. Public keys are
  not secret; they are written with mode 0644.

Identifiers (device ids, the aggregator id, fleet names) go into MQTT topics and file names, so
they are restricted to ``[A-Za-z0-9_.-]``, 1 to :data:`~bedside.constants.MAX_ID_LENGTH`
characters, never ``..`` and never starting with ``.`` or ``-`` (see :func:`validate_id`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bedside.constants import MAX_ID_LENGTH
from bedside.errors import InputError, KeyStoreError, SignatureError, UnknownSenderError
from bedside.files import atomic_write_bytes, fsync_dir

__all__ = [
    "PUBLIC_KEY_PREFIX",
    "SIGNATURE_BYTES",
    "KeyRing",
    "SigningKey",
    "VerifyKey",
    "generate_keypair",
    "is_valid_id",
    "validate_id",
]

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
PUBLIC_KEY_PREFIX = "ed25519:"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
_MAX_KEY_FILE_BYTES = 16 * 1024  # a PEM Ed25519 key is 119 bytes; anything this large is not one
_ID_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_HEX_RE = re.compile(r"[0-9a-f]+")


# ---------------------------------------------------------------------------------------------
# Identifiers
# ---------------------------------------------------------------------------------------------
def is_valid_id(value: object) -> bool:
    """True if ``value`` is a safe id for topics and file names (see :func:`validate_id`)."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= MAX_ID_LENGTH
        and _ID_RE.fullmatch(value) is not None
        and ".." not in value
        and value[0] not in ".-"
    )


def validate_id(value: object, *, what: str = "id") -> str:
    """Return ``value`` if it is a valid identifier, else raise :class:`InputError`.

    Valid: 1 to ``MAX_ID_LENGTH`` characters from ``A-Z a-z 0-9 _ . -``, not containing ``..``
    and not starting with ``.`` or ``-``. So an id can never be an MQTT wildcard (``+``, ``#``), a
    topic or path separator (``/``), a relative path (``..``), a hidden file or a command-line
    option.
    """
    if not is_valid_id(value):
        raise InputError(
            f"{what} {value!r} is not valid: use 1 to {MAX_ID_LENGTH} characters from "
            "A-Z a-z 0-9 _ . - (no '/', '+', '#', spaces or '..'), not starting with '.' or '-'"
        )
    assert isinstance(value, str)
    return value


def validate_device_id(value: object, *, what: str = "device id") -> str:
    """A valid id (:func:`validate_id`) that is not a service's identity (``RESERVED_IDS``)."""
    from bedside.constants import RESERVED_IDS, RESERVED_PREFIX

    v = validate_id(value, what=what)
    if v.lower() in RESERVED_IDS or v.lower().startswith(RESERVED_PREFIX):
        raise InputError(f"{what} {v!r} is reserved for a Bedside service (reserved: "
                         f"{', '.join(sorted(RESERVED_IDS))}, and ids that start with "
                         f"{RESERVED_PREFIX!r}): a device with it could pass for "
                         "that service at the broker; choose another id")
    return v


# ---------------------------------------------------------------------------------------------
# Verify keys
# ---------------------------------------------------------------------------------------------
class VerifyKey:
    """An Ed25519 public key: verifies signatures. Equal when the raw key bytes are equal."""

    __slots__ = ("_key", "_raw")

    def __init__(self, key: Ed25519PublicKey) -> None:
        if not isinstance(key, Ed25519PublicKey):
            raise TypeError(f"expected an Ed25519PublicKey, got {type(key).__name__}")
        self._key = key
        self._raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def from_raw(cls, raw: bytes, *, source: str = "public key") -> VerifyKey:
        """Build a key from its 32 raw bytes. Raises :class:`KeyStoreError` if they are not one."""
        if not isinstance(raw, bytes | bytearray) or len(raw) != PUBLIC_KEY_BYTES:
            raise KeyStoreError(f"{source}: an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes")
        try:
            return cls(Ed25519PublicKey.from_public_bytes(bytes(raw)))
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise KeyStoreError(f"{source}: not a usable Ed25519 public key ({exc})") from None

    @property
    def raw(self) -> bytes:
        """The 32 raw bytes of the public key."""
        return self._raw

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of sha256(raw public key): what people compare out of band."""
        return hashlib.sha256(self._raw).hexdigest()[:16]

    def verify(self, signature: bytes, data: bytes | memoryview) -> None:
        """Raise :class:`SignatureError` unless ``signature`` is this key's signature of
        ``data``."""
        if not isinstance(signature, bytes | bytearray) or len(signature) != SIGNATURE_BYTES:
            raise SignatureError(
                f"signature must be {SIGNATURE_BYTES} bytes (key {self.fingerprint})")
        try:
            self._key.verify(bytes(signature), bytes(data))
        except InvalidSignature:
            raise SignatureError(
                f"signature does not verify against key {self.fingerprint}: the message was "
                "altered or signed with another key"
            ) from None

    def to_text(self) -> str:
        """One line, ``ed25519:<64 lowercase hex digits>``: for ``.pub`` files and config."""
        return PUBLIC_KEY_PREFIX + self._raw.hex()

    @classmethod
    def from_text(cls, text: str, *, source: str = "public key") -> VerifyKey:
        """Parse :meth:`to_text` output (surrounding whitespace allowed, nothing else)."""
        if not isinstance(text, str):
            raise KeyStoreError(f"{source}: expected text, got {type(text).__name__}")
        s = text.strip()
        hexpart = s[len(PUBLIC_KEY_PREFIX):].lower() if s.startswith(PUBLIC_KEY_PREFIX) else ""
        if len(hexpart) != 2 * PUBLIC_KEY_BYTES or not _HEX_RE.fullmatch(hexpart):
            shown = s[:24] + ("..." if len(s) > 24 else "")
            raise KeyStoreError(
                f"{source}: not a Bedside public key (expected one line "
                f"'{PUBLIC_KEY_PREFIX}<64 hex digits>', got {shown!r}); copy the .pub file "
                "written by 'bedside keys generate' or 'bedside edge enroll'"
            )
        return cls.from_raw(bytes.fromhex(hexpart), source=source)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the one-line text form to ``path`` atomically (mode 0644), replacing it."""
        p = Path(path)
        try:
            atomic_write_bytes(p, (self.to_text() + "\n").encode("ascii"), mode=0o644)
        except OSError as exc:
            raise KeyStoreError(f"{p}: cannot write the public key ({_why(exc)})") from None
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VerifyKey:
        """Read a ``.pub`` file written by :meth:`save`."""
        p = Path(path)
        data = _read_small(p, "public key")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise KeyStoreError(
                f"{p}: not a Bedside public key file (not ASCII text); expected one line "
                f"'{PUBLIC_KEY_PREFIX}<64 hex digits>'"
            ) from None
        if "PRIVATE KEY" in text:
            raise KeyStoreError(
                f"{p}: this is a private key, not a public key. Never copy a .key file to "
                "another machine; use the .pub file next to it")
        return cls.from_text(text, source=str(p))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and secrets.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"VerifyKey(fingerprint={self.fingerprint!r})"


# ---------------------------------------------------------------------------------------------
# Signing keys
# ---------------------------------------------------------------------------------------------
class SigningKey:
    """An Ed25519 private key. Its ``repr`` shows the public fingerprint only, never the secret."""

    __slots__ = ("_key", "_public")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError(f"expected an Ed25519PrivateKey, got {type(key).__name__}")
        self._key = key
        self._public = VerifyKey(key.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh key from the operating system's CSPRNG."""
        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes | memoryview) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._key.sign(bytes(data))

    @property
    def public(self) -> VerifyKey:
        return self._public

    def private_pem(self) -> bytes:
        """The key as PEM PKCS#8 (unencrypted): for an offline enrollment bundle, which is
        handled as the credential it then is. Everything else uses :meth:`save`."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the key as PEM PKCS#8 with mode 0600, atomically.

        The file is created by ``os.open(tmp, O_CREAT | O_EXCL, 0o600)`` next to ``path`` and then
        linked (``overwrite=False``: fails if ``path`` exists, with no race) or renamed
        (``overwrite=True``) into place. Raises :class:`KeyStoreError` if ``path`` exists and
        ``overwrite`` is false, or if the file cannot be written.
        """
        p = Path(path)
        if not overwrite and (p.exists() or p.is_symlink()):
            raise KeyStoreError(
                f"{p} already exists; refusing to replace a private key (the old key would stop "
                "working). Remove it first or pass --force / overwrite=True")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            _write_private(p, self.private_pem(), overwrite=overwrite)
        except FileExistsError:
            raise KeyStoreError(f"{p} already exists; refusing to replace a private key") from None
        except OSError as exc:
            raise KeyStoreError(f"{p}: cannot write the private key ({_why(exc)})") from None
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SigningKey:
        """Read a key written by :meth:`save`. Refuses unsafe permissions, other key types, junk."""
        p = Path(path)
        return cls.from_pem(_read_small(p, "private key", private=True), str(p))

    @classmethod
    def from_pem(cls, data: bytes, source: str) -> SigningKey:
        """Parse a PEM PKCS#8 Ed25519 key (``source`` names it in errors)."""
        p = source
        if b"ENCRYPTED" in data:
            raise KeyStoreError(
                f"{p}: the key is encrypted with a passphrase; Bedside services start unattended "
                "and need an unencrypted PKCS#8 key protected by mode 0600. Generate one with "
                "'bedside keys generate'")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise KeyStoreError(
                f"{p}: not a PEM private key ({detail}); generate one with "
                "'bedside keys generate --out DIR'") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyStoreError(
                f"{p}: holds a {type(key).__name__.removeprefix('_')} key; Bedside signs with "
                "Ed25519. Generate one with 'bedside keys generate --out DIR'")
        return cls(key)

    def __repr__(self) -> str:
        return f"SigningKey(fingerprint={self._public.fingerprint!r})"

    def __reduce__(self) -> str | tuple[Any, ...]:
        # A private key must not travel by pickle (or end up in a cache or a crash dump by it).
        raise TypeError("SigningKey cannot be pickled; load it from its file instead")


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask can only clear bits; this makes the mode exact
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_no_replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)


def _link_no_replace(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists (FileExistsError)."""
    try:
        os.link(tmp, path)  # atomic "create if absent"
    except FileExistsError:
        raise
    except OSError as exc:
        # Some file systems (FAT, some network and FUSE mounts) have no hard links. Fall back to
        # check-then-rename: the window is tiny, and the file is 0600 from its creation anyway.
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                             errno.EMLINK, errno.ENOSYS):
            raise
        if path.exists() or path.is_symlink():
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp, path)


def _read_small(path: Path, what: str, *, private: bool = False) -> bytes:
    """Read a key file through one descriptor; type, mode and size are checked on that fd."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        hint = ("create one with 'bedside keys generate --out DIR'" if private
                else "copy the .pub file written by 'bedside keys generate'")
        raise KeyStoreError(f"{path}: no such {what} file; {hint}") from None
    except OSError as exc:
        raise KeyStoreError(f"{path}: cannot open the {what} file ({_why(exc)})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyStoreError(f"{path}: not a regular file; expected a {what} file")
        if private and st.st_mode & 0o077:
            raise KeyStoreError(
                f"{path}: private key is accessible by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); refusing to use it. Run: chmod 600 {path}")
        if st.st_size > _MAX_KEY_FILE_BYTES:
            raise KeyStoreError(f"{path}: {st.st_size} bytes is far too large for a {what} file")
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            total += len(chunk)
            if total > _MAX_KEY_FILE_BYTES:
                raise KeyStoreError(f"{path}: far too large for a {what} file")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise KeyStoreError(f"{path}: cannot read the {what} file ({_why(exc)})") from None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Key rings
# ---------------------------------------------------------------------------------------------
class KeyRing:
    """Sender id -> :class:`VerifyKey`: the keys a receiver trusts.

    The aggregator keeps one of enrolled devices (``keys/devices/<device_id>.pub``); a device keeps
    one holding only the aggregator's key, pinned at enrollment. A ring is also a callable lookup,
    so it can be passed wherever ``Callable[[str], VerifyKey]`` is expected.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: dict[str, VerifyKey] | None = None) -> None:
        self._keys: dict[str, VerifyKey] = {}
        for sender_id, key in (keys or {}).items():
            self.add(sender_id, key)

    def add(self, sender_id: str, key: VerifyKey, *, replace: bool = False) -> None:
        """Trust ``key`` for ``sender_id``. Another key for a known id needs ``replace=True``."""
        validate_id(sender_id, what="sender id")
        if not isinstance(key, VerifyKey):
            raise TypeError(f"expected a VerifyKey, got {type(key).__name__}")
        old = self._keys.get(sender_id)
        if old is not None and old != key and not replace:
            raise KeyStoreError(
                f"{sender_id} already has key {old.fingerprint}; refusing to replace it with "
                f"{key.fingerprint} silently (re-enroll the sender to change its key)")
        self._keys[sender_id] = key

    def get(self, sender_id: str) -> VerifyKey:
        """The key of ``sender_id``; :class:`UnknownSenderError` if it has none (fail closed)."""
        key = self._keys.get(sender_id) if isinstance(sender_id, str) else None
        if key is None:
            shown = sender_id if is_valid_id(sender_id) else repr(sender_id)[:80]
            raise UnknownSenderError(
                f"sender {shown} has no enrolled or pinned public key; enroll it with "
                "'bedside aggregator enroll' (devices) or re-run 'bedside edge enroll' "
                "(aggregator)")
        return key

    __call__ = get

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> KeyRing:
        """Load every ``<sender_id>.pub`` in ``path`` (not recursive; dot-files are skipped).

        A ``.pub`` file whose name is not a valid id, or that does not hold a key, is an error
        naming the file: an enrollment directory is configuration, and a broken one fails closed.
        """
        d = Path(path)
        if not d.is_dir():
            raise KeyStoreError(f"{d}: key directory does not exist or is not a directory")
        ring = cls()
        try:
            entries = sorted(d.iterdir())
        except OSError as exc:
            raise KeyStoreError(f"{d}: cannot list the key directory ({_why(exc)})") from None
        for f in entries:
            if f.name.startswith(".") or not f.name.endswith(PUBLIC_SUFFIX):
                continue
            sender_id = f.name[: -len(PUBLIC_SUFFIX)]
            if not is_valid_id(sender_id):
                raise KeyStoreError(
                    f"{f}: {sender_id!r} is not a valid sender id (use A-Z a-z 0-9 _ . -, at most "
                    f"{MAX_ID_LENGTH} characters); rename or remove the file")
            ring._keys[sender_id] = VerifyKey.load(f)
        return ring

    def __contains__(self, sender_id: object) -> bool:
        return sender_id in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def items(self) -> list[tuple[str, VerifyKey]]:
        return sorted(self._keys.items())

    def __repr__(self) -> str:
        return f"KeyRing({', '.join(f'{k}={v.fingerprint}' for k, v in self.items())})"


def generate_keypair(out_dir: str | os.PathLike[str], name: str,
                     overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``out_dir/NAME.key`` (mode 0600) and ``out_dir/NAME.pub``; return both paths.

    Refuses (:class:`KeyStoreError`) if either file exists, unless ``overwrite``.
    """
    validate_id(name, what="key name")
    out = Path(out_dir)
    key_path, pub_path = out / f"{name}{PRIVATE_SUFFIX}", out / f"{name}{PUBLIC_SUFFIX}"
    if not overwrite:
        for p in (key_path, pub_path):
            if p.exists() or p.is_symlink():
                raise KeyStoreError(
                    f"{p} already exists; refusing to replace a key pair (anything that trusts "
                    "the old public key would stop accepting this sender). Use --force to "
                    "replace it")
    if out.exists() and not out.is_dir():
        raise KeyStoreError(f"{out}: exists and is not a directory")
    key = SigningKey.generate()
    key.save(key_path, overwrite=overwrite)
    key.public.save(pub_path)
    return key_path, pub_path
