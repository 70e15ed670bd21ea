"""Durable jobs against real processes: a `tidemill relay` (with its rescuer), real worker
processes, real Valkey and Postgres. The broker is wiped with jobs queued, delayed and in
flight; a message is stranded in a live worker's acks set; a worker is SIGKILLed mid-job. Every
job ends done exactly once, each e-mail sent once, each ledger entry written once.

Deadlines are small here (TIDEMILL_REDELIVER_AFTER_S=3) and dramatiq's own dead-worker
requeue stays at its 60 s heartbeat timeout, so anything that comes back within the bounds
below came back through the rescuer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from dramatiq.brokers.redis import RedisBroker

import workers.actors  # noqa: F401  (the messages built here name real actors)
from core.proc import stop_process, tail, wait_until
from tests.conftest import start_cli
from tests.support import actors  # noqa: F401  (declares the test actors)
from tests.support import stripe_events as se
from tests.test_payments import T0, assert_balance_is_sum_of_ledger, make_user
from workers.broker import broker
from workers.outbox import build_message

pytestmark = pytest.mark.slow

DEADLINE_S = 3.0
# deadline + a rescuer poll + worker pickup, with room for a loaded 2-core machine
RECOVERY_BOUND_S = 20.0


def env_for(tmp_path: Path, deadline_s: float = DEADLINE_S) -> dict[str, str]:
    return dict(
        os.environ,
        TIDEMILL_REDELIVER_AFTER_S=str(deadline_s),
        TIDEMILL_RESCUER_POLL_S="0.3",
        TIDEMILL_RELAY_POLL_S="0.2",
        MAIL_URL=f"file://{tmp_path / 'mail'}",
    )


@contextmanager
def process(*args: str, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = start_cli(*args, env=env, stderr=out, stdout=out)
    try:
        yield proc
    finally:
        stop_process(proc, sig=signal.SIGTERM, timeout=30, group=True)


def worker_args(*queues: str, threads: int = 4) -> list[str]:
    args = ["worker", "tests.support.actors", "--processes", "1", "--threads", str(threads)]
    for queue in queues:
        args += ["--queue", queue]
    return args


RELAY = ("relay", "tests.support.actors")


def not_done(sql: Any) -> int:
    return int(sql.execute("SELECT count(*) FROM outbox WHERE done_at IS NULL").fetchone()[0])


def audit(sql: Any, key: str) -> int:
    return int(
        sql.execute("SELECT count(*) FROM audit_logs WHERE entity_id = %s", (key,)).fetchone()[0]
    )


def add_job(sql: Any, actor: str, *args: Any, queue: str) -> int:
    row = sql.execute(
        "INSERT INTO outbox (actor, queue_name, args) VALUES (%s, %s, %s::jsonb) RETURNING id",
        (actor, queue, json.dumps(list(args))),
    ).fetchone()
    return int(row[0])


def redis() -> Any:
    return cast(RedisBroker, broker).client


def test_flushall_with_jobs_queued_delayed_and_in_flight_loses_and_doubles_nothing(
    db, sql, tmp_path: Path
) -> None:
    broker.flush_all()
    # a longer deadline here: the queued jobs must still be waiting, not yet rescued, when
    # the broker is wiped
    env = env_for(tmp_path, deadline_s=6.0)
    users = 25
    own = cast(RedisBroker, broker).broker_id
    with (
        process(*worker_args("tests", "tests-slow"), env=env, log=tmp_path / "w1.log"),
        process(*RELAY, env=env, log=tmp_path / "relay.log") as relay,
    ):
        assert wait_until(lambda: len(live_worker_ids(own)) >= 1, timeout=60)
        # Given welcome e-mails and payments queued (no worker takes those queues yet),
        uids = [make_user(sql) for _ in range(users)]
        events = [
            se.event(
                "payment_intent.succeeded",
                se.payment_intent(f"pi_d{i}", user_id=uid, amount=1000 + i, charge=f"ch_d{i}"),
                created=T0 + i,
            )
            for i, uid in enumerate(uids)
        ]
        se.store(events)
        for e in events:  # the receiver's outbox row, one per stored event
            add_job(sql, "process_event", e["id"], queue="payments")
        # a job held back in a retry with a 5 s delay,
        delayed = add_job(sql, "retry_later_then_write", "delayed", 5000, queue="tests")
        # and a job running in a worker,
        running = add_job(sql, "hold_then_write", "running", queue="tests-slow")
        assert wait_until(
            lambda: (
                sql.execute("SELECT retries FROM outbox WHERE id = %s", (delayed,)).fetchone()[0]
                == 1
                and redis().exists("started:running")
                and redis().hlen("dramatiq:emails.msgs") >= users
                and redis().hlen("dramatiq:payments.msgs") >= users
            ),
            timeout=60,
        ), tail(tmp_path / "w1.log")
        retry_scheduled = time.time()
        # When the broker is wiped (a failover to an empty replica, an eviction, FLUSHALL)
        redis().flushall()
        redis().set("release:running", "1")
        # and workers for every queue run
        with process(*worker_args("emails", "payments", "cache"), env=env, log=tmp_path / "w2.log"):
            # Then every job is done
            assert wait_until(lambda: not_done(sql) == 0, timeout=90, interval=0.3), tail(
                tmp_path / "relay.log"
            ) + tail(tmp_path / "w2.log")
        assert relay.poll() is None
    # exactly once: one e-mail per user, one ledger entry per payment, one row per test job
    assert len(list((tmp_path / "mail").glob("*.eml"))) == users
    assert sql.execute(
        "SELECT count(*) FROM email_deliveries WHERE status = 'sent'"
    ).fetchone() == (users,)
    ledger = sql.execute(
        "SELECT count(*), count(DISTINCT source_id) FROM ledger_entries"
    ).fetchone()
    assert ledger == (users, users)
    assert sql.execute(
        "SELECT count(*) FROM webhook_events WHERE status = 'processed'"
    ).fetchone() == (users,)
    assert_balance_is_sum_of_ledger(sql)
    assert audit(sql, "delayed") == 1 and audit(sql, "running") == 1
    # the delayed job was not re-sent before its retry was due
    done_at = sql.execute(
        "SELECT extract(epoch FROM done_at) FROM outbox WHERE id = %s", (delayed,)
    ).fetchone()[0]
    assert float(done_at) >= retry_scheduled + 4.0
    # the queued jobs came back through the rescuer, and it counted them
    rescued = sql.execute("SELECT value FROM job_counters WHERE name = 'rescued'").fetchone()[0]
    assert rescued >= 2 * users
    assert running and sql.execute(
        "SELECT count(*) FROM outbox WHERE dead_at IS NOT NULL"
    ).fetchone() == (0,)


def live_worker_ids(own: str) -> set[str]:
    now_ms = time.time() * 1000
    return {
        member.decode()
        for member, score in redis().zrange("dramatiq:__heartbeats__", 0, -1, withscores=True)
        if member.decode() != own and now_ms - score < 5000
    }


def test_a_message_stranded_in_a_live_workers_acks_set_is_done_within_the_deadline(
    db, sql, tmp_path: Path
) -> None:
    broker.flush_all()
    env = env_for(tmp_path)
    with process(*worker_args("tests", threads=2), env=env, log=tmp_path / "w.log") as worker:
        own = cast(RedisBroker, broker).broker_id
        assert wait_until(lambda: len(live_worker_ids(own)) == 1, timeout=60), tail(
            tmp_path / "w.log"
        )
        (worker_id,) = live_worker_ids(own)
        # Given a job whose message the worker's fetch moved into its acks set, but whose reply
        # never reached it (a Valkey restart at that moment): dispatched, never delivered
        oid = add_job(sql, "write_row", "stranded", queue="tests")
        row = sql.execute(
            "SELECT id, actor, queue_name, args, kwargs, retries FROM outbox WHERE id = %s",
            (oid,),
        ).fetchone()
        message = build_message(broker.get_actor("write_row"), [_Row(*row)])
        message = message.copy(options={"redis_message_id": "stranded-1"})
        redis().hset("dramatiq:tests.msgs", "stranded-1", message.encode())
        redis().sadd(f"dramatiq:__acks__.{worker_id}.tests", "stranded-1")
        sql.execute(
            "UPDATE outbox SET dispatched_at = now(), message_id = %s, "
            "redeliver_at = now() + make_interval(secs => %s) WHERE id = %s",
            (message.message_id, DEADLINE_S, oid),
        )
        stranded_at = time.monotonic()
        # When a relay (and so a rescuer) runs
        with process(*RELAY, env=env, log=tmp_path / "relay.log"):
            # Then the job is done within the deadline's bound, the worker alive throughout
            assert wait_until(lambda: not_done(sql) == 0, timeout=RECOVERY_BOUND_S), tail(
                tmp_path / "relay.log"
            )
        took = time.monotonic() - stranded_at
        assert worker.poll() is None and worker_id in live_worker_ids(own)
    assert audit(sql, "stranded") == 1
    assert took >= DEADLINE_S - 0.5  # not before its deadline: it might still have been coming
    print(f"\nstranded message done after {took:.1f} s (deadline {DEADLINE_S} s)")


def test_a_worker_sigkilled_mid_job_costs_one_deadline(db, sql, tmp_path: Path) -> None:
    broker.flush_all()
    env = env_for(tmp_path)
    own = cast(RedisBroker, broker).broker_id
    with process(*RELAY, env=env, log=tmp_path / "relay.log"):
        w1 = start_cli(*worker_args("tests", threads=2), env=env)
        try:
            assert wait_until(lambda: len(live_worker_ids(own)) >= 1, timeout=60)
            # Given a job running in a worker
            add_job(sql, "hold_then_write_default_limit", "killed", queue="tests")
            assert wait_until(lambda: redis().exists("started:killed"), timeout=60)
            # When that worker is SIGKILLed mid-job (no ack, no nack, no shutdown)
            os.killpg(w1.pid, signal.SIGKILL)
            w1.wait(timeout=10)
            killed_at = time.monotonic()
        finally:
            stop_process(w1, sig=signal.SIGKILL, group=True)
        redis().set("release:killed", "1")
        # and another worker runs
        with process(*worker_args("tests", threads=2), env=env, log=tmp_path / "w2.log"):
            # Then the job is done within the deadline's bound, not dramatiq's 60 s+ heartbeat
            assert wait_until(lambda: not_done(sql) == 0, timeout=RECOVERY_BOUND_S), tail(
                tmp_path / "relay.log"
            )
            took = time.monotonic() - killed_at
    assert audit(sql, "killed") == 1
    assert int(redis().get("attempts:killed") or 0) >= 2  # the killed attempt, the rescue
    print(f"\njob of a SIGKILLed worker done after {took:.1f} s (deadline {DEADLINE_S} s)")


class _Row:
    def __init__(
        self,
        id: int,
        actor: str,
        queue_name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        retries: int,
    ) -> None:
        self.id, self.actor, self.queue_name = id, actor, queue_name
        self.args, self.kwargs, self.retries = args, kwargs, retries
