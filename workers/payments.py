"""Payment actors: apply one stored Stripe event, exactly once.

Whether a failure is retried is decided where it is known: content the database refuses
(a foreign key, a value out of range) is the event's own and fails now with its reason;
a payment not seen yet is a known wait ('waiting', retried within the actor's budget); anything
else (an outage) is retried.
"""

from __future__ import annotations

from contextvars import ContextVar

import psycopg
import sqlalchemy.exc
from dramatiq.middleware import CurrentMessage

from core.log import get_logger
from db.engine import UnitOfWork, unit_of_work
from workers.base import PermanentError, actor
from workers.stripe_effects import (
    AwaitingPayment,
    EventContentError,
    apply_event,
    payment_subject,
)

log = get_logger(__name__)


class EventNotFound(PermanentError):
    pass


# Locks the event and marks it processed in one statement, returning the status it had: a
# failure rolls the mark back with the effects, and the usual outcome costs no statement of its
# own. FOR UPDATE in `old`: a duplicate delivery that waited for the lock sees the status the
# first one committed (and then `marked` changes nothing).
_LOCK_EVENT = """
    WITH old AS (SELECT status, payload FROM webhook_events WHERE id = %(id)s FOR UPDATE),
         marked AS (UPDATE webhook_events SET status = 'processed', attempts = attempts + 1,
                        last_error = NULL, processed_at = now()
                    WHERE id = %(id)s AND status NOT IN ('processed', 'ignored'))
    SELECT status, payload FROM old
"""
_RECORD_FAILURE = """
    UPDATE webhook_events SET attempts = attempts + 1, last_error = %(error)s,
        status = CASE WHEN %(final)s THEN 'failed' WHEN %(waiting)s THEN 'waiting'
                      ELSE status END,
        subject_id = COALESCE(%(subject)s, subject_id)
    WHERE id = %(id)s AND status NOT IN ('processed', 'ignored')
"""
# Errors the database raises because of what the event carries: retrying cannot change them.
_CONTENT_ERRORS = (psycopg.errors.IntegrityError, psycopg.errors.DataError)
# Set by `replay`: whether a failure of this direct run ends the event (it was failed before)
# or leaves it to the retries still scheduled for it.
_REPLAY_FINAL: ContextVar[bool] = ContextVar("replay_final", default=True)
# A failed event goes back to received; returns the status it had, or nothing if it is unknown.
_REOPEN_FAILED = """
    WITH old AS (SELECT status FROM webhook_events WHERE id = %(id)s FOR UPDATE),
         reopened AS (UPDATE webhook_events SET status = 'received'
                      WHERE id = %(id)s AND status = 'failed')
    SELECT status FROM old
"""
_STATUS = "SELECT status FROM webhook_events WHERE id = %(id)s"
_QUEUE_EVENT = """
    INSERT INTO outbox (actor, queue_name, args)
    VALUES ('process_event', 'payments', jsonb_build_array(%(id)s::text))
"""
_MARK_OUTCOME = "UPDATE webhook_events SET status = %(status)s WHERE id = %(id)s"


# Its own retry budget: a refund that arrived before its payment waits through retries.
@actor(queue_name="payments", max_retries=20)
def process_event(uow: UnitOfWork, event_id: str) -> None:
    """Lock the event row (marking it processed), apply it, record any other outcome; a
    processed or ignored event is left alone."""
    try:
        row = uow.sql(_LOCK_EVENT, {"id": event_id}).fetchone()
        if row is None:
            raise EventNotFound(f"webhook event {event_id} is not stored")
        if row.status in ("processed", "ignored"):
            log.info("webhook_event_already_applied", event_id=event_id, status=row.status)
            return
        outcome = apply_event(uow, row.payload)
        if outcome != "processed":  # 'ignored': a type nothing acts on
            uow.sql(_MARK_OUTCOME, {"status": outcome, "id": event_id})
        log.info(
            "webhook_event_applied", event_id=event_id, type=row.payload["type"], outcome=outcome
        )
    except Exception as exc:
        uow.rollback()
        cause = _content_error(exc)
        record_failure(event_id, cause or exc)
        if cause is not None:
            raise cause from exc
        raise


def _content_error(exc: Exception) -> EventContentError | None:
    """The database refused the event's content: a permanent error with a readable reason."""
    orig = exc.orig if isinstance(exc, sqlalchemy.exc.DBAPIError) else exc
    if not isinstance(orig, _CONTENT_ERRORS):
        return None
    detail = str(orig).strip().splitlines()[0][:300] if str(orig).strip() else ""
    return EventContentError(f"the database refused the event: {type(orig).__name__}: {detail}")


def _final_attempt(exc: Exception) -> bool:
    if isinstance(exc, PermanentError):
        return True
    message = CurrentMessage.get_current_message()
    if message is None:
        # called directly (replay from the CLI): no retry of this call follows, but a worker
        # may still be retrying the event; only a replayed failed event fails again
        return _REPLAY_FINAL.get()
    return bool(message.options.get("retries", 0) >= process_event.options["max_retries"])


def record_failure(event_id: str, exc: Exception) -> None:
    """Count the attempt in its own transaction (the failed one rolled back); after the last
    retry the event is marked failed with its error. An event waiting for its payment shows
    status 'waiting' and is woken as soon as the payment is applied."""
    final = _final_attempt(exc)
    waiting = isinstance(exc, AwaitingPayment)
    if waiting and final:
        error = f"gave up: {exc} after the last retry; it is applied when the payment arrives"
    else:
        error = f"{type(exc).__name__}: {exc}"[:2000]
    subject = payment_subject(exc.intent_id) if isinstance(exc, AwaitingPayment) else None
    with unit_of_work() as uow:
        uow.sql(
            _RECORD_FAILURE,
            {
                "error": error,
                "final": final,
                "waiting": waiting,
                "subject": subject,
                "id": event_id,
            },
        )
    log.warning("webhook_event_failed", event_id=event_id, error=error, final=final)


def replay(event_id: str) -> str:
    """Run a stored event again now, in this process; returns its new status."""
    with unit_of_work() as uow:
        row = uow.sql(_REOPEN_FAILED, {"id": event_id}).fetchone()
    if row is None:
        raise EventNotFound(f"webhook event {event_id} is not stored")
    # An event still being retried (received, waiting) keeps its status if this run fails:
    # its retries go on. A failed event that fails again is failed again.
    token = _REPLAY_FINAL.set(row.status == "failed")
    try:
        process_event(event_id)  # a processed or ignored event is left alone by process_event
    finally:
        _REPLAY_FINAL.reset(token)
    with unit_of_work() as uow:
        after = uow.sql(_STATUS, {"id": event_id}).fetchone()
    assert after is not None  # it was stored a moment ago; events are never deleted by replay
    return str(after.status)


def queue_replay(uow: UnitOfWork, event_id: str) -> str:
    """Reopen a failed event and queue it for a worker through the outbox, in the caller's
    transaction (the message exists exactly if the reopening commits); returns the status the
    event had. A processed or ignored event is left alone and nothing is queued."""
    row = uow.sql(_REOPEN_FAILED, {"id": event_id}).fetchone()
    if row is None:
        raise EventNotFound(f"webhook event {event_id} is not stored")
    if row.status not in ("processed", "ignored"):
        uow.sql(_QUEUE_EVENT, {"id": event_id})
    return str(row.status)
