"""Misfires as pure plans: which ticks were missed, and what the policy says to do about them.

No I/O and no clock: ``now`` and the last recorded tick are parameters, so tests pass literal
timestamps. The scheduler applies a plan (``schedules.scheduler.catch_up``) at start-up and on
every leadership acquisition.

Policies:
- ``once``: the ticks missed within the grace window (``now - tick < misfire_grace_s``) are
  run once, as a single catch-up tick (the latest of them); older ones are skipped.
- ``skip``: every missed tick is skipped; the next regular tick runs as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from apscheduler.triggers.cron import CronTrigger

from schedules.schedule import Schedule

# Counting stops here: a per-second test schedule after a week down would otherwise enumerate
# 600,000 ticks to report a number nobody needs exactly.
MAX_COUNT = 10_000
_EPS = timedelta(microseconds=1)


def ticks_between(
    trigger: CronTrigger, after: datetime, until: datetime, *, limit: int = MAX_COUNT
) -> list[datetime]:
    """Cron ticks t with ``after < t <= until``, oldest first, at most ``limit`` of them."""
    out: list[datetime] = []
    probe = after + _EPS
    while len(out) < limit:
        nxt = trigger.get_next_fire_time(None, probe)
        if nxt is None or nxt > until:
            break
        out.append(nxt)
        probe = nxt + _EPS
    return out


def latest_tick(trigger: CronTrigger, *, now: datetime, lookback: timedelta) -> datetime | None:
    """The most recent cron tick in ``(now - lookback, now]``: the tick a job run stands for.

    APScheduler 3 does not tell a job which run time it is executing; the job runs at or just
    after its tick, so the latest tick not after ``now`` names it exactly (and replicas that
    fire a few seconds apart agree on it, so the unique row lets one through). Cron triggers
    only look forward, so the window grows backwards (1 s, 2 s, 4 s, …) until it holds a tick:
    a few calls whatever the schedule's density.
    """
    window = timedelta(seconds=1)
    while True:
        window = min(window, lookback)
        found = trigger.get_next_fire_time(None, now - window + _EPS)
        if found is not None and found <= now:
            while (
                nxt := trigger.get_next_fire_time(None, found + _EPS)
            ) is not None and nxt <= now:
                found = nxt
            return found
        if window >= lookback:
            return None
        window *= 2


@dataclass(frozen=True)
class MisfirePlan:
    schedule: str
    policy: str
    since: datetime | None  # the last tick accounted for (recorded, caught up to, or resumed)
    now: datetime
    missed: int  # ticks in (since, now]
    truncated: bool  # `missed` stopped counting at MAX_COUNT
    fire_tick: datetime | None  # the catch-up tick to fire (policy "once"), or None
    covers: int  # missed ticks the catch-up stands for (those within the grace window)
    skipped: int  # missed ticks that will never run

    @property
    def is_misfire(self) -> bool:
        return self.missed > 0


def plan_misfire(
    schedule: Schedule, *, since: datetime | None, now: datetime, limit: int = MAX_COUNT
) -> MisfirePlan:
    """What to do about the ticks of ``schedule`` missed since ``since``, seen at ``now``.

    ``since`` None means the schedule has never fired: nothing was missed (a new schedule
    starts with its next tick rather than with an invented backlog).
    """
    if since is None or since >= now:
        return MisfirePlan(schedule.name, schedule.misfire, since, now, 0, False, None, 0, 0)
    trigger = schedule.trigger()
    grace_start = max(since, now - timedelta(seconds=schedule.misfire_grace_s))
    # Too old to run: only counted. Within grace: the candidates for a catch-up.
    stale = ticks_between(trigger, since, grace_start, limit=limit) if grace_start > since else []
    fresh = ticks_between(trigger, grace_start, now, limit=limit)
    truncated = len(stale) >= limit or len(fresh) >= limit
    if len(fresh) >= limit:
        # Only the latest in-grace tick matters for the catch-up: find it directly.
        last = latest_tick(trigger, now=now, lookback=now - grace_start)
        fresh = [*fresh[:-1], last] if last is not None else fresh
    missed = len(stale) + len(fresh)
    if schedule.misfire == "once" and fresh:
        return MisfirePlan(
            schedule.name,
            schedule.misfire,
            since,
            now,
            missed,
            truncated,
            fresh[-1],
            len(fresh),
            len(stale),
        )
    return MisfirePlan(
        schedule.name, schedule.misfire, since, now, missed, truncated, None, 0, missed
    )


def baseline(
    *,
    last_tick: datetime | None,
    caught_up_to: datetime | None,
    resumed_at: datetime | None,
) -> datetime | None:
    """Where missed ticks start counting: the latest of the last recorded (non-manual) tick,
    the last applied plan, and the last resume (ticks during a pause are not misfires)."""
    marks = [m for m in (last_tick, caught_up_to, resumed_at) if m is not None]
    return max(marks) if marks else None
