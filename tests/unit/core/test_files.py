"""User-named output paths: special files are written in place, regular files replaced atomically.

Regression for issue 17: ``--output /dev/null`` run as root turned the machine's /dev/null into a
regular file, and ``--output FIFO`` replaced the pipe so its reader got nothing.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading

import pytest

from bedside.cli import main
from bedside.errors import InputError
from bedside.files import _special, atomic_write_bytes, write_output
from bedside.models import datasets


def _read_fifo(path, out):
    with open(path, "rb") as fh:  # blocks until the writer opens the pipe
        out.append(fh.read())


def test_fifo_is_written_in_place_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=_read_fifo, args=(fifo, got), daemon=True)
    reader.start()
    assert write_output(fifo, b"hello\n") == "in place"
    reader.join(10)
    assert got == [b"hello\n"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_unix_socket_is_written_in_place(tmp_path):
    path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    got: list[bytes] = []

    def serve():
        conn, _ = server.accept()
        with conn:
            chunks = []
            while chunk := conn.recv(4096):
                chunks.append(chunk)
            got.append(b"".join(chunks))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert write_output(path, "over a socket") == "in place"
    t.join(10)
    server.close()
    assert got == [b"over a socket"]
    assert stat.S_ISSOCK(os.stat(path).st_mode)


def test_devices_and_descriptor_aliases_are_special_without_writing_them():
    assert _special("/dev/null") == "device"
    assert _special("/dev/stdout") == "descriptor"
    assert _special("/proc/self/fd/1") == "descriptor"


def test_regular_file_is_replaced_atomically_and_symlink_kept(tmp_path):
    target = tmp_path / "real.csv"
    target.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    assert write_output(link, "new") == "replaced"
    assert link.is_symlink() and target.read_text() == "new"
    assert write_output(tmp_path / "fresh.csv", b"x") == "replaced"
    assert (tmp_path / "fresh.csv").read_bytes() == b"x"


def test_unwritable_outputs_are_clear_input_errors(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        write_output(tmp_path, "x")
    with pytest.raises(InputError, match="does not exist"):
        write_output(tmp_path / "missing" / "out.csv", "x")


def test_atomic_write_sets_the_exact_mode_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write_bytes(tmp_path / "a", b"1", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o644


@pytest.fixture()
def wdbc_csv(tmp_path):
    ds = datasets.load("wdbc")
    datasets.to_csv(ds.subset(list(range(6))), tmp_path / "in.csv")
    return tmp_path / "in.csv"


def test_edge_infer_output_fifo_delivers_to_its_reader(exported, wdbc_csv, tmp_path):
    model = exported("logreg", "wdbc")
    fifo = tmp_path / "predictions"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=_read_fifo, args=(fifo, got), daemon=True)
    reader.start()
    rc = main(["edge", "infer", "--model", str(model), "--input", str(wdbc_csv), "--json",
               "--output", str(fifo)])
    reader.join(10)
    assert rc == 0
    preds = json.loads(got[0])["predictions"]
    assert len(preds) == 6
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_edge_infer_output_dash_is_stdout(exported, wdbc_csv, capsys):
    model = exported("logreg", "wdbc")
    rc = main(["edge", "infer", "--model", str(model), "--input", str(wdbc_csv), "--output", "-"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("row,label,") and len(lines) == 7
