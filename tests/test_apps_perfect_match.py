"""Perfect Match end to end (seed 002): its own schema, `tidemill app attach perfect_match`,
its flows driven by SQL with the real relay and worker.

A new match notifies both users and drops `match:{id}` and both users' `matches:recent:{id}`;
new messages notify the other side; activity logs are kept 90 days; message retention is
configurable; daily backups.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import workers.actors  # noqa: F401  (every actor the triggers name)
from tests.conftest import Servers, run_cli
from tests.support.apps import create_app_database, pump, serving

DB = "app_perfect_match"


@pytest.fixture
def perfect_match(servers: Servers, db: str) -> Iterator[str]:
    url = servers.pg.url(DB)
    create_app_database(servers.admin_url, url, DB, "perfect_match")
    out = run_cli("app", "attach", "perfect_match", env=servers.env(DATABASE_URL=url))
    assert out.returncode == 0, out.stdout + out.stderr
    yield url


def one(sql: Any, query: str, *params: Any) -> Any:
    row = sql.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def notifications(sql: Any) -> list[tuple[str, str, str]]:
    return sorted(
        (str(r[0]), r[1], r[2])
        for r in sql.execute(
            "SELECT user_id, type, coalesce(content ->> 'match_id', '') FROM notifications"
        ).fetchall()
    )


@pytest.mark.slow
def test_perfect_match_end_to_end(
    perfect_match: str, inproc_worker: Any, redis_client: Any
) -> None:
    with (
        serving("perfect_match", perfect_match),
        psycopg.connect(perfect_match, autocommit=True) as sql,
    ):
        ada, bob, cyd = (
            str(
                one(
                    sql,
                    "INSERT INTO users (email, first_name) VALUES (%s, %s) RETURNING user_id",
                    f"{n}@pm.test",
                    n,
                )
            )
            for n in ("ada", "bob", "cyd")
        )
        for uid in (ada, bob, cyd):
            redis_client.set(f"matches:recent:{uid}", "[]")
        # Given the app's matcher writes a match (and a second one in the same statement)
        m1, m2 = str(uuid.uuid4()), str(uuid.uuid4())
        redis_client.set(f"match:{m1}", "preview")
        redis_client.set(f"match:{m2}", "preview")
        sql.execute(
            "INSERT INTO matches (match_id, user_id_1, user_id_2, compatibility_score) "
            "VALUES (%s, %s, %s, 0.91), (%s, %s, %s, 0.42)",
            (m1, ada, bob, m2, bob, cyd),
        )
        pump(sql, inproc_worker)
        # Then both users of each match hear about it, once
        assert notifications(sql) == sorted(
            [
                (ada, "new_match", m1),
                (bob, "new_match", m1),
                (bob, "new_match", m2),
                (cyd, "new_match", m2),
            ]
        )
        # and the insert dropped both matches' previews and the three users' recent lists
        assert not redis_client.exists(f"match:{m1}", f"match:{m2}")
        assert not any(redis_client.exists(f"matches:recent:{u}") for u in (ada, bob, cyd))
        # an update of one match drops its keys only
        redis_client.set(f"match:{m1}", "preview")
        redis_client.set(f"matches:recent:{ada}", "[stale]")
        redis_client.set(f"matches:recent:{cyd}", "[fresh]")
        sql.execute(
            "UPDATE matches SET status = 'active', user_1_liked = true WHERE match_id = %s", (m1,)
        )
        pump(sql, inproc_worker)
        assert not redis_client.exists(f"match:{m1}", f"matches:recent:{ada}")
        assert redis_client.exists(f"matches:recent:{cyd}")  # untouched by m1's change

        # A duplicated job (a relay re-send) notifies nobody twice
        sql.execute(
            "SELECT tidemill.enqueue('app_fan_out', %s::jsonb, 'notifications')",
            (f'["new_match", "{m1}"]',),
        )
        pump(sql, inproc_worker)
        assert len(notifications(sql)) == 4

        # New messages notify the other side of the match
        conv = one(
            sql, "INSERT INTO conversations (match_id) VALUES (%s) RETURNING conversation_id", m1
        )
        msg = one(
            sql,
            "INSERT INTO messages (conversation_id, sender_id, content) "
            "VALUES (%s, %s, 'hi') RETURNING message_id",
            conv,
            ada,
        )
        pump(sql, inproc_worker)
        got = sql.execute(
            "SELECT user_id::text, content ->> 'message_id' FROM notifications "
            "WHERE type = 'new_message'"
        ).fetchall()
        assert got == [(bob, str(msg))]

        # Retention: activity logs 90 days, messages a configurable period (the policy file)
        from pipelines.lifecycle.policies import load_policies
        from schedules.schedule import load_schedules

        # daily backups (and PITR: the profile's base backups + WAL archiving)
        schedules = {x.name: x for x in load_schedules()}
        assert schedules["backup-full"].cron == "0 3 * * *"
        assert schedules["activity-logs-purge"].actor == "run_pipeline"

        policies = {p.name: p for p in load_policies()}
        assert (
            policies["activity-logs-purge"].table,
            policies["activity-logs-purge"].age.text,
        ) == ("audit_logs", "90 days")
        assert policies["messages-archive"].age_column == "sent_at"
        sql.execute(
            "INSERT INTO audit_logs (action, entity_type, performed_at) VALUES "
            "('profile.view', 'user', now() - interval '91 days'), "
            "('profile.view', 'user', now() - interval '89 days')"
        )
    # run the purge the scheduler would fire, as a real CLI process against the app database
    out = run_cli("pipeline", "run", "activity-logs-purge", env=_env(perfect_match))
    assert out.returncode == 0, out.stdout + out.stderr
    with psycopg.connect(perfect_match, autocommit=True) as sql:
        left = [
            r[0]
            for r in sql.execute(
                "SELECT performed_at > now() - interval '90 days' FROM tidemill.audit_logs"
            )
        ]
        assert left == [True]
        run = sql.execute(
            "SELECT status, rows_affected FROM tidemill.pipeline_runs "
            "WHERE pipeline = 'activity-logs-purge'"
        ).fetchall()
        assert run == [("succeeded", 1)]


def _env(url: str) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update(DATABASE_URL=url, TIDEMILL_APP="perfect_match")
    return env
