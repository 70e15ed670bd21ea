"""The scheduler process: APScheduler fires; a fire records the tick and enqueues, nothing more.

Any number of replicas may run. Each runs APScheduler with every schedule, but a job only
fires while its replica holds the leader lock (``schedules.leader``). A fire inserts
``schedule_ticks (schedule, tick)`` and the outbox row in one transaction, fenced by the lock:
a tick fired twice during a hand-over inserts one row and sends one message.

On start-up and on every leadership acquisition the leader applies each schedule's misfire
policy to the ticks missed since the last recorded one (``schedules.misfire``). Jobs wait for
that catch-up before firing, so a current tick cannot hide the gap before it. Any tick the leader
could not fire later on (a failed fire, a run APScheduler missed or skipped) asks for another
catch-up, so every tick is either fired or counted by its schedule's policy, once.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.schedulers.background import BackgroundScheduler

from core.log import get_logger
from core.settings import Settings, get_settings
from db.engine import UnitOfWork, direct_url, unit_of_work
from schedules.leader import Fence, LeaderLock, LockSessionUnit, NotLeader
from schedules.misfire import MisfirePlan, baseline, latest_tick, plan_misfire
from schedules.schedule import Schedule, check_actors, load_schedules

log = get_logger(__name__)

# How late APScheduler may run a job and still fire it (a busy thread pool, a GC pause).
# Anything later is a misfire, handled by a catch-up. Also how long a job waits for a pending
# catch-up before leaving its tick to it.
JOB_GRACE_S = 30

KINDS = ("scheduled", "manual", "catch-up")


class FireOutcome(StrEnum):
    FIRED = "fired"
    DUPLICATE = "duplicate"  # this (schedule, tick) had already fired
    PAUSED = "paused"
    NOT_LEADER = "not_leader"  # the fence failed: this replica lost the lock
    CAUGHT_UP = "caught_up"  # a catch-up already accounted for this tick (fired or counted)


_TICK = """
    INSERT INTO schedule_ticks (schedule, tick, fired_by, manual, kind, covers)
    VALUES (%(schedule)s, %(tick)s, %(fired_by)s, %(manual)s, %(kind)s, %(covers)s)
    ON CONFLICT (schedule, tick) DO NOTHING
    RETURNING id
"""
_ENQUEUE = """
    INSERT INTO outbox (actor, queue_name, args, kwargs)
    VALUES (%(actor)s, %(queue_name)s, '[]'::jsonb, %(kwargs)s::jsonb)
    RETURNING id
"""


def identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


Unit = UnitOfWork | LockSessionUnit


@contextlib.contextmanager
def _transaction(settings: Settings | None, fence: Fence | None) -> Iterator[Unit]:
    """With a fence: a transaction on the leader lock's own session (commits only while the
    lock is held; ``NotLeader`` otherwise). Without: an ordinary unit of work (manual ticks
    from the CLI and the dashboard, tests)."""
    if fence is None:
        with unit_of_work(settings) as uow:
            yield uow
    else:
        with fence.transaction() as unit:
            yield unit


def _state_for_fire(uow: Unit, name: str) -> tuple[bool, datetime | None]:
    """(paused, caught_up_to). FOR SHARE: a pause or a catch-up (FOR UPDATE) committing
    concurrently either lands before this fire, and is seen, or waits for it."""
    row = uow.sql(
        "SELECT paused, caught_up_to FROM schedule_state WHERE name = %(n)s FOR SHARE",
        {"n": name},
    ).fetchone()
    return (bool(row.paused), row.caught_up_to) if row else (False, None)


def _insert_tick(
    uow: Unit,
    schedule: Schedule,
    tick: datetime,
    *,
    kind: str,
    fired_by: str,
    covers: int,
) -> bool:
    inserted = uow.sql(
        _TICK,
        {
            "schedule": schedule.name,
            "tick": tick,
            "fired_by": fired_by,
            "manual": kind == "manual",
            "kind": kind,
            "covers": covers,
        },
    ).fetchone()
    if inserted is None:
        return False
    kwargs = {**schedule.kwargs, "tick": tick.isoformat()}
    outbox = uow.sql(
        _ENQUEUE,
        {"actor": schedule.actor, "queue_name": schedule.queue_name, "kwargs": json.dumps(kwargs)},
    ).fetchone()
    assert outbox is not None
    uow.sql(
        "UPDATE schedule_ticks SET outbox_id = %(o)s WHERE id = %(id)s",
        {"o": outbox.id, "id": inserted.id},
    )
    return True


def fire(
    schedule: Schedule,
    tick: datetime,
    *,
    settings: Settings | None = None,
    kind: str = "scheduled",
    fired_by: str | None = None,
    fence: Fence | None = None,
    covers: int = 1,
) -> FireOutcome:
    """Record the tick and enqueue its actor, in one transaction.

    A paused schedule does not fire (manual ticks excepted: an operator asked for them), nor does
    a scheduled tick that a catch-up already planned for (at or before ``caught_up_to``). With a
    ``fence``, nothing commits unless the leader lock is still this replica's.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    try:
        with _transaction(settings, fence) as uow:
            paused, caught_up_to = (
                (False, None) if kind == "manual" else _state_for_fire(uow, schedule.name)
            )
            if paused:
                outcome = FireOutcome.PAUSED
            elif kind == "scheduled" and caught_up_to is not None and tick <= caught_up_to:
                outcome = FireOutcome.CAUGHT_UP
            elif _insert_tick(
                uow, schedule, tick, kind=kind, fired_by=fired_by or identity(), covers=covers
            ):
                outcome = FireOutcome.FIRED
            else:
                outcome = FireOutcome.DUPLICATE
    except NotLeader:
        # The lock's session is gone (or was given up) before or during the commit: nothing
        # of this fire committed, and the replica has stepped down.
        outcome = FireOutcome.NOT_LEADER
    event = {
        FireOutcome.FIRED: "tick_fired",
        FireOutcome.DUPLICATE: "tick_already_fired",
        FireOutcome.PAUSED: "tick_paused",
        FireOutcome.NOT_LEADER: "tick_fenced",
        FireOutcome.CAUGHT_UP: "tick_caught_up",
    }[outcome]
    log.info(event, schedule=schedule.name, tick=tick.isoformat(), kind=kind)
    return outcome


_STATE = """
    SELECT s.paused, s.changed_at, s.caught_up_to,
           (SELECT max(tick) FROM schedule_ticks t
             WHERE t.schedule = %(n)s AND t.kind <> 'manual') AS last_tick
    FROM (SELECT %(n)s::text AS name) k
    LEFT JOIN schedule_state s ON s.name = k.name
"""
_RECORD_MISFIRE = """
    INSERT INTO schedule_state AS s (name, caught_up_to, missed_ticks, skipped_ticks,
                                     last_misfire_at)
    VALUES (%(n)s, %(now)s, %(missed)s, %(skipped)s, %(now)s)
    ON CONFLICT (name) DO UPDATE SET
        caught_up_to = EXCLUDED.caught_up_to,
        missed_ticks = s.missed_ticks + EXCLUDED.missed_ticks,
        skipped_ticks = s.skipped_ticks + EXCLUDED.skipped_ticks,
        last_misfire_at = EXCLUDED.last_misfire_at
"""


def catch_up_one(
    schedule: Schedule,
    *,
    now: datetime,
    settings: Settings | None = None,
    fence: Fence | None = None,
    fired_by: str | None = None,
) -> MisfirePlan | None:
    """Plan and apply one schedule's misfire policy at ``now``; None when nothing was missed
    (or it is paused, or the fence failed). Plan, catch-up tick and counters share one
    transaction, so a crash or a lost lock leaves either all of it or none."""
    try:
        with _transaction(settings, fence) as uow:
            plan, fired = _catch_up_in(uow, schedule, now=now, fired_by=fired_by)
    except NotLeader:
        log.info("catch_up_fenced", schedule=schedule.name)
        return None
    if plan is None:
        return None
    log.warning(
        "schedule_misfire",
        schedule=schedule.name,
        policy=plan.policy,
        since=plan.since.isoformat() if plan.since else None,
        missed=plan.missed,
        skipped=plan.skipped,
        caught_up=fired,
        catch_up_tick=plan.fire_tick.isoformat() if plan.fire_tick else None,
        covers=plan.covers,
        truncated=plan.truncated,
    )
    return plan


def _catch_up_in(
    uow: Unit, schedule: Schedule, *, now: datetime, fired_by: str | None
) -> tuple[MisfirePlan | None, bool]:
    """Plan and apply one schedule's misfire policy inside ``uow``: (plan or None, whether
    a catch-up tick was inserted)."""
    # Serialise with pauses and with any other replica applying the same plan.
    uow.sql(
        "INSERT INTO schedule_state (name) VALUES (%(n)s) ON CONFLICT (name) DO NOTHING",
        {"n": schedule.name},
    )
    uow.sql("SELECT 1 FROM schedule_state WHERE name = %(n)s FOR UPDATE", {"n": schedule.name})
    state = uow.sql(_STATE, {"n": schedule.name}).fetchone()
    assert state is not None  # the LEFT JOIN always yields one row
    if state.paused:
        return None, False
    since = baseline(
        last_tick=state.last_tick,
        caught_up_to=state.caught_up_to,
        resumed_at=state.changed_at,
    )
    plan = plan_misfire(schedule, since=since, now=now)
    if not plan.is_misfire:
        uow.rollback()  # nothing to record: drop the state row insert, if it was new
        return None, False
    fired = False
    if plan.fire_tick is not None:
        fired = _insert_tick(
            uow,
            schedule,
            plan.fire_tick,
            kind="catch-up",
            fired_by=fired_by or identity(),
            covers=plan.covers,
        )
    uow.sql(
        _RECORD_MISFIRE,
        {"n": schedule.name, "now": now, "missed": plan.missed, "skipped": plan.skipped},
    )
    return plan, fired


def catch_up(
    schedules: list[Schedule],
    *,
    now: datetime,
    settings: Settings | None = None,
    fence: Fence | None = None,
    fired_by: str | None = None,
) -> list[MisfirePlan]:
    """Apply every schedule's misfire policy at ``now``; the plans that found missed ticks."""
    plans = []
    for schedule in schedules:
        plan = catch_up_one(schedule, now=now, settings=settings, fence=fence, fired_by=fired_by)
        if plan is not None:
            plans.append(plan)
    return plans


class Scheduler:
    """APScheduler jobs for every schedule plus a leader thread that owns the lock.

    Catch-ups are requested (``_request_catch_up``) on every acquisition and whenever a tick
    could not be fired: a failed fire, a run APScheduler missed (later than ``job_grace_s``) or
    skipped (the previous run still busy). The leader thread applies them; until one is done,
    jobs wait rather than fire, and a job whose tick the catch-up planned for does not fire it
    again (``FireOutcome.CAUGHT_UP``).
    """

    def __init__(
        self,
        settings: Settings,
        schedules: list[Schedule],
        *,
        replica_id: str | None = None,
        job_grace_s: int = JOB_GRACE_S,
    ) -> None:
        assert settings.database_url
        self.identity = replica_id or identity()  # host:pid; tests name in-process replicas
        self.settings = settings
        self.schedules = schedules
        self.by_name = {s.name: s for s in schedules}
        self.retry_s = settings.scheduler_leader_retry_s
        self.job_grace_s = job_grace_s
        self.lock = LeaderLock(
            direct_url(settings),
            identity=self.identity,
            # the leader's checks every retry_s keep its session busy well within this
            idle_timeout_s=max(5.0, 5 * self.retry_s),
        )
        self.aps = BackgroundScheduler(timezone="UTC")
        self._stop = threading.Event()
        self._wake = threading.Event()  # a catch-up was requested: run the leader step now
        self._caught_up = threading.Event()  # clear while a catch-up is due
        self._requests = 0  # catch-up requests so far; a catch-up done clears only its own
        self._requests_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def catch_up_due(self) -> bool:
        return not self._caught_up.is_set()

    def _request_catch_up(self, reason: str | None = None, **fields: object) -> None:
        with self._requests_lock:
            self._requests += 1
            self._caught_up.clear()
        if reason is not None:
            log.info("catch_up_requested", reason=reason, identity=self.identity, **fields)
            self._wake.set()

    def _wait_for_catch_up(self) -> bool:
        """Wait (at most ``job_grace_s``) until no catch-up is due; False if one still is."""
        waited = 0.0
        while not self._caught_up.wait(0.2):
            waited += 0.2
            if self._stop.is_set() or waited >= self.job_grace_s or self.lock.fence is None:
                return False
        return True

    def _job(self, name: str) -> None:
        schedule = self.by_name[name]
        if self.lock.fence is None:
            return  # a standby: the leader fires this tick
        now = datetime.now(UTC)
        tick = latest_tick(
            schedule.trigger(), now=now, lookback=timedelta(seconds=self.job_grace_s + 5)
        )
        if tick is None:
            log.warning("tick_not_found", schedule=name, now=now.isoformat())
            return
        if not self._wait_for_catch_up():
            # The catch-up has not finished (or leadership went): leave this tick to it, and
            # make sure one runs after this tick was due, so it is planned for.
            if self.lock.fence is not None and not self._stop.is_set():
                self._request_catch_up("tick_waited_too_long", schedule=name, tick=tick.isoformat())
            return
        fence = self.lock.fence
        if fence is None:
            return
        try:
            fire(schedule, tick, settings=self.settings, fence=fence, fired_by=self.identity)
        except Exception as exc:  # a database blip: the catch-up applies the misfire policy
            log.error("tick_fire_failed", schedule=name, tick=tick.isoformat(), error=str(exc))
            self._request_catch_up("tick_fire_failed", schedule=name, tick=tick.isoformat())

    def _on_not_run(self, event: JobEvent) -> None:
        """APScheduler did not run a job: too late (missed) or still busy (max instances). The
        tick goes through the misfire policy like any other tick the leader did not fire."""
        if self.lock.fence is None or event.job_id not in self.by_name:
            return
        reason = "job_missed" if event.code == EVENT_JOB_MISSED else "job_max_instances"
        times = getattr(event, "scheduled_run_times", None) or [
            getattr(event, "scheduled_run_time", None)
        ]
        log.warning(reason, schedule=event.job_id, scheduled=[str(t) for t in times])
        self._request_catch_up(reason, schedule=event.job_id)

    def _leader_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._leader_step()
            except Exception as exc:  # this thread must outlive any surprise, or no one leads
                log.error("leader_loop_error", error=f"{type(exc).__name__}: {exc}")
            self._wake.wait(self.retry_s)
            self._wake.clear()

    def _leader_step(self) -> None:
        if self.lock.is_leader:
            if not self.lock.check():
                log.warning("leader_lost", identity=self.identity)
                return
        else:
            # Before the fence is published: jobs that see it wait for the first catch-up.
            self._request_catch_up()
            if not self.lock.try_acquire():
                return
            assert self.lock.fence is not None
            log.info("leader_acquired", identity=self.identity, backend_pid=self.lock.fence.pid)
        if self.catch_up_due:
            # Ticks due while no one led (start-up, hand-over) or that could not be fired:
            # apply each misfire policy. A failure (a database blip) is retried on the next
            # step, still as the leader; jobs keep waiting meanwhile.
            with self._requests_lock:
                requests = self._requests
            try:
                catch_up(
                    self.schedules,
                    now=datetime.now(UTC),
                    settings=self.settings,
                    fence=self.lock.fence,
                    fired_by=self.identity,
                )
            except Exception as exc:
                log.error("catch_up_failed", error=f"{type(exc).__name__}: {exc}")
                return
            with self._requests_lock:
                if self._requests == requests:  # none asked for since: every job may fire
                    self._caught_up.set()
            if self.catch_up_due:
                self._wake.set()

    def start(self) -> None:
        for schedule in self.schedules:
            self.aps.add_job(
                self._job,
                schedule.trigger(),
                args=(schedule.name,),
                id=schedule.name,
                name=schedule.name,
                misfire_grace_time=self.job_grace_s,
                coalesce=True,
                max_instances=1,
            )
        self.aps.add_listener(self._on_not_run, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        self.aps.start()
        self._thread = threading.Thread(target=self._leader_loop, name="leader", daemon=True)
        self._thread.start()
        log.info(
            "scheduler_started",
            identity=self.identity,
            schedules=[s.name for s in self.schedules],
        )
        for job in self.aps.get_jobs():
            log.info("schedule_next_fire", schedule=job.id, next_fire=str(job.next_run_time))

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.aps.shutdown(wait=True)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.lock.release()
        log.info("scheduler_stopped", identity=self.identity)


def run_scheduler(settings: Settings, stop: threading.Event) -> None:
    """`tidemill scheduler`: run until ``stop`` is set."""
    settings = settings or get_settings()
    schedules = load_schedules(settings)
    check_actors(schedules)  # a misspelt actor stops start-up with one clear line
    scheduler = Scheduler(settings, schedules)
    scheduler.start()
    try:
        stop.wait()
    finally:
        scheduler.stop()


__all__ = [
    "FireOutcome",
    "Scheduler",
    "catch_up",
    "catch_up_one",
    "fire",
    "identity",
    "run_scheduler",
]
