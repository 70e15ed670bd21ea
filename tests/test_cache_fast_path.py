"""Issue 18: the relay's fast path UNLINKs a change's keys itself, and the durable path (the
outbox row, its message, the worker's ``invalidate``) still runs and marks the row done.

Each test attacks one promise: the fast path really deletes before any worker runs; a key is
never left stale when the fast path fails (Redis down, Redis hung) or its relay dies between
fetching the rows and deleting; a burst leaves no key behind; the row ends done either way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import psycopg
import pytest
import redis
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

import workers.actors  # noqa: F401  (the relay must know every actor the triggers name)
from core.proc import free_port, stop_process, wait_until
from core.settings import get_settings
from db.cache_keys import CACHE_MAP, moment_key, user_email_key, user_key
from db.embedded import EmbeddedValkey
from tests.conftest import start_cli
from tests.test_cache_invalidation import (  # noqa: F401  (second_valkey is a fixture)
    gone,
    new_moment,
    new_user,
    second_valkey,
)
from tests.test_outbox_relay import _listening, running_relay
from workers.broker import broker, build_broker
from workers.cache import fast_path, keys_of_changes
from workers.jobs import done_marker
from workers.outbox import CHANNEL, Relay, drain, outbox_backlog, wakeup_changes


@pytest.fixture(autouse=True)
def fast_path_resumed() -> Iterator[None]:
    fast_path.resume()  # a pause left by another test must not hide this one's fast path
    yield
    fast_path.resume()


def quiet_moments(sql: Any, n: int) -> list[str]:
    """n moments whose own insert invalidations are already out of the outbox."""
    uid = new_user(sql, f"owner{n}@example.com")
    mids = [new_moment(sql, uid) for _ in range(n)]
    sql.execute("DELETE FROM outbox")
    return mids


def row_states(sql: Any) -> list[tuple[bool, bool, bool]]:
    """(dispatched, done, payload emptied) of every outbox row."""
    return [
        (r[0] is not None, r[1] is not None, r[2] == {})
        for r in sql.execute("SELECT dispatched_at, done_at, kwargs FROM outbox ORDER BY id")
    ]


def run_worker_until_done(sql: Any, queue: str = "cache") -> None:
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        broker.join(queue, timeout=30_000)
        worker.join()
    finally:
        worker.stop()
    done_marker.flush()


def test_the_relay_removes_the_keys_and_the_worker_still_marks_the_rows_done(
    db, sql, redis_client
) -> None:
    broker.flush_all()
    mids = quiet_moments(sql, 3)
    for mid in mids:
        redis_client.set(moment_key(mid), "stale")
    for mid in mids:
        sql.execute("UPDATE moments SET title = 'new' WHERE id = %s", (mid,))
    # When only the relay runs (no worker at all)
    assert drain(broker, batch=100) == 3
    # Then the keys are gone already, by the relay's own UNLINK
    assert gone(redis_client, *[moment_key(m) for m in mids])
    # and the rows are dispatched, not done: their message waits for a worker, payload kept
    assert row_states(sql) == [(True, False, False)] * 3
    assert broker.client.hlen("dramatiq:cache.msgs") == 1  # type: ignore[attr-defined]
    # When the worker runs the message (deleting again: a no-op), the rows end done, emptied
    redis_client.set("control", "kept")
    run_worker_until_done(sql)
    assert row_states(sql) == [(True, True, True)] * 3
    assert redis_client.get("control") == "kept"  # only the change's keys are touched


def test_fast_path_off_leaves_the_keys_to_the_worker(db, sql, redis_client, monkeypatch) -> None:
    broker.flush_all()
    (mid,) = quiet_moments(sql, 1)
    redis_client.set(moment_key(mid), "stale")
    sql.execute("UPDATE moments SET title = 'new' WHERE id = %s", (mid,))
    settings = dataclasses.replace(get_settings(), cache_fast_path=False)
    drain(broker, batch=100, settings=settings)
    assert redis_client.get(moment_key(mid)) == "stale"  # the switch really switches
    run_worker_until_done(sql)
    assert gone(redis_client, moment_key(mid))
    assert row_states(sql) == [(True, True, True)]


def test_redis_down_during_the_fast_path_the_worker_deletes_once_it_is_back(
    db,
    sql,
    second_valkey: EmbeddedValkey,  # noqa: F811  (the fixture imported above)
) -> None:
    broker.flush_all()
    cache = redis.Redis.from_url(second_valkey.url(0))
    mids = quiet_moments(sql, 4)
    for mid in mids:
        cache.set(moment_key(mid), "stale")  # no TTL: only an invalidation removes it
    cache.set("control", "kept")  # survives the restart (AOF): a gone key was deleted
    # Given the cache Redis is down (the broker is not) when the relay sends the changes
    second_valkey.stop()
    for mid in mids[:2]:
        sql.execute("UPDATE moments SET title = 'new' WHERE id = %s", (mid,))
    with structlog.testing.capture_logs() as logs:
        assert drain(broker, batch=100) == 2
        # a second batch inside the pause does not try Redis again
        for mid in mids[2:]:
            sql.execute("UPDATE moments SET title = 'new' WHERE id = %s", (mid,))
        assert drain(broker, batch=100) == 2
    # Then the relay's batches went through all the same, the failure logged once
    assert [e["event"] for e in logs if e["event"].startswith("cache_fast")] == [
        "cache_fast_path_failed"
    ]
    assert row_states(sql) == [(True, False, False)] * 4
    # When a worker runs while Redis is still away, its job fails and is retried
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        assert wait_until(
            lambda: bool(broker.client.hlen("dramatiq:cache.DQ.msgs")),  # type: ignore[attr-defined]
            timeout=20,
        )
        # and once Redis is back, the retry removes every key
        second_valkey.start()
        broker.join("cache", timeout=30_000)
        worker.join()
    finally:
        worker.stop()
    done_marker.flush()
    cache = redis.Redis.from_url(second_valkey.url(0))
    assert cache.exists(*[moment_key(m) for m in mids]) == 0
    assert cache.get("control") == b"kept"
    assert row_states(sql) == [(True, True, True)] * 4


def test_a_hung_redis_holds_the_relay_one_timeout_then_the_worker_deletes(
    db,
    sql,
    second_valkey: EmbeddedValkey,  # noqa: F811  (the fixture imported above)
) -> None:
    import time

    broker.flush_all()
    cache = redis.Redis.from_url(second_valkey.url(0))
    mids = quiet_moments(sql, 2)
    for mid in mids:
        cache.set(moment_key(mid), "stale")
    assert second_valkey.proc is not None
    pid = second_valkey.proc.pid
    # Given a cache Redis that accepts connections but answers nothing (SIGSTOP)
    os.kill(pid, signal.SIGSTOP)
    try:
        sql.execute("UPDATE moments SET title = 'new' WHERE id = %s", (mids[0],))
        started = time.monotonic()
        with structlog.testing.capture_logs() as logs:
            assert drain(broker, batch=100) == 1
            sql.execute("UPDATE moments SET title = 'new' WHERE id = %s", (mids[1],))
            assert drain(broker, batch=100) == 1
        # (the fast path did try, and timed out, once)
        assert [e["error"] for e in logs if e["event"] == "cache_fast_path_failed"] == [
            "TimeoutError"
        ]
        # Then the relay waited one fast-path timeout (0.5 s), not the client's 30 s, and
        # not again for the next batch (generous bound: a loaded machine)
        assert time.monotonic() - started < 10
        assert row_states(sql) == [(True, False, False)] * 2
    finally:
        os.kill(pid, signal.SIGCONT)
    # When Redis answers again, the worker's jobs remove the keys and mark the rows done
    run_worker_until_done(sql)
    assert cache.exists(*[moment_key(m) for m in mids]) == 0
    assert row_states(sql) == [(True, True, True)] * 2


def test_a_write_burst_leaves_no_key_behind(db, sql, redis_client, inproc_worker) -> None:
    # Given 300 moments and 40 users cached, and a relay + worker running
    uids = [new_user(sql, f"burst{i}@example.com") for i in range(40)]
    mids = quiet_moments(sql, 300)
    keys = [moment_key(m) for m in mids] + [user_key(u) for u in uids]
    keys += [user_email_key(f"burst{i}@example.com") for i in range(40)]
    for key in keys:
        redis_client.set(key, "stale", ex=300)
    errors: list[BaseException] = []

    def writer(part: int) -> None:
        try:
            with psycopg.connect(sql.info.dsn, autocommit=True) as conn:
                for i, mid in enumerate(mids[part::4]):
                    conn.execute("UPDATE moments SET title = %s WHERE id = %s", (f"b{i}", mid))
                for uid in uids[part::4]:  # a changed e-mail drops the old address's key too
                    conn.execute("UPDATE users SET email = 'moved-' || email WHERE id = %s", (uid,))
                # and one statement touching many rows at once
                conn.execute(
                    "UPDATE moments SET location = 'elsewhere' WHERE id = ANY(%s::uuid[])",
                    (mids[part::8],),
                )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    with running_relay(sql, poll_s=3600):  # only NOTIFY + the fast path
        # When four connections commit 344 statements (hundreds of rows) as fast as they can
        threads = [threading.Thread(target=writer, args=(p,)) for p in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        # Then every key is gone and the outbox drains
        assert wait_until(lambda: redis_client.exists(*keys) == 0, timeout=30)
        assert wait_until(lambda: outbox_backlog()[0] == 0, timeout=30)
    broker.join("cache", timeout=30_000)
    inproc_worker.join()
    done_marker.flush()
    # and every row ends done (none left for the rescuer), its payload emptied
    states = row_states(sql)
    assert len(states) == len(mids) + len(uids) + 4  # one row per committed statement
    assert set(states) == {(True, True, True)}


STALLED_CLAIM = """
    SELECT count(*) FROM pg_stat_activity
    WHERE state = 'idle in transaction'
      AND query LIKE '%%dispatched_at IS NULL AND last_error IS NULL%%FOR UPDATE SKIP LOCKED%%'
"""


@pytest.mark.slow
def test_relay_sigkilled_after_its_unlink_the_durable_path_finishes_the_rows(
    db, sql, redis_client, tmp_path: Path
) -> None:
    # The broker on a Valkey of its own, which the test freezes; the cache Redis stays up.
    broker_valkey = EmbeddedValkey(tmp_path, port=free_port())
    broker_valkey.start()
    assert broker_valkey.proc is not None
    env = dict(
        os.environ,
        BROKER_URL=broker_valkey.url(0),
        TIDEMILL_RELAY_POLL_S="0.2",
        TIDEMILL_CACHE_FAST_PATH="true",
    )
    mids = quiet_moments(sql, 50)
    keys = [moment_key(m) for m in mids]
    for key in keys:
        redis_client.set(key, "stale")  # no TTL
    procs: list[Any] = []
    try:
        # Given a relay that has claimed a burst of changes and is stuck sending their message
        # (the broker frozen)
        relay = start_cli("relay", env=env, stderr=open(tmp_path / "relay.log", "wb"))  # noqa: SIM115
        procs.append(relay)
        assert wait_until(lambda: _listening(sql), timeout=60), (tmp_path / "relay.log").read_text()
        os.kill(broker_valkey.proc.pid, signal.SIGSTOP)
        for mid in mids:
            sql.execute("UPDATE moments SET title = 'new' WHERE id = %s", (mid,))
        assert wait_until(lambda: sql.execute(STALLED_CLAIM).fetchone()[0] == 1, timeout=30), (
            sql.execute("SELECT state, query FROM pg_stat_activity").fetchall()
        )
        # Then its fast path removed every key already, from the NOTIFYs alone
        assert wait_until(lambda: redis_client.exists(*keys) == 0, timeout=30)
        # When it is SIGKILLed there, and readers cache the old values again meanwhile
        os.killpg(relay.pid, signal.SIGKILL)
        relay.wait(timeout=10)
        for key in keys:
            redis_client.set(key, "stale")
        os.kill(broker_valkey.proc.pid, signal.SIGCONT)
        # its claim rolls back: every row pending again, the outbox their only record
        assert wait_until(lambda: outbox_backlog()[0] >= len(mids), timeout=30)
        # When the durable path alone runs (a relay without the fast path, and a worker)
        env["TIDEMILL_CACHE_FAST_PATH"] = "false"
        procs.append(start_cli("relay", env=env))
        procs.append(start_cli("worker", "--queue", "cache", "--processes", "1", env=env))
        # Then every key goes again, and every row ends dispatched and done
        assert wait_until(lambda: redis_client.exists(*keys) == 0, timeout=60)
        assert wait_until(lambda: set(row_states(sql)) == {(True, True, True)}, timeout=60)
    finally:
        os.kill(broker_valkey.proc.pid, signal.SIGCONT)
        for proc in procs:
            stop_process(proc, group=True)
        broker_valkey.stop()


# --- the wake-up's payload (migration 0016): commit -> NOTIFY -> UNLINK ---------------------


def wakeups(listener: psycopg.Connection[Any], n: int) -> list[str]:
    """The next n payloads on the relay's channel (generous deadline: a loaded machine)."""
    got = [note.payload for note in listener.notifies(timeout=20, stop_after=n)]
    assert len(got) >= n, got
    return got


def skip_pending(listener: psycopg.Connection[Any]) -> None:
    """Read away the wake-ups already sent (the arrangement's own)."""
    listener.execute("SELECT 1")  # a round trip: every earlier commit's NOTIFY is in by now
    while list(listener.notifies(timeout=0.1)):
        pass


@pytest.fixture
def listener(db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        yield conn


def test_the_wakeup_carries_the_statements_invalidations_and_nothing_else(
    db, sql, listener
) -> None:
    (mid,) = quiet_moments(sql, 1)
    skip_pending(listener)  # the arrangement's own wake-ups
    # A change to a cached table: its one outbox row's kwargs, as a JSON array
    sql.execute("UPDATE moments SET title = 'new' WHERE id = %s", (mid,))
    (payload,) = wakeups(listener, 1)
    changes, complete = wakeup_changes([payload])
    assert complete and len(changes) == 1
    assert changes[0]["table"] == "moments"
    assert keys_of_changes(changes, CACHE_MAP)[0] == {moment_key(mid)}
    # One statement writing other jobs, an `invalidate` with args (not merged by the relay:
    # not the fast path's) and two merged ones: only the two merged ones ride along
    sql.execute(
        """INSERT INTO outbox (actor, queue_name, args, kwargs) VALUES
           ('write_row', 'default', '[]', '{"value": "x"}'),
           ('invalidate', 'cache', '[["k0"]]', '{}'),
           ('invalidate', 'cache', '[]', '{"keys": ["k1"]}'),
           ('invalidate', 'cache', '[]', '{"keys": ["k2", "ü—\u00e9"]}')"""
    )
    (payload,) = wakeups(listener, 1)
    changes, complete = wakeup_changes([payload])
    assert complete
    assert sorted(keys_of_changes(changes, CACHE_MAP)[0]) == ["k1", "k2", "ü—é"]
    # Other jobs alone: a plain wake-up
    sql.execute("INSERT INTO outbox (actor, kwargs) VALUES ('write_row', '{}')")
    assert wakeups(listener, 1) == [""]
    assert wakeup_changes([""]) == ([], False)


@pytest.mark.parametrize("shape", ["many rows", "big rows"])
def test_an_oversized_statement_sends_a_plain_wakeup_and_the_durable_path_removes_all(
    db, sql, redis_client, listener, inproc_worker, shape: str
) -> None:
    if shape == "big rows":
        # one UPDATE of 300 moments: one outbox row whose kwargs are ~16 kB, past NOTIFY's limit
        mids = quiet_moments(sql, 300)
        keys = [moment_key(m) for m in mids]
        statement = ("UPDATE moments SET title = 'big' WHERE id = ANY(%s::uuid[])", (mids,))
    else:
        # 250 explicit invalidations in one INSERT, each small: past the 200-row cut-off
        keys = [f"many:{i}" for i in range(250)]
        statement = (
            "INSERT INTO outbox (actor, queue_name, kwargs) "
            "SELECT 'invalidate', 'cache', jsonb_build_object('keys', jsonb_build_array(k)) "
            "FROM unnest(%s::text[]) AS k",
            (keys,),
        )
    skip_pending(listener)
    for key in keys:
        redis_client.set(key, "stale")
    sql.execute(*statement)
    # Then the wake-up is a plain one (no payload over the limit, no error for the writer)
    assert wakeups(listener, 1) == [""]
    # and a running relay with a worker removes every key and ends every row done
    with running_relay(sql, poll_s=3600):
        assert wait_until(lambda: redis_client.exists(*keys) == 0, timeout=60)
        assert wait_until(lambda: outbox_backlog()[0] == 0, timeout=30)
    broker.join("cache", timeout=30_000)
    inproc_worker.join()
    done_marker.flush()
    assert set(row_states(sql)) == {(True, True, True)}


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        # (no NUL: Postgres text cannot hold one, so no outbox row can either)
        st.lists(
            st.text(
                st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=80
            ),
            min_size=1,
            max_size=30,
        ),
        min_size=1,
        max_size=12,
    )
)
def test_the_payload_is_exactly_the_rows_kwargs_or_plain_when_too_big(
    db, listener, key_lists: list[list[str]]
) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        skip_pending(listener)
        kwargs = [{"keys": keys} for keys in key_lists]
        conn.execute(
            "INSERT INTO outbox (actor, queue_name, kwargs) "
            "SELECT 'invalidate', 'cache', k FROM unnest(%s::jsonb[]) AS k",
            ([Jsonb(k) for k in kwargs],),
        )
        (payload,) = wakeups(listener, 1)
        size = len(json.dumps(kwargs, ensure_ascii=False).encode())
        if payload:
            assert len(payload.encode()) <= 7000
            changes, complete = wakeup_changes([payload])
            assert complete
            assert sorted(map(json.dumps, changes)) == sorted(map(json.dumps, kwargs))
        else:
            assert (
                size > 6000
            )  # only a payload near the limit falls back (the JSON spacing differs)


def test_the_relay_unlinks_on_the_notify_before_any_claim_of_the_row(
    db, sql, redis_client, tmp_path: Path
) -> None:
    # A relay in this process on a broker Valkey of its own, which the test freezes; the cache
    # Redis stays up; no worker at all.
    valkey = EmbeddedValkey(tmp_path, port=free_port())
    valkey.start()
    assert valkey.proc is not None
    cfg = dataclasses.replace(get_settings(), broker_url=valkey.url(0), relay_poll_s=3600)
    own_broker = build_broker(cfg, metrics=False)
    for actor in broker.actors.values():
        own_broker.declare_actor(actor)
    first, second = quiet_moments(sql, 2)
    for mid in (first, second):
        redis_client.set(moment_key(mid), "stale")
    relay = Relay(cfg, own_broker)
    thread = threading.Thread(target=relay.run)
    thread.start()
    try:
        assert wait_until(lambda: _listening(sql), timeout=20)
        # Given the relay's drainer stuck enqueueing a first change (its broker frozen)
        os.kill(valkey.proc.pid, signal.SIGSTOP)
        sql.execute("UPDATE moments SET title = 'new' WHERE id = %s", (first,))
        assert wait_until(lambda: sql.execute(STALLED_CLAIM).fetchone()[0] == 1, timeout=30)
        # When a second change commits
        sql.execute("UPDATE moments SET title = 'new' WHERE id = %s", (second,))
        # Then its key goes, from the NOTIFY alone
        assert wait_until(lambda: gone(redis_client, moment_key(second)), timeout=20)
        # while its row is pending and claimed by nobody (the test can lock it), no message sent
        pending = sql.execute(
            "SELECT id FROM outbox WHERE dispatched_at IS NULL FOR UPDATE SKIP LOCKED"
        ).fetchall()
        assert len(pending) == 1
        assert row_states(sql) == [(False, False, False)] * 2
        assert gone(redis_client, moment_key(first))
        # When the broker answers again, the durable path dispatches both rows
        os.kill(valkey.proc.pid, signal.SIGCONT)
        assert wait_until(lambda: outbox_backlog()[0] == 0, timeout=30)
        assert row_states(sql) == [(True, False, False)] * 2
    finally:
        os.kill(valkey.proc.pid, signal.SIGCONT)
        relay.stop()
        thread.join(timeout=30)
        valkey.stop()
    assert not thread.is_alive()


def test_migration_0016_downgrades_to_the_plain_wakeup_and_upgrades_again(servers) -> None:
    from alembic import command

    from db import migrate
    from db.engine import dispose_all

    name = "wakeup_roundtrip"
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = servers.pg.url(name)
    trigger = (
        "SELECT t.tgnewtable FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE t.tgname = 'outbox_wakeup' AND n.nspname = 'tidemill' AND c.relname = 'outbox'"
    )
    insert = "INSERT INTO tidemill.outbox (actor, queue_name, kwargs) VALUES %s"
    row = "('invalidate', 'cache', '{\"keys\": [\"k\"]}')"

    def payload_of_one_insert() -> str:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            conn.execute(insert % row)
            return wakeups(conn, 1)[0]

    try:
        migrate.upgrade(url)
        with psycopg.connect(url) as conn:
            assert conn.execute(trigger).fetchone() == ("new_rows",)
        assert wakeup_changes([payload_of_one_insert()]) == ([{"keys": ["k"]}], True)
        dispose_all()
        command.downgrade(migrate.alembic_config(url), "-1")
        with psycopg.connect(url) as conn:
            assert conn.execute(trigger).fetchone() == (None,)  # no transition table
        assert payload_of_one_insert() == ""
        migrate.upgrade(url)
        assert wakeup_changes([payload_of_one_insert()]) == ([{"keys": ["k"]}], True)
    finally:
        dispose_all()
        with psycopg.connect(servers.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_rows_no_wakeup_announced_are_unlinked_by_the_polling_drain(db, sql, redis_client) -> None:
    broker.flush_all()
    mids = quiet_moments(sql, 2)
    keys = [moment_key(m) for m in mids]
    for key in keys:
        redis_client.set(key, "stale")
    with running_relay(sql, poll_s=0.2):
        # Given changes committed while the relay listens, with the wake-up trigger off (a
        # NOTIFY lost), and no worker running
        sql.execute("ALTER TABLE outbox DISABLE TRIGGER outbox_wakeup")
        try:
            for mid in mids:
                sql.execute("UPDATE moments SET title = 'new' WHERE id = %s", (mid,))
        finally:
            sql.execute("ALTER TABLE outbox ENABLE TRIGGER outbox_wakeup")
        # Then the relay's poll finds them and UNLINKs their keys after enqueueing
        assert wait_until(lambda: gone(redis_client, *keys), timeout=20)
        assert wait_until(lambda: outbox_backlog()[0] == 0, timeout=20)
    assert row_states(sql) == [(True, False, False)] * 2  # dispatched, the worker's to finish
