"""A private embedded Postgres 18 with WAL archiving on, for backup / WAL / PITR tests.

The suite's shared cluster does not archive, so these tests start their own (port and
directory of their own, stopped and removed after the test). WAL goes through the real
``archive_command`` (`tidemill wal push`), which the server runs as its system user when the
suite runs as root: the object directory is owned by that user, as it would be in production.

Import the fixture into a test module: ``from tests.support.pgcluster import archived_cluster``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from core.settings import Settings
from db.embedded import EmbeddedPostgres, WalArchive, pg_system_user


@dataclass
class ArchivedCluster:
    pg: EmbeddedPostgres
    root: Path
    objects: Path
    settings: Settings  # DATABASE_URL and STORAGE_URL point at this cluster and its archive

    @property
    def url(self) -> str:
        return self.pg.url()

    @property
    def storage_url(self) -> str:
        return self.settings.storage_url

    def execute(self, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, params or None)
            return cur.fetchall() if cur.description else []

    def switch_and_wait(self, *, timeout: float = 60) -> str:
        """Close the current WAL segment and wait until the archiver has stored it."""
        # Something must be written, or the switch is a no-op and names an unfinished segment.
        self.execute("SELECT pg_logical_emit_message(false, 'tidemill', 'switch')")
        row = self.execute("SELECT pg_walfile_name(pg_switch_wal())")
        name = str(row[0][0])
        self.wait_archived(name, timeout=timeout)
        return name

    def wait_archived(self, name: str, *, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.execute(
                "SELECT last_archived_wal, last_failed_wal, failed_count FROM pg_stat_archiver"
            )[0]
            last = str(row[0] or "")
            if last and last[8:24] >= name[8:24]:
                return
            time.sleep(0.1)
        log = (self.root / "postgres.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"WAL {name} was not archived within {timeout}s; log:\n{log}")

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DATABASE_URL"] = self.url
        env.pop("DATABASE_DIRECT_URL", None)  # this cluster is not behind the suite's pooler
        env["STORAGE_URL"] = self.storage_url
        return env


def start_archived_cluster(*, timeout_s: int = 60) -> ArchivedCluster:
    from core.proc import free_port

    root = Path(tempfile.mkdtemp(prefix="tidemill-pitr-"))
    objects = root / "objects"
    objects.mkdir()
    user = pg_system_user()
    if user is not None:
        os.chown(objects, *user)  # the archiver writes here as the Postgres system user
    storage_url = f"file://{objects}"
    pg = EmbeddedPostgres(
        root, port=free_port(), archive=WalArchive(storage_url=storage_url, timeout_s=timeout_s)
    )
    pg.start()
    settings = dataclasses.replace(
        Settings.from_env(),
        database_url=pg.url(),
        database_direct_url=None,
        storage_url=storage_url,
    )
    return ArchivedCluster(pg=pg, root=root, objects=objects, settings=settings)


@pytest.fixture
def archived_cluster() -> Iterator[ArchivedCluster]:
    cluster = start_archived_cluster()
    try:
        yield cluster
    finally:
        cluster.pg.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
