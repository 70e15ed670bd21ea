"""The outbox relay: outbox rows -> dramatiq messages.

The table is the truth; NOTIFY only shortens the wait. Rows are claimed with
``FOR UPDATE SKIP LOCKED`` so several relays can run side by side, enqueued, then marked in the
same transaction. A relay killed between enqueue and commit re-sends that batch once on
restart; the message id is derived from the outbox id, so the duplicate is recognisable.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import dramatiq
import psycopg
from sqlalchemy import text

from core.log import get_logger
from core.settings import Settings
from db.engine import UnitOfWork, get_database, libpq_url
from workers.base import actor

log = get_logger(__name__)

CHANNEL = "tidemill_outbox"
_NAMESPACE = uuid.UUID("0f6c1c5e-8a57-4b53-9f0e-7d1f3b8a2c11")


def message_id_for(outbox_id: int) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"outbox:{outbox_id}"))


@dataclass
class RelayStats:
    sent: int = 0
    rejected: int = 0


_CLAIM = text("""
    SELECT id, actor, queue_name, args, kwargs FROM outbox
    WHERE dispatched_at IS NULL
    ORDER BY id
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
""")
_MARK = text("""
    UPDATE outbox SET dispatched_at = now(), message_id = data.message_id, last_error = data.error
    FROM (SELECT unnest(CAST(:ids AS bigint[])) AS id,
                 unnest(CAST(:mids AS text[])) AS message_id,
                 unnest(CAST(:errors AS text[])) AS error) AS data
    WHERE outbox.id = data.id
""")


def relay_batch(
    broker: dramatiq.Broker, *, batch: int, settings: Settings | None = None
) -> RelayStats:
    """Claim up to `batch` pending rows, enqueue them, mark them; one transaction."""
    stats = RelayStats()
    db = get_database(settings)
    with db.sessions() as session, session.begin():
        rows = session.execute(_CLAIM, {"batch": batch}).all()
        if not rows:
            return stats
        ids: list[int] = []
        mids: list[str | None] = []
        errors: list[str | None] = []
        for row in rows:
            ids.append(row.id)
            try:
                actor = broker.get_actor(row.actor)
            except dramatiq.errors.ActorNotFound:
                # Not retried: no deploy of this relay will learn the actor by waiting. The row
                # stays in the table with its error, visible to operators.
                log.error("outbox_unknown_actor", outbox_id=row.id, actor=row.actor)
                mids.append(None)
                errors.append(f"unknown actor {row.actor!r}")
                stats.rejected += 1
                continue
            message = actor.message_with_options(
                args=tuple(row.args or ()),
                kwargs=row.kwargs or {},
                outbox_id=row.id,
            )
            message = message.copy(
                message_id=message_id_for(row.id), queue_name=row.queue_name or actor.queue_name
            )
            broker.enqueue(message)
            mids.append(message.message_id)
            errors.append(None)
            stats.sent += 1
        session.execute(_MARK, {"ids": ids, "mids": mids, "errors": errors})
    if stats.sent or stats.rejected:
        log.info("outbox_relayed", sent=stats.sent, rejected=stats.rejected)
    return stats


def drain(broker: dramatiq.Broker, *, batch: int, settings: Settings | None = None) -> int:
    total = 0
    while True:
        stats = relay_batch(broker, batch=batch, settings=settings)
        total += stats.sent + stats.rejected
        if stats.sent + stats.rejected < batch:
            return total


class Relay:
    """LISTEN for wake-ups, and poll every `poll_s` in case a NOTIFY was lost."""

    def __init__(self, settings: Settings, broker: dramatiq.Broker) -> None:
        self.settings = settings
        self.broker = broker
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        assert self.settings.database_url
        backoff = 0.5
        log.info(
            "relay_started", poll_s=self.settings.relay_poll_s, batch=self.settings.relay_batch
        )
        while not self.stopping.is_set():
            try:
                with psycopg.connect(
                    libpq_url(self.settings.database_url), autocommit=True
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    backoff = 0.5
                    self._loop(conn)
            except (psycopg.OperationalError, OSError) as exc:
                # Postgres restarting or unreachable: rows wait in the table, nothing is lost.
                log.warning("relay_connection_lost", error=str(exc).strip(), retry_in_s=backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        log.info("relay_stopped")

    def _loop(self, conn: psycopg.Connection[Any]) -> None:
        while not self.stopping.is_set():
            drain(self.broker, batch=self.settings.relay_batch, settings=self.settings)
            deadline = time.monotonic() + self.settings.relay_poll_s
            while not self.stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # Wake at least every 0.5 s to notice a stop request promptly; a lost
                # connection raises here and run() reconnects.
                if any(True for _ in conn.notifies(timeout=min(remaining, 0.5), stop_after=1)):
                    break


def prune_dispatched(uow: UnitOfWork, *, older_than_hours: int) -> int:
    """Delete dispatched rows older than the window, in bounded batches (short locks)."""
    total = 0
    while True:
        deleted = uow.execute(
            text("""
                DELETE FROM outbox WHERE id IN (
                    SELECT id FROM outbox
                    WHERE dispatched_at < now() - make_interval(hours => :hours)
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
    prune_dispatched(uow, older_than_hours=older_than_hours)
