"""Actor family: lifecycle. A tick names a pipeline; the engine does the work.

The pipeline engine uses its own connections (a lock connection plus one short transaction per
batch), so the message's unit of work stays unused: a run must never be one long transaction.
"""

from __future__ import annotations

from datetime import datetime

from core.log import get_logger
from db.engine import UnitOfWork
from workers.base import PermanentError, actor

log = get_logger(__name__)

# Retention runs can be long (millions of rows); the default 10-minute limit would interrupt
# them. A killed run loses nothing: the next one resumes (see pipelines/lifecycle/engine.py).
PIPELINE_TIME_LIMIT_MS = 6 * 3600 * 1000


class UnknownPipelineName(PermanentError):
    """The message names a pipeline the policy file does not have: retrying cannot help."""


class BadUser(PermanentError):
    """The user does not exist or is not erasable now: retrying cannot help."""


@actor(queue_name="pipelines", time_limit=PIPELINE_TIME_LIMIT_MS, max_retries=5)
def run_pipeline(uow: UnitOfWork, name: str, tick: str | None = None) -> None:
    from pipelines.lifecycle.engine import PipelineBusy
    from pipelines.lifecycle.engine import run_pipeline as run
    from pipelines.lifecycle.policies import PolicyError, UnknownPipeline

    when = datetime.fromisoformat(tick) if tick else None
    try:
        run(name, tick=when)
    except PipelineBusy:
        # The run in progress does this tick's work too; nothing to retry.
        log.info("pipeline_tick_skipped_busy", pipeline=name, tick=tick)
    except (UnknownPipeline, PolicyError) as exc:
        log.error("pipeline_rejected", pipeline=name, error=str(exc))
        raise UnknownPipelineName(str(exc)) from None


@actor(queue_name="pipelines", max_retries=5)
def gdpr_erase(uow: UnitOfWork, user_id: str, by: str = "system") -> None:
    from pipelines.lifecycle.gdpr import NotEligible, UserNotFound, erase

    try:
        erase(user_id, by=by)
    except (NotEligible, UserNotFound) as exc:
        log.warning("gdpr_erase_rejected", reason=type(exc).__name__)
        raise BadUser(str(exc)) from None


@actor(queue_name="pipelines", max_retries=5)
def gdpr_export(uow: UnitOfWork, user_id: str, by: str = "system") -> None:
    from pipelines.lifecycle.gdpr import UserNotFound, export

    try:
        export(user_id, by=by)
    except UserNotFound as exc:
        log.warning("gdpr_export_rejected", reason=type(exc).__name__)
        raise BadUser(str(exc)) from None
