"""The outbox relay: outbox rows -> dramatiq messages.

The table is the truth; NOTIFY only shortens the wait. Rows are claimed with
``FOR UPDATE SKIP LOCKED`` so several relays can run side by side, enqueued, then marked in the
same transaction. A relay killed between enqueue and commit re-sends that batch once on
restart; the message id is derived from the outbox id, so the duplicate is recognisable, and
the first delivery's done-marking makes the second roll back (``workers.base.actor``).

Dispatched is not done: the row stays the job's record, with a redelivery deadline, until the
actor's commit marks it done; ``workers.rescuer`` re-sends what misses its deadline.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import dramatiq
import psycopg
import redis
import sqlalchemy.exc
from sqlalchemy import text

from core.log import get_logger
from core.settings import Settings, get_settings
from db.engine import KEEPALIVES, UnitOfWork, direct_url, get_database, libpq_url
from workers.base import actor
from workers.cache import fast_path
from workers.jobs import COALESCED_ACTORS, redeliver_after_s

log = get_logger(__name__)

CHANNEL = "tidemill_outbox"
_NAMESPACE = uuid.UUID("0f6c1c5e-8a57-4b53-9f0e-7d1f3b8a2c11")


def message_id_for(outbox_id: int) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"outbox:{outbox_id}"))


@dataclass
class RelayStats:
    sent: int = 0
    rejected: int = 0


# A rejected row (unknown actor) keeps dispatched_at NULL, so it stays out of the prune and in
# sight, and carries last_error, which keeps it from being claimed again. Clearing its
# last_error (say, after deploying the actor) makes the relay send it.
_CLAIM = text("""
    SELECT id, actor, queue_name, args, kwargs, retries FROM outbox
    WHERE dispatched_at IS NULL AND last_error IS NULL
    ORDER BY id
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
""")
# A cache row's payload (key columns: e-mail addresses, usernames) is kept until the job is
# done, so the rescuer can rebuild a lost message; the done-marking empties it
# (workers.jobs.mark_done), so personal data does not linger in the outbox after, say, a GDPR
# erase. redeliver_at: the deadline after which the rescuer re-sends the job.
# The mark's commit does not wait for its WAL flush (synchronous_commit off for this
# transaction only, set in the same statement to spare a round trip): the flush costs a few ms
# on a busy disk, and every drain of the durable path pays it. Safe because a crash can only
# lose a suffix of the WAL: a lost mark leaves its rows pending, and the relay re-sends them
# (a single job with the same message id; a merged group perhaps regrouped, whose rows'
# done-marking is by outbox id), exactly as after a relay killed before its commit: the first
# delivery's done-marking makes the duplicate roll back, and the cache delete is idempotent
# anyway. A worker's done-marking that survived proves the mark did: its synchronous commit
# flushed the WAL up to itself, the earlier mark included. (Since the fast path moved to the
# wake-up, the mark no longer delays any UNLINK; it only paces the durable path.)
_MARK = text("""
    UPDATE outbox SET dispatched_at = CASE WHEN data.error IS NULL THEN now() END,
           message_id = data.message_id, last_error = data.error,
           redeliver_at = CASE WHEN data.error IS NULL
                               THEN now() + make_interval(secs => data.after) END
    FROM (SELECT unnest(CAST(:ids AS bigint[])) AS id,
                 unnest(CAST(:mids AS text[])) AS message_id,
                 unnest(CAST(:errors AS text[])) AS error,
                 unnest(CAST(:afters AS float8[])) AS after) AS data,
         (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
    WHERE outbox.id = data.id
""")

# Actors whose outbox rows the relay merges, per batch, into one message carrying every row's
# kwargs as ``changes=[…]``: idempotent and order-free (a cache delete), and frequent (one row
# per committed change), so one message per row would make the worker the bottleneck at a
# thousand commits a second. The merged message's id derives from its first row's id, and it
# carries every row's id (``outbox_ids``), so its commit marks them all done.
__all__ = ["COALESCED_ACTORS"]


def build_message(actor: dramatiq.Actor[Any, Any], rows: list[Any]) -> dramatiq.Message[Any]:
    """The message for one job (one row) or one merged group (several rows of a coalesced
    actor), with the id derived from the first row: the relay and the rescuer send the same."""
    first = rows[0]
    options: dict[str, Any] = {}
    if first.retries:
        options["retries"] = first.retries  # a re-sent job keeps its retry budget spent
    if first.actor in COALESCED_ACTORS and not first.args:
        if len(rows) > 1:
            options["outbox_ids"] = [row.id for row in rows]
        message = actor.message_with_options(
            kwargs={"changes": [row.kwargs or {} for row in rows]}, outbox_id=first.id, **options
        )
    else:
        message = actor.message_with_options(
            args=tuple(first.args or ()), kwargs=first.kwargs or {}, outbox_id=first.id, **options
        )
    return message.copy(
        message_id=message_id_for(first.id), queue_name=first.queue_name or actor.queue_name
    )


def relay_batch(
    broker: dramatiq.Broker,
    *,
    batch: int,
    settings: Settings | None = None,
    fast_path_after_enqueue: bool = True,
) -> RelayStats:
    """Claim up to `batch` pending rows, enqueue them, mark them; one transaction.

    Cache invalidations go first: they are the jobs whose latency is the point. With
    `fast_path_after_enqueue`, each of their groups is followed by the fast path (the relay
    UNLINKs their keys itself, ``workers.cache.FastPath``), once their message is in the
    broker. The running relay turns it off for a drain that only payload wake-ups started: it
    UNLINKed those keys on receipt of the NOTIFY already (``Relay``).
    """
    stats = RelayStats()
    settings = settings or get_settings()
    db = get_database(settings)
    with db.sessions() as session, session.begin():
        rows = session.execute(_CLAIM, {"batch": batch}).all()
        if not rows:
            return stats
        marks: dict[int, tuple[str | None, str | None]] = {}
        afters: dict[int, float] = {}
        merged: dict[tuple[str, str | None], list[Any]] = {}
        singles: list[Any] = []
        for row in rows:
            if row.actor in COALESCED_ACTORS and not row.args:
                merged.setdefault((row.actor, row.queue_name), []).append(row)
            else:
                singles.append(row)
        for group in merged.values():
            actor = _known_actor(broker, group[0], marks, stats)
            if actor is None:
                for row in group[1:]:
                    marks[row.id] = marks[group[0].id]
                    stats.rejected += 1
                continue
            message = build_message(actor, group)
            broker.enqueue(message)
            after = redeliver_after_s(actor, settings)
            for row in group:
                marks[row.id] = (message.message_id, None)
                afters[row.id] = after
            stats.sent += len(group)
            if fast_path_after_enqueue and group[0].actor == "invalidate":
                fast_path.invalidate([row.kwargs or {} for row in group], settings=settings)
        for row in singles:
            actor = _known_actor(broker, row, marks, stats)
            if actor is None:
                continue
            message = build_message(actor, [row])
            broker.enqueue(message)
            marks[row.id] = (message.message_id, None)
            afters[row.id] = redeliver_after_s(actor, settings)
            stats.sent += 1
        ids = list(marks)
        session.execute(
            _MARK,
            {
                "ids": ids,
                "mids": [marks[i][0] for i in ids],
                "errors": [marks[i][1] for i in ids],
                "afters": [afters.get(i, 0.0) for i in ids],
            },
        )
    if stats.sent or stats.rejected:
        log.info("outbox_relayed", sent=stats.sent, rejected=stats.rejected)
    return stats


def _known_actor(
    broker: dramatiq.Broker,
    row: Any,
    marks: dict[int, tuple[str | None, str | None]],
    stats: RelayStats,
) -> dramatiq.Actor[Any, Any] | None:
    try:
        return broker.get_actor(row.actor)
    except dramatiq.errors.ActorNotFound:
        # Not retried: no deploy of this relay will learn the actor by waiting. The row stays
        # in the table, undispatched, with its error: outbox_rejected() counts it and the
        # prune keeps it, until an operator clears last_error or deletes it.
        log.error("outbox_unknown_actor", outbox_id=row.id, actor=row.actor)
        marks[row.id] = (None, f"unknown actor {row.actor!r}")
        stats.rejected += 1
        return None


def drain(
    broker: dramatiq.Broker,
    *,
    batch: int,
    settings: Settings | None = None,
    fast_path_after_enqueue: bool = True,
) -> int:
    total = 0
    while True:
        stats = relay_batch(
            broker,
            batch=batch,
            settings=settings,
            fast_path_after_enqueue=fast_path_after_enqueue,
        )
        total += stats.sent + stats.rejected
        if stats.sent + stats.rejected < batch:
            return total


# How long a drain that only payload wake-ups asked for waits for more (see Relay._drain_loop).
PAYLOAD_DRAIN_DELAY_S = 0.01


def wakeup_changes(payloads: Iterable[str]) -> tuple[list[dict[str, Any]], bool]:
    """(the cache changes that wake-up payloads carry, whether every payload carried some).

    A payload is the JSON array that migration 0016's trigger sends: the kwargs of one
    statement's ``invalidate`` rows, or '' for a plain wake-up (none, or too many to fit).
    Anything else counts as a plain wake-up: the claim will find its rows all the same.
    """
    changes: list[dict[str, Any]] = []
    complete = True
    for payload in payloads:
        try:
            parsed = json.loads(payload) if payload else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, list) or not all(isinstance(c, dict) for c in parsed):
            complete = False
            continue
        changes.extend(parsed)
    return changes, complete


class Relay:
    """LISTEN for wake-ups, and poll every `poll_s` in case a NOTIFY was lost.

    Two threads, so that a wake-up's UNLINK never waits for a drain: this one reads the
    notifications and runs the fast path on the changes their payloads carry (commit ->
    NOTIFY -> UNLINK: NOTIFY is delivered after the commit, so the delete never precedes it),
    then wakes the drainer, which claims, enqueues and marks as always (the durable path: the
    worker deletes again and marks the rows done).
    """

    def __init__(self, settings: Settings, broker: dramatiq.Broker) -> None:
        self.settings = settings
        self.broker = broker
        self.stopping = threading.Event()
        self._backoff = 0.5
        self._wake = threading.Event()
        self._lock = threading.Lock()
        # The next drain UNLINKs after enqueueing unless only payload wake-ups asked for it:
        # rows found at start-up, by the poll or after a plain wake-up had no UNLINK yet.
        self._unlink_next = True

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()

    def run(self) -> None:
        assert self.settings.database_url
        self._backoff = 0.5
        # The listening thread must get the GIL as soon as its NOTIFY arrives, not when the
        # drainer's Python code reaches the default 5 ms switch interval: that wait was the
        # fast path's p50 (5.8 ms -> 3.6 ms in bench.cache). The relay's process runs the
        # relay and the rescuer only, so the process-wide setting touches nothing else.
        sys.setswitchinterval(0.0005)
        log.info(
            "relay_started", poll_s=self.settings.relay_poll_s, batch=self.settings.relay_batch
        )
        while not self.stopping.is_set():
            try:
                with psycopg.connect(
                    libpq_url(direct_url(self.settings)), autocommit=True, **KEEPALIVES
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._loop(conn)
            except (psycopg.OperationalError, sqlalchemy.exc.OperationalError, OSError) as exc:
                # Postgres restarting or unreachable (on the LISTEN connection or, wrapped by
                # SQLAlchemy, in a drain): rows wait in the table, nothing is lost.
                self._wait("relay_connection_lost", exc)
            except (redis.RedisError, dramatiq.errors.BrokerConnectionError) as exc:
                # The broker is away: the batch being enqueued rolled back (its rows stay
                # pending; any message already enqueued from it is the one duplicate the
                # actors tolerate). Wait and catch up from the table, do not exit.
                self._wait("relay_broker_unavailable", exc)
        log.info("relay_stopped")

    def _wait(self, event: str, exc: BaseException) -> None:
        log.warning(event, error=str(exc).strip(), retry_in_s=self._backoff)
        self.stopping.wait(self._backoff)
        self._backoff = min(self._backoff * 2, 30.0)

    def _loop(self, conn: psycopg.Connection[Any]) -> None:
        """Listen here while a drainer thread drains; either one's error ends both, and
        run() reconnects (a drain's error is raised here)."""
        ended = threading.Event()
        failed: list[BaseException] = []
        with self._lock:
            self._unlink_next = True  # whatever committed while we were not listening
        self._wake.set()
        drainer = threading.Thread(
            target=self._drain_loop, args=(ended, failed), name="relay-drain", daemon=True
        )
        drainer.start()
        try:
            while not self.stopping.is_set() and drainer.is_alive():
                # Wake at least every 0.5 s to notice a stop or a drainer's end; a lost
                # connection raises here and run() reconnects.
                notes = list(conn.notifies(timeout=0.5, stop_after=1))
                if not notes:
                    continue
                notes += conn.notifies(timeout=0)  # whatever else is already here: one UNLINK
                changes, complete = wakeup_changes(n.payload for n in notes)
                if changes:
                    fast_path.invalidate(changes, settings=self.settings)
                with self._lock:
                    self._unlink_next = self._unlink_next or not complete
                self._wake.set()
        finally:
            ended.set()
            self._wake.set()
            drainer.join()
        if failed:
            raise failed[0]

    def _drain_loop(self, ended: threading.Event, failed: list[BaseException]) -> None:
        try:
            while not self.stopping.is_set() and not ended.is_set():
                woken = self._wake.wait(self.settings.relay_poll_s)
                self._wake.clear()
                if self.stopping.is_set() or ended.is_set():
                    return
                with self._lock:
                    unlink = self._unlink_next or not woken  # the poll: no NOTIFY seen
                if not unlink:
                    # Only payload wake-ups: their keys are gone already, so the durable path
                    # can wait a moment and take the next ones in the same claim, enqueue and
                    # mark (fewer, larger batches: less CPU taken from the next UNLINKs).
                    self.stopping.wait(PAYLOAD_DRAIN_DELAY_S)
                    self._wake.clear()
                with self._lock:
                    unlink = unlink or self._unlink_next
                    self._unlink_next = False
                drain(
                    self.broker,
                    batch=self.settings.relay_batch,
                    settings=self.settings,
                    fast_path_after_enqueue=unlink,
                )
                self._backoff = 0.5  # a full drain worked: both stores are back
        except BaseException as exc:  # raised again by _loop, in run()'s thread
            failed.append(exc)


_BACKLOG = text("""
    SELECT count(*) AS pending,
           extract(epoch FROM clock_timestamp() - min(created_at)) AS oldest_s
    FROM outbox WHERE dispatched_at IS NULL AND last_error IS NULL
""")
_REJECTED = text("""
    SELECT count(*) FROM outbox WHERE dispatched_at IS NULL AND last_error IS NOT NULL
""")


def outbox_backlog(settings: Settings | None = None) -> tuple[int, float | None]:
    """(pending rows, age in seconds of the oldest pending row or None), for /metrics.

    Reads the partial index ``ix_outbox_pending`` only (pending rows and the few rejected ones,
    which are not counted: see outbox_rejected), so it stays cheap however large the
    dispatched history is. A growing age with relays running means they cannot keep up (or
    every relay is down): the alert to set.
    """
    db = get_database(settings)
    with db.sessions() as session:
        row = session.execute(_BACKLOG).one()
    oldest = None if row.oldest_s is None else max(float(row.oldest_s), 0.0)
    return int(row.pending), oldest


def outbox_rejected(settings: Settings | None = None) -> int:
    """Rows the relay refused (unknown actor) and nobody has dealt with yet, for /metrics: any
    at all needs an operator (deploy the actor and clear last_error, or delete the row)."""
    db = get_database(settings)
    with db.sessions() as session:
        return int(session.execute(_REJECTED).scalar_one())


def prune_dispatched(uow: UnitOfWork, *, older_than_hours: int) -> int:
    """Delete done rows older than the window, in bounded batches (short locks). A row not
    done is never pruned (it is its job's only record); dead rows and rows with an error are
    kept: they are the operators' to resolve."""
    total = 0
    while True:
        deleted = uow.execute(
            text("""
                DELETE FROM outbox WHERE id IN (
                    SELECT id FROM outbox
                    WHERE done_at < now() - make_interval(hours => :hours)
                      AND last_error IS NULL AND dead_at IS NULL
                    ORDER BY id LIMIT 5000)
            """),
            {"hours": older_than_hours},
        ).rowcount
        uow.commit()
        total += deleted
        if deleted < 5000:
            break
    log.info("outbox_pruned", rows=total, older_than_hours=older_than_hours)
    return total


@actor(queue_name="maintenance")
def prune_outbox(uow: UnitOfWork, tick: str | None = None, older_than_hours: int = 168) -> None:
    """A one-off prune an operator can enqueue (`queue_send`-style) with any window; the
    scheduled pruning is the `outbox-relayed-prune` lifecycle policy."""
    prune_dispatched(uow, older_than_hours=older_than_hours)
