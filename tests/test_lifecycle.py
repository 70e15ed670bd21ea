"""The retention engine against the real Postgres: batches, runs, dry runs, locks, the actor."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pipelines.lifecycle.engine import PipelineBusy, lock_key, run_pipeline
from pipelines.lifecycle.policies import Policy, get_policy
from tests.conftest import run_cli
from tests.support import lifecycle as _lifecycle
from tests.support.lifecycle import add_notifications, make_user

# fixtures from tests/support, registered by assignment (not an import) so that
# test parameters named like them do not shadow an import
file_storage = _lifecycle.file_storage


NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)


def _policy(name: str, **changes: Any) -> Policy:
    return dataclasses.replace(get_policy(name), **changes)


def test_notifications_older_than_90_days_go_in_batches(sql, file_storage) -> None:
    # Given 250 notifications older than 90 days and 40 younger ones
    user = make_user(sql)
    add_notifications(sql, user=user, n=250, start=NOW - timedelta(days=200), step="1 hour")
    add_notifications(sql, user=user, n=40, start=NOW - timedelta(days=80), step="1 hour")
    # When the purge runs with batches of 60
    result = run_pipeline(
        "notifications-purge", now=NOW, policy=_policy("notifications-purge", batch_size=60)
    )
    # Then exactly the old ones are gone, in ceil(250/60) = 5 batches, and the run is recorded
    left = sql.execute("SELECT count(*), min(created_at) FROM notifications").fetchone()
    assert left[0] == 40
    assert left[1] >= NOW - timedelta(days=90)
    assert result.stats.rows_affected == 250
    assert result.stats.batches == 5
    run = sql.execute(
        "SELECT status, rows_scanned, rows_affected, dry_run, finished_at IS NOT NULL "
        "FROM pipeline_runs WHERE id = %s",
        (result.run_id,),
    ).fetchone()
    assert run == ("succeeded", 250, 250, False, True)


def test_dry_run_changes_nothing_and_says_what_it_would_do(sql, file_storage) -> None:
    user = make_user(sql)
    add_notifications(sql, user=user, n=30, start=NOW - timedelta(days=200))
    result = run_pipeline("notifications-purge", now=NOW, dry_run=True)
    assert sql.execute("SELECT count(*) FROM notifications").fetchone()[0] == 30
    assert result.plan.eligible_rows == 30
    assert any("delete 30 rows" in line for line in result.plan.lines())
    # a dry run changes nothing, not even the run log: no row, read-only sessions
    assert result.status == "dry-run" and result.run_id == 0
    assert sql.execute("SELECT count(*) FROM pipeline_runs").fetchone()[0] == 0


def test_the_same_pipeline_never_runs_twice_at_once(sql, db, file_storage) -> None:
    # Given another session holds the pipeline's lock (a run in progress elsewhere)
    with psycopg.connect(db, autocommit=True) as other:
        other.execute(
            "SELECT pg_advisory_lock(hashtextextended(%s, 0))", (lock_key("notifications-purge"),)
        )
        with pytest.raises(PipelineBusy):
            run_pipeline("notifications-purge", now=NOW)
        # a different pipeline is not blocked
        run_pipeline("refresh-tokens-expire", now=NOW)
    # once released, it runs
    assert run_pipeline("notifications-purge", now=NOW).status == "succeeded"


def test_expire_refresh_tokens_and_email_verifications(sql, file_storage) -> None:
    user = make_user(sql)
    sql.execute(
        "INSERT INTO refresh_tokens (user_id, token_hash, expires_at, created_at) "
        "SELECT %s, 'h' || g, %s, %s - (g * interval '1 day') FROM generate_series(1, 10) g",
        (user, NOW + timedelta(days=1), NOW),
    )
    sql.execute(
        "INSERT INTO email_verifications (user_id, email, code, expires_at) "
        "SELECT %s, 'x@example.com', 'c' || g, %s - (g * interval '12 hours') "
        "FROM generate_series(1, 6) g",
        (user, NOW),
    )
    run_pipeline("refresh-tokens-expire", now=NOW)
    run_pipeline("email-verifications-expire", now=NOW)
    # tokens created 1..10 days ago: older than 7 days -> 8, 9, 10 gone
    assert sql.execute("SELECT count(*) FROM refresh_tokens").fetchone()[0] == 7
    # codes expired 12h..72h ago: more than a day ago -> 36h, 48h, 60h, 72h gone
    assert sql.execute("SELECT count(*) FROM email_verifications").fetchone()[0] == 2


def test_batches_are_short_transactions_with_timeouts(sql, db, file_storage) -> None:
    """A row lock held by an app transaction makes the batch give up after lock_timeout
    instead of waiting behind it; the run fails clearly and the next one finishes."""
    user = make_user(sql)
    add_notifications(sql, user=user, n=5, start=NOW - timedelta(days=200))
    from core.settings import Settings

    settings = dataclasses.replace(Settings.from_env(), pipeline_lock_timeout_ms=200)
    with psycopg.connect(db) as app:
        app.execute("SELECT * FROM notifications FOR UPDATE").fetchall()
        with pytest.raises(psycopg.errors.LockNotAvailable):
            run_pipeline("notifications-purge", now=NOW, settings=settings)
        app.rollback()
    failed = sql.execute(
        "SELECT status, error FROM pipeline_runs ORDER BY id DESC LIMIT 1"
    ).fetchone()
    assert failed[0] == "failed" and "LockNotAvailable" in failed[1]
    assert run_pipeline("notifications-purge", now=NOW, settings=settings).stats.rows_affected == 5


def test_actor_runs_the_named_pipeline(sql, inproc_worker, file_storage) -> None:
    from workers.broker import broker
    from workers.lifecycle import run_pipeline as actor

    actor.send("refresh-tokens-expire", tick="2026-06-15T12:00:00+00:00")
    broker.join("pipelines", timeout=30_000)
    inproc_worker.join()
    row = sql.execute(
        "SELECT pipeline, status, tick FROM pipeline_runs ORDER BY id DESC LIMIT 1"
    ).fetchone()
    assert row[0] == "refresh-tokens-expire" and row[1] == "succeeded"
    assert row[2] == datetime(2026, 6, 15, 12, 0, tzinfo=UTC)


def test_cli_list_run_history(sql, file_storage) -> None:
    listed = run_cli("pipeline", "list")
    assert listed.returncode == 0, listed.stderr
    for name in ("messages-archive", "notifications-purge", "deleted-users-erase"):
        assert name in listed.stdout
    assert "does not exist" not in listed.stdout
    dry = run_cli("pipeline", "run", "notifications-purge", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "nothing changed" in dry.stdout and "delete 0 rows" in dry.stdout
    real = run_cli("pipeline", "run", "notifications-purge")
    assert real.returncode == 0 and "succeeded" in real.stdout
    history = run_cli("pipeline", "history")
    assert history.returncode == 0
    assert history.stdout.count("notifications-purge") == 1  # a dry run leaves no run row
    unknown = run_cli("pipeline", "run", "no-such-thing")
    assert unknown.returncode == 2
    assert "no pipeline named 'no-such-thing'" in unknown.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("pipeline", "list"),
        ("pipeline", "run"),
        ("pipeline", "history"),
        ("archive", "list"),
        ("archive", "restore"),
        ("gdpr", "erase"),
        ("gdpr", "export"),
    ],
)
def test_lifecycle_commands_have_help(command: tuple[str, str]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
