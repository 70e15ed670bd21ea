"""Actors used by the tests, declared on tidemill's real broker with tidemill's decorator."""

from __future__ import annotations

import time

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import text

from db.engine import UnitOfWork
from db.redis import get_redis
from workers.base import PermanentError, actor


def _record(uow: UnitOfWork, key: str) -> None:
    uow.execute(
        text(
            "INSERT INTO audit_logs (action, entity_type, entity_id) VALUES ('test', 'probe', :k)"
        ),
        {"k": key},
    )


@actor(queue_name="tests")
def write_row(uow: UnitOfWork, key: str) -> None:
    """Writes one audit_logs row and notes the log context it saw."""
    import structlog

    ctx = structlog.contextvars.get_contextvars()
    get_redis().hset(f"ctx:{key}", mapping={k: str(v) for k, v in ctx.items()})
    _record(uow, key)


@actor(queue_name="tests", max_retries=3)
def fail_then_write(uow: UnitOfWork, key: str, failures: int) -> None:
    """Writes its row, then fails on the first `failures` attempts: the row must be rolled back."""
    attempt = int(get_redis().incr(f"attempts:{key}"))
    _record(uow, f"{key}:{attempt}")
    if attempt <= failures:
        raise RuntimeError(f"transient failure {attempt}")


@actor(queue_name="tests", max_retries=3)
def always_permanent(uow: UnitOfWork, key: str) -> None:
    get_redis().incr(f"attempts:{key}")
    raise PermanentError("bad input")


@actor(queue_name="tests-slow", time_limit=120_000)
def hold_then_write(uow: UnitOfWork, key: str) -> None:
    """Counts the attempt, then waits for a release key before writing (a test kills the
    worker while it waits)."""
    _hold_then_write(uow, key)


def _hold_then_write(uow: UnitOfWork, key: str) -> None:
    r = get_redis()
    r.incr(f"attempts:{key}")
    r.set(f"started:{key}", "1")
    deadline = time.monotonic() + 90
    while not r.exists(f"release:{key}"):
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.05)
    _record(uow, key)


@actor(queue_name="tests")
def retry_later_then_write(uow: UnitOfWork, key: str, delay_ms: int) -> None:
    """The first attempt asks to be retried after `delay_ms` (a retry held back on purpose, like
    AwaitingPayment); a later attempt writes its row."""
    import dramatiq
    from dramatiq.middleware import CurrentMessage

    message = CurrentMessage.get_current_message()
    if message is None or not message.options.get("retries", 0):
        raise dramatiq.Retry(delay=delay_ms)
    _record(uow, key)


@actor(queue_name="tests")
def hold_then_write_default_limit(uow: UnitOfWork, key: str) -> None:
    """hold_then_write with the default time limit, so the default redelivery deadline applies."""
    _hold_then_write(uow, key)


@actor(queue_name="hosts", max_retries=3, time_limit=120_000)
def host_job(uow: UnitOfWork, key: str, work_s: float) -> None:
    """One job of tests/test_many_hosts.py: `work_s` of work (no database session held, like a
    call to a vendor), then its effect in one commit, made exactly once by the primary key of
    the test's ``host_jobs`` table. Every attempt, every commit and every attempt that failed
    (a connection a cut link ended) is noted in Redis with the name of the host (network
    namespace) that ran it."""
    import os

    host = os.environ.get("TIDEMILL_TEST_HOST", "?")
    r = get_redis()
    r.rpush(f"hosts:started:{key}", host)
    time.sleep(work_s)
    try:
        inserted = uow.sql(
            "INSERT INTO host_jobs (key, host) VALUES (%(k)s, %(h)s) ON CONFLICT (key) DO NOTHING "
            "RETURNING key",
            {"k": key, "h": host},
        ).fetchone()
        if inserted is not None:  # the one effect that must not double
            uow.sql("UPDATE host_job_totals SET done = done + 1")
        uow.commit()
    except Exception as exc:
        _note_until_reachable(r, f"hosts:failed:{key}", f"{host}:{type(exc).__name__}")
        raise
    _note_until_reachable(r, f"hosts:committed:{key}", f"{host}:{int(inserted is not None)}")


def _note_until_reachable(
    r: redis.Redis, list_key: str, value: str, within_s: float = 120.0
) -> None:
    """RPUSH that outlasts a cut link (the test reads these notes once the link is back)."""

    deadline = time.monotonic() + within_s
    while True:
        try:
            r.rpush(list_key, value)
            return
        except (RedisConnectionError, RedisTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
