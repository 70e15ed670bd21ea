"""App tasks: the few flows an app profile carries as code (SaltBitter's GDPR export and
deletion), run by name so a trigger or ``tidemill.enqueue`` can ask for them."""

from __future__ import annotations

from core.log import get_logger
from db.engine import UnitOfWork
from workers.base import PermanentError, actor

log = get_logger(__name__)


@actor(queue_name="gdpr", max_retries=10)
def run_app_task(uow: UnitOfWork, name: str, key: str) -> None:
    """Run the served app's task `name` on `key` in this message's transaction."""
    from apps import active_profile

    profile = active_profile()
    task = profile.tasks.get(name)
    if task is None:
        raise PermanentError(f"app {profile.name!r} declares no task {name!r}")
    task(uow, key)
    log.info("app_task_done", app=profile.name, task=name)
