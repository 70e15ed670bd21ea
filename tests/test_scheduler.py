"""Fires, pause/resume, the leader lock and its fence, and misfire catch-up, on the real
Postgres. Time is passed in (or frozen with freezegun) wherever a clock matters."""

from __future__ import annotations

import itertools
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from apscheduler.events import EVENT_JOB_MISSED, JobExecutionEvent
from freezegun import freeze_time

from core.proc import wait_until
from schedules import control
from schedules.leader import LeaderLock
from schedules.scheduler import FireOutcome, Scheduler, catch_up, catch_up_one, fire
from tests.support.scheduler import (
    logged_events,
    make_schedule,
    outbox_ticks,
    settings_with,
    structlog_to_caplog,
    tick_rows,
)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def logs() -> None:
    structlog_to_caplog()


# ---- fire --------------------------------------------------------------------------------------


def test_fire_records_the_tick_and_enqueues_once(db, sql) -> None:
    sched = make_schedule("nightly", cron="0 3 * * *", kwargs={"name": "nightly"})
    settings = settings_with(sched)
    tick = at("2026-01-01T03:00")
    # When the same tick fires twice (two replicas, a hand-over)
    assert fire(sched, tick, settings=settings) is FireOutcome.FIRED
    assert fire(sched, tick, settings=settings) is FireOutcome.DUPLICATE
    # Then one row and one message, which carries the tick and the schedule's kwargs
    assert [(t, k, c) for t, k, c, _ in tick_rows(sql, "nightly")] == [(tick, "scheduled", 1)]
    rows = sql.execute(
        "SELECT o.queue_name, o.kwargs FROM schedule_ticks t JOIN outbox o ON o.id = t.outbox_id"
    ).fetchall()
    assert rows == [("tests-ticks", {"name": "nightly", "tick": tick.isoformat()})]


def test_fire_refuses_an_unknown_kind(db) -> None:
    with pytest.raises(ValueError, match="kind"):
        fire(make_schedule(), at("2026-01-01T00:00"), kind="sometimes")


def test_pause_is_honoured_at_fire_time_and_resume_fires_again(db, sql, logs, caplog) -> None:
    sched = make_schedule("hourly", cron="0 * * * *")
    settings = settings_with(sched)
    # Given a paused schedule (persisted: any replica reads it in its fire transaction)
    assert control.pause("hourly", by="ops:ana", settings=settings) is True
    assert control.pause("hourly", by="ops:ana", settings=settings) is False  # already paused
    # When its tick comes
    now_ = at("2026-01-01T01:30")
    assert fire(sched, at("2026-01-01T01:00"), settings=settings) is FireOutcome.PAUSED
    # Then nothing fired, and the skip is logged
    assert tick_rows(sql, "hourly") == []
    assert logged_events(caplog, "tick_paused")[0]["schedule"] == "hourly"
    (paused,) = [s for s in control.list_schedules(settings, now=now_) if s.name == "hourly"]
    assert (paused.name, paused.paused, paused.changed_by, paused.next_fire) == (
        "hourly",
        True,
        "ops:ana",
        None,
    )
    # When resumed, the next tick fires
    assert control.resume("hourly", by="ops:bo", settings=settings) is True
    assert fire(sched, at("2026-01-01T02:00"), settings=settings) is FireOutcome.FIRED
    assert [t for t, *_ in tick_rows(sql, "hourly")] == [at("2026-01-01T02:00")]
    assert logged_events(caplog, "schedule_resumed")[0]["by"] == "ops:bo"


def test_unknown_schedule_is_a_lookup_error_naming_the_known_ones(db, logs, caplog) -> None:
    settings = settings_with(make_schedule("real"))
    for op in (control.pause, control.resume, control.trigger):
        with pytest.raises(control.UnknownSchedule, match=r"'nope'.*real"):
            op("nope", by="ops", settings=settings)
    assert len(logged_events(caplog, "schedule_unknown")) == 3
    with pytest.raises(ValueError, match="by"):
        control.pause("real", by=" ", settings=settings)


def test_trigger_records_a_manual_tick_even_while_paused(db, sql) -> None:
    sched = make_schedule("hourly", cron="0 * * * *")
    settings = settings_with(sched)
    control.pause("hourly", by="ops", settings=settings)
    with freeze_time("2026-02-03T04:05:06.789"):
        tick = control.trigger("hourly", by="ops:cy", settings=settings)
    assert tick == at("2026-02-03T04:05:06.789")
    assert tick_rows(sql, "hourly") == [(tick, "manual", 1, "ops:cy")]
    assert outbox_ticks(sql, "test_tick") == [tick.isoformat()]
    assert sql.execute("SELECT manual FROM schedule_ticks").fetchone() == (True,)


# ---- leader lock and fence ---------------------------------------------------------------------


def test_only_one_replica_holds_the_lock_and_a_stale_fence_cannot_fire(db, sql) -> None:
    sched = make_schedule("fast")
    settings = settings_with(sched)
    a, b = LeaderLock(db, identity="a"), LeaderLock(db, identity="b")
    try:
        assert a.try_acquire()
        assert not b.try_acquire()
        assert a.check() and a.is_leader and not b.is_leader
        fence_a = a.fence
        assert fire(sched, at("2026-01-01T00:00:02"), settings=settings, fence=fence_a) is (
            FireOutcome.FIRED
        )
        # When a steps down, its old fence no longer lets a fire through
        a.release()
        assert fire(sched, at("2026-01-01T00:00:04"), settings=settings, fence=fence_a) is (
            FireOutcome.NOT_LEADER
        )
        # and b takes over
        assert b.try_acquire()
        assert fire(sched, at("2026-01-01T00:00:04"), settings=settings, fence=b.fence) is (
            FireOutcome.FIRED
        )
        assert fire(sched, at("2026-01-01T00:00:06"), settings=settings, fence=fence_a) is (
            FireOutcome.NOT_LEADER
        )
    finally:
        a.release()
        b.release()
    assert [t.second for t, *_ in tick_rows(sql, "fast")] == [2, 4]


def test_a_leader_whose_connection_dies_steps_down_and_a_standby_takes_over(db, sql) -> None:
    a, b = LeaderLock(db, identity="a"), LeaderLock(db, identity="b")
    try:
        assert a.try_acquire()
        assert a.fence is not None
        # When the server ends the leader's backend (crash, network cut, admin kill)
        sql.execute("SELECT pg_terminate_backend(%s)", (a.fence.pid,))
        # Then its next check fails and it stops being leader, and the lock is free
        assert wait_until(lambda: not a.check(), timeout=10)
        assert not a.is_leader and a.fence is None
        assert b.try_acquire()
        # and the old leader can come back only as a standby
        assert not a.try_acquire()
    finally:
        a.release()
        b.release()


def test_lock_attempts_against_an_unreachable_server_fail_softly(logs, caplog) -> None:
    lock = LeaderLock("postgresql://u:secret@127.0.0.1:1/db", identity="x", connect_timeout=2)
    assert lock.try_acquire() is False
    assert not lock.is_leader
    (event,) = logged_events(caplog, "leader_connect_failed")
    assert "secret" not in json.dumps(event, default=str)


# ---- misfires: catch-up applied with time passed in --------------------------------------------


def test_catch_up_once_fires_one_tick_for_the_downtime_and_counts_it(db, sql, logs, caplog) -> None:
    sched = make_schedule("hourly", cron="0 * * * *", misfire="once", misfire_grace_s=3 * 3600)
    settings = settings_with(sched)
    # Given a schedule last fired at 00:00, and a scheduler down until 05:30
    fire(sched, at("2026-01-01T00:00"), settings=settings)
    now = at("2026-01-01T05:30")
    # When the scheduler starts (or a replica becomes leader)
    (plan,) = catch_up([sched], now=now, settings=settings)
    # Then 05:00 fires once, as a catch-up standing for 03:00, 04:00, 05:00; 01:00, 02:00 skipped
    assert (plan.missed, plan.covers, plan.skipped) == (5, 3, 2)
    assert tick_rows(sql, "hourly")[-1][:3] == (at("2026-01-01T05:00"), "catch-up", 3)
    assert outbox_ticks(sql, "test_tick")[-1] == at("2026-01-01T05:00").isoformat()
    (event,) = logged_events(caplog, "schedule_misfire")
    assert (event["missed"], event["skipped"], event["caught_up"], event["policy"]) == (
        5,
        2,
        True,
        "once",
    )
    state = sql.execute(
        "SELECT missed_ticks, skipped_ticks, caught_up_to FROM schedule_state WHERE name = 'hourly'"
    ).fetchone()
    assert state == (5, 2, now)
    # And a second start at the same moment finds nothing more to do (no double count)
    assert catch_up([sched], now=now, settings=settings) == []
    assert len(tick_rows(sql, "hourly")) == 2
    (status,) = [s for s in control.list_schedules(settings, now=now) if s.name == "hourly"]
    assert (status.missed_ticks, status.skipped_ticks, status.last_tick_kind) == (5, 2, "catch-up")


def test_catch_up_skip_fires_nothing_and_does_not_count_the_same_gap_twice(db, sql) -> None:
    sched = make_schedule("prune", cron="17 * * * *", misfire="skip", misfire_grace_s=600)
    settings = settings_with(sched)
    fire(sched, at("2026-01-01T00:17"), settings=settings)
    (plan,) = catch_up([sched], now=at("2026-01-01T03:20"), settings=settings)
    assert (plan.missed, plan.fire_tick, plan.skipped) == (3, None, 3)
    assert len(tick_rows(sql, "prune")) == 1
    # A later start counts only what was missed since the last plan
    (plan,) = catch_up([sched], now=at("2026-01-01T04:20"), settings=settings)
    assert (plan.since, plan.missed) == (at("2026-01-01T03:20"), 1)
    assert sql.execute("SELECT missed_ticks, skipped_ticks FROM schedule_state").fetchone() == (
        4,
        4,
    )


def test_no_catch_up_while_paused_and_none_for_ticks_due_during_the_pause(db, sql) -> None:
    sched = make_schedule("hourly", cron="0 * * * *", misfire="once", misfire_grace_s=86400)
    settings = settings_with(sched)
    fire(sched, at("2026-01-01T00:00"), settings=settings)
    control.pause("hourly", by="ops", settings=settings)
    assert catch_up([sched], now=at("2026-01-01T05:30"), settings=settings) == []
    # Resumed "now" (the database clock): the paused hours are not misfires
    control.resume("hourly", by="ops", settings=settings)
    resumed_at = sql.execute("SELECT changed_at FROM schedule_state").fetchone()[0]
    # a minute later, but never past the next hourly tick (the resume used the real clock)
    next_tick = resumed_at.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    later = min(resumed_at + timedelta(minutes=1), next_tick - timedelta(microseconds=1))
    assert catch_up([sched], now=later, settings=settings) == []
    assert len(tick_rows(sql, "hourly")) == 1


def test_a_schedule_that_never_fired_is_not_caught_up(db, sql) -> None:
    sched = make_schedule("new", cron="0 * * * *")
    settings = settings_with(sched)
    assert catch_up_one(sched, now=at("2026-01-01T05:30"), settings=settings) is None
    assert sql.execute("SELECT count(*) FROM schedule_state").fetchone() == (0,)


def test_catch_up_with_a_stale_fence_changes_nothing(db, sql) -> None:
    sched = make_schedule("hourly", cron="0 * * * *", misfire_grace_s=86400)
    settings = settings_with(sched)
    fire(sched, at("2026-01-01T00:00"), settings=settings)
    lock = LeaderLock(db, identity="old")
    assert lock.try_acquire()
    stale = lock.fence
    lock.release()
    assert catch_up([sched], now=at("2026-01-01T05:30"), settings=settings, fence=stale) == []
    assert len(tick_rows(sql, "hourly")) == 1


# ---- list --------------------------------------------------------------------------------------


def test_list_shows_next_fire_last_tick_and_last_run_status(db, sql) -> None:
    pipeline = make_schedule(
        "purge-old", cron="30 2 * * *", actor="run_pipeline", queue_name="pipelines"
    )
    other = make_schedule("hourly", cron="0 * * * *")
    idle = make_schedule("idle", cron="0 0 1 1 *")
    settings = settings_with(pipeline, other, idle)
    now = at("2026-01-01T10:15")
    fire(pipeline, at("2026-01-01T02:30"), settings=settings)
    fire(other, at("2026-01-01T10:00"), settings=settings)
    by_name = {s.name: s for s in control.list_schedules(settings, now=now)}
    # the message of each tick is still in the outbox
    assert by_name["purge-old"].last_run_status == "pending"
    assert by_name["hourly"].last_run_status == "pending"
    assert by_name["hourly"].next_fire == at("2026-01-01T11:00")
    assert by_name["hourly"].last_tick == at("2026-01-01T10:00")
    assert by_name["purge-old"].next_fire == at("2026-01-02T02:30")
    assert by_name["idle"].last_tick is None and by_name["idle"].last_run_status is None
    # When the relay sends them and the pipeline records its run for the tick
    sql.execute("UPDATE outbox SET dispatched_at = now()")
    sql.execute(
        "INSERT INTO pipeline_runs (pipeline, tick, status) VALUES ('purge-old', %s, 'succeeded')",
        (at("2026-01-01T02:30"),),
    )
    by_name = {s.name: s for s in control.list_schedules(settings, now=now)}
    assert by_name["purge-old"].last_run_status == "succeeded"
    assert by_name["hourly"].last_run_status == "enqueued"
    # A message the relay could not send shows as an error
    sql.execute("UPDATE outbox SET last_error = 'unknown actor' WHERE actor = 'test_tick'")
    by_name = {s.name: s for s in control.list_schedules(settings, now=now)}
    assert by_name["hourly"].last_run_status == "error"
    names = [s.name for s in control.list_schedules(settings, now=now)]
    assert names == sorted(names)
    assert {"purge-old", "hourly", "idle", "outbox-relayed-prune"} <= set(names)


def test_list_shows_a_backup_schedules_own_run_status(db, sql) -> None:
    full = make_schedule("nightly-full", cron="0 3 * * *", actor="backup_full")
    incr = make_schedule(
        "hourly-incr", cron="30 * * * *", actor="backup_base", kwargs={"incremental": True}
    )
    drill = make_schedule("nightly-drill", cron="0 5 * * *", actor="backup_drill")
    settings = settings_with(full, incr, drill)
    now = at("2026-01-02T06:00")
    fire(full, at("2026-01-02T03:00"), settings=settings)
    fire(incr, at("2026-01-02T05:30"), settings=settings)
    fire(drill, at("2026-01-02T05:00"), settings=settings)
    sql.execute("UPDATE outbox SET dispatched_at = now()")
    # Yesterday's backups and drill succeeded: they are not the last tick's runs
    sql.execute(
        "INSERT INTO backups (kind, status, key, storage_url, started_at) VALUES "
        "('full', 'complete', 'f0', 'file:///b', %(old)s), "
        "('incremental', 'complete', 'i0', 'file:///b', %(old)s)",
        {"old": at("2026-01-01T03:00")},
    )
    sql.execute(
        "INSERT INTO backup_drills (status, started_at) VALUES ('passed', %s)",
        (at("2026-01-01T05:00"),),
    )
    by_name = {s.name: s for s in control.list_schedules(settings, now=now)}
    assert [by_name[n].last_run_status for n in ("nightly-full", "hourly-incr")] == [
        "enqueued",
        "enqueued",
    ]
    assert by_name["nightly-drill"].last_run_status == "enqueued"
    # When tonight's full backup and drill fail, and the incremental (not a base) is running
    sql.execute(
        "INSERT INTO backups (kind, status, key, storage_url, started_at) VALUES "
        "('full', 'failed', 'f1', 'file:///b', %(full)s), "
        "('base', 'complete', 'b1', 'file:///b', %(incr)s), "
        "('incremental', 'running', 'i1', 'file:///b', %(incr)s)",
        {"full": at("2026-01-02T03:00:05"), "incr": at("2026-01-02T05:30:02")},
    )
    sql.execute(
        "INSERT INTO backup_drills (status, started_at) VALUES ('failed', %s)",
        (at("2026-01-02T05:00:03"),),
    )
    by_name = {s.name: s for s in control.list_schedules(settings, now=now)}
    # Then list shows each backup's own status, not the message's "enqueued"
    assert by_name["nightly-full"].last_run_status == "failed"
    assert by_name["hourly-incr"].last_run_status == "running"
    assert by_name["nightly-drill"].last_run_status == "failed"
    # and a retry that completes is the tick's run from then on
    sql.execute(
        "INSERT INTO backups (kind, status, key, storage_url, started_at) "
        "VALUES ('full', 'complete', 'f2', 'file:///b', %s)",
        (at("2026-01-02T03:10"),),
    )
    by_name = {s.name: s for s in control.list_schedules(settings, now=now)}
    assert by_name["nightly-full"].last_run_status == "complete"


# ---- the scheduler, in process -----------------------------------------------------------------


def test_two_in_process_schedulers_fire_each_tick_once(db, sql) -> None:
    sched = make_schedule("fast", cron="* * * * * *")  # every second
    settings = settings_with(sched, scheduler_leader_retry_s=0.2)
    first = Scheduler(settings, [sched], replica_id="replica-1")
    second = Scheduler(settings, [sched], replica_id="replica-2")
    first.start()
    second.start()
    try:
        assert wait_until(lambda: len(tick_rows(sql, "fast")) >= 4, timeout=30)
        (leader,) = [s for s in (first, second) if s.lock.is_leader]
        rows = tick_rows(sql, "fast")  # while both run: the standby must have fired nothing
    finally:
        first.stop()
        second.stop()
    ticks = [t for t, *_ in rows]
    # one row per tick, consecutive seconds (the first may be a catch-up after acquisition)
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(ticks))
    assert {fired_by for *_, fired_by in rows} == {leader.identity}
    assert sorted(outbox_ticks(sql, "test_tick"))[: len(ticks)] == [t.isoformat() for t in ticks]


@pytest.mark.parametrize("policy", ["once", "skip"])
def test_a_starting_scheduler_applies_the_misfire_policy_to_its_downtime(db, sql, policy) -> None:
    # Given an hourly schedule whose last tick was five hours before now (the scheduler was down)
    sched = make_schedule("hourly", cron="0 * * * *", misfire=policy, misfire_grace_s=3 * 3600)
    settings = settings_with(sched, scheduler_leader_retry_s=0.2)
    now = datetime.now(UTC)
    if now.minute == 59:  # the scheduler reads the real clock: don't straddle the hour
        time.sleep(61 - now.second)
        now = datetime.now(UTC)
    last = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)
    fire(sched, last, settings=settings)
    # When a scheduler starts (and becomes leader)
    scheduler = Scheduler(settings, [sched], replica_id="starter")
    scheduler.start()
    try:
        assert wait_until(
            lambda: sql.execute("SELECT count(*) FROM schedule_state").fetchone() == (1,),
            timeout=30,
        )
    finally:
        scheduler.stop()
    missed, skipped = sql.execute(
        "SELECT missed_ticks, skipped_ticks FROM schedule_state"
    ).fetchone()
    rows = tick_rows(sql, "hourly")
    # Then five ticks were missed; "once" runs the latest of those within 3 h as one catch-up
    assert missed == 5
    if policy == "once":
        assert (skipped, len(rows)) == (2, 2)
        assert rows[-1][1:] == ("catch-up", 3, "starter")
        assert rows[-1][0] == last + timedelta(hours=5)
    else:
        assert (skipped, len(rows)) == (5, 1)


def _state(sql, name: str) -> Any:
    """(missed_ticks, skipped_ticks, caught_up_to) of ``name``, None without a state row."""
    return sql.execute(
        "SELECT missed_ticks, skipped_ticks, caught_up_to FROM schedule_state WHERE name = %s",
        (name,),
    ).fetchone()


def _not_near_the_hour() -> datetime:
    """Now, moved off minute 59: a test reading the real clock must not straddle the hour."""
    now = datetime.now(UTC)
    if now.minute == 59:
        time.sleep(61 - now.second)
        now = datetime.now(UTC)
    return now


def test_a_fire_that_fails_while_leading_goes_through_the_misfire_policy(
    db, sql, logs, caplog
) -> None:
    # Given a leader firing every second, on a database where a lock wait soon gives up
    sql.execute(f"ALTER DATABASE {sql.info.dbname} SET lock_timeout = '300ms'")
    sched = make_schedule("fast", cron="* * * * * *", misfire="once", misfire_grace_s=3600)
    settings = settings_with(sched, scheduler_leader_retry_s=0.2)
    scheduler = Scheduler(settings, [sched], replica_id="blip")
    scheduler.start()
    try:
        assert wait_until(lambda: len(tick_rows(sql, "fast")) >= 2, timeout=30)
        # When a fire fails (a lock on schedule_ticks outlasts its lock_timeout) and the
        # replica stays the leader
        with psycopg.connect(db) as blocker:
            blocker.execute("SET lock_timeout = 0")
            blocker.execute("LOCK TABLE schedule_ticks IN ACCESS EXCLUSIVE MODE")
            assert wait_until(lambda: bool(logged_events(caplog, "tick_fire_failed")), timeout=30)
            blocker.rollback()
        # Then the leader applies the policy to the failed tick: one catch-up for the gap
        assert wait_until(
            lambda: any(kind == "catch-up" for _, kind, *_ in tick_rows(sql, "fast")), timeout=30
        )
        assert wait_until(lambda: len(tick_rows(sql, "fast")) >= 6, timeout=30)
        assert scheduler.lock.is_leader
    finally:
        scheduler.stop()
    rows = tick_rows(sql, "fast")
    failed = {datetime.fromisoformat(e["tick"]) for e in logged_events(caplog, "tick_fire_failed")}
    catch_ups = [tick for tick, kind, *_ in rows if kind == "catch-up"]
    assert failed and all(any(f <= c for c in catch_ups) for f in failed)
    assert not failed & {tick for tick, *_ in rows if tick not in catch_ups}
    # and every tick from the first to the last was fired or covered by a catch-up, once
    span = int((rows[-1][0] - rows[0][0]).total_seconds()) + 1
    assert sum(covers for _, _, covers, _ in rows) == span
    missed, skipped, _ = _state(sql, "fast")
    assert skipped == 0 and missed == sum(c for _, k, c, _ in rows if k == "catch-up")


@pytest.mark.parametrize("policy", ["once", "skip"])
def test_a_run_apscheduler_missed_is_planned_by_the_policy_and_counted_once(
    db, sql, policy
) -> None:
    sched = make_schedule("hourly", cron="0 * * * *", misfire=policy, misfire_grace_s=3 * 3600)
    settings = settings_with(sched, scheduler_leader_retry_s=0.2)
    this_hour = _not_near_the_hour().replace(minute=0, second=0, microsecond=0)
    scheduler = Scheduler(settings, [sched], replica_id="late")
    scheduler.start()
    try:
        assert wait_until(
            lambda: scheduler.lock.is_leader and not scheduler.catch_up_due, timeout=30
        )
        # Given the previous hour fired, when APScheduler reports this hour's run as missed
        fire(sched, this_hour - timedelta(hours=1), settings=settings)
        scheduler._on_not_run(JobExecutionEvent(EVENT_JOB_MISSED, "hourly", "default", this_hour))
        # Then the leader's catch-up applies the policy to it
        assert wait_until(lambda: _state(sql, "hourly") is not None, timeout=30)
        assert wait_until(lambda: not scheduler.catch_up_due, timeout=30)
    finally:
        scheduler.stop()
    # and a later acquisition does not count the same tick again
    later = Scheduler(settings, [sched], replica_id="later")
    later.start()
    try:
        assert wait_until(lambda: later.lock.is_leader and not later.catch_up_due, timeout=30)
    finally:
        later.stop()
    missed, skipped, caught_up_to = _state(sql, "hourly")
    rows = tick_rows(sql, "hourly")
    assert missed == 1 and caught_up_to is not None and caught_up_to >= this_hour
    if policy == "once":
        assert skipped == 0
        assert rows[-1] == (this_hour, "catch-up", 1, "late")
    else:
        assert skipped == 1 and len(rows) == 1


def test_jobs_wait_for_the_first_catch_up_after_acquiring(db, sql) -> None:
    # Given a per-second schedule whose last tick was an hour ago, and a first catch-up that
    # is held up (another schedule's state row is locked; catch-ups go in schedule order)
    first = make_schedule("a-first", cron="0 0 1 1 *")
    fast = make_schedule("b-fast", cron="* * * * * *", misfire="skip", misfire_grace_s=600)
    settings = settings_with(first, fast, scheduler_leader_retry_s=0.2)
    last = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    fire(fast, last, settings=settings)
    sql.execute("INSERT INTO schedule_state (name) VALUES ('a-first')")
    scheduler = Scheduler(settings, [first, fast], replica_id="waiter")
    try:
        with psycopg.connect(db) as blocker:
            blocker.execute("SELECT 1 FROM schedule_state WHERE name = 'a-first' FOR UPDATE")
            scheduler.start()
            assert wait_until(lambda: scheduler.lock.is_leader, timeout=30)
            time.sleep(2.5)  # several of b-fast's ticks come due while the catch-up waits
            # no job fired ahead of the catch-up
            assert len(tick_rows(sql, "b-fast")) == 1
            blocker.rollback()
        # When the catch-up proceeds
        assert wait_until(lambda: _state(sql, "b-fast") is not None, timeout=30)
        assert wait_until(lambda: len(tick_rows(sql, "b-fast")) >= 3, timeout=30)
    finally:
        scheduler.stop()
    # Then it counted the whole hour, and jobs fired only ticks after what it planned for
    missed, skipped, caught_up_to = _state(sql, "b-fast")
    assert missed == skipped and missed >= 3600
    rows = tick_rows(sql, "b-fast")
    assert rows[0][0] == last
    assert all(tick > caught_up_to and kind == "scheduled" for tick, kind, *_ in rows[1:])
    ticks = [tick for tick, *_ in rows[1:]]
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(ticks))
