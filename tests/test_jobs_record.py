"""The job record in Postgres, with a real Worker in this process: done in the actor's commit,
a second delivery rolls back, retries held back move the deadline, dead letters are marked,
the rescuer re-sends overdue jobs with the same message id, one pass at a time."""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any, cast

import dramatiq
from dramatiq.brokers.redis import RedisBroker

import workers.actors  # noqa: F401  (the cache actor the merged test relays)
from core.proc import wait_until
from core.settings import get_settings
from db.engine import get_database
from tests.support import actors
from workers.broker import broker
from workers.outbox import build_message, drain, message_id_for
from workers.rescuer import LOCK_KEY, in_flight, rescue_batch, rescued_total


def add_row(sql: Any, actor: str, *args: Any, queue: str = "tests") -> int:
    row = sql.execute(
        "INSERT INTO outbox (actor, queue_name, args) VALUES (%s, %s, %s::jsonb) RETURNING id",
        (actor, queue, json.dumps(list(args))),
    ).fetchone()
    return int(row[0])


def audit(sql: Any, key: str) -> int:
    return int(
        sql.execute("SELECT count(*) FROM audit_logs WHERE entity_id = %s", (key,)).fetchone()[0]
    )


def job(sql: Any, oid: int) -> Any:
    return sql.execute(
        "SELECT dispatched_at, done_at, dead_at, retries, rescues, message_id, "
        "extract(epoch FROM redeliver_at - now()) AS due_in_s FROM outbox WHERE id = %s",
        (oid,),
    ).fetchone()


def queued_ids(queue: str) -> list[str]:
    client = cast(RedisBroker, broker).client
    return [json.loads(raw)["message_id"] for raw in client.hvals(f"dramatiq:{queue}.msgs")]


def test_done_is_marked_in_the_actors_commit_and_a_second_delivery_changes_nothing(
    inproc_worker, sql
) -> None:
    # Given a job relayed and processed
    oid = add_row(sql, "write_row", "d1")
    assert drain(broker, batch=10) == 1
    assert sql.execute("SELECT done_at FROM outbox WHERE id = %s", (oid,)).fetchone()[0] is None
    broker.join("tests", timeout=30_000)
    inproc_worker.join()
    # Then its row says done, and its effect is there once
    dispatched_at, done_at, dead_at, *_ = job(sql, oid)
    assert done_at is not None and done_at >= dispatched_at and dead_at is None
    assert audit(sql, "d1") == 1
    assert in_flight() == []
    # When the same message arrives twice more (a rescue racing a slow worker, a relay crash)
    row = sql.execute(
        "SELECT id, actor, queue_name, args, kwargs, retries FROM outbox WHERE id = %s", (oid,)
    ).fetchone()
    message = build_message(broker.get_actor("write_row"), [_Row(*row)])
    assert message.message_id == message_id_for(oid)
    broker.enqueue(message)
    broker.enqueue(message)
    broker.join("tests", timeout=30_000)
    inproc_worker.join()
    # Then the duplicates rolled their transaction back: still one effect, done_at unchanged
    assert audit(sql, "d1") == 1
    assert job(sql, oid)[1] == done_at


def test_a_failing_job_is_not_done_and_retries_until_its_commit(inproc_worker, sql) -> None:
    oid = add_row(sql, "fail_then_write", "f1", 2)
    drain(broker, batch=10)
    assert wait_until(lambda: job(sql, oid)[1] is not None, timeout=30)
    # the two failed attempts rolled back their row and their done-marking; the third stuck
    assert sql.execute(
        "SELECT entity_id FROM audit_logs WHERE entity_id LIKE 'f1:%'"
    ).fetchall() == [("f1:3",)]
    assert job(sql, oid)[3] == 2  # the retries the row recorded while they were held back


def test_a_retry_held_back_moves_the_deadline_instead_of_being_rescued(inproc_worker, sql) -> None:
    settings = dataclasses.replace(get_settings(), redeliver_after_s=1.0)
    # Given a job whose actor asks to be retried in 4 s
    oid = add_row(sql, "retry_later_then_write", "r1", 4000)
    drain(broker, batch=10, settings=settings)
    # Then its deadline moves past the retry's due time (4 s + the 1 s deadline)
    assert wait_until(lambda: job(sql, oid)[3] == 1, timeout=30)
    assert job(sql, oid)[6] > 3.0
    # and the rescuer, though the first deadline has passed, does not re-send it early
    threading.Event().wait(1.2)
    assert rescue_batch(broker, settings=settings).rescued == 0
    # and the retry runs when due, once
    assert wait_until(lambda: job(sql, oid)[1] is not None, timeout=30)
    assert audit(sql, "r1") == 1 and job(sql, oid)[4] == 0


def test_exhausted_retries_mark_the_job_dead_and_a_wipe_neither_loses_nor_revives_it(
    inproc_worker, sql
) -> None:
    settings = dataclasses.replace(get_settings(), redeliver_after_s=0.5)
    oid = add_row(sql, "always_permanent", "x1")
    drain(broker, batch=10, settings=settings)
    assert wait_until(lambda: job(sql, oid)[2] is not None, timeout=30)
    assert job(sql, oid)[1] is None  # dead, not done
    assert (
        "bad input"
        in sql.execute("SELECT last_error FROM outbox WHERE id = %s", (oid,)).fetchone()[0]
    )
    # When the broker is wiped (its dead-letter set with it)
    cast(RedisBroker, broker).client.flushall()
    threading.Event().wait(0.6)
    # Then the rescuer does not send it again: the row is the dead letter's record
    assert rescue_batch(broker, settings=settings).rescued == 0
    assert job(sql, oid)[2] is not None and in_flight() == []


def test_the_rescuer_resends_an_overdue_job_with_the_same_id_once_per_deadline(db, sql) -> None:
    broker.flush_all()
    settings = dataclasses.replace(get_settings(), redeliver_after_s=0.3)
    oid = add_row(sql, "write_row", "lost1")
    drain(broker, batch=10, settings=settings)
    # When the message is lost (no worker ran; the broker is wiped)
    broker.flush_all()
    assert in_flight()[0][:2] == ("tests", 1)
    threading.Event().wait(0.5)
    # Then one pass sends it again, with the same message id, and moves its deadline on
    assert rescue_batch(broker, settings=settings).rescued == 1
    assert queued_ids("tests") == [message_id_for(oid)]
    assert rescue_batch(broker, settings=settings).rescued == 0  # not again before the deadline
    assert job(sql, oid)[4] == 1
    assert rescued_total() == 1


def test_a_merged_cache_message_is_rebuilt_whole_and_its_rows_scrubbed_when_done(db, sql) -> None:
    broker.flush_all()
    settings = dataclasses.replace(get_settings(), redeliver_after_s=0.3)
    ids = [
        int(
            sql.execute(
                "INSERT INTO outbox (actor, queue_name, kwargs) "
                "VALUES ('invalidate', 'cache', %s::jsonb) RETURNING id",
                (json.dumps({"keys": [f"user:u{i}"]}),),
            ).fetchone()[0]
        )
        for i in range(3)
    ]
    # Given three cache rows relayed as one merged message, lost in a wipe
    drain(broker, batch=10, settings=settings)
    broker.flush_all()
    threading.Event().wait(0.5)
    # Then the rescuer rebuilds the whole merged message, under its first row's id
    assert rescue_batch(broker, settings=settings).rescued == 3
    raw = cast(RedisBroker, broker).client.hvals("dramatiq:cache.msgs")
    (message,) = [json.loads(r) for r in raw]
    assert message["message_id"] == message_id_for(ids[0])
    assert sorted(message["options"]["outbox_ids"]) == ids
    assert [c["keys"] for c in message["kwargs"]["changes"]] == [[f"user:u{i}"] for i in range(3)]
    # and its one commit marks all three done and empties their payload (key columns)
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        assert wait_until(
            lambda: (
                sql.execute(
                    "SELECT count(*) FROM outbox WHERE done_at IS NOT NULL AND kwargs = '{}'::jsonb"
                ).fetchone()[0]
                == 3
            ),
            timeout=30,
        )
    finally:
        worker.stop()


def test_one_rescuer_pass_at_a_time(db, sql) -> None:
    # Given another replica's pass in progress (it holds the pass lock)
    with get_database().engine.connect() as other:
        from sqlalchemy import text

        other.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
        # Then this replica's pass steps aside at once
        assert rescue_batch(broker).locked_out
        other.rollback()
    assert not rescue_batch(broker).locked_out


@dataclasses.dataclass
class _Row:
    id: int
    actor: str
    queue_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    retries: int


_ = actors  # the actors above are declared by importing tests.support.actors


def test_the_dashboard_overview_counts_jobs_not_done_and_the_oldest(db, sql) -> None:
    from web.dashboard.store import jobs_in_flight

    assert jobs_in_flight(get_settings()) == (0, None)
    sql.execute(
        "INSERT INTO outbox (actor, queue_name, dispatched_at, redeliver_at) "
        "VALUES ('a', 'q1', now() - interval '40 seconds', now()), ('a', 'q2', now(), now())"
    )
    count, oldest = jobs_in_flight(get_settings())
    assert count == 2 and oldest is not None and 39 <= oldest < 600
