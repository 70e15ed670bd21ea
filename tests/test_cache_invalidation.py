"""Cache invalidation: a committed change removes every key the declarative map derives from
it, through the real path (trigger -> outbox -> relay -> dramatiq worker -> Redis)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import structlog

import workers.actors  # noqa: F401  (the relay must know every actor the triggers name)
from core.proc import free_port, wait_until
from core.settings import reset_settings_cache
from db.cache_keys import (
    CACHE_MAP,
    UnknownCachedTable,
    keys_for,
    moment_key,
    trigger_ddl,
    user_email_key,
    user_key,
    user_username_key,
)
from db.embedded import EmbeddedValkey
from tests.test_outbox_relay import running_relay
from workers.broker import broker

# --- the map ------------------------------------------------------------------------------------


def test_keys_for_old_and_new_rows_skip_null_columns() -> None:
    rows: list[dict[str, str | None]] = [
        {"id": "u1", "email": "old@example.com", "username": "ayse"},
        {"id": "u1", "email": "new@example.com", "username": None},
    ]
    assert keys_for("users", rows) == {
        "user:u1",
        "user:email:old@example.com",
        "user:email:new@example.com",
        "user:username:ayse",
    }


def test_every_seed_key_pattern_is_declared() -> None:
    templates = {t for entry in CACHE_MAP.values() for t in entry.keys}
    assert {
        "moment:{id}",
        "user:{id}",
        "user:email:{email}",
        "user:username:{username}",
        "event:{id}",
        "events:upcoming",
        "event:rsvps:{event_id}",
        "event:{id}:metrics",
        "matches:recent:{user_id_1}",
        "matches:recent:{user_id_2}",
        "match:{match_id}",
    } <= templates
    assert CACHE_MAP["moments"].ttl_s == 300
    assert CACHE_MAP["matches"].columns == ("match_id", "user_id_1", "user_id_2")
    assert keys_for("matches", [{"match_id": "m", "user_id_1": "a", "user_id_2": "b"}]) == {
        "match:m",
        "matches:recent:a",
        "matches:recent:b",
    }


def test_unknown_table_is_a_clear_error() -> None:
    with pytest.raises(UnknownCachedTable, match="no cache keys declared for table 'nope'"):
        keys_for("nope", [{"id": 1}])


# --- end to end ---------------------------------------------------------------------------------


def new_user(sql: Any, email: str, username: str | None = None) -> str:
    row = sql.execute(
        "INSERT INTO users (email, username) VALUES (%s, %s) RETURNING id", (email, username)
    ).fetchone()
    return str(row[0])


def new_moment(sql: Any, owner: str) -> str:
    row = sql.execute(
        "INSERT INTO moments (user_id, title, category, location, date, status) "
        "VALUES (%s, 'Picnic', 'outdoors', 'Maçka', now(), 'draft') RETURNING id",
        (owner,),
    ).fetchone()
    return str(row[0])


def gone(r: Any, *keys: str) -> bool:
    return int(r.exists(*keys)) == 0


def test_commits_drop_exactly_the_affected_keys(sql, redis_client, inproc_worker) -> None:
    uid = new_user(sql, "old@example.com", "ayse")
    mid = new_moment(sql, uid)
    other = new_moment(sql, uid)
    with running_relay(sql, poll_s=3600):  # only NOTIFY can make this fast
        # wait for the inserts' own invalidations, then cache the current values
        assert wait_until(lambda: _pending(sql) == 0, timeout=20)
        broker.join("cache", timeout=20_000)
        cached = {
            moment_key(mid): "m",
            moment_key(other): "o",
            user_key(uid): "u",
            user_email_key("old@example.com"): "u",
            user_username_key("ayse"): "u",
        }
        for key, value in cached.items():
            redis_client.set(key, value, ex=300)
        # When the app updates a moment, then changes the user's e-mail
        sql.execute("UPDATE moments SET title = 'Picnic!' WHERE id = %s", (mid,))
        assert wait_until(lambda: gone(redis_client, moment_key(mid)), timeout=20)
        sql.execute("UPDATE users SET email = 'new@example.com' WHERE id = %s", (uid,))
        # Then the user's keys go, including the old address's, and the username's
        assert wait_until(
            lambda: gone(
                redis_client, user_key(uid), user_email_key("old@example.com"), "user:username:ayse"
            ),
            timeout=20,
        )
        # and the other moment's key stays (only affected keys are removed)
        assert redis_client.get(moment_key(other)) == "o"
        sql.execute("DELETE FROM moments WHERE id = %s", (other,))
        assert wait_until(lambda: gone(redis_client, moment_key(other)), timeout=20)


def test_other_seed_tables_get_the_same_triggers(sql, redis_client, inproc_worker) -> None:
    # Given Pomi's events table with the triggers the map generates
    sql.execute("CREATE TABLE events (id uuid PRIMARY KEY, user_id uuid, title text)")
    sql.execute(trigger_ddl("events"))
    sql.execute(
        "INSERT INTO events VALUES ('00000000-0000-0000-0000-0000000000e1', NULL, 'Meetup')"
    )
    drain_and_join()
    eid = "00000000-0000-0000-0000-0000000000e1"
    for key in (f"event:{eid}", f"event:{eid}:metrics", "events:upcoming"):
        redis_client.set(key, "x", ex=300)
    # When the event changes
    sql.execute("UPDATE events SET title = 'Meetup (moved)' WHERE id = %s", (eid,))
    drain_and_join()
    # Then its details, its metrics and the upcoming list are gone
    assert gone(redis_client, f"event:{eid}", f"event:{eid}:metrics", "events:upcoming")


def test_relay_outage_catches_up_from_the_outbox(sql, redis_client, inproc_worker) -> None:
    uid = new_user(sql, "x@example.com")
    mids = [new_moment(sql, uid) for _ in range(20)]
    drain_and_join()
    for mid in mids:
        redis_client.set(moment_key(mid), "stale-soon", ex=300)
    # While no relay runs, the app keeps committing
    for mid in mids:
        sql.execute("UPDATE moments SET title = 'changed' WHERE id = %s", (mid,))
    assert _pending(sql) == 20
    assert redis_client.exists(*[moment_key(m) for m in mids]) == 20
    # When a relay starts, it catches up from the table (no NOTIFY was heard)
    with running_relay(sql, poll_s=0.2):
        assert wait_until(lambda: gone(redis_client, *[moment_key(m) for m in mids]), timeout=30)
    assert _pending(sql) == 0


@pytest.fixture
def second_valkey(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmbeddedValkey]:
    """A cache Redis of its own (the broker stays on the session's), so a test can stop it."""
    valkey = EmbeddedValkey(tmp_path, port=free_port())
    valkey.start()
    session_url = os.environ["REDIS_URL"]
    monkeypatch.setenv("REDIS_URL", valkey.url(0))
    reset_settings_cache()
    try:
        yield valkey
    finally:
        # The session's URL back before the cache is dropped: a background thread (stats,
        # done-marker) reading settings in between would otherwise cache this test's Redis
        # for every later test (monkeypatch restores the variable only after this fixture).
        os.environ["REDIS_URL"] = session_url
        reset_settings_cache()
        valkey.stop()


def test_redis_outage_is_retried_until_the_keys_are_gone(sql, inproc_worker, second_valkey) -> None:
    import redis

    cache = redis.Redis.from_url(second_valkey.url(0))
    uid = new_user(sql, "y@example.com")
    mid = new_moment(sql, uid)
    drain_and_join()
    cache.set(moment_key(mid), "stale")  # no TTL: only the invalidation can remove it
    cache.set("control", "kept")  # proves the restart keeps data (AOF), so a gone key was deleted
    # Given the cache Redis is down when the change is relayed
    second_valkey.stop()
    sql.execute("UPDATE moments SET title = 'new' WHERE id = %s", (mid,))
    from workers.outbox import drain

    drain(broker, batch=100)
    # the message fails and is retried with backoff while Redis is away
    assert wait_until(lambda: _retried(), timeout=20)
    second_valkey.start()
    broker.join("cache", timeout=30_000)
    cache = redis.Redis.from_url(second_valkey.url(0))
    assert cache.exists(moment_key(mid)) == 0
    assert cache.get("control") == b"kept"


def _retried() -> bool:
    from dramatiq.brokers.redis import RedisBroker

    assert isinstance(broker, RedisBroker)
    # a retried message sits in the delay queue until its backoff elapses
    return bool(broker.client.hlen("dramatiq:cache.DQ.msgs"))


def drain_and_join() -> None:
    from workers.outbox import drain

    drain(broker, batch=500)
    broker.join("cache", timeout=20_000)


def _pending(sql: Any) -> int:
    return int(sql.execute("SELECT count(*) FROM outbox WHERE dispatched_at IS NULL").fetchone()[0])


def test_relay_merges_a_batch_of_cache_rows_into_one_message(sql, redis_client) -> None:
    from dramatiq.brokers.redis import RedisBroker

    from workers.outbox import drain, message_id_for

    broker.flush_all()
    uid = new_user(sql, "z@example.com")
    mids = [new_moment(sql, uid) for _ in range(5)]
    sql.execute("DELETE FROM outbox")
    for mid in mids:
        redis_client.set(moment_key(mid), "stale")
        sql.execute("UPDATE moments SET title = 'changed' WHERE id = %s", (mid,))
    first = sql.execute("SELECT min(id) FROM outbox").fetchone()[0]
    # When one relay batch holds the five invalidation rows
    assert drain(broker, batch=100) == 5
    # Then one message carries them all, and every row is marked with its id
    assert isinstance(broker, RedisBroker)
    assert broker.client.hlen("dramatiq:cache.msgs") == 1
    marked = {r[0] for r in sql.execute("SELECT message_id FROM outbox")}
    assert marked == {message_id_for(first)}
    # (the payloads stay until the job is done, so a lost message can be rebuilt)
    assert sql.execute("SELECT count(*) FROM outbox WHERE kwargs = '{}'").fetchone() == (0,)
    # and running it removes every key
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        broker.join("cache", timeout=20_000)
    finally:
        worker.stop()
    assert gone(redis_client, *[moment_key(m) for m in mids])
    # and once done, the rows' payloads are emptied: they held key columns such as e-mails
    from workers.jobs import done_marker

    done_marker.flush()
    assert sql.execute(
        "SELECT count(*) FROM outbox WHERE done_at IS NOT NULL AND kwargs = '{}'"
    ).fetchone() == (5,)


def test_unknown_table_in_a_merged_batch_does_not_keep_the_others_stale(sql, redis_client) -> None:
    from workers.outbox import drain

    broker.flush_all()
    uid = new_user(sql, "mixed@example.com")
    mids = [new_moment(sql, uid) for _ in range(3)]
    sql.execute("DELETE FROM outbox")
    for mid in mids:
        redis_client.set(moment_key(mid), "stale")
    # Given one relay batch where a change names a table without a cache map entry, between
    # ordinary changes
    sql.execute("UPDATE moments SET title = 'changed' WHERE id = %s", (mids[0],))
    sql.execute(
        "INSERT INTO outbox (actor, queue_name, kwargs) VALUES ('invalidate', 'cache', %s)",
        (json.dumps({"table": "nope", "rows": [{"id": 1}]}),),
    )
    for mid in mids[1:]:
        sql.execute("UPDATE moments SET title = 'changed' WHERE id = %s", (mid,))
    assert drain(broker, batch=100) == 4
    # When the merged message runs
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    with structlog.testing.capture_logs() as logs:
        worker.start()
        try:
            broker.join("cache", timeout=20_000)
        finally:
            worker.stop()
    # Then every known table's keys are gone, the unknown table is logged, nothing dead-letters
    assert gone(redis_client, *[moment_key(m) for m in mids])
    assert [e["table"] for e in logs if e["event"] == "cache_unknown_table"] == ["nope"]
    from dramatiq.brokers.redis import RedisBroker

    assert isinstance(broker, RedisBroker)
    assert broker.client.hlen("dramatiq:cache.XQ.msgs") == 0
