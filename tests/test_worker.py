"""Messages through the real Redis broker to a real dramatiq Worker writing to real Postgres."""

from __future__ import annotations

from typing import Any

from tests.support import actors
from workers.broker import broker


def rows(sql: Any, key_prefix: str) -> list[str]:
    return [
        r[0]
        for r in sql.execute(
            "SELECT entity_id FROM audit_logs WHERE entity_id LIKE %s ORDER BY entity_id",
            (key_prefix + "%",),
        ).fetchall()
    ]


def test_message_writes_a_row_through_real_broker_and_worker(
    inproc_worker, sql, redis_client
) -> None:
    # Given a message sent through the Redis broker
    message = actors.write_row.send("k1")
    # When the worker has processed the queue
    broker.join("tests", timeout=30_000)
    inproc_worker.join()
    # Then the actor's unit of work was committed exactly once
    assert rows(sql, "k1") == ["k1"]
    # and the log context was bound to this message while it ran, and cleared afterwards
    ctx = redis_client.hgetall("ctx:k1")
    assert ctx["message_id"] == message.message_id
    assert ctx["actor"] == "write_row"
    assert ctx["queue"] == "tests"
    assert ctx["retries"] == "0"


def test_failed_attempts_roll_back_and_retry_commits_once(inproc_worker, sql, redis_client) -> None:
    actors.fail_then_write.send("k2", 2)
    broker.join("tests", timeout=30_000)
    inproc_worker.join()
    # attempts 1 and 2 wrote a row and then raised: rolled back; attempt 3 committed
    assert redis_client.get("attempts:k2") == "3"
    assert rows(sql, "k2") == ["k2:3"]


def test_permanent_error_is_not_retried_and_lands_in_dead_letters(
    inproc_worker, sql, redis_client
) -> None:
    actors.always_permanent.send("k3")
    broker.join("tests", timeout=30_000)
    inproc_worker.join()
    assert redis_client.get("attempts:k3") == "1"
    dead = redis_client.zrange("dramatiq:tests.XQ", 0, -1)
    assert len(dead) == 1, dead


def test_exhausted_retries_dead_letter_the_message(inproc_worker, sql, redis_client) -> None:
    actors.fail_then_write.send("k4", 99)
    broker.join("tests", timeout=30_000)
    inproc_worker.join()
    # max_retries=3: the first attempt plus three retries, then the dead-letter set
    assert redis_client.get("attempts:k4") == "4"
    assert rows(sql, "k4") == []
    assert redis_client.zcard("dramatiq:tests.XQ") == 1
