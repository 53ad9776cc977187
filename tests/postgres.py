"""A throw-away PostgreSQL for tests: Debian's server in a temporary directory, on a free
127.0.0.1 port, stopped afterwards (../shared/notes/postgresql-in-tests.md).

PostgreSQL refuses to run as root: as root, the server runs as the ``postgres`` user (created by
Debian's package) in a directory it owns. Without the package, tests that need it are skipped,
except under CI, where a missing server is a failure (``.ci/run`` installs it).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from bedside.transport import free_port


def bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[3]) if Path(p).parts[3].isdigit() else 0)
    return Path(found[-1]).parent if found else None


@dataclass
class Postgres:
    dir: Path
    port: int
    bin: Path
    user: str = "bedside"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname}"

    def create_db(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def _as_owner(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)

    def stop(self) -> None:
        subprocess.run(self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"),
                                      "-m", "immediate", "-w", "stop"),
                       capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_postgres() -> Postgres:
    b = bindir()
    if b is None:
        if os.environ.get("CI"):
            raise RuntimeError("PostgreSQL is not installed (apt-get install -y postgresql); "
                               ".ci/run installs it")
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql)")
    d = Path(tempfile.mkdtemp(prefix="bedside-pg-"))
    pg = Postgres(d, free_port(), b)
    if os.geteuid() == 0:
        shutil.chown(d, "postgres")
    try:
        subprocess.run(pg._as_owner(str(b / "initdb"), "-D", str(d / "data"), "-A", "trust",
                                    "-U", pg.user, "--no-sync"),
                       check=True, capture_output=True, timeout=120)
        subprocess.run(pg._as_owner(
            str(b / "pg_ctl"), "-D", str(d / "data"), "-l", str(d / "log"), "-w", "-t", "60",
            "start", "-o", f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {d} "
                           "-c fsync=off -c max_connections=50"),
            check=True, capture_output=True, timeout=90)
    except subprocess.CalledProcessError as exc:
        log = (d / "log").read_text() if (d / "log").exists() else ""
        shutil.rmtree(d, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr!r} {log[-2000:]}") from None
    return pg
