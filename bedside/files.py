"""One way to write files: atomic replacement for Bedside's own files, in-place for special files.

* :func:`atomic_write_bytes`: temporary file in the same directory, fsync, ``rename`` over the
  target, fsync of the directory. Readers see the old file or the new one, never half, and the
  new directory entry survives a power cut. For files Bedside owns (manifests, models, keys,
  releases).
* :func:`write_output`: for a path a *user* named on the command line (``--output``, a report or
  plot path). ``-`` is standard output. An existing path that is not a regular file (a character
  or block device such as ``/dev/null``, a FIFO a downstream program reads, a Unix socket) or an
  alias of an open file descriptor (``/dev/stdout``, ``/dev/fd/N``, ``/proc/self/fd/N``) is
  written in place: replacing it would hand the reader nothing and leave a regular file where the
  device or pipe was. Everything else is written with :func:`atomic_write_bytes`.
* :func:`private_dir`, :func:`private_file`: a directory only its owner can enter (0700) and a
  file only its owner can read (0600), whatever the umask: what patient data touches.
* :func:`fsync_dir`: make a new directory entry durable.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import sys
import tempfile
from pathlib import Path

from bedside.errors import InputError

STDOUT = "-"
# Paths that name an already open file descriptor: writing them must reach that descriptor.
_FD_ALIASES = ("/dev/stdout", "/dev/stderr", "/dev/fd/", "/proc/self/fd/", "/dev/tty")


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so that a file created or renamed in it survives a power cut (POSIX).

    A no-op where directories cannot be opened (e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and missing parents) and make it 0700."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    os.chmod(p, 0o700)
    return p


def refuse_shared(path: str | os.PathLike[str], what: str) -> None:
    """Refuse an existing ``path`` that others than its owner may read or write: it holds
    patients' data or privacy state, which may already have been read (a silent ``chmod`` would
    hide that). Raises :class:`~bedside.errors.ConfigError` with the fix."""
    from bedside.errors import ConfigError

    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        raise ConfigError(
            f"{path}: the {what} is readable or writable by others (mode {mode:04o}); it may "
            f"have been read. Restrict it (chmod 600 {path}), tell your privacy officer, then "
            "start again")


def private_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """Create ``path`` empty if it is missing, in a private directory, and make it 0600 (before
    anything is written to it, so no reader ever sees it with wider permissions). An existing
    file that others may read is refused (:func:`refuse_shared`), not silently tightened."""
    p = Path(path)
    refuse_shared(p, what)
    private_dir(p.parent)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return p


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    The file gets exactly ``mode`` (the umask does not apply). Its directory is created if
    missing and fsynced after the rename.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def _special(path: Path) -> str | None:
    """What kind of non-regular file ``path`` is ("fifo", "socket", "device"), or None."""
    if str(path).startswith(_FD_ALIASES):
        return "descriptor"
    try:
        st = os.stat(path)  # follows symlinks: /dev/stdout -> the pipe or terminal behind it
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror})") from None
    if stat.S_ISFIFO(st.st_mode):
        return "fifo"
    if stat.S_ISSOCK(st.st_mode):
        return "socket"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return "device"
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path}: is a directory; name a file to write")
    return None


def write_output(path: str | os.PathLike[str], data: bytes | str) -> str:
    """Write ``data`` where the user asked. Returns how: "stdout", "in place" or "replaced".

    Raises InputError naming the path when it cannot be written (a directory, a missing parent
    directory, no permission, a socket nobody listens on).
    """
    payload = data.encode() if isinstance(data, str) else bytes(data)
    if str(path) == STDOUT:
        sys.stdout.flush()
        sys.stdout.buffer.write(payload)
        sys.stdout.flush()
        return "stdout"
    p = Path(path)
    kind = _special(p)
    try:
        if kind == "socket":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(p))
                s.sendall(payload)
            return "in place"
        if kind is not None:
            # Opening a FIFO for writing blocks until a reader opens it: that is the contract
            # of a named pipe. O_TRUNC is not asked for: it means nothing on devices and pipes.
            fd = os.open(p, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            return "in place"
        if not p.parent.is_dir():
            raise InputError(f"{p}: the directory {p.parent} does not exist; create it first")
        atomic_write_bytes(os.path.realpath(p), payload)  # a symlink keeps pointing at the file
        return "replaced"
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"{p}: cannot write ({exc.strerror or exc})") from None
