"""The schedule, as data: which actor fires on which cron, in which timezone, with which misfire
policy.

The list the scheduler runs is composed from three sources: the static ``SCHEDULES`` below,
the lifecycle policies (``pipelines.lifecycle.policies.load_policies``) and the backup plan
(``pipelines.backups.plan.BACKUP_PLAN``), plus ``TIDEMILL_SCHEDULES_EXTRA`` (JSON, for tests and
ad-hoc jobs). A tick only enqueues; the work happens in the actor.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

from core.log import get_logger
from core.settings import Settings, SettingsError, get_settings

log = get_logger(__name__)

MISFIRE_POLICIES = ("once", "skip")
PIPELINE_ACTOR = "run_pipeline"
PIPELINE_QUEUE = "pipelines"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")


class ScheduleError(SettingsError):
    """A schedule that cannot run: bad cron, timezone, policy, or a duplicate name.

    A SettingsError: schedules are configuration, so the CLI reports one line and exits 2.
    """


@dataclass(frozen=True)
class Schedule:
    name: str
    cron: str  # five-field crontab, or six with a leading seconds field
    actor: str
    queue_name: str = "default"
    timezone: str = "UTC"
    kwargs: dict[str, Any] = field(default_factory=dict)
    misfire: str = "once"  # "once": one catch-up for all ticks missed within the grace window
    misfire_grace_s: int = 3600
    source: str = "static"

    def trigger(self) -> CronTrigger:
        return cron_trigger(self.cron, self.timezone)


# Static schedules (none today). The outbox's done rows are pruned by the lifecycle policy
# `outbox-relayed-prune` (every 10 minutes, an hour after their job committed); the hourly
# static `outbox-prune` that preceded it was removed so that one mechanism owns the table.
SCHEDULES: tuple[Schedule, ...] = ()

_DOW_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _crontab_dow(expr: str) -> str:
    """Crontab day-of-week (0 or 7 = Sunday) -> day names APScheduler 3 reads the same way.

    APScheduler 3 numbers Monday 0 (its from_crontab documents the mismatch), so numeric days
    are expanded to names: ``1-5`` -> ``mon,tue,wed,thu,fri``.
    """
    if expr == "*" or re.search(r"[a-z]", expr, re.IGNORECASE):
        return expr
    days: set[int] = set()
    for part in expr.split(","):
        base, _, step_s = part.partition("/")
        step = int(step_s) if step_s else 1
        if base == "*":
            lo, hi = 0, 6
        elif "-" in base:
            lo_s, hi_s = base.split("-", 1)
            lo, hi = int(lo_s), int(hi_s)
        else:
            lo = int(base)
            hi = 6 if step_s else lo
        if not (0 <= lo <= 7 and 0 <= hi <= 7 and lo <= hi and step > 0):
            raise ValueError(f"bad day of week {part!r}")
        days.update(d % 7 for d in range(lo, hi + 1, step))
    return ",".join(_DOW_NAMES[d] for d in sorted(days))


def cron_trigger(cron: str, timezone: str) -> CronTrigger:
    """A CronTrigger from a crontab with standard day-of-week numbering; six fields mean a
    leading seconds field (test and demo schedules that tick every few seconds)."""
    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ScheduleError(f"unknown timezone {timezone!r}") from exc
    fields = cron.split()
    if len(fields) == 5:
        second = "0"
        minute, hour, day, month, dow = fields
    elif len(fields) == 6:
        second, minute, hour, day, month, dow = fields
    else:
        raise ScheduleError(
            f"cron {cron!r} has {len(fields)} fields; expected 5 (or 6 with seconds first)"
        )
    try:
        return CronTrigger(
            second=second,
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=_crontab_dow(dow),
            timezone=tz,
        )
    except ValueError as exc:
        raise ScheduleError(f"bad cron {cron!r}: {exc}") from exc


def validate(schedule: Schedule) -> Schedule:
    where = f"schedule {schedule.name!r} ({schedule.source})"
    if not _NAME.match(schedule.name):
        raise ScheduleError(f"{where}: name must be 1-100 letters, digits, '_', '-', '.', ':'")
    if schedule.misfire not in MISFIRE_POLICIES:
        raise ScheduleError(f"{where}: misfire must be one of {MISFIRE_POLICIES}")
    if schedule.misfire_grace_s < 0:
        raise ScheduleError(f"{where}: misfire_grace_s must be >= 0")
    if not schedule.actor:
        raise ScheduleError(f"{where}: actor is empty")
    try:
        schedule.trigger()
    except ScheduleError as exc:
        raise ScheduleError(f"{where}: {exc}") from None
    return schedule


def registered_actors() -> set[str]:
    """Every dramatiq actor the workers declare (``workers.actors``, imported here, lazily:
    it builds the broker from settings)."""
    import dramatiq

    import workers.actors  # noqa: F401  (declares every actor family on the broker)

    return set(dramatiq.get_broker().get_declared_actors())


def check_actors(schedules: Iterable[Schedule], known: Collection[str] | None = None) -> None:
    """Refuse a schedule whose actor no worker declares (a misspelt name would otherwise be
    enqueued on every tick and only fail at the relay): a ScheduleError naming it.

    ``known`` defaults to ``registered_actors()``. When the actors cannot be imported because
    no broker is configured (the scheduler itself needs only Postgres), the check is skipped,
    loudly.
    """
    if known is None:
        try:
            known = registered_actors()
        except SettingsError as exc:
            log.warning("schedule_actors_unchecked", reason=str(exc))
            return
    for schedule in schedules:
        if schedule.actor in known:
            continue
        close = difflib.get_close_matches(schedule.actor, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        error = (
            f"schedule {schedule.name!r} ({schedule.source}): unknown actor "
            f"{schedule.actor!r} (no worker declares it){hint}"
        )
        log.error("schedule_invalid", schedule=schedule.name, source=schedule.source, error=error)
        raise ScheduleError(error)


def _from_policies(settings: Settings) -> list[Schedule]:
    from pipelines.lifecycle.policies import load_policies

    return [
        Schedule(
            name=p.name,
            cron=p.schedule,
            actor=PIPELINE_ACTOR,
            queue_name=PIPELINE_QUEUE,
            timezone=p.timezone,
            kwargs={"name": p.name},
            misfire=p.misfire,
            misfire_grace_s=p.misfire_grace_s,
            source="policy",
        )
        for p in load_policies(settings)
    ]


def _from_backup_plan(settings: Settings) -> list[Schedule]:
    from apps import get_profile  # issue 14: the served app's backup plan

    backups = get_profile(settings.app).backups
    return [
        Schedule(
            name=b.name,
            cron=b.cron,
            actor=b.actor,
            queue_name=b.queue_name,
            timezone=b.timezone,
            kwargs=dict(b.kwargs),
            misfire=b.misfire,
            misfire_grace_s=b.misfire_grace_s,
            source="backup-plan",
        )
        for b in (backups.plan if backups is not None else ())
    ]


_EXTRA_KEYS = {
    "name",
    "cron",
    "actor",
    "queue",
    "timezone",
    "kwargs",
    "misfire",
    "misfire_grace_s",
}


def parse_extra(raw: str | None) -> list[Schedule]:
    """``TIDEMILL_SCHEDULES_EXTRA``: a JSON list of objects; a bad value is a SettingsError."""
    if not raw:
        return []
    var = "TIDEMILL_SCHEDULES_EXTRA"
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{var} is not valid JSON: {exc}") from None
    if not isinstance(items, list):
        raise SettingsError(f"{var} must be a JSON list of schedule objects")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not {"name", "cron", "actor"} <= item.keys():
            raise SettingsError(f"{var}[{i}] needs at least name, cron and actor")
        unknown = item.keys() - _EXTRA_KEYS
        if unknown:
            raise SettingsError(f"{var}[{i}] has unknown keys {sorted(unknown)}")
        try:
            out.append(
                Schedule(
                    name=str(item["name"]),
                    cron=str(item["cron"]),
                    actor=str(item["actor"]),
                    queue_name=str(item.get("queue", "default")),
                    timezone=str(item.get("timezone", "UTC")),
                    kwargs=dict(item.get("kwargs") or {}),
                    misfire=str(item.get("misfire", "once")),
                    misfire_grace_s=int(item.get("misfire_grace_s", 3600)),
                    source="extra",
                )
            )
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"{var}[{i}]: {exc}") from None
    return out


def load_schedules(settings: Settings | None = None) -> list[Schedule]:
    """Every schedule, validated, names unique, sorted by name.

    A source that fails to load, or a bad schedule, stops the caller with a clear error rather
    than silently running without it (a missing backup schedule is worse than a crash loop).
    """
    settings = settings or get_settings()
    try:
        extra = parse_extra(settings.schedules_extra)
    except SettingsError:
        log.error("schedule_invalid", source="extra")
        raise
    composed = [*SCHEDULES, *_from_policies(settings), *_from_backup_plan(settings), *extra]
    seen: dict[str, Schedule] = {}
    for sched in composed:
        try:
            validate(sched)
        except ScheduleError as exc:
            log.error("schedule_invalid", schedule=sched.name, source=sched.source, error=str(exc))
            raise
        if sched.name in seen:
            log.error("schedule_duplicate", schedule=sched.name, source=sched.source)
            raise ScheduleError(
                f"schedule name {sched.name!r} is used by both {seen[sched.name].source} "
                f"and {sched.source}"
            )
        seen[sched.name] = sched
    return sorted(seen.values(), key=lambda s: s.name)
