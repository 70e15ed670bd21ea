"""The backup plan as data: what the scheduler fires for backups, and when.

``BACKUP_PLAN`` lists name, crontab, timezone, the actor (in ``workers.backups``) and its
queue, keyword arguments, and the misfire policy. Seed Lovendo / SaltBitter: a daily full at
03:00 UTC, hourly incrementals, a daily restore drill (after the backups, so it restores the
night's dump), and retention pruning (after the drill, so the newest full is restored before
anything moves to cold storage).
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


BACKUP_PLAN: tuple[PlannedBackup, ...] = (
    # Logical: pg_dump | zstd. A missed night still runs once when the scheduler is back.
    PlannedBackup(name="backup-full", cron="0 3 * * *", actor="backup_full"),
    # Physical: the daily full base backup that the hourly incrementals are relative to.
    PlannedBackup(name="backup-base", cron="30 3 * * *", actor="backup_base"),
    # Hourly incrementals (PG 17+; the actor takes a full base when it cannot). A missed hour
    # is skipped, not caught up: the next hour's incremental covers it, WAL covers the rest.
    PlannedBackup(
        name="backup-incremental",
        cron="30 0-2,4-23 * * *",
        actor="backup_base",
        kwargs={"incremental": True},
        misfire="skip",
        misfire_grace_s=900,
    ),
    PlannedBackup(name="backup-drill", cron="0 5 * * *", actor="backup_drill"),
    PlannedBackup(name="backup-prune", cron="0 6 * * *", actor="backup_prune"),
)
