"""The schedule, as data: which actor fires on which cron, in which timezone.

Later issues add the retention pipelines and backups here; a tick only enqueues.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Schedule:
    name: str
    cron: str  # five-field crontab
    actor: str
    queue_name: str = "default"
    timezone: str = "UTC"
    kwargs: dict[str, Any] = field(default_factory=dict)


SCHEDULES: tuple[Schedule, ...] = (
    Schedule(
        name="outbox-prune", cron="17 * * * *", actor="prune_outbox", queue_name="maintenance"
    ),
)
