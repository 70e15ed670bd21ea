"""Monthly partitions of notifications and messages: schema, maintenance, drop of whole months."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta

import psycopg

from pipelines.lifecycle import partitions as parts
from pipelines.lifecycle.engine import run_pipeline
from pipelines.lifecycle.policies import get_policy
from tests.support import lifecycle as _lifecycle
from tests.support.lifecycle import (
    add_messages,
    add_notifications,
    make_conversation,
    make_user,
)

# fixtures from tests/support, registered by assignment (not an import) so that
# test parameters named like them do not shadow an import
file_storage = _lifecycle.file_storage


def test_notifications_and_messages_are_partitioned_by_month(sql) -> None:
    today = datetime.now(UTC).date()
    for table in ("notifications", "messages"):
        assert parts.is_partitioned(sql, table)
        pk = sql.execute(
            "SELECT array_agg(a.attname ORDER BY a.attname) FROM pg_index i "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = %s::regclass AND i.indisprimary",
            (table,),
        ).fetchone()[0]
        assert pk == ["created_at", "id"]
        listed = parts.list_partitions(sql, table)
        months = {p.lo.date() for p in listed if p.lo}
        this_month = parts.month_start(today)
        assert {parts.add_months(this_month, i) for i in range(4)} <= months
        assert listed[-1].is_default and all(p.schema == "partitions" for p in listed)
        # the indexes and foreign keys of the old table survived
        idx = {
            r[0]
            for r in sql.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename = %s",
                (table,),
            )
        }
        assert f"ix_{table}_created_at_id" in idx


def test_rows_land_in_their_month_or_the_default(sql) -> None:
    user = make_user(sql)
    now = datetime.now(UTC)
    add_notifications(sql, user=user, n=3, start=now - timedelta(minutes=10))
    add_notifications(sql, user=user, n=2, start=datetime(2019, 1, 10, tzinfo=UTC))
    where = dict(
        sql.execute(
            "SELECT tableoid::regclass::text, count(*) FROM notifications GROUP BY 1"
        ).fetchall()
    )
    assert where[f"partitions.notifications_p{now:%Y_%m}"] == 3
    assert where["partitions.notifications_default"] == 2


def test_creating_a_month_moves_its_rows_out_of_the_default(sql, db) -> None:
    user = make_user(sql)
    add_notifications(sql, user=user, n=5, start=datetime(2020, 3, 1, tzinfo=UTC), step="1 day")
    with psycopg.connect(db, autocommit=True) as conn:
        moved = parts.create_month(conn, "notifications", date(2020, 3, 1))
    assert moved == 5
    assert sql.execute("SELECT count(*) FROM partitions.notifications_p2020_03").fetchone()[0] == 5
    assert sql.execute("SELECT count(*) FROM partitions.notifications_default").fetchone()[0] == 0
    assert sql.execute("SELECT count(*) FROM notifications").fetchone()[0] == 5


def test_maintenance_creates_future_months(sql, file_storage) -> None:
    later = datetime.now(UTC) + timedelta(days=200)
    policy = dataclasses.replace(get_policy("notifications-partitions"), months_ahead=2)
    dry = run_pipeline("notifications-partitions", now=later, policy=policy, dry_run=True)
    want = [
        parts.partition_name("notifications", parts.add_months(parts.month_start(later), i))
        for i in range(3)
    ]
    assert list(dry.plan.created) == [w for w in want if w in dry.plan.created]
    assert dry.plan.created  # 200 days ahead is beyond the migration's 3 months
    names = {p.name for p in parts.list_partitions(sql, "notifications")}
    assert not set(dry.plan.created) & names  # dry run created nothing
    run_pipeline("notifications-partitions", now=later, policy=policy)
    names = {p.name for p in parts.list_partitions(sql, "notifications")}
    assert set(want) <= names
    # a second run has nothing to do
    again = run_pipeline("notifications-partitions", now=later, policy=policy)
    assert again.plan.created == ()


def test_purge_drops_expired_months_whole_and_deletes_only_the_boundary(
    sql, db, file_storage
) -> None:

    # Given notifications in two whole expired months, the boundary month and a recent one
    now = datetime(2026, 6, 15, 12, tzinfo=UTC)  # cutoff: 90 days before, 2026-03-17 12:00
    user = make_user(sql)
    with psycopg.connect(db, autocommit=True) as conn:
        for m in (date(2026, 1, 1), date(2026, 2, 1), date(2026, 3, 1), date(2026, 6, 1)):
            parts.create_month(conn, "notifications", m)
    for month in (1, 2, 3, 6):
        add_notifications(
            sql,
            user=user,
            n=31,
            start=datetime(2026, month, 1, tzinfo=UTC) - timedelta(hours=12),
            step="1 day",
        )  # one row per day, 1st..31st at 12:00 (March: 31 rows, 16 before the cutoff)
    total = sql.execute("SELECT count(*) FROM notifications").fetchone()[0]
    # When the purge plans and runs
    dry = run_pipeline("notifications-purge", now=now, dry_run=True)
    assert set(dry.plan.drop_partitions) >= {
        "partitions.notifications_p2026_01",
        "partitions.notifications_p2026_02",
    }
    assert "partitions.notifications_p2026_03" not in dry.plan.drop_partitions
    result = run_pipeline("notifications-purge", now=now)
    # Then January and February are gone as partitions; March lost only its expired days
    names = {p.name for p in parts.list_partitions(sql, "notifications")}
    assert "notifications_p2026_01" not in names and "notifications_p2026_02" not in names
    assert "notifications_p2026_03" in names
    left = sql.execute("SELECT count(*), min(created_at) FROM notifications").fetchone()
    cutoff = now - timedelta(days=90)
    assert left[1] >= cutoff
    expired = sql.execute(
        "SELECT count(*) FROM partitions.notifications_p2026_03 WHERE created_at < %s", (cutoff,)
    ).fetchone()[0]
    assert expired == 0
    assert result.stats.rows_affected == total - left[0]
    assert result.plan.rows_in_dropped_partitions > 0 and result.plan.rows_by_batch > 0


def test_archive_drops_months_it_emptied(sql, db, file_storage) -> None:
    now = datetime(2026, 6, 15, 12, tzinfo=UTC)
    a, b = make_user(sql), make_user(sql)
    conv = make_conversation(sql, [a, b])
    with psycopg.connect(db, autocommit=True) as conn:
        parts.create_month(conn, "messages", date(2023, 1, 1))
    add_messages(sql, conversation=conv, sender=a, n=20, start=datetime(2023, 1, 2, tzinfo=UTC))
    run_pipeline("messages-archive", now=now)
    names = {p.name for p in parts.list_partitions(sql, "messages")}
    assert "messages_p2023_01" not in names
    assert sql.execute("SELECT count(*) FROM archive_objects").fetchone()[0] == 1


def test_archive_drop_keeps_a_month_that_got_a_row_after_its_emptiness_check(sql, db) -> None:
    # Given an expired month the archive emptied, and found empty
    a, b = make_user(sql), make_user(sql)
    conv = make_conversation(sql, [a, b])
    with psycopg.connect(db, autocommit=True) as conn:
        parts.create_month(conn, "messages", date(2023, 2, 1))
        parts.create_month(conn, "messages", date(2023, 3, 1))
    month = next(p for p in parts.list_partitions(sql, "messages") if p.name == "messages_p2023_02")
    assert not sql.execute("SELECT EXISTS (SELECT 1 FROM partitions.messages_p2023_02)").fetchone()[
        0
    ]
    # When a row lands in it between that check and the drop
    add_messages(sql, conversation=conv, sender=a, n=1, start=datetime(2023, 2, 3, tzinfo=UTC))
    with psycopg.connect(db, autocommit=True) as conn:
        dropped = parts.drop_partition(conn, "messages", month, require_empty=True)
    # Then the drop is abandoned: the partition is still attached and the row still there
    assert dropped is False
    names = {p.name for p in parts.list_partitions(sql, "messages")}
    assert "messages_p2023_02" in names
    assert (
        sql.execute("SELECT count(*) FROM messages WHERE created_at < '2023-03-01'").fetchone()[0]
        == 1
    )
    # while a month still empty under the lock is dropped
    march = next(p for p in parts.list_partitions(sql, "messages") if p.name == "messages_p2023_03")
    with psycopg.connect(db, autocommit=True) as conn:
        assert parts.drop_partition(conn, "messages", march, require_empty=True) is True
    assert "messages_p2023_03" not in {p.name for p in parts.list_partitions(sql, "messages")}
