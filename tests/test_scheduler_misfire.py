"""Misfire plans with time passed in: which ticks were missed and what each policy does.

Pure functions, literal timestamps: no database and no clock.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.settings import SettingsError
from schedules.misfire import MAX_COUNT, baseline, latest_tick, plan_misfire, ticks_between
from schedules.schedule import (
    Schedule,
    ScheduleError,
    check_actors,
    cron_trigger,
    parse_extra,
    validate,
)
from tests.support.scheduler import make_schedule


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


HOURLY_ONCE = make_schedule("hourly", cron="0 * * * *", misfire="once", misfire_grace_s=3 * 3600)
HOURLY_SKIP = make_schedule("hourly", cron="0 * * * *", misfire="skip", misfire_grace_s=3 * 3600)


def test_once_runs_one_catch_up_for_the_ticks_within_grace_and_skips_older_ones() -> None:
    # Given an hourly schedule last fired at 00:00 and a scheduler back at 05:30, grace 3 h
    plan = plan_misfire(HOURLY_ONCE, since=at("2026-01-01T00:00"), now=at("2026-01-01T05:30"))
    # Then 01:00 … 05:00 were missed; 03:00, 04:00, 05:00 are within grace and run once as 05:00
    assert plan.missed == 5
    assert plan.fire_tick == at("2026-01-01T05:00")
    assert plan.covers == 3
    assert plan.skipped == 2
    assert not plan.truncated


def test_skip_runs_nothing_and_counts_every_missed_tick() -> None:
    plan = plan_misfire(HOURLY_SKIP, since=at("2026-01-01T00:00"), now=at("2026-01-01T05:30"))
    assert (plan.missed, plan.fire_tick, plan.covers, plan.skipped) == (5, None, 0, 5)


def test_once_with_every_missed_tick_older_than_grace_runs_nothing() -> None:
    sched = make_schedule("h", cron="0 * * * *", misfire="once", misfire_grace_s=600)
    plan = plan_misfire(sched, since=at("2026-01-01T00:00"), now=at("2026-01-01T05:30"))
    assert (plan.missed, plan.fire_tick, plan.skipped) == (5, None, 5)


def test_grace_window_excludes_a_tick_exactly_grace_old() -> None:
    sched = make_schedule("h", cron="0 * * * *", misfire="once", misfire_grace_s=1800)
    plan = plan_misfire(sched, since=at("2026-01-01T04:00"), now=at("2026-01-01T05:30"))
    # 05:00 is exactly 30 min old: outside "now - tick < grace"
    assert (plan.missed, plan.fire_tick, plan.skipped) == (1, None, 1)
    plan = plan_misfire(sched, since=at("2026-01-01T04:00"), now=at("2026-01-01T05:29:59"))
    assert (plan.missed, plan.fire_tick, plan.covers) == (1, at("2026-01-01T05:00"), 1)


def test_nothing_missed_when_the_last_tick_is_the_latest_due() -> None:
    plan = plan_misfire(HOURLY_ONCE, since=at("2026-01-01T05:00"), now=at("2026-01-01T05:59:59"))
    assert not plan.is_misfire
    assert plan.fire_tick is None


def test_a_tick_due_exactly_now_counts_as_missed() -> None:
    plan = plan_misfire(HOURLY_ONCE, since=at("2026-01-01T04:00"), now=at("2026-01-01T05:00"))
    assert (plan.missed, plan.fire_tick) == (1, at("2026-01-01T05:00"))


def test_a_schedule_that_never_fired_has_no_backlog() -> None:
    plan = plan_misfire(HOURLY_ONCE, since=None, now=at("2026-01-01T05:30"))
    assert not plan.is_misfire


def test_timezone_ticks_follow_local_wall_clock() -> None:
    # 03:00 in Istanbul (UTC+3, no DST) is 00:00 UTC
    sched = make_schedule(
        "daily", cron="0 3 * * *", timezone="Europe/Istanbul", misfire_grace_s=86400
    )
    plan = plan_misfire(sched, since=at("2026-01-01T00:00"), now=at("2026-01-03T12:00"))
    assert plan.missed == 2
    assert plan.fire_tick == at("2026-01-03T00:00")


def test_daylight_saving_day_has_one_tick_for_a_nonexistent_local_hour_skipped() -> None:
    # Europe/Berlin springs forward on 2026-03-29: 02:00-03:00 local does not exist
    trigger = cron_trigger("0 * * * *", "Europe/Berlin")
    ticks = ticks_between(trigger, at("2026-03-28T22:00"), at("2026-03-29T03:00"))
    # UTC 23:00 (00 local), 00:00 (01 local), 01:00 (03 local CEST), 02:00, 03:00
    assert ticks == [
        at("2026-03-28T23:00"),
        at("2026-03-29T00:00"),
        at("2026-03-29T01:00"),
        at("2026-03-29T02:00"),
        at("2026-03-29T03:00"),
    ]


def test_seconds_field_for_fast_schedules() -> None:
    sched = make_schedule("fast", cron="*/2 * * * * *")
    plan = plan_misfire(sched, since=at("2026-01-01T00:00:00"), now=at("2026-01-01T00:00:10"))
    assert (plan.missed, plan.fire_tick, plan.covers) == (5, at("2026-01-01T00:00:10"), 5)


def test_a_huge_backlog_stops_counting_but_still_finds_the_latest_tick() -> None:
    sched = make_schedule("every-second", cron="* * * * * *", misfire_grace_s=86400)
    now = at("2026-01-08T12:00:00.5")
    plan = plan_misfire(sched, since=at("2026-01-01T00:00"), now=now)
    assert plan.truncated
    assert plan.missed >= MAX_COUNT
    assert plan.fire_tick == at("2026-01-08T12:00:00")


def test_crontab_day_of_week_numbers_mean_sunday_zero() -> None:
    # APScheduler 3 would read 0 as Monday; tidemill keeps crontab's meaning
    weekdays = ticks_between(
        cron_trigger("0 9 * * 1-5", "UTC"), at("2026-01-04T00:00"), at("2026-01-11T00:00")
    )  # 2026-01-04 is a Sunday
    assert [t.strftime("%a") for t in weekdays] == ["Mon", "Tue", "Wed", "Thu", "Fri"]
    for expr in ("0 0 * * 0", "0 0 * * 7", "0 0 * * sun"):
        (sunday,) = ticks_between(
            cron_trigger(expr, "UTC"), at("2026-01-05T00:00"), at("2026-01-12T00:00")
        )
        assert sunday.strftime("%a") == "Sun", expr
    every_other = ticks_between(
        cron_trigger("0 0 * * */2", "UTC"), at("2026-01-03T12:00"), at("2026-01-10T12:00")
    )
    assert [t.strftime("%a") for t in every_other] == ["Sun", "Tue", "Thu", "Sat"]


def test_latest_tick_names_the_run_a_late_job_stands_for() -> None:
    trigger = cron_trigger("*/2 * * * * *", "UTC")
    now = at("2026-01-01T00:00:05.300")
    assert latest_tick(trigger, now=now, lookback=timedelta(seconds=30)) == at(
        "2026-01-01T00:00:04"
    )
    hourly = cron_trigger("0 * * * *", "UTC")
    later = at("2026-01-01T00:10:05")
    assert latest_tick(hourly, now=later, lookback=timedelta(seconds=60)) is None
    assert latest_tick(hourly, now=later, lookback=timedelta(days=1)) == at("2026-01-01T00:00")
    assert latest_tick(hourly, now=at("2026-01-01T00:00"), lookback=timedelta(seconds=1)) == at(
        "2026-01-01T00:00"
    )


def test_baseline_is_the_latest_mark() -> None:
    assert baseline(last_tick=None, caught_up_to=None, resumed_at=None) is None
    assert baseline(
        last_tick=at("2026-01-01T01:00"),
        caught_up_to=at("2026-01-01T03:00"),
        resumed_at=at("2026-01-01T02:00"),
    ) == at("2026-01-01T03:00")


@settings(max_examples=200, deadline=None)
@given(
    start=st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2027, 1, 1)),
    down_s=st.integers(min_value=0, max_value=5 * 86400),
    grace_s=st.integers(min_value=0, max_value=2 * 86400),
    policy=st.sampled_from(["once", "skip"]),
    cron=st.sampled_from(["0 * * * *", "*/15 * * * *", "0 3 * * *", "30 2 * * 1-5"]),
)
def test_plans_account_for_every_missed_tick(start, down_s, grace_s, policy, cron) -> None:
    since = start.replace(tzinfo=UTC)
    now = since + timedelta(seconds=down_s)
    sched = make_schedule("p", cron=cron, misfire=policy, misfire_grace_s=grace_s)
    plan = plan_misfire(sched, since=since, now=now)
    expected = ticks_between(sched.trigger(), since, now)
    assert plan.missed == len(expected)
    # every missed tick is either covered by the catch-up or skipped, never both
    assert plan.covers + plan.skipped == plan.missed
    if plan.fire_tick is not None:
        assert policy == "once"
        assert plan.fire_tick == expected[-1]
        assert now - plan.fire_tick < timedelta(seconds=grace_s)
        assert plan.covers == sum(1 for t in expected if now - t < timedelta(seconds=grace_s))
    else:
        assert policy == "skip" or all(now - t >= timedelta(seconds=grace_s) for t in expected)


@pytest.mark.parametrize(
    ("schedule", "needle"),
    [
        (make_schedule("x", cron="* * * *"), "4 fields"),
        (make_schedule("x", cron="61 * * * *"), "bad cron"),
        (make_schedule("x", cron="0 0 * * 9"), "bad cron"),
        (make_schedule("x", timezone="Mars/Olympus"), "unknown timezone"),
        (make_schedule("x", misfire="always"), "misfire must be"),
        (make_schedule("x", misfire_grace_s=-1), "misfire_grace_s"),
        (make_schedule("has space"), "name must be"),
        (Schedule(name="x", cron="0 * * * *", actor=""), "actor is empty"),
    ],
)
def test_invalid_schedules_are_refused_with_the_reason(schedule: Schedule, needle: str) -> None:
    with pytest.raises(ScheduleError, match=needle) as info:
        validate(schedule)
    assert repr(schedule.name) in str(info.value)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("{nope", "not valid JSON"),
        ('{"name": "x"}', "JSON list"),
        ('[{"name": "x", "cron": "* * * * *"}]', "needs at least name, cron and actor"),
        ('[{"name": "x", "cron": "* * * * *", "actor": "a", "colour": 1}]', "unknown keys"),
        ('[{"name": "x", "cron": "* * * * *", "actor": "a", "misfire_grace_s": "soon"}]', "[0]"),
    ],
)
def test_bad_extra_schedules_name_the_variable(raw: str, needle: str) -> None:
    with pytest.raises(SettingsError, match="TIDEMILL_SCHEDULES_EXTRA") as info:
        parse_extra(raw)
    assert needle in str(info.value)


def test_check_actors_names_the_schedule_and_the_closest_registered_actor() -> None:
    known = {"backup_full", "backup_base", "run_pipeline"}
    check_actors([make_schedule("ok", actor="backup_base")], known)
    with pytest.raises(
        ScheduleError, match=r"'nightly'.*unknown actor 'bakup_full'.*'backup_full'"
    ):
        check_actors([make_schedule("nightly", actor="bakup_full")], known)
    with pytest.raises(ScheduleError, match=r"unknown actor 'zzz' \(no worker declares it\)$"):
        check_actors([make_schedule("odd", actor="zzz")], known)
