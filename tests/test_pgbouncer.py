"""PgBouncer in transaction pooling mode: the suite's DATABASE_URL goes through a real one.

The adversary here is the pooler itself: consecutive transactions of one client land on
different server connections, so a statement prepared on one is missing on the next, and
session state (LISTEN, session advisory locks) does not stay with the client.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from sqlalchemy import text

from core.settings import Settings, SettingsError, get_settings
from db.engine import connect_options, direct_url, get_database, pooled, unit_of_work

pytestmark = pytest.mark.skipif(
    os.environ.get("TIDEMILL_TEST_PGBOUNCER", "1") == "0", reason="TIDEMILL_TEST_PGBOUNCER=0"
)

QUERY = "SELECT %(n)s::int + 1 AS m, pg_backend_pid() AS pid"


def bouncer_stats(servers: Any) -> dict[str, int]:
    # The admin console answers simple-protocol queries only; psycopg sends parameterless
    # statements that way.
    with psycopg.connect(servers.bouncer.admin_url(), autocommit=True) as admin:
        cur = admin.execute("SHOW STATS")
        names = [c.name for c in cur.description or []]
        for row in cur.fetchall():
            record = dict(zip(names, row, strict=True))
            if record["database"] == "tidemill_test":
                return {k: int(v) for k, v in record.items() if k != "database"}
    return {}


def test_the_system_under_test_is_pooled_and_sessions_go_direct(servers, db) -> None:
    settings = get_settings()
    # Given the suite's environment: DATABASE_URL at PgBouncer, the direct URL at Postgres
    assert urlsplit(settings.database_url or "").port == servers.bouncer.port
    assert urlsplit(direct_url(settings)).port == servers.pg.port
    assert pooled(settings) and connect_options(settings) == {"prepare_threshold": None}
    with psycopg.connect(servers.bouncer.admin_url(), autocommit=True) as admin:
        config = {row[0]: row[1] for row in admin.execute("SHOW CONFIG").fetchall()}
    assert config["pool_mode"] == "transaction"
    # When units of work commit, PgBouncer counts their transactions
    before = bouncer_stats(servers).get("total_xact_count", 0)
    for _ in range(5):
        with unit_of_work() as uow:
            uow.sql("SELECT 1")
    assert bouncer_stats(servers)["total_xact_count"] >= before + 5


def alternate_servers(
    run: Callable[[int], int], hold: Callable[[], None], free: Callable[[], None]
) -> set[int]:
    """Run `run(i)` (one transaction) 12 times while another client alternately holds a
    transaction open: PgBouncer hands out its most recently used server, so holding it pushes
    the next transaction onto another server connection. Returns the backend pids seen."""
    pids = set()
    for i in range(12):
        if i % 2:
            hold()
        pids.add(run(i))
        if i % 2:
            free()
    return pids


@pytest.fixture
def blocker(servers: Any, db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(servers.pooled_url, prepare_threshold=None) as conn:
        yield conn


def test_psycopg_defaults_break_behind_transaction_pooling(servers, blocker) -> None:
    # The control: psycopg's default (prepare after 5 runs) fails here, so the next test
    # proves something.
    with psycopg.connect(servers.pooled_url) as conn:

        def run(i: int) -> int:
            row = conn.execute(QUERY, {"n": i}).fetchone()
            conn.commit()
            assert row is not None and row[0] == i + 1
            return int(row[1])

        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            alternate_servers(run, lambda: blocker.execute("SELECT 1") and None, blocker.commit)


def test_pooled_engine_and_raw_sql_never_prepare(servers, blocker) -> None:
    # Given the engine every unit of work uses (DATABASE_URL = PgBouncer)
    engine = get_database().engine
    with engine.connect() as conn:

        def run(i: int) -> int:
            row = conn.execute(text("SELECT :n + 1 AS m, pg_backend_pid() AS pid"), {"n": i})
            m, pid = row.one()
            conn.commit()
            assert m == i + 1 and isinstance(pid, int)
            return pid

        # When its transactions land on different server connections
        pids = alternate_servers(run, lambda: blocker.execute("SELECT 1") and None, blocker.commit)
    # Then every statement ran (nothing prepared), and the alternation really happened
    assert len(pids) >= 2

    def run_uow(i: int) -> int:
        with unit_of_work() as uow:  # the hot-path raw psycopg cursor of a unit of work
            row = uow.sql(QUERY, {"n": i}).fetchone()
        assert row is not None and row.m == i + 1
        return int(row.pid)

    pids = alternate_servers(run_uow, lambda: blocker.execute("SELECT 1") and None, blocker.commit)
    assert len(pids) >= 2


def test_direct_url_falls_back_to_database_url() -> None:
    url = "postgresql://u@db:5432/x"
    settings = Settings.from_env({"DATABASE_URL": url})
    assert direct_url(settings) == url and not pooled(settings)
    assert connect_options(settings) == {}
    settings = Settings.from_env(
        {"DATABASE_URL": "postgresql://u@bouncer:6432/x", "DATABASE_DIRECT_URL": url}
    )
    assert direct_url(settings) == url and pooled(settings)
    # A copy pointed at another database (a drill's cluster, embedded servers) never reaches
    # the old one through the leftover direct URL
    other = dataclasses.replace(settings, database_url="postgresql://u@elsewhere:5432/y")
    assert direct_url(other) == "postgresql://u@elsewhere:5432/y" and not pooled(other)
    embedded = settings.with_urls(database_url="postgresql://postgres@127.0.0.1:5/x")
    assert embedded.database_direct_url is None and "DATABASE_DIRECT_URL" not in (
        embedded.child_env()
    )
    with pytest.raises(SettingsError, match="DATABASE_DIRECT_URL"):
        Settings.from_env({"DATABASE_DIRECT_URL": "mysql://u@db/x"})


def test_the_leader_lock_needs_the_direct_url(servers, db) -> None:
    from schedules.leader import LeaderLock

    settings = get_settings()
    # The control: through the pooler, a session lock stays with a server connection that
    # the next client is handed, and advisory locks are re-entrant for their session, so two
    # "replicas" both become leader (and both fences name the same backend)
    pooled_locks = [
        LeaderLock(settings.database_url or "", key=4242, identity=f"p{i}") for i in range(2)
    ]
    try:
        assert [lock.try_acquire() for lock in pooled_locks] == [True, True]
    finally:
        for lock in pooled_locks:
            lock.release()
    # The scheduler's way (schedules/scheduler.py): the direct URL, one leader
    direct_locks = [LeaderLock(direct_url(settings), key=4243, identity=f"d{i}") for i in range(2)]
    try:
        assert [lock.try_acquire() for lock in direct_locks] == [True, False]
        assert direct_locks[0].check()
    finally:
        for lock in direct_locks:
            lock.release()
