"""The scheduler process: APScheduler fires; a fire records the tick and enqueues, nothing more.

A fire inserts ``schedule_ticks (schedule, tick)`` and the outbox row in one transaction: a
tick fired twice (two replicas, a failover) inserts one row and sends one message.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import text

from core.log import get_logger
from core.settings import Settings
from db.engine import unit_of_work
from schedules.schedule import SCHEDULES, Schedule

log = get_logger(__name__)

_TICK = text("""
    INSERT INTO schedule_ticks (schedule, tick, fired_by, manual)
    VALUES (:schedule, :tick, :fired_by, :manual)
    ON CONFLICT (schedule, tick) DO NOTHING
    RETURNING id
""")
_ENQUEUE = text("""
    INSERT INTO outbox (actor, queue_name, args, kwargs)
    VALUES (:actor, :queue_name, '[]'::jsonb, CAST(:kwargs AS jsonb))
""")


def identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fire(
    schedule: Schedule, tick: datetime, *, settings: Settings | None = None, manual: bool = False
) -> bool:
    """Record the tick and enqueue its actor; False when this tick had already fired."""
    with unit_of_work(settings) as uow:
        inserted = uow.execute(
            _TICK,
            {
                "schedule": schedule.name,
                "tick": tick,
                "fired_by": identity(),
                "manual": manual,
            },
        ).first()
        if inserted is None:
            log.info("tick_already_fired", schedule=schedule.name, tick=tick.isoformat())
            return False
        kwargs = {**schedule.kwargs, "tick": tick.isoformat()}
        uow.execute(
            _ENQUEUE,
            {
                "actor": schedule.actor,
                "queue_name": schedule.queue_name,
                "kwargs": json.dumps(kwargs),
            },
        )
    log.info("tick_fired", schedule=schedule.name, tick=tick.isoformat(), manual=manual)
    return True


def run_scheduler(settings: Settings, stop: threading.Event) -> None:
    scheduler = BackgroundScheduler(timezone="UTC")
    for sched in SCHEDULES:
        trigger = CronTrigger.from_crontab(sched.cron, timezone=sched.timezone)

        def job(sched: Schedule = sched) -> None:
            # Cron has minute resolution: the minute names the tick, so replicas firing a few
            # seconds apart agree on it and the unique row lets only one through.
            tick = datetime.now(UTC).replace(second=0, microsecond=0)
            fire(sched, tick, settings=settings)

        scheduler.add_job(
            job,
            trigger,
            id=sched.name,
            name=sched.name,
            misfire_grace_time=300,
            coalesce=True,
            max_instances=1,
        )
    scheduler.start()
    log.info("scheduler_started", schedules=[s.name for s in SCHEDULES])
    for j in scheduler.get_jobs():
        log.info("schedule_next_fire", schedule=j.id, next_fire=str(j.next_run_time))
    stop.wait()
    scheduler.shutdown(wait=True)
    log.info("scheduler_stopped")
