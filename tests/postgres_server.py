"""A real PostgreSQL server for the tests of the store on PostgreSQL: deploy/postgres_cluster.py's cluster (Debian's
`initdb` and `pg_ctl`, a temporary folder, trust authentication, a free loopback port, fsync off), the one that
deploy/run_replicas.py starts too. One server per test session (`postgres` fixture in conftest.py), one database per
test (`new_database`), so that the tests stay independent and start in milliseconds.

Without the binaries the tests are skipped, unless LIGHTNING_CLS_REQUIRE_POSTGRES is set (as .ci/run does), where
they fail instead.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
from postgres_cluster import PostgresCluster, binary

REQUIRE = "LIGHTNING_CLS_REQUIRE_POSTGRES"


def missing(reason: str) -> None:
    """Skip, or fail where PostgreSQL must be there (CI)."""
    if os.environ.get(REQUIRE):
        pytest.fail(f"{reason} ({REQUIRE} is set: the PostgreSQL tests must run)")
    pytest.skip(reason)


class PostgresServer(PostgresCluster):
    """A throwaway cluster; `stop` removes it."""

    def __init__(self) -> None:
        if binary("initdb") is None or binary("pg_ctl") is None:
            missing("PostgreSQL's initdb and pg_ctl were not found (Debian: apt-get install postgresql)")
        super().__init__()

    def new_database(self) -> str:
        """A fresh, empty database on this server; its URL."""
        return self.create_database(f"t_{uuid.uuid4().hex[:12]}")

    def stop(self) -> None:
        super().stop(remove=True, mode="immediate")  # nothing of it is kept: no shutdown checkpoint to wait for
