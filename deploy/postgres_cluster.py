"""A PostgreSQL server in a folder of its own, from Debian's `postgresql` binaries (`initdb`, `pg_ctl`): what
`run_replicas.py` starts when it is given no database URL, and what the tests' `postgres` fixture runs
(tests/postgres_server.py). Trust authentication on the loopback address only, its socket in the folder: a server for
one machine's trials, not a production database (that one has passwords, backups and its own machine).

PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` system user (created with `useradd`
when missing) and the commands run through `runuser`.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "postgres"
# For trials and tests: a crash may lose the last commits (nothing here outlives the folder). A real server keeps
# PostgreSQL's defaults.
FAST_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


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


class PostgresCluster:
    """``initdb`` in ``folder`` (a new temporary one by default) and ``pg_ctl start`` on ``port`` (a free one);
    `restart` is ``pg_ctl restart`` (the fault the fault benchmark injects), `stop` stops it and, with ``remove``,
    deletes the folder. ``durable=False`` turns fsync off (tests)."""

    def __init__(self, folder: str | Path | None = None, port: int | None = None, durable: bool = False) -> None:
        initdb, pg_ctl = binary("initdb"), binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise FileNotFoundError(
                "PostgreSQL's initdb and pg_ctl were not found (Debian: apt-get install postgresql)."
            )
        self.pg_ctl = pg_ctl
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="lightning_cls_pg_"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.run_as: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            if subprocess.run(["id", "-u", USER], capture_output=True).returncode != 0:
                subprocess.run(["useradd", "--system", "--no-create-home", USER], check=True)
            shutil.chown(self.folder, USER)
            self.run_as = ["runuser", "-u", USER, "--"]
        self.data, self.log = self.folder / "data", self.folder / "log"
        self.port = port or free_port()
        self.options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=200" + (
            "" if durable else f" {FAST_OPTIONS}"
        )
        self._run([initdb, "-D", str(self.data), "-A", "trust", "-U", USER, "-E", "UTF8", "--no-sync"])
        self._ctl("start")

    def _run(self, command: list[str]) -> None:
        done = subprocess.run([*self.run_as, *command], capture_output=True, text=True)
        if done.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed: {done.stdout}{done.stderr}{tail}")

    def _ctl(self, action: str, *extra: str) -> None:
        self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", self.options, *extra, "-w", action])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database on this server; its URL."""
        import sqlalchemy as sa

        engine = sa.create_engine(self.url().replace("postgresql://", "postgresql+psycopg://"))
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sa.text(f"CREATE DATABASE {name}"))
        finally:
            engine.dispose()
        return self.url(name)

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every connection is cut, the server is down until it accepts them again."""
        self._ctl("restart", "-m", "fast")

    def stop(self, remove: bool = True, mode: str = "fast") -> None:
        """``pg_ctl stop -m MODE`` (fast: connections cut, a clean shutdown; immediate: no shutdown checkpoint)."""
        try:
            self._run([self.pg_ctl, "-D", str(self.data), "-m", mode, "stop"])
        finally:
            if remove:
                shutil.rmtree(self.folder, ignore_errors=True)


def stop_data_dir(data: Path, mode: str = "fast") -> None:
    """``pg_ctl stop`` of a cluster started by another process (its data folder from a state file)."""
    run_as = ["runuser", "-u", USER, "--"] if os.geteuid() == 0 else []
    command = [*run_as, binary("pg_ctl") or "pg_ctl", "-D", str(data), "-m", mode, "-w", "stop"]
    subprocess.run(command, check=False, capture_output=True)
