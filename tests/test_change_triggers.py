"""App writes -> outbox rows, written by triggers in the same transaction as the change."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from db import migrate
from db.cache_keys import CACHE_MAP


def new_user(sql: Any, email: str, **cols: Any) -> str:
    names = ["email", *cols]
    values = [email, *cols.values()]
    row = sql.execute(
        f"INSERT INTO users ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))}) "
        "RETURNING id",
        values,
    ).fetchone()
    return str(row[0])


def new_moment(sql: Any, user_id: str, *, status: str = "active", title: str = "Tea") -> str:
    row = sql.execute(
        "INSERT INTO moments (user_id, title, category, location, date, status) "
        "VALUES (%s, %s, 'food', 'Kadikoy', now() + interval '1 day', %s) RETURNING id",
        (user_id, title, status),
    ).fetchone()
    return str(row[0])


def outbox(sql: Any, actor: str | None = None) -> list[tuple[str, str, Any, Any]]:
    rows = sql.execute("SELECT actor, queue_name, args, kwargs FROM outbox ORDER BY id").fetchall()
    return [tuple(r) for r in rows if actor is None or r[0] == actor]


def test_new_user_writes_a_welcome_row_and_a_cache_row(sql) -> None:
    uid = new_user(sql, "ayse@example.com", username="ayse")
    assert outbox(sql, "send_welcome_email") == [("send_welcome_email", "emails", [uid], {})]
    [(_, queue, _, kwargs)] = outbox(sql, "invalidate")
    assert queue == "cache"
    assert kwargs == {
        "table": "users",
        "rows": [{"id": uid, "email": "ayse@example.com", "username": "ayse"}],
    }


def test_users_that_cannot_be_welcomed_get_no_welcome_row(sql) -> None:
    new_user(sql, "")
    sql.execute("INSERT INTO users (email, deleted_at) VALUES ('gone@example.com', now())")
    assert outbox(sql, "send_welcome_email") == []


def test_bulk_insert_writes_one_row_per_user_and_one_cache_row(sql) -> None:
    sql.execute(
        "INSERT INTO users (email) SELECT 'u' || g || '@example.com' FROM generate_series(1, 50) g"
    )
    assert len(outbox(sql, "send_welcome_email")) == 50
    [(_, _, _, kwargs)] = outbox(sql, "invalidate")
    assert len(kwargs["rows"]) == 50


def test_rolled_back_change_leaves_no_outbox_row(db) -> None:
    with psycopg.connect(db) as conn:
        conn.execute("INSERT INTO users (email) VALUES ('never@example.com')")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)


def test_outbox_rows_from_triggers_notify_the_relay_channel(db, sql) -> None:
    with psycopg.connect(db, autocommit=True) as listener:
        listener.execute("LISTEN tidemill_outbox")
        new_user(sql, "wake@example.com")
        got = list(listener.notifies(timeout=10, stop_after=1))
    # (one wake-up per distinct payload since migration 0016: the welcome job's plain one and
    # the cache row's, which carries its change, may come together)
    assert got and {n.channel for n in got} == {"tidemill_outbox"}


def test_active_moment_fans_out_and_a_draft_only_when_published(sql) -> None:
    uid = new_user(sql, "creator@example.com")
    active = new_moment(sql, uid)
    draft = new_moment(sql, uid, status="draft")
    assert [r[2] for r in outbox(sql, "fan_out")] == [["new_moment", active]]
    # an edit of an active moment does not fan out again
    sql.execute("UPDATE moments SET title = 'Coffee' WHERE id = %s", (active,))
    sql.execute("UPDATE moments SET status = 'active' WHERE id = %s", (draft,))
    assert [r[2] for r in outbox(sql, "fan_out")] == [
        ["new_moment", active],
        ["new_moment", draft],
    ]
    assert all(r[1] == "notifications" for r in outbox(sql, "fan_out"))


def test_update_sends_old_and_new_key_columns_in_one_row(sql) -> None:
    uid = new_user(sql, "old@example.com", username="old")
    sql.execute("DELETE FROM outbox")
    sql.execute("UPDATE users SET email = 'new@example.com', username = NULL WHERE id = %s", (uid,))
    [(_, _, _, kwargs)] = outbox(sql, "invalidate")
    assert kwargs["table"] == "users"
    assert sorted(kwargs["rows"], key=json.dumps) == sorted(
        [
            {"id": uid, "email": "old@example.com", "username": "old"},
            {"id": uid, "email": "new@example.com", "username": None},
        ],
        key=json.dumps,
    )


def test_delete_and_empty_statements(sql) -> None:
    uid = new_user(sql, "c@example.com")
    mid = new_moment(sql, uid)
    sql.execute("DELETE FROM outbox")
    sql.execute("UPDATE moments SET title = 'x' WHERE false")  # touches no row
    assert outbox(sql) == []
    sql.execute("DELETE FROM moments WHERE id = %s", (mid,))
    assert outbox(sql, "invalidate") == [
        ("invalidate", "cache", [], {"table": "moments", "rows": [{"id": mid}]})
    ]


def test_installed_triggers_carry_the_columns_of_the_declarative_map(sql) -> None:
    rows = sql.execute(
        """
        SELECT c.relname, t.tgname, t.tgargs
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_proc p ON p.oid = t.tgfoid
        WHERE p.proname = 'tidemill_cache_outbox'
        """
    ).fetchall()
    installed: dict[str, set[tuple[str, ...]]] = {}
    for table, _, raw in rows:
        args = tuple(a.decode() for a in bytes(raw).split(b"\x00") if a)
        installed.setdefault(table, set()).add(args)
    tables = {r[0] for r in sql.execute("SELECT tablename FROM pg_tables").fetchall()}
    expected = {t: {CACHE_MAP[t].columns} for t in CACHE_MAP if t in tables}
    assert expected and installed == expected
    # three triggers (insert, update, delete) per cached table
    assert sorted(r[1] for r in rows if r[0] == "users") == [
        "users_cache_delete",
        "users_cache_insert",
        "users_cache_update",
    ]


def test_migration_0004_downgrades_and_upgrades_again(servers) -> None:
    name = "triggers_roundtrip"
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = servers.pg.url(name)
    try:
        migrate.upgrade(url, "0004")
        from alembic import command

        command.downgrade(migrate.alembic_config(url), "0003")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT to_regclass('follows')").fetchone() == (None,)
            assert conn.execute(
                "SELECT count(*) FROM pg_proc WHERE proname LIKE 'tidemill_%%_outbox'"
            ).fetchone() == (0,)
        migrate.upgrade(url, "0004")
        assert migrate.current(url) == "0004"
    finally:
        from db.engine import dispose_all

        dispose_all()
        with psycopg.connect(servers.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("status", ["draft", "cancelled"])
def test_inactive_moments_do_not_fan_out(sql, status: str) -> None:
    uid = new_user(sql, "d@example.com")
    new_moment(sql, uid, status=status)
    assert outbox(sql, "fan_out") == []


def test_outbox_backlog_counts_pending_rows_and_the_oldest_age(sql) -> None:
    from workers.outbox import outbox_backlog

    assert outbox_backlog() == (0, None)
    sql.execute(
        "INSERT INTO outbox (actor, created_at) VALUES "
        "('a', now() - interval '1 hour'), ('b', now()), ('c', now() - interval '2 hours')"
    )
    sql.execute("UPDATE outbox SET dispatched_at = now() WHERE actor = 'c'")  # sent: not counted
    pending, oldest = outbox_backlog()
    assert pending == 2
    assert oldest is not None and 3600 <= oldest < 7200
