"""Scheduler test helpers: schedules built in the test, settings that carry them, tick rows.

Tests construct their own schedules (the policy and backup-plan sources belong to other
issues); subprocesses get them through ``TIDEMILL_SCHEDULES_EXTRA``.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any

from core.settings import Settings, get_settings, reset_settings_cache
from schedules.schedule import Schedule

# Every two seconds: a test sees ten ticks in twenty seconds.
FAST_CRON = "*/2 * * * * *"


def make_schedule(
    name: str = "fast",
    *,
    cron: str = FAST_CRON,
    actor: str = "test_tick",
    queue_name: str = "tests-ticks",
    timezone: str = "UTC",
    misfire: str = "once",
    misfire_grace_s: int = 3600,
    kwargs: dict[str, Any] | None = None,
) -> Schedule:
    return Schedule(
        name=name,
        cron=cron,
        actor=actor,
        queue_name=queue_name,
        timezone=timezone,
        kwargs=kwargs or {},
        misfire=misfire,
        misfire_grace_s=misfire_grace_s,
        source="extra",
    )


def extra_json(*schedules: Schedule) -> str:
    """The ``TIDEMILL_SCHEDULES_EXTRA`` value that declares ``schedules``."""
    return json.dumps(
        [
            {
                "name": s.name,
                "cron": s.cron,
                "actor": s.actor,
                "queue": s.queue_name,
                "timezone": s.timezone,
                "kwargs": s.kwargs,
                "misfire": s.misfire,
                "misfire_grace_s": s.misfire_grace_s,
            }
            for s in schedules
        ]
    )


def settings_with(*schedules: Schedule, **changes: Any) -> Settings:
    """This process's settings (pointed at the test servers) plus these extra schedules."""
    reset_settings_cache()
    return dataclasses.replace(get_settings(), schedules_extra=extra_json(*schedules), **changes)


def tick_rows(sql: Any, schedule: str) -> list[tuple[datetime, str, int, str]]:
    """(tick, kind, covers, fired_by) of ``schedule``, oldest tick first (fired_by "" if unset)."""
    return [
        (r[0], r[1], r[2], r[3] or "")
        for r in sql.execute(
            "SELECT tick, kind, covers, fired_by FROM schedule_ticks WHERE schedule = %s "
            "ORDER BY tick",
            (schedule,),
        ).fetchall()
    ]


def outbox_ticks(sql: Any, actor: str, queue: str | None = None) -> list[str]:
    """The ``tick`` argument of every message enqueued for ``actor`` (on ``queue``, if given),
    in insertion order."""
    return [
        r[0]
        for r in sql.execute(
            "SELECT kwargs->>'tick' FROM outbox WHERE actor = %s "
            "AND (%s::text IS NULL OR queue_name = %s) ORDER BY id",
            (actor, queue, queue),
        ).fetchall()
    ]


def logged_events(caplog: Any, event: str) -> list[dict[str, Any]]:
    """structlog events named ``event`` seen by pytest's ``caplog`` (``structlog_to_caplog``)."""
    return [
        r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == event
    ]


def structlog_to_caplog() -> None:
    """Route structlog through the stdlib root logger, where ``caplog`` listens. Call it from a
    fixture (set-up phase): pytest attaches its capture handler after, for the test's body."""
    from core.log import configure_logging

    configure_logging(env="test", level="info", force=True)
