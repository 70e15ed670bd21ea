"""The rescuer (Lifeline): re-send every job dispatched but not done within its deadline.

Postgres is the record of a job until the actor's commit marks it done; the broker only
delivers. Whatever loses a message on the way (a wiped or failed-over broker, a fetch whose
reply was lost so the message sits in a live worker's acks set, a worker killed mid-job, a
delayed retry held in a dead worker's memory), the row stays dispatched-not-done and, past its
``redeliver_at``, is sent again with the same message id. The actor's done-marking makes a
second delivery of a job already done roll back, so a re-send is always safe.

One rescuer works at a time, whatever number of replicas run one: each pass takes a
transaction-level advisory lock (``pg_try_advisory_xact_lock``; fine behind PgBouncer in
transaction mode) and a replica that does not get it skips the pass. Rows are also claimed
``FOR UPDATE SKIP LOCKED``, so a worker marking a row done meanwhile never waits on a pass for
longer than its enqueue.

A row re-sent again and again (a queue backlog longer than the deadline, a worker pool that is
down) waits a longer interval each time (doubling, at most 8 times the deadline), so the
rescuer cannot flood a broker that is merely slow.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import dramatiq
import redis
import sqlalchemy.exc
from sqlalchemy import text

from core.log import get_logger
from core.settings import Settings, get_settings
from db.engine import get_database
from workers.jobs import redeliver_after_s
from workers.outbox import build_message

log = get_logger(__name__)

# "tdmlresc": one rescuer pass at a time per database.
LOCK_KEY = int.from_bytes(b"tdmlresc", "big")
MAX_BACKOFF_FACTOR = 8

_CLAIM = text("""
    SELECT id, actor, queue_name, args, kwargs, retries, rescues, message_id FROM outbox
    WHERE dispatched_at IS NOT NULL AND done_at IS NULL AND dead_at IS NULL
      AND redeliver_at <= now()
    ORDER BY redeliver_at, id
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
""")
_MARK = text("""
    UPDATE outbox SET rescues = outbox.rescues + 1,
           redeliver_at = now() + make_interval(secs => data.after)
    FROM (SELECT unnest(CAST(:ids AS bigint[])) AS id,
                 unnest(CAST(:afters AS float8[])) AS after) AS data
    WHERE outbox.id = data.id
""")
_COUNT = text("""
    INSERT INTO job_counters AS c (name, value) VALUES ('rescued', :n)
    ON CONFLICT (name) DO UPDATE SET value = c.value + EXCLUDED.value
""")


@dataclass
class RescueStats:
    rescued: int = 0
    locked_out: bool = False  # another replica's pass was running


def rescue_batch(
    broker: dramatiq.Broker, *, batch: int = 1000, settings: Settings | None = None
) -> RescueStats:
    """One pass over at most ``batch`` overdue jobs, in one transaction: re-send, then move
    each deadline. A crash between send and commit re-sends them once more next pass."""
    settings = settings or get_settings()
    stats = RescueStats()
    db = get_database(settings)
    with db.sessions() as session, session.begin():
        got = session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
        if not got.scalar_one():
            stats.locked_out = True
            return stats
        rows = session.execute(_CLAIM, {"batch": batch}).all()
        if not rows:
            return stats
        ids: list[int] = []
        afters: list[float] = []
        queues: dict[str, int] = {}
        # A merged message (coalesced actor) is one group of rows sharing its message id:
        # rebuilt whole, from the rows still not done.
        for _, group_iter in groupby(
            sorted(rows, key=lambda r: (r.message_id or "", r.id)), key=lambda r: r.message_id
        ):
            group = list(group_iter)
            try:
                actor = broker.get_actor(group[0].actor)
            except dramatiq.errors.ActorNotFound:
                log.error("rescue_unknown_actor", outbox_id=group[0].id, actor=group[0].actor)
                continue
            broker.enqueue(build_message(actor, group))
            base = redeliver_after_s(actor, settings)
            for row in group:
                ids.append(row.id)
                afters.append(base * min(2 ** (row.rescues + 1), MAX_BACKOFF_FACTOR))
                queues[row.queue_name] = queues.get(row.queue_name, 0) + 1
        session.execute(_MARK, {"ids": ids, "afters": afters})
        session.execute(_COUNT, {"n": len(ids)})
        stats.rescued = len(ids)
    log.warning(
        "jobs_rescued",
        jobs=stats.rescued,
        queues=queues,
        oldest_outbox_id=min(ids),
    )
    return stats


def rescue_all(
    broker: dramatiq.Broker, *, batch: int = 1000, settings: Settings | None = None
) -> int:
    total = 0
    while True:
        stats = rescue_batch(broker, batch=batch, settings=settings)
        total += stats.rescued
        if stats.rescued < batch:
            return total


class Rescuer:
    """Runs ``rescue_all`` every ``rescuer_poll_s`` until stopped; rides out a store outage."""

    def __init__(self, settings: Settings, broker: dramatiq.Broker, *, batch: int = 1000) -> None:
        self.settings = settings
        self.broker = broker
        self.batch = batch
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        log.info("rescuer_started", poll_s=self.settings.rescuer_poll_s)
        backoff = 0.5
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                rescue_all(self.broker, batch=self.batch, settings=self.settings)
                backoff = 0.5
            except (
                sqlalchemy.exc.OperationalError,
                redis.RedisError,
                dramatiq.errors.BrokerConnectionError,
                OSError,
            ) as exc:
                # Rows stay in the table: the next pass picks them up.
                log.warning("rescuer_unavailable", error=str(exc).strip()[:200], retry_in_s=backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            elapsed = time.monotonic() - started
            self.stopping.wait(max(0.0, self.settings.rescuer_poll_s - elapsed))
        log.info("rescuer_stopped")


def start_rescuer_thread(settings: Settings, broker: dramatiq.Broker) -> Rescuer:
    """A rescuer in a daemon thread of the calling process (the relay runs one)."""
    rescuer = Rescuer(settings, broker)
    threading.Thread(target=rescuer.run, name="rescuer", daemon=True).start()
    return rescuer


_IN_FLIGHT = text("""
    SELECT queue_name, count(*) AS jobs,
           extract(epoch FROM clock_timestamp() - min(dispatched_at)) AS oldest_s
    FROM outbox
    WHERE dispatched_at IS NOT NULL AND done_at IS NULL AND dead_at IS NULL
    GROUP BY queue_name ORDER BY queue_name
""")


def in_flight(settings: Settings | None = None) -> list[tuple[str, int, float]]:
    """(queue, jobs dispatched but not done, age in seconds of the oldest), per queue; reads
    the partial index of jobs in flight only, for /metrics and the dashboard."""
    with get_database(settings).sessions() as session:
        rows: list[Any] = list(session.execute(_IN_FLIGHT).all())
    return [(r.queue_name, int(r.jobs), max(float(r.oldest_s or 0.0), 0.0)) for r in rows]


def rescued_total(settings: Settings | None = None) -> int:
    with get_database(settings).sessions() as session:
        value = session.execute(
            text("SELECT value FROM job_counters WHERE name = 'rescued'")
        ).scalar_one_or_none()
    return int(value or 0)


def dead_jobs(settings: Settings | None = None) -> int:
    with get_database(settings).sessions() as session:
        return int(
            session.execute(
                text("SELECT count(*) FROM outbox WHERE dead_at IS NOT NULL")
            ).scalar_one()
        )
