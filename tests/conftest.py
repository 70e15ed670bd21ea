"""Real servers for the whole session: embedded Postgres and Valkey, started once.

They start in ``pytest_configure``, before test modules are imported, because importing
``workers.broker`` builds the broker from the environment. Each test that asks for ``db`` gets
a fresh database cloned from a migrated template, and an empty Redis.

A real PgBouncer in transaction pooling mode sits in front of Postgres (tests/support/
pgbouncer.py): DATABASE_URL points at it, so the system under test (web, workers, relay drains,
scheduler fires, subprocesses) runs pooled, and DATABASE_DIRECT_URL points at Postgres for what
needs a session. The ``db`` fixture and the tests' own arranging and asserting connections use
the direct URL: they are the test's hands, not the system under test. TIDEMILL_TEST_PGBOUNCER=0
runs the suite without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_DB = "tidemill_test"
TEMPLATE_DB = "tidemill_template"


class Servers:
    def __init__(self) -> None:
        from core.proc import free_port
        from db.embedded import EmbeddedPostgres, EmbeddedValkey
        from tests.support.pgbouncer import PgBouncer

        self.root = Path(tempfile.mkdtemp(prefix="tidemill-test-"))
        self.pg = EmbeddedPostgres(self.root, port=free_port())
        self.valkey = EmbeddedValkey(self.root, port=free_port())
        self.bouncer: PgBouncer | None = None
        if os.environ.get("TIDEMILL_TEST_PGBOUNCER", "1") != "0":
            self.bouncer = PgBouncer(self.root, server_host="127.0.0.1", server_port=self.pg.port)

    def start(self) -> None:
        from db.migrate import upgrade

        self.pg.start()
        self.valkey.start()
        if self.bouncer is not None:
            self.bouncer.start()
        with psycopg.connect(self.pg.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
        upgrade(self.pg.url(TEMPLATE_DB))

    def stop(self) -> None:
        if self.bouncer is not None:
            self.bouncer.stop()
        self.valkey.stop()
        self.pg.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def admin_url(self) -> str:
        return self.pg.url("postgres")

    @property
    def database_url(self) -> str:
        """Postgres itself: a session of its own (the tests' hands, LISTEN, locks, pg_dump)."""
        return self.pg.url(TEST_DB)

    @property
    def pooled_url(self) -> str:
        """What the system under test gets as DATABASE_URL: PgBouncer when it runs."""
        return self.bouncer.url(TEST_DB) if self.bouncer is not None else self.database_url

    @property
    def redis_url(self) -> str:
        return self.valkey.url(0)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a tidemill subprocess pointed at these servers."""
        env = dict(os.environ)
        env.update(extra)
        return env


_servers: Servers | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _servers
    if hasattr(config, "workerinput"):
        return
    _servers = Servers()
    _servers.start()
    os.environ.update(
        {
            "DATABASE_URL": _servers.pooled_url,
            "DATABASE_DIRECT_URL": _servers.database_url,
            "REDIS_URL": _servers.redis_url,
            "TIDEMILL_DATA_DIR": str(_servers.root / "data"),
            "TIDEMILL_ENV": "test",
            "TIDEMILL_MIN_BACKOFF_MS": "50",
            "TIDEMILL_MAX_BACKOFF_MS": "200",
            "TIDEMILL_MAX_RETRIES": "3",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
    )
    _recreate_test_database()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _servers is not None:
        from db.engine import dispose_all

        dispose_all()
        _servers.stop()


def _recreate_test_database() -> None:
    from db.schema import search_path

    assert _servers is not None
    if _servers.bouncer is not None:
        _servers.bouncer.kill_database(TEST_DB)  # its pooled connections die with the database
    with psycopg.connect(_servers.admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEST_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{TEST_DB}" TEMPLATE "{TEMPLATE_DB}"')
        # A per-database role setting is not copied from the template: tidemill's search_path
        # (migration 0014, db/schema.py) is pinned again for the clone.
        conn.execute(
            f'ALTER ROLE CURRENT_USER IN DATABASE "{TEST_DB}" SET search_path = {search_path()}'
        )


@pytest.fixture(scope="session")
def servers() -> Servers:
    assert _servers is not None
    return _servers


@pytest.fixture
def db(servers: Servers) -> Iterator[str]:
    """A fresh, migrated database and an empty Redis; yields the database URL."""
    import redis as redis_lib

    from db.engine import dispose_all

    dispose_all()  # pooled connections would keep the old database alive
    _recreate_test_database()
    redis_lib.Redis.from_url(servers.redis_url).flushall()
    yield servers.database_url
    dispose_all()


@pytest.fixture
def sql(db: str) -> Iterator[Any]:
    """An autocommit psycopg connection to the test database, for arranging and asserting."""
    with psycopg.connect(db, autocommit=True) as conn:
        yield conn


@pytest.fixture
def redis_client(servers: Servers) -> Any:
    import redis as redis_lib

    return redis_lib.Redis.from_url(servers.redis_url, decode_responses=True)


@pytest.fixture(autouse=True)
def _forget_stopped_workers() -> Iterator[None]:
    """dramatiq leaves a stopped in-process Worker's hook on the broker, and that hook starts
    a consumer for every queue declared afterwards (an actor module imported by a later test):
    consumers that fetch messages into a live process's acks and never run them. Drop the
    hooks of workers that are no longer running after each test."""
    yield
    broker_module = sys.modules.get("workers.broker")
    if broker_module is None:
        return
    from dramatiq.worker import _WorkerMiddleware

    broker = broker_module.broker
    broker.middleware[:] = [
        m
        for m in broker.middleware
        if not isinstance(m, _WorkerMiddleware)
        or any(thread.is_alive() for thread in m.worker.workers)
    ]


@pytest.fixture
def inproc_worker(db: str) -> Iterator[Any]:
    """A real dramatiq Worker (2 threads) in this process, on tidemill's broker, emptied first."""
    import dramatiq

    from workers.broker import broker

    broker.flush_all()
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
    worker.start()
    yield worker
    worker.stop()


def start_cli(
    *args: str,
    env: dict[str, str] | None = None,
    stdout: Any = subprocess.DEVNULL,
    stderr: Any = subprocess.DEVNULL,
) -> subprocess.Popen[bytes]:
    """Start `tidemill ARGS` as a real subprocess in its own process group (stop it with
    `core.proc.stop_process(proc, group=True)`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args],
        env=env or dict(os.environ),
        cwd=ROOT,
        start_new_session=True,
        stdout=stdout,
        stderr=stderr,
    )


def healthy(port: int) -> bool:
    """The web server on `port` answers /healthz with 200 and status ok."""
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return bool(resp.status == 200 and json.load(resp)["status"] == "ok")
    except OSError:
        return False


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `tidemill ARGS` as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True,
        text=True,
        env=env or dict(os.environ),
        timeout=timeout,
        cwd=ROOT,
    )


def up_env(tmp_path: Path, **extra: str) -> tuple[dict[str, str], int]:
    """Environment for a `tidemill up` of its own (embedded servers on free ports, data under
    `tmp_path`) and its web port; `extra` overrides, e.g. external DATABASE_URL / REDIS_URL."""
    from core.proc import free_port

    web = free_port()
    env = dict(
        os.environ,
        TIDEMILL_DATA_DIR=str(tmp_path / "data"),
        TIDEMILL_WEB_PORT=str(web),
        TIDEMILL_PG_PORT=str(free_port()),
        TIDEMILL_REDIS_PORT=str(free_port()),
        TIDEMILL_WORKER_PROCESSES="2",
        TIDEMILL_WORKER_THREADS="2",
    )
    for name in ("DATABASE_URL", "DATABASE_DIRECT_URL", "REDIS_URL", "BROKER_URL"):
        env.pop(name, None)
    env.update(extra)
    return env, web
