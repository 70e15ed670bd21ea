"""A relay SIGKILLed between enqueue and commit loses no row and re-sends that batch once; the
actors tolerate the duplicate (one welcome e-mail per user)."""

from __future__ import annotations

import collections
import json
import os
import signal
from pathlib import Path
from typing import Any, cast

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker

import workers.actors  # noqa: F401  (the worker must know every actor)
from core.proc import free_port, stop_process, wait_until
from core.settings import reset_settings_cache
from tests.conftest import start_cli
from workers.broker import broker
from workers.outbox import message_id_for, outbox_backlog

USERS = 200
BATCH = 50

# Installed by the test, not by tidemill: it holds the relay's "mark dispatched" statement
# (which runs after the batch was enqueued) so the kill lands inside the crash window.
STALL = """
CREATE TABLE relay_stall (armed boolean NOT NULL);
INSERT INTO relay_stall VALUES (true);
CREATE FUNCTION relay_stall() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF (SELECT armed FROM relay_stall) THEN PERFORM pg_sleep(120); END IF;
  RETURN NULL;
END;
$$;
CREATE TRIGGER relay_stall AFTER UPDATE ON outbox
FOR EACH STATEMENT EXECUTE FUNCTION relay_stall();
"""


def queued_ids(queue: str) -> list[str]:
    """The dramatiq message ids of the messages waiting on `queue`. (dramatiq 2 stores each
    enqueue under a fresh redis_message_id, so a duplicate is a second entry, not a no-op.)"""
    client = cast(RedisBroker, broker).client
    return [json.loads(raw)["message_id"] for raw in client.hvals(f"dramatiq:{queue}.msgs")]


def stalled_backend(sql: Any) -> int | None:
    row = sql.execute(
        "SELECT pid FROM pg_stat_activity "
        "WHERE wait_event = 'PgSleep' AND query LIKE '%%UPDATE outbox SET dispatched_at%%'"
    ).fetchone()
    return None if row is None else int(row[0])


@pytest.mark.slow
def test_sigkilled_relay_loses_nothing_and_duplicates_one_batch_at_most(
    db, sql, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker.flush_all()
    mail_dir = tmp_path / "mail"
    env = dict(
        os.environ,
        TIDEMILL_RELAY_BATCH=str(BATCH),
        TIDEMILL_RELAY_POLL_S="0.2",
        MAIL_URL=f"file://{mail_dir}",
    )
    sql.execute(STALL)
    # Given 200 new users (200 welcome rows + 1 cache row) and a relay that gets stuck
    # after enqueueing its first batch
    sql.execute(
        "INSERT INTO users (email) SELECT 'crash' || g || '@example.com' "
        "FROM generate_series(1, %s) g",
        (USERS,),
    )
    assert outbox_backlog()[0] == USERS + 1
    relay = start_cli("relay", env=env)
    try:
        assert wait_until(lambda: stalled_backend(sql) is not None, timeout=30)
        first_batch = len(queued_ids("emails")) + len(queued_ids("cache"))
        assert first_batch == BATCH
        # When it is SIGKILLed inside the window (enqueued, not committed)
        os.killpg(relay.pid, signal.SIGKILL)
        relay.wait(timeout=10)
    finally:
        stop_process(relay, group=True)
    # (Postgres notices the dead client; here at once, instead of after TCP keepalive)
    backend = stalled_backend(sql)
    sql.execute("UPDATE relay_stall SET armed = false")
    if backend is not None:
        sql.execute("SELECT pg_terminate_backend(%s)", (backend,))
    assert outbox_backlog()[0] == USERS + 1  # nothing was marked: the batch rolled back
    # and a relay is started again
    relay = start_cli("relay", env=env)
    try:
        assert wait_until(lambda: outbox_backlog()[0] == 0, timeout=60)
    finally:
        stop_process(relay, group=True)
    # Then every row was sent, the interrupted batch twice and nothing else twice
    ids = sql.execute("SELECT id, message_id FROM outbox ORDER BY id").fetchall()
    assert all(mid == message_id_for(oid) for oid, mid in ids)
    counts = collections.Counter(queued_ids("emails") + queued_ids("cache"))
    assert set(counts) == {message_id_for(oid) for oid, _ in ids}
    assert sorted(collections.Counter(counts.values()).items()) == [
        (1, USERS + 1 - BATCH),
        (2, BATCH),
    ]
    # and the actors tolerate the duplicates: one e-mail per user
    monkeypatch.setenv("MAIL_URL", f"file://{mail_dir}")
    reset_settings_cache()
    worker = dramatiq.Worker(broker, worker_threads=4, worker_timeout=100)
    worker.start()
    try:
        broker.join("emails", timeout=60_000)
        broker.join("cache", timeout=60_000)
        worker.join()
    finally:
        worker.stop()
        reset_settings_cache()
    assert len(list(mail_dir.glob("*.eml"))) == USERS
    sent = sql.execute(
        "SELECT count(*) FROM email_deliveries WHERE kind = 'welcome' AND status = 'sent'"
    ).fetchone()[0]
    assert sent == USERS


def test_relay_survives_a_broker_outage_and_catches_up(db, sql, tmp_path: Path) -> None:
    import dataclasses
    import threading

    from core.settings import get_settings
    from db.embedded import EmbeddedValkey
    from workers.broker import build_broker
    from workers.outbox import Relay

    # Given a relay whose broker Redis is down
    valkey = EmbeddedValkey(tmp_path, port=free_port())
    valkey.start()
    settings = dataclasses.replace(
        get_settings(), broker_url=valkey.url(0), relay_poll_s=0.2, relay_batch=10
    )
    own_broker = build_broker(settings, metrics=False)
    for actor in broker.actors.values():
        own_broker.declare_actor(actor)  # the same actors, on the broker under test
    valkey.stop()
    relay = Relay(settings, own_broker)
    thread = threading.Thread(target=relay.run)
    thread.start()
    try:
        sql.execute("INSERT INTO users (email) VALUES ('outage@example.com')")
        # the relay keeps trying (rows stay pending, the thread stays alive)
        assert not wait_until(lambda: outbox_backlog()[0] == 0, timeout=2)
        assert thread.is_alive()
        # When the broker comes back, the relay catches up from the outbox
        valkey.start()
        assert wait_until(lambda: outbox_backlog()[0] == 0, timeout=60)
        # (the welcome message and the cache message, each sent once)
        client = cast(RedisBroker, own_broker).client
        assert client.hlen("dramatiq:emails.msgs") == 1
        assert client.hlen("dramatiq:cache.msgs") == 1
    finally:
        relay.stop()
        thread.join(timeout=30)
        valkey.stop()
    assert not thread.is_alive()
