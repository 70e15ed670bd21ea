"""SaltBitter end to end (seed 003): its own schema, `tidemill app attach saltbitter`, its flows
driven by SQL and signed Stripe webhooks with the real receiver, relay and worker.

Subscription events set the tier (in any order); the GDPR flows write
data_export_requested/completed and data_deletion_requested/completed; refresh tokens expire
after 7 days; a daily 03:00 UTC backup kept 7 days plus PITR.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import stripe

import workers.actors  # noqa: F401  (every actor the triggers name)
from core.settings import get_settings
from core.stripe_samples import event, subscription
from tests.conftest import Servers, run_cli
from tests.support.apps import create_app_database, pump, serving
from tests.support.web import serve
from web.webhooks import PATH

DB = "app_saltbitter"


@pytest.fixture
def saltbitter(servers: Servers, db: str) -> Iterator[str]:
    url = servers.pg.url(DB)
    create_app_database(servers.admin_url, url, DB, "saltbitter")
    out = run_cli("app", "attach", "saltbitter", env=servers.env(DATABASE_URL=url))
    assert out.returncode == 0, out.stdout + out.stderr
    yield url


def post_signed(client: httpx.Client, evt: dict[str, Any]) -> None:
    payload = json.dumps(evt)
    header = stripe.WebhookSignature.generate_signature_header(
        payload, get_settings().stripe_webhook_secrets[0]
    )
    response = client.post(
        PATH,
        content=payload.encode(),
        headers={"Content-Type": "application/json", "Stripe-Signature": header},
    )
    assert response.status_code == 200, response.text


def one(sql: Any, query: str, *params: Any) -> Any:
    row = sql.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def actions(sql: Any) -> list[tuple[str, bool]]:
    return [
        (r[0], r[1])
        for r in sql.execute(
            "SELECT action_type, user_id IS NOT NULL FROM compliance_logs ORDER BY created_at, id"
        ).fetchall()
    ]


@pytest.mark.slow
def test_saltbitter_end_to_end(saltbitter: str, inproc_worker: Any, servers: Servers) -> None:
    with serving("saltbitter", saltbitter), psycopg.connect(saltbitter, autocommit=True) as sql:
        uid = str(
            one(
                sql,
                "INSERT INTO users (email, password_hash) VALUES ('sam@salt.test', 'x') "
                "RETURNING id",
            )
        )
        sql.execute(
            "INSERT INTO profiles (user_id, name, date_of_birth) VALUES (%s, 'Sam', '1990-01-01')",
            (uid,),
        )
        sql.execute(
            "INSERT INTO consent_logs (user_id, consent_type, granted) "
            "VALUES (%s, 'ai_coaching', true)",
            (uid,),
        )

        # --- Stripe: subscription events set the tier, whatever order they arrive in ---
        def sub(tier: str, status: str = "active") -> dict[str, Any]:
            return subscription(
                "sub_salt1",
                customer="cus_salt1",
                user_id=uid,
                tier=tier,
                status=status,
                period_start=1_700_000_000,
                period_end=1_702_592_000,
            )

        created = event(
            "customer.subscription.created",
            sub("premium"),
            created=1_700_000_000,
            event_id="evt_s1",
        )
        upgraded = event(
            "customer.subscription.updated", sub("elite"), created=1_700_000_100, event_id="evt_s2"
        )
        with serve(get_settings()) as base, httpx.Client(base_url=base, timeout=30) as client:
            post_signed(client, upgraded)  # the later event first
            post_signed(client, created)
            post_signed(client, created)  # and a retry
            pump(sql, inproc_worker)
            assert one(sql, "SELECT subscription_tier FROM users WHERE id = %s", uid) == "elite"
            row = sql.execute(
                "SELECT tier, status, stripe_customer_id FROM subscriptions WHERE user_id = %s",
                (uid,),
            ).fetchall()
            assert row == [("elite", "active", "cus_salt1")]
            cancelled = event(
                "customer.subscription.deleted",
                sub("elite", "canceled"),
                created=1_700_000_200,
                event_id="evt_s3",
            )
            post_signed(client, cancelled)
            pump(sql, inproc_worker)
        assert one(sql, "SELECT subscription_tier FROM users WHERE id = %s", uid) == "free"

        # --- GDPR export: requested by the app, completed by tidemill ---
        sql.execute(
            "INSERT INTO compliance_logs (user_id, action_type, metadata) "
            "VALUES (%s, 'data_export_requested', '{}')",
            (uid,),
        )
        pump(sql, inproc_worker)
        assert actions(sql) == [("data_export_requested", True), ("data_export_completed", True)]
        meta = one(
            sql,
            "SELECT metadata FROM compliance_logs WHERE action_type = 'data_export_completed'",
        )
        from core.storage import open_storage

        doc = json.loads(open_storage().get_bytes(meta["key"]))
        assert doc["user"]["email"] == "sam@salt.test" and "password_hash" not in doc["user"]
        assert doc["profile"]["name"] == "Sam"
        assert [c["consent_type"] for c in doc["consents"]] == ["ai_coaching"]
        assert doc["subscriptions"][0]["tier"] == "elite"

        # --- refresh tokens expire after 7 days (the policy the scheduler fires) ---
        sql.execute(
            "INSERT INTO refresh_tokens (user_id, token_hash, expires_at, created_at) VALUES "
            "(%s, 'old', now() - interval '1 day', now() - interval '8 days'), "
            "(%s, 'new', now() + interval '6 days', now() - interval '1 day')",
            (uid, uid),
        )
        from schedules.schedule import load_schedules

        schedules = {s.name: s for s in load_schedules()}
        env = dict(os.environ)
        out = run_cli("pipeline", "run", "refresh-tokens-expire", env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        left = [r[0] for r in sql.execute("SELECT token_hash FROM refresh_tokens")]
        assert left == ["new"]

        # --- GDPR deletion: the user's rows go, the compliance trail stays ---
        sql.execute(
            "INSERT INTO compliance_logs (user_id, action_type) "
            "VALUES (%s, 'data_deletion_requested')",
            (uid,),
        )
        pump(sql, inproc_worker)
        for table, column in (
            ("users", "id"),
            ("profiles", "user_id"),
            ("consent_logs", "user_id"),
            ("subscriptions", "user_id"),
            ("refresh_tokens", "user_id"),
        ):
            assert one(sql, f"SELECT count(*) FROM {table} WHERE {column} = %s", uid) == 0
        assert actions(sql) == [
            ("data_export_requested", False),
            ("data_export_completed", False),
            ("data_deletion_requested", False),
            ("data_deletion_completed", False),
        ]
        done = one(
            sql,
            "SELECT metadata FROM compliance_logs WHERE action_type = 'data_deletion_completed'",
        )
        assert done["counts"]["users"] == 1 and uid not in json.dumps(done)
        # a replayed request (a re-sent job) completes nothing twice
        req = one(
            sql, "SELECT id FROM compliance_logs WHERE action_type = 'data_deletion_requested'"
        )
        sql.execute(
            "SELECT tidemill.enqueue('run_app_task', %s::jsonb, 'gdpr')",
            (json.dumps(["gdpr_delete", str(req)]),),
        )
        pump(sql, inproc_worker)
        assert len(actions(sql)) == 4

    # --- backups: daily at 03:00 UTC, kept 7 days, plus PITR ---
    from apps import get_profile

    assert (schedules["backup-full"].cron, schedules["backup-full"].timezone) == (
        "0 3 * * *",
        "UTC",
    )
    assert "backup-base" in schedules  # the physical base backups PITR replays WAL onto
    backups = get_profile("saltbitter").backups
    assert backups is not None and (backups.keep_days, backups.pitr) == (7, True)
