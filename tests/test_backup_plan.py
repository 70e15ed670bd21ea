"""The backup plan as data, and its actors through the real broker and a real worker."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog
from apscheduler.triggers.cron import CronTrigger

import workers.backups as backups
from core.settings import reset_settings_cache
from pipelines.backups.plan import BACKUP_PLAN


def test_plan_entries_name_real_actors_and_valid_crons() -> None:
    names = [b.name for b in BACKUP_PLAN]
    assert len(names) == len(set(names))
    for planned in BACKUP_PLAN:
        actor = getattr(backups, planned.actor)
        assert actor.queue_name == planned.queue_name == "backups"
        CronTrigger.from_crontab(planned.cron, timezone=planned.timezone)
        assert planned.misfire in ("once", "skip")


def _next(name: str, after: datetime) -> datetime:
    planned = next(b for b in BACKUP_PLAN if b.name == name)
    trigger = CronTrigger.from_crontab(planned.cron, timezone=planned.timezone)
    fire = trigger.get_next_fire_time(None, after)
    assert fire is not None
    return fire.astimezone(UTC)


def test_seed_schedule_full_at_3_utc_hourly_incrementals_daily_drill_after_backups() -> None:
    day = datetime(2026, 11, 23, 0, 0, tzinfo=UTC)
    assert _next("backup-full", day) == datetime(2026, 11, 23, 3, 0, tzinfo=UTC)
    base = _next("backup-base", day)
    drill = _next("backup-drill", day)
    prune = _next("backup-prune", day)
    assert _next("backup-full", day) < base < drill < prune
    incremental = next(b for b in BACKUP_PLAN if b.name == "backup-incremental")
    assert incremental.kwargs == {"incremental": True}
    trigger = CronTrigger.from_crontab(incremental.cron, timezone="UTC")
    fires, moment = [], day
    while True:
        nxt = trigger.get_next_fire_time(None, moment)
        assert nxt is not None
        if nxt >= day.replace(day=24):
            break
        fires.append(nxt)
        moment = nxt.replace(second=1)
    # 23 a day: every hour but the one the full base backup takes
    assert len(fires) == 23 and all(f.hour != 3 for f in fires)


@pytest.fixture
def storage_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"file://{tmp_path / 'objects'}"
    monkeypatch.setenv("STORAGE_URL", url)
    reset_settings_cache()
    yield url
    reset_settings_cache()


def test_actors_back_up_and_drill_through_the_broker(sql, inproc_worker, storage_env) -> None:
    from workers.broker import broker

    backups.backup_full.send(tick="2026-11-23T03:00:00+00:00")
    broker.join("backups", timeout=120_000)
    backups.backup_drill.send(tick="2026-11-23T05:00:00+00:00")
    broker.join("backups", timeout=120_000)
    backups.backup_prune.send()
    broker.join("backups", timeout=60_000)
    row = sql.execute("SELECT kind, status FROM backups").fetchall()
    assert row == [("full", "complete")]
    drill = sql.execute("SELECT status, restore_seconds > 0 FROM backup_drills").fetchall()
    assert drill == [("passed", True)]


@pytest.fixture
def summarize_wal(servers) -> Iterator[None]:
    """summarize_wal on the suite's server for one test (a reloadable setting)."""
    import psycopg

    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET summarize_wal = on")
        conn.execute("SELECT pg_reload_conf()")
    yield
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM RESET summarize_wal")
        conn.execute("SELECT pg_reload_conf()")


@pytest.fixture
def no_summaries(servers) -> Iterator[None]:
    """The embedded server runs with summarize_wal on (issue #16); a server without it."""
    import psycopg

    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET summarize_wal = off")
        conn.execute("SELECT pg_reload_conf()")
    yield
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM RESET summarize_wal")
        conn.execute("SELECT pg_reload_conf()")


def test_incremental_ticks_without_summaries_are_skipped(
    sql, inproc_worker, storage_env, no_summaries
) -> None:
    from workers.broker import broker

    # A server with summarize_wal off: no incremental is possible, and an hourly full base
    # backup would be far too heavy: the tick does nothing, with a warning.
    with structlog.testing.capture_logs() as logs:
        backups.backup_base.send(tick="2026-11-23T04:30:00+00:00", incremental=True)
        broker.join("backups", timeout=120_000)
    assert sql.execute("SELECT count(*) FROM backups").fetchone() == (0,)
    assert any(e["event"] == "backup_incremental_unavailable" for e in logs)


def test_incremental_tick_without_a_full_base_takes_a_full_one_then_incrementals(
    sql, inproc_worker, storage_env, summarize_wal
) -> None:
    from workers.broker import broker

    for hour in ("04:30", "05:30"):
        backups.backup_base.send(tick=f"2026-11-23T{hour}:00+00:00", incremental=True)
        broker.join("backups", timeout=120_000)
    rows = sql.execute("SELECT kind, status, parent_id FROM backups ORDER BY id").fetchall()
    assert [r[:2] for r in rows] == [("base", "complete"), ("incremental", "complete")]
    assert rows[1][2] is not None  # the incremental names its full base
