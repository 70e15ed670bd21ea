"""tidemill's own tables on the default policies: each removes or archives exactly the rows
past its horizon and nothing else; the webhook dedup window outlives Stripe's retries."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pipelines.lifecycle.engine import run_pipeline
from pipelines.lifecycle.policies import PolicyError, get_policy, parse_policies
from tests.support import lifecycle as _lifecycle
from tests.support.lifecycle import archived_ids, make_user

file_storage = _lifecycle.file_storage

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
MARGIN = timedelta(minutes=5)


def _event(sql: Any, received_at: datetime, status: str) -> str:
    event_id = f"evt_{uuid.uuid4().hex[:16]}"
    sql.execute(
        "INSERT INTO webhook_events (id, type, created, livemode, payload, status, received_at) "
        "VALUES (%s, 'charge.succeeded', %s, false, %s, %s, %s)",
        (event_id, received_at, json.dumps({"id": event_id}), status, received_at),
    )
    return event_id


def _outbox(
    sql: Any, done_at: datetime | None, error: str | None = None, *, dispatched: bool = True
) -> str:
    at = done_at or NOW - timedelta(days=30)
    row = sql.execute(
        "INSERT INTO outbox (actor, kwargs, created_at, dispatched_at, done_at, last_error) "
        "VALUES ('noop', '{}', %s, %s, %s, %s) RETURNING id",
        (at, at if dispatched else None, done_at, error),
    ).fetchone()
    return str(row[0])


def _tick(sql: Any, fired_at: datetime) -> str:
    row = sql.execute(
        "INSERT INTO schedule_ticks (schedule, tick, fired_at) VALUES ('s', %s, %s) RETURNING id",
        (fired_at, fired_at),
    ).fetchone()
    return str(row[0])


def _run(sql: Any, started_at: datetime, status: str, pending: bool = False) -> str:
    row = sql.execute(
        "INSERT INTO pipeline_runs (pipeline, started_at, status, progress) "
        "VALUES ('other', %s, %s, %s) RETURNING id",
        (started_at, status, json.dumps({"pending": "k"} if pending else {})),
    ).fetchone()
    return str(row[0])


def _delivery(sql: Any, claimed_at: datetime, status: str) -> str:
    user = make_user(sql)
    row = sql.execute(
        "INSERT INTO email_deliveries (kind, user_id, status, claimed_at) "
        "VALUES ('welcome', %s, %s, %s) RETURNING id",
        (user, status, claimed_at),
    ).fetchone()
    return str(row[0])


def _ids(sql: Any, table: str) -> set[str]:
    return {str(r[0]) for r in sql.execute(f"SELECT id FROM {table}").fetchall()}


# table -> (rows that must go, rows that must stay), built around the policy's cutoff
def _arrange(sql: Any, name: str, cutoff: datetime) -> tuple[str, set[str], set[str]]:
    old, young = cutoff - MARGIN, cutoff + MARGIN
    if name == "webhook-events-archive":
        go = {_event(sql, old, "processed"), _event(sql, old, "ignored")}
        stay = {
            _event(sql, young, "processed"),
            _event(sql, old, "failed"),  # kept until resolved
            _event(sql, old, "received"),  # not processed yet
        }
        return "webhook_events", go, stay
    if name == "outbox-relayed-prune":
        go = {_outbox(sql, old), _outbox(sql, old)}
        stay = {
            _outbox(sql, young),
            _outbox(sql, None),  # dispatched long ago, not done: the rescuer's record
            _outbox(sql, None, dispatched=False),  # not relayed yet
            _outbox(sql, old, "unknown actor"),
        }
        return "outbox", go, stay
    if name == "schedule-ticks-prune":
        return "schedule_ticks", {_tick(sql, old)}, {_tick(sql, young)}
    if name == "pipeline-runs-prune":
        go = {_run(sql, old, "succeeded"), _run(sql, old, "failed")}
        stay = {
            _run(sql, young, "succeeded"),
            _run(sql, old, "failed", pending=True),  # its orphan is still to be removed
            _run(sql, old, "running"),
        }
        return "pipeline_runs", go, stay
    if name == "email-deliveries-prune":
        go = {_delivery(sql, old, "sent"), _delivery(sql, old, "skipped")}
        stay = {_delivery(sql, young, "sent"), _delivery(sql, old, "failed")}
        return "email_deliveries", go, stay
    raise AssertionError(name)


OWN = [
    "webhook-events-archive",
    "outbox-relayed-prune",
    "schedule-ticks-prune",
    "pipeline-runs-prune",
    "email-deliveries-prune",
]


@pytest.mark.parametrize("name", OWN)
def test_each_default_policy_takes_exactly_the_rows_past_its_horizon(
    sql, file_storage, name
) -> None:
    policy = get_policy(name)
    cutoff = policy.cutoff(NOW)
    # Given rows just past the horizon, just inside it, and past it but excluded by status
    table, go, stay = _arrange(sql, name, cutoff)
    before = _ids(sql, table)
    # When the default policy runs
    result = run_pipeline(name, now=NOW)
    # Then exactly the rows past the horizon are gone, the others untouched
    left = _ids(sql, table)
    if table == "pipeline_runs":
        left.discard(str(result.run_id))  # the run's own row
    assert left == before - go, (sorted(go), sorted(left))
    assert stay <= left
    assert result.stats.rows_affected == len(go)
    if policy.action == "archive":
        # archived, not lost: every gone row is in storage, once
        assert sorted(archived_ids(file_storage, f"{table}/")) == sorted(go)


def test_the_default_horizons_are_documented_and_outlast_stripes_retries() -> None:
    events = get_policy("webhook-events-archive")
    # Stripe retries for up to 3 days: the dedup window (the row's life) is far longer
    assert events.cutoff(NOW) <= NOW - timedelta(days=30)
    assert get_policy("outbox-relayed-prune").cutoff(NOW) == NOW - timedelta(hours=1)


@pytest.mark.parametrize("age", ["1 day", "3 days", "72 hours", "4319 minutes"])
def test_an_override_that_would_break_the_dedup_window_is_refused(age: str) -> None:
    text = f"""
[[policy]]
name = "webhook-events-archive"
table = "webhook_events"
age_column = "received_at"
age = "{age}"
action = "archive"
schedule = "0 3 * * *"
"""
    with pytest.raises(PolicyError, match="Stripe retries"):
        parse_policies(text)


def test_an_override_with_a_longer_window_is_accepted() -> None:
    (policy,) = parse_policies(
        """
[[policy]]
name = "webhook-events-archive"
table = "webhook_events"
age_column = "received_at"
age = "90 days"
action = "archive"
filter = "status IN ('processed', 'ignored')"
schedule = "0 3 * * *"
"""
    )
    assert policy.cutoff(NOW) == NOW - timedelta(days=90)


def test_a_resent_event_inside_the_dedup_window_is_still_recognised(sql, file_storage) -> None:
    """Stripe re-sends an event up to 3 days later: after the retention pipeline ran at any
    point of that window, the re-sent event is acknowledged as a duplicate, applied once."""
    from core.settings import get_settings
    from tests.test_webhook_intake import client_for, post_signed, sample_event

    event = sample_event(f"evt_{uuid.uuid4().hex[:12]}")
    payload = json.dumps(event)
    with client_for(get_settings()) as client:
        first = post_signed(client, payload)
        assert first.json() == {"received": True, "duplicate": False}
        received = sql.execute(
            "SELECT received_at FROM webhook_events WHERE id = %s", (event["id"],)
        ).fetchone()[0]
        sql.execute(
            "UPDATE webhook_events SET status = 'processed', processed_at = now() WHERE id = %s",
            (event["id"],),
        )
        # When the archive pipeline runs at the end of Stripe's retry window (and beyond it,
        # up to a day before the horizon)
        for later in (timedelta(days=3), timedelta(days=3, hours=1), timedelta(days=29)):
            run_pipeline("webhook-events-archive", now=received + later)
            # Then Stripe's re-send is recognised: nothing new stored or queued
            again = post_signed(client, payload, timestamp=int(time.time()) + 1)
            assert again.json() == {"received": True, "duplicate": True}, later
        assert sql.execute("SELECT count(*) FROM outbox").fetchone()[0] == 1
        # and past the horizon the event is archived (no longer a duplicate by then)
        run_pipeline("webhook-events-archive", now=received + timedelta(days=31))
        assert sql.execute("SELECT count(*) FROM webhook_events").fetchone()[0] == 0
        assert archived_ids(file_storage, "webhook_events/") == [event["id"]]
