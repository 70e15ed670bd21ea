"""The outbox relay: rows become messages; the table is the truth, NOTIFY only wakes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Iterator
from typing import Any, cast

from dramatiq.brokers.redis import RedisBroker

from core.proc import wait_until
from core.settings import get_settings
from db.engine import unit_of_work
from tests.support import actors  # noqa: F401  (declares the actors the rows name)
from workers.broker import broker
from workers.outbox import (
    Relay,
    drain,
    message_id_for,
    outbox_backlog,
    outbox_rejected,
    prune_dispatched,
)


def redis_broker() -> RedisBroker:
    return cast(RedisBroker, broker)


def add_row(sql: Any, actor: str, *args: Any, queue: str = "tests") -> int:
    row = sql.execute(
        "INSERT INTO outbox (actor, queue_name, args) VALUES (%s, %s, %s::jsonb) RETURNING id",
        (actor, queue, json.dumps(list(args))),
    ).fetchone()
    return int(row[0])


def test_drain_enqueues_marks_and_the_worker_applies(inproc_worker, sql) -> None:
    ids = [add_row(sql, "write_row", f"o{i}") for i in range(5)]
    assert drain(broker, batch=2) == 5
    broker.join("tests", timeout=30_000)
    inproc_worker.join()
    marked = sql.execute(
        "SELECT id, message_id FROM outbox WHERE dispatched_at IS NOT NULL ORDER BY id"
    ).fetchall()
    assert [(r[0], r[1]) for r in marked] == [(i, message_id_for(i)) for i in ids]
    written = sql.execute("SELECT count(*) FROM audit_logs WHERE entity_id LIKE 'o%'").fetchone()
    assert written[0] == 5
    # a second drain finds nothing left
    assert drain(broker, batch=2) == 0


def test_unknown_actor_is_kept_with_its_error_not_retried(db, sql) -> None:
    broker.flush_all()
    sql.execute("DELETE FROM outbox")
    oid = add_row(sql, "no_such_actor", 1)
    legacy = add_row(sql, "no_such_actor_either", 2)
    assert drain(broker, batch=10) == 2
    row = sql.execute(
        "SELECT dispatched_at, message_id, last_error FROM outbox WHERE id = %s", (oid,)
    ).fetchone()
    # The row stays undispatched with its error: never claimed again, not in the backlog,
    # counted as rejected
    assert row[0] is None and row[1] is None
    assert "unknown actor 'no_such_actor'" in row[2]
    assert redis_broker().client.llen("dramatiq:tests") == 0
    assert drain(broker, batch=10) == 0
    assert outbox_backlog() == (0, None)
    assert outbox_rejected() == 2
    # and the prune keeps it, however old, as it keeps an error row from before this rule
    # (marked dispatched then; no longer counted as rejected, but not deleted)
    sql.execute(
        "UPDATE outbox SET created_at = now() - interval '30 days', "
        "dispatched_at = CASE WHEN id = %s THEN now() - interval '30 days' END",
        (legacy,),
    )
    with unit_of_work() as uow:
        assert prune_dispatched(uow, older_than_hours=1) == 0
    assert sql.execute("SELECT count(*) FROM outbox").fetchone()[0] == 2
    # Once an operator clears the error (the actor deployed), the relay sends it
    sql.execute("UPDATE outbox SET last_error = NULL, dispatched_at = NULL WHERE id = %s", (oid,))
    sql.execute("UPDATE outbox SET actor = 'write_row' WHERE id = %s", (oid,))
    assert outbox_backlog()[0] == 1 and outbox_rejected() == 0
    assert drain(broker, batch=10) == 1
    assert sql.execute("SELECT message_id FROM outbox WHERE id = %s", (oid,)).fetchone()[0]
    broker.flush_all()


def test_skip_locked_lets_two_relays_split_the_rows(db, sql) -> None:
    broker.flush_all()
    for i in range(200):
        add_row(sql, "write_row", f"s{i}")
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(drain(broker, batch=7))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # every row sent exactly once between them
    assert sum(results) == 200
    assert redis_broker().client.hlen("dramatiq:tests.msgs") == 200


@contextlib.contextmanager
def running_relay(sql: Any, *, poll_s: float) -> Iterator[None]:
    """A real Relay in a thread, LISTENing before the block starts; stopped after it."""
    relay = Relay(dataclasses.replace(get_settings(), relay_poll_s=poll_s), broker)
    thread = threading.Thread(target=relay.run)
    thread.start()
    try:
        assert wait_until(lambda: _listening(sql), timeout=20)
        yield
    finally:
        relay.stop()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_running_relay_wakes_on_notify(db, sql) -> None:
    broker.flush_all()
    # a poll interval of an hour: only the NOTIFY can deliver the row in time
    with running_relay(sql, poll_s=3600):
        oid = add_row(sql, "write_row", "n1")
        assert wait_until(lambda: _dispatched(sql, oid), timeout=20)


def test_running_relay_polls_when_notify_is_lost(db, sql) -> None:
    broker.flush_all()
    # rows inserted with the trigger disabled: no NOTIFY is ever sent
    sql.execute("ALTER TABLE outbox DISABLE TRIGGER outbox_wakeup")
    try:
        with running_relay(sql, poll_s=0.2):
            oid = add_row(sql, "write_row", "p1")
            assert wait_until(lambda: _dispatched(sql, oid), timeout=20)
    finally:
        sql.execute("ALTER TABLE outbox ENABLE TRIGGER outbox_wakeup")


def _listening(sql: Any) -> bool:
    return bool(
        sql.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'").fetchone()[
            0
        ]
    )


def _dispatched(sql: Any, oid: int) -> bool:
    row = sql.execute("SELECT dispatched_at FROM outbox WHERE id = %s", (oid,)).fetchone()
    return row[0] is not None
