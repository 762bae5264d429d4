"""A real PostgreSQL server for the tests of the store on PostgreSQL: Debian's `postgresql` binaries (`initdb`,
`pg_ctl`), a cluster in a temporary folder, trust authentication, a free loopback port, its socket in the folder.
One server per test session (`postgres` fixture in conftest.py), one database per test (`new_database`), so that the
tests stay independent and start in milliseconds.

PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` system user (created with
`useradd` when missing) and the commands run through `runuser`. Without the binaries the tests are skipped, unless
LIGHTNING_CLS_REQUIRE_POSTGRES is set (as .ci/run does), where they fail instead.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

REQUIRE = "LIGHTNING_CLS_REQUIRE_POSTGRES"
USER = "postgres"


def binary(name: str) -> str | None:
    """A PostgreSQL program: on PATH, or in Debian's versioned folder (not on PATH by default)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    return candidates[-1] if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing(reason: str) -> None:
    """Skip, or fail where PostgreSQL must be there (CI)."""
    if os.environ.get(REQUIRE):
        pytest.fail(f"{reason} ({REQUIRE} is set: the PostgreSQL tests must run)")
    pytest.skip(reason)


class PostgresServer:
    """A throwaway cluster; `stop` removes it."""

    def __init__(self) -> None:
        initdb, pg_ctl = binary("initdb"), binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            missing("PostgreSQL's initdb and pg_ctl were not found (Debian: apt-get install postgresql)")
        self.pg_ctl = pg_ctl
        self.run_as: list[str] = []
        self.folder = Path(tempfile.mkdtemp(prefix="lightning_cls_pg_"))
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            if subprocess.run(["id", "-u", USER], capture_output=True).returncode != 0:
                subprocess.run(["useradd", "--system", "--no-create-home", USER], check=True)
            shutil.chown(self.folder, USER)
            self.run_as = ["runuser", "-u", USER, "--"]
        self.data = self.folder / "data"
        self.port = free_port()
        self._run([initdb, "-D", str(self.data), "-A", "trust", "-U", USER, "-E", "UTF8", "--no-sync"])
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run([pg_ctl, "-D", str(self.data), "-l", str(self.folder / "log"), "-o", options, "-w", "start"])

    def _run(self, command: list[str]) -> None:
        done = subprocess.run([*self.run_as, *command], capture_output=True, text=True)
        if done.returncode != 0:
            log = self.folder / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed: {done.stdout}{done.stderr}{tail}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database on this server; its URL."""
        import sqlalchemy as sa

        name = f"t_{uuid.uuid4().hex[:12]}"
        engine = sa.create_engine(self.url().replace("postgresql://", "postgresql+psycopg://"))
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sa.text(f"CREATE DATABASE {name}"))
        finally:
            engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"])
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
