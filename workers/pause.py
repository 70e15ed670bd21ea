"""Queue pause: an operator pauses a queue from the dashboard; every worker, on every host,
stops running its messages until it is resumed.

A pause is a row of ``queue_pauses`` in Postgres (queue, who, when), like every other record
tidemill keeps: a wiped broker (FLUSHALL, an eviction, a failover to an empty replica) does not
resume a paused queue, and a worker that boots while a queue is paused reads it before its
first message.

Each worker process reads the table at most once a second (one primary-key scan of a table of
a few rows). A message of a paused queue that a worker fetches is not run: it goes back to the
queue's delayed set with the same message id and retry count and comes back after
``recheck_ms`` (then again, while the pause lasts), and the fetched copy is acknowledged.
Nothing is lost and nothing runs. This middleware sits before AgeLimit, so time spent paused
is not held against a message by this middleware; messages older than TIDEMILL's max age when
the queue resumes are still dropped by AgeLimit.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from dramatiq.common import q_name
from dramatiq.middleware import AgeLimit, Middleware, SkipMessage
from sqlalchemy import text

from core.log import get_logger
from core.settings import Settings
from db.engine import get_database

log = get_logger("workers.pause")

REFRESH_S = 1.0
RECHECK_MS = 5_000


def paused_queues(settings: Settings | None = None) -> dict[str, dict[str, Any]]:
    """queue -> {"by": account, "at": epoch seconds} for every paused queue."""
    with get_database(settings).sessions() as session:
        rows = session.execute(
            text("SELECT queue, paused_by, extract(epoch FROM paused_at) FROM queue_pauses")
        ).all()
    return {str(row[0]): {"by": str(row[1]), "at": float(row[2])} for row in rows}


def pause_queue(queue: str, *, by: str, settings: Settings | None = None) -> bool:
    """Pause `queue`; False if it was already paused (the first pause's record is kept)."""
    with get_database(settings).sessions() as session:
        inserted = session.execute(
            text(
                "INSERT INTO queue_pauses (queue, paused_by) VALUES (:q, :by) "
                "ON CONFLICT (queue) DO NOTHING RETURNING queue"
            ),
            {"q": q_name(queue), "by": by},
        ).first()
        session.commit()
    return inserted is not None


def resume_queue(queue: str, *, settings: Settings | None = None) -> bool:
    """Resume `queue`; False if it was not paused."""
    with get_database(settings).sessions() as session:
        deleted = session.execute(
            text("DELETE FROM queue_pauses WHERE queue = :q RETURNING queue"), {"q": q_name(queue)}
        ).first()
        session.commit()
    return deleted is not None


class QueuePause(Middleware):
    def __init__(self, *, recheck_ms: int = RECHECK_MS, refresh_s: float = REFRESH_S) -> None:
        self.recheck_ms = recheck_ms
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._paused: frozenset[str] = frozenset()
        self._read_at = float("-inf")

    def paused(self, broker: Any) -> frozenset[str]:
        now = time.monotonic()
        if now - self._read_at < self.refresh_s:
            return self._paused
        with self._lock:
            if now - self._read_at >= self.refresh_s:
                try:
                    self._paused = frozenset(paused_queues())
                except Exception as exc:
                    # Postgres unreachable: keep the last known state (a paused queue stays
                    # paused); no job can commit its effects meanwhile anyway
                    log.warning("queue_pause_read_failed", error=type(exc).__name__)
                self._read_at = now
        return self._paused

    def before_process_message(self, broker: Any, message: Any) -> None:
        queue = q_name(message.queue_name)
        if queue not in self.paused(broker):
            return
        # back to the delayed set, same message id and options; the fetched copy is acked
        broker.enqueue(message.copy(queue_name=queue), delay=self.recheck_ms)
        log.info("message_held_queue_paused", queue=queue, message_id=message.message_id)
        raise SkipMessage(f"queue {queue} is paused")


def install(broker: Any) -> QueuePause:
    """Add the middleware once (tests and processes that build their own broker)."""
    for mw in broker.middleware:
        if isinstance(mw, QueuePause):
            return mw
    pause = QueuePause()
    if any(isinstance(mw, AgeLimit) for mw in broker.middleware):
        broker.add_middleware(pause, before=AgeLimit)
    else:
        broker.add_middleware(pause)
    return pause
