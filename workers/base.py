"""The actor decorator: ids in, unit of work, call a function, commit."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import dramatiq
from dramatiq.middleware import CurrentMessage

import workers.broker  # noqa: F401  (sets the global broker before any actor is declared)
from core.log import get_logger
from db.engine import UnitOfWork
from workers.jobs import done_marker, mark_done, outbox_ids
from workers.middleware import close_unit_of_work, open_unit_of_work

log = get_logger("workers")

P = ParamSpec("P")
R = TypeVar("R")


class TidemillError(Exception):
    """Root of tidemill's own errors. Subclasses that are permanent go in an actor's throws=."""


class PermanentError(TidemillError):
    """Retrying cannot help (bad input, missing row): fail now, keep the message as dead letter."""


def actor(
    *, queue_name: str = "default", **options: Any
) -> Callable[[Callable[Concatenate[UnitOfWork, P], R]], dramatiq.Actor[P, R]]:
    """Declare an actor whose function receives the message's unit of work first.

    The commit happens inside the actor call, so a failed commit is a failed message that
    the Retries middleware sees (and eventually dead-letters), never a silent ack.

    A message born of the outbox marks its rows done in that same commit: the row says done
    exactly when the effects are in. A second delivery of a job already done (a re-send by the
    rescuer, a relay that crashed before its commit) finds the rows done and rolls its own
    transaction back, so whatever it wrote in its last transaction never lands twice.
    An actor that wrote nothing to Postgres (a cache delete) has no commit to share: its jobs
    are marked done in batches shortly after (``workers.jobs.DoneMarker``).
    """

    def decorate(fn: Callable[Concatenate[UnitOfWork, P], R]) -> dramatiq.Actor[P, R]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            uow = open_unit_of_work()
            try:
                result = fn(uow, *args, **kwargs)
                message = CurrentMessage.get_current_message()
                ids = outbox_ids(message) if message is not None else []
                if ids and not uow.opened:
                    # Nothing written to Postgres, so no commit to share: marked in batches.
                    done_marker.add(ids)
                elif ids and not mark_done(uow, ids):
                    log.info("job_already_done", outbox_ids=ids[:10])
                    uow.rollback()
                    return result
                uow.commit()
                return result
            finally:
                # Rolls back if the commit did not happen. Also outside a worker (a direct call
                # in a test or the CLI), where no middleware is there to close the session.
                close_unit_of_work()

        options.setdefault("throws", (PermanentError,))
        declared: dramatiq.Actor[P, R] = dramatiq.actor(queue_name=queue_name, **options)(run)
        return declared

    return decorate
