"""The backup plan as data (issue #7 replaces this stub; the interface below is fixed).

``BACKUP_PLAN`` lists what the scheduler fires for backups: name, crontab, timezone, the actor
(in ``workers.backups``) and its queue, keyword arguments, and the misfire policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PlannedBackup:
    name: str
    cron: str
    actor: str
    queue_name: str = "backups"
    timezone: str = "UTC"
    kwargs: dict[str, Any] = field(default_factory=dict)
    misfire: str = "once"
    misfire_grace_s: int = 3600


BACKUP_PLAN: tuple[PlannedBackup, ...] = ()
