"""Pomi end to end (seed 004): its own schema, `tidemill app attach pomi`, its flows driven by
SQL with the real relay and worker, its retention by the real pipelines.

The key map (user:{id}, user:email:…, user:username:…, event:{id}, events:upcoming,
event:rsvps:{id}) is invalidated on change; expired e-mail verifications and auth tokens go;
soft-deleted rows are purged; a backup is taken before a change to the app's schema.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import workers.actors  # noqa: F401  (every actor the triggers name)
from tests.conftest import Servers, run_cli
from tests.support import smtp as _smtp
from tests.support.apps import create_app_database, pump, serving
from tests.support.smtp import SmtpServer

smtp_server = _smtp.smtp_server

DB = "app_pomi"


@pytest.fixture
def pomi(servers: Servers, db: str) -> Iterator[tuple[str, str]]:
    url = servers.pg.url(DB)
    create_app_database(servers.admin_url, url, DB, "pomi")
    out = run_cli("app", "attach", "pomi", env=servers.env(DATABASE_URL=url))
    assert out.returncode == 0, out.stdout + out.stderr
    yield url, out.stdout


def one(sql: Any, query: str, *params: Any) -> Any:
    row = sql.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def run_policy(name: str) -> None:
    out = run_cli("pipeline", "run", name, env=dict(os.environ))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_pomi_end_to_end(
    pomi: tuple[str, str],
    inproc_worker: Any,
    redis_client: Any,
    smtp_server: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, attach_output = pomi
    monkeypatch.setenv("MAIL_URL", smtp_server.url)
    monkeypatch.setenv("MAIL_FROM", "Pomi <hello@pomi.test>")
    # --- a backup was taken before attach touched the app's schema ---
    assert "backup before changing the app's schema" in attach_output
    with psycopg.connect(url, autocommit=True) as sql:
        backups = sql.execute("SELECT kind, status FROM tidemill.backups").fetchall()
    assert backups == [("full", "complete")]

    with serving("pomi", url), psycopg.connect(url, autocommit=True) as sql:
        # --- users: three keys per user, old and new values on change ---
        uid = str(uuid.uuid4())
        keys = [f"user:{uid}", "user:email:abeba@pomi.test", "user:username:abeba"]
        for key in keys:
            redis_client.set(key, "cached")
        sql.execute(
            "INSERT INTO users (id, email, username, password_hash, language) "
            "VALUES (%s, 'abeba@pomi.test', 'abeba', 'x', 'am')",
            (uid,),
        )
        pump(sql, inproc_worker)
        assert redis_client.exists(*keys) == 0
        # the welcome e-mail, in the user's language (Amharic), once
        welcome = smtp_server.to("abeba@pomi.test")
        assert [m["Subject"] for m in welcome] == ["እንኳን ወደ ፖሚ በደህና መጡ፣ abeba!"]
        for key in [*keys, "user:email:new@pomi.test"]:
            redis_client.set(key, "cached")
        redis_client.set("user:email:other@pomi.test", "kept")
        sql.execute("UPDATE users SET email = 'new@pomi.test' WHERE id = %s", (uid,))
        pump(sql, inproc_worker)
        assert redis_client.exists(*keys, "user:email:new@pomi.test") == 0
        assert redis_client.get("user:email:other@pomi.test") == "kept"

        # --- events, the upcoming list and RSVPs ---
        eid = str(uuid.uuid4())
        for key in (f"event:{eid}", "events:upcoming", f"event:rsvps:{eid}"):
            redis_client.set(key, "cached")
        sql.execute(
            "INSERT INTO events (id, user_id, title, start_date, end_date, status) VALUES "
            "(%s, %s, 'Buna', now() + interval '2 days', now() + interval '2 days 2 hours', "
            "'published')",
            (eid, uid),
        )
        pump(sql, inproc_worker)
        assert redis_client.exists(f"event:{eid}", "events:upcoming") == 0
        assert redis_client.exists(f"event:rsvps:{eid}") == 1  # no RSVP changed yet
        sql.execute("INSERT INTO event_rsvps (event_id, user_id) VALUES (%s, %s)", (eid, uid))
        pump(sql, inproc_worker)
        assert redis_client.exists(f"event:rsvps:{eid}") == 0

        # --- expiry: verification codes and auth tokens a day past expiry go ---
        sql.execute(
            "INSERT INTO email_verifications (user_id, email, code, expires_at) VALUES "
            "(%s, 'new@pomi.test', 'OLD1', now() - interval '2 days'), "
            "(%s, 'new@pomi.test', 'NEW1', now() + interval '1 hour')",
            (uid, uid),
        )
        sql.execute(
            "INSERT INTO auth_tokens (user_id, token, expires_at) VALUES "
            "(%s, 'tok-old', now() - interval '2 days'), "
            "(%s, 'tok-new', now() + interval '1 hour')",
            (uid, uid),
        )
        # --- soft deletes: rows deleted more than 30 days ago are purged ---
        gone = str(uuid.uuid4())
        sql.execute(
            "INSERT INTO users (id, email, username, password_hash, status, deleted_at) VALUES "
            "(%s, 'gone@pomi.test', 'gone', 'x', 'deleted', now() - interval '31 days')",
            (gone,),
        )
        sql.execute(
            "INSERT INTO marketplace_listings (seller_id, title, deleted_at) VALUES "
            "(%s, 'old sofa', now() - interval '40 days'), (%s, 'lamp', now() - interval '1 day'),"
            " (%s, 'chair', NULL)",
            (uid, uid, uid),
        )
        sql.execute(
            "INSERT INTO businesses (owner_id, business_name, deleted_at) VALUES "
            "(%s, 'Closed Cafe', now() - interval '31 days'), (%s, 'Open Cafe', NULL)",
            (uid, uid),
        )
        sql.execute(
            "INSERT INTO events (user_id, title, start_date, end_date, deleted_at) VALUES "
            "(%s, 'Cancelled', now(), now(), now() - interval '35 days')",
            (uid,),
        )
        pump(sql, inproc_worker)
        redis_client.set(f"user:{gone}", "cached")
        redis_client.set("user:username:gone", "cached")
        # one as the scheduler's CLI would, as a process; the rest in this process (faster)
        run_policy("deleted-users-purge")
        from pipelines.lifecycle.engine import run_pipeline

        for policy in (
            "email-verifications-expire",
            "auth-tokens-expire",
            "deleted-listings-purge",
            "deleted-businesses-purge",
            "deleted-events-purge",
        ):
            run_pipeline(policy)
        pump(sql, inproc_worker)
        assert [r[0] for r in sql.execute("SELECT code FROM email_verifications")] == ["NEW1"]
        assert [r[0] for r in sql.execute("SELECT token FROM auth_tokens")] == ["tok-new"]
        assert one(sql, "SELECT count(*) FROM users WHERE id = %s", gone) == 0
        listings = sorted(r[0] for r in sql.execute("SELECT title FROM marketplace_listings"))
        assert listings == ["chair", "lamp"]
        names = [r[0] for r in sql.execute("SELECT business_name FROM businesses")]
        assert names == ["Open Cafe"]
        assert [r[0] for r in sql.execute("SELECT title FROM events")] == ["Buna"]
        assert smtp_server.to("gone@pomi.test") == []  # inserted deleted: no welcome
        # the purge's DELETE went through the users trigger: the purged user's keys are gone
        assert redis_client.exists(f"user:{gone}", "user:username:gone") == 0
        runs: dict[str, str] = dict(
            sql.execute(
                "SELECT pipeline, status FROM tidemill.pipeline_runs ORDER BY id"
            ).fetchall()
        )
        assert set(runs.values()) == {"succeeded"} and len(runs) == 6
