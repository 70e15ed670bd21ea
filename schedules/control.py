"""Operate the schedules: list with next fire / last tick / last run, pause, resume, trigger.

Used by `tidemill schedule …` and by the dashboard. Pause state lives in ``schedule_state``,
so every scheduler replica honours it at fire time (``schedules.scheduler.fire``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from core.log import get_logger
from core.settings import Settings, get_settings
from db.engine import UnitOfWork, unit_of_work
from schedules.schedule import PIPELINE_ACTOR, Schedule, load_schedules
from schedules.scheduler import FireOutcome, fire

log = get_logger(__name__)


class UnknownSchedule(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        shown = ", ".join(known) if known else "none"
        super().__init__(f"no schedule named {name!r} (known: {shown})")


@dataclass(frozen=True)
class ScheduleStatus:
    name: str
    cron: str
    timezone: str
    actor: str
    paused: bool
    next_fire: datetime | None  # None while paused
    last_tick: datetime | None
    last_run_status: str | None
    misfire: str
    # Beyond the shared interface: what the CLI and dashboard can also show.
    queue_name: str = "default"
    misfire_grace_s: int = 0
    source: str = "static"
    last_tick_kind: str | None = None
    changed_by: str | None = None
    changed_at: datetime | None = None
    missed_ticks: int = 0
    skipped_ticks: int = 0
    last_misfire_at: datetime | None = None


def _find(name: str, settings: Settings) -> Schedule:
    schedules = load_schedules(settings)
    for schedule in schedules:
        if schedule.name == name:
            return schedule
    log.warning("schedule_unknown", schedule=name)
    raise UnknownSchedule(name, [s.name for s in schedules])


# The newest tick of each schedule through the (schedule, tick) unique index, with the state of
# the message it wrote; the newest pipeline run where the actor is the lifecycle pipeline.
_LAST_TICKS = """
    SELECT n.name, t.tick, t.kind, t.fired_at,
           o.id AS outbox_id, o.dispatched_at, o.last_error, t.outbox_id AS wanted_outbox
    FROM unnest(%(names)s::text[]) AS n(name)
    JOIN LATERAL (
        SELECT tick, kind, fired_at, outbox_id FROM schedule_ticks
        WHERE schedule = n.name ORDER BY tick DESC LIMIT 1
    ) t ON true
    LEFT JOIN outbox o ON o.id = t.outbox_id
"""
_LAST_RUNS = """
    SELECT n.name, r.status, r.tick, r.started_at
    FROM unnest(%(names)s::text[]) AS n(name)
    JOIN LATERAL (
        SELECT status, tick, started_at FROM pipeline_runs
        WHERE pipeline = n.name ORDER BY started_at DESC LIMIT 1
    ) r ON true
"""
# A backup actor records its own run: in ``backups`` (by kind) or ``backup_drills``. The tick's
# run is the newest row started at or after the tick (a retry after a failure is newer).
_LAST_BACKUP = """
    SELECT status, started_at FROM backups
    WHERE kind = %(kind)s AND started_at >= %(tick)s
    ORDER BY started_at DESC LIMIT 1
"""
_LAST_DRILL = """
    SELECT status, started_at FROM backup_drills
    WHERE started_at >= %(tick)s
    ORDER BY started_at DESC LIMIT 1
"""
_STATES = """
    SELECT name, paused, changed_by, changed_at, missed_ticks, skipped_ticks, last_misfire_at
    FROM schedule_state WHERE name = ANY(%(names)s::text[])
"""


def _message_status(tick: object) -> str:
    """What became of the message a tick wrote: waiting in the outbox, sent, or refused."""
    if getattr(tick, "last_error", None):
        return "error"
    if getattr(tick, "outbox_id", None) is None:
        # No outbox row: pruned after dispatch (or written before ticks kept their outbox id).
        return "enqueued"
    return "enqueued" if getattr(tick, "dispatched_at", None) else "pending"


def _backup_kind(schedule: Schedule) -> str | None:
    """The ``backups.kind`` a backup actor's run writes (workers.backups), None if not one."""
    if schedule.actor == "backup_full":
        return "full"
    if schedule.actor == "backup_base":
        # An incremental tick that finds no parent base falls back to a full base backup; that
        # row is not attributed here (it would be confused with the daily base schedule's).
        return "incremental" if schedule.kwargs.get("incremental") else "base"
    return None


def _backup_run_status(uow: UnitOfWork, schedule: Schedule, tick: datetime) -> str | None:
    """The status of the backup (or drill) that ran for ``tick``, None if none has started."""
    kind = _backup_kind(schedule)
    if kind is not None:
        row = uow.sql(_LAST_BACKUP, {"kind": kind, "tick": tick}).fetchone()
    elif schedule.actor == "backup_drill":
        row = uow.sql(_LAST_DRILL, {"tick": tick}).fetchone()
    else:  # backup_prune and everything else keep no run record of their own
        return None
    return row.status if row is not None else None


def list_schedules(
    settings: Settings | None = None, *, now: datetime | None = None
) -> list[ScheduleStatus]:
    """Every schedule with its next fire time (from ``now``), last tick and last run's status.

    The last run's status is the lifecycle pipeline's own (``pipeline_runs``: running,
    succeeded, failed, interrupted) when one started for or after the last tick; for backup
    actors, the backup's own (``backups``: running, complete, failed, expired; for drills
    ``backup_drills``: running, passed, failed), from the newest row started at or after the
    tick; otherwise the state of the message the tick enqueued (pending, enqueued, error).
    """
    settings = settings or get_settings()
    now = now or datetime.now(UTC)
    schedules = load_schedules(settings)
    names = [s.name for s in schedules]
    with unit_of_work(settings) as uow:
        ticks = {r.name: r for r in uow.sql(_LAST_TICKS, {"names": names}).fetchall()}
        runs = {r.name: r for r in uow.sql(_LAST_RUNS, {"names": names}).fetchall()}
        states = {r.name: r for r in uow.sql(_STATES, {"names": names}).fetchall()}
        backup_runs = {
            s.name: _backup_run_status(uow, s, ticks[s.name].tick)
            for s in schedules
            if s.name in ticks
        }
    out = []
    for schedule in schedules:
        tick = ticks.get(schedule.name)
        state = states.get(schedule.name)
        paused = bool(state and state.paused)
        status: str | None = None
        if tick is not None:
            status = _message_status(tick)
        run = runs.get(schedule.name) if schedule.actor == PIPELINE_ACTOR else None
        if run is not None and (
            tick is None or run.tick == tick.tick or run.started_at >= tick.fired_at
        ):
            status = run.status
        if backup_runs.get(schedule.name) is not None:
            status = backup_runs[schedule.name]
        out.append(
            ScheduleStatus(
                name=schedule.name,
                cron=schedule.cron,
                timezone=schedule.timezone,
                actor=schedule.actor,
                paused=paused,
                next_fire=None if paused else schedule.trigger().get_next_fire_time(None, now),
                last_tick=tick.tick if tick else None,
                last_run_status=status,
                misfire=schedule.misfire,
                queue_name=schedule.queue_name,
                misfire_grace_s=schedule.misfire_grace_s,
                source=schedule.source,
                last_tick_kind=tick.kind if tick else None,
                changed_by=state.changed_by if state else None,
                changed_at=state.changed_at if state else None,
                missed_ticks=state.missed_ticks if state else 0,
                skipped_ticks=state.skipped_ticks if state else 0,
                last_misfire_at=state.last_misfire_at if state else None,
            )
        )
    return out


_SET_PAUSED = """
    INSERT INTO schedule_state AS s (name, paused, changed_by, changed_at)
    VALUES (%(n)s, %(paused)s, %(by)s, now())
    ON CONFLICT (name) DO UPDATE SET
        paused = EXCLUDED.paused, changed_by = EXCLUDED.changed_by,
        changed_at = EXCLUDED.changed_at
    RETURNING (SELECT paused FROM schedule_state WHERE name = %(n)s) AS was_paused
"""


def _set_paused(name: str, *, paused: bool, by: str, settings: Settings | None) -> bool:
    settings = settings or get_settings()
    if not by.strip():
        raise ValueError("`by` must name who changed the schedule")
    schedule = _find(name, settings)
    with unit_of_work(settings) as uow:
        row = uow.sql(_SET_PAUSED, {"n": schedule.name, "paused": paused, "by": by}).fetchone()
    was = bool(row and row.was_paused)
    log.info(
        "schedule_paused" if paused else "schedule_resumed",
        schedule=schedule.name,
        by=by,
        changed=was != paused,
    )
    return was != paused


def pause(name: str, *, by: str, settings: Settings | None = None) -> bool:
    """Stop firing ``name`` on every replica; True if it was running. Ticks due while paused
    are not misfires: resuming does not catch them up."""
    return _set_paused(name, paused=True, by=by, settings=settings)


def resume(name: str, *, by: str, settings: Settings | None = None) -> bool:
    """Fire ``name`` again from its next tick; True if it was paused."""
    return _set_paused(name, paused=False, by=by, settings=settings)


def trigger(name: str, *, by: str, settings: Settings | None = None) -> datetime:
    """Fire ``name`` now, as a manual tick (even while paused: an operator asked for it);
    returns the tick, which is also the ``tick`` argument the actor receives."""
    settings = settings or get_settings()
    if not by.strip():
        raise ValueError("`by` must name who triggered the schedule")
    schedule = _find(name, settings)
    tick = datetime.now(UTC)
    outcome = fire(schedule, tick, settings=settings, kind="manual", fired_by=by)
    if outcome is not FireOutcome.FIRED:  # two triggers within the same microsecond
        raise RuntimeError(f"{schedule.name}: manual tick {tick.isoformat()} {outcome}")
    log.info("schedule_triggered", schedule=schedule.name, by=by, tick=tick.isoformat())
    return tick
