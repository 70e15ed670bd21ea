"""Bilten end to end (seed 001): its own schema, `tidemill app attach bilten`, its flows driven
by SQL and signed Stripe webhooks through the real receiver, relay and worker.

Ticket purchase -> confirmation e-mail; event creation -> notice e-mail + `event:{id}` and
`event:{id}:metrics` invalidated; daily compressed dumps kept 30 days.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import stripe

import workers.actors  # noqa: F401  (every actor the triggers name)
from core.settings import get_settings
from tests.conftest import Servers, run_cli
from tests.support import smtp as _smtp
from tests.support.apps import create_app_database, pump, serving
from tests.support.smtp import SmtpServer
from tests.support.web import serve
from web.webhooks import PATH

smtp_server = _smtp.smtp_server
DB = "app_bilten"


@pytest.fixture
def bilten(servers: Servers, db: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = servers.pg.url(DB)
    create_app_database(servers.admin_url, url, DB, "bilten")
    env = servers.env(DATABASE_URL=url, TIDEMILL_APP="bilten")
    check = run_cli("app", "check", "bilten", env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    for _ in range(2):  # attach is idempotent: a second run changes nothing and succeeds
        out = run_cli("app", "attach", "bilten", env=env)
        assert out.returncode == 0, out.stdout + out.stderr
    assert "trigger bilten_payment_completed on payments" in out.stdout
    yield url


def post_signed(client: httpx.Client, event: dict[str, Any]) -> httpx.Response:
    payload = json.dumps(event)
    header = stripe.WebhookSignature.generate_signature_header(
        payload, get_settings().stripe_webhook_secrets[0]
    )
    return client.post(
        PATH,
        content=payload.encode(),
        headers={"Content-Type": "application/json", "Stripe-Signature": header},
    )


def pi_event(event_id: str, payment_id: str, kind: str = "payment_intent.succeeded") -> dict:
    return {
        "id": event_id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": 1_718_000_000,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": kind,
        "data": {
            "object": {
                "id": f"pi_{event_id}",
                "object": "payment_intent",
                "amount": 5000,
                "currency": "usd",
                "status": "succeeded" if kind.endswith("succeeded") else "requires_payment_method",
                "metadata": {"payment_id": payment_id},
            }
        },
    }


def one(sql: Any, query: str, *params: Any) -> Any:
    row = sql.execute(query, params).fetchone()
    assert row is not None
    return row[0]


@pytest.mark.slow
def test_bilten_end_to_end(
    bilten: str,
    inproc_worker: Any,
    smtp_server: SmtpServer,
    redis_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    servers: Servers,
) -> None:
    monkeypatch.setenv("MAIL_URL", smtp_server.url)
    monkeypatch.setenv("MAIL_FROM", "Bilten <tickets@bilten.test>")
    with serving("bilten", bilten), psycopg.connect(bilten, autocommit=True) as sql:
        # --- event creation: notice to the organizer's organization, cache keys dropped ---
        org = one(sql, "INSERT INTO organizations (name) VALUES ('Jazz Club') RETURNING id")
        organizer = one(
            sql,
            "INSERT INTO users (email, password_hash, first_name, last_name, role, "
            "organization_id) VALUES ('ola@bilten.test', 'x', 'Ola', 'Org', 'organizer', %s) "
            "RETURNING id",
            org,
        )
        one(
            sql,
            "INSERT INTO users (email, password_hash, first_name, last_name, organization_id) "
            "VALUES ('mia@bilten.test', 'x', 'Mia', 'Member', %s) RETURNING id",
            org,
        )
        buyer = one(
            sql,
            "INSERT INTO users (email, password_hash, first_name, last_name) "
            "VALUES ('ben@bilten.test', 'x', 'Ben', 'Buyer') RETURNING id",
        )
        event_id = uuid.uuid4()
        # the app cached the (missing) event and its metrics before it existed
        redis_client.set(f"event:{event_id}", "stale")
        redis_client.set(f"event:{event_id}:metrics", "stale")
        redis_client.set("event:other", "kept")
        sql.execute(
            "INSERT INTO events (id, title, organizer_id, start_date, end_date, status) "
            "VALUES (%s, 'Late Set', %s, now() + interval '7 days', "
            "now() + interval '7 days 3 hours', 'published')",
            (event_id, organizer),
        )
        pump(sql, inproc_worker)
        assert not redis_client.exists(f"event:{event_id}", f"event:{event_id}:metrics")
        assert redis_client.get("event:other") == "kept"
        for address in ("ola@bilten.test", "mia@bilten.test"):
            notices = smtp_server.to(address)
            assert [m["Subject"] for m in notices] == ["New event: Late Set"], address
        assert smtp_server.to("ben@bilten.test") == []
        # an update drops the keys again
        redis_client.set(f"event:{event_id}:metrics", '{"views": 3}')
        sql.execute("UPDATE events SET capacity = 300 WHERE id = %s", (event_id,))
        pump(sql, inproc_worker)
        assert not redis_client.exists(f"event:{event_id}:metrics")

        # --- ticket purchase: payment -> tickets -> signed Stripe webhook -> e-mail ---
        ticket_type = one(
            sql,
            "INSERT INTO ticket_types (event_id, name, price, quantity) "
            "VALUES (%s, 'General', 25.00, 100) RETURNING id",
            event_id,
        )
        payment = one(
            sql,
            "INSERT INTO payments (user_id, amount, currency, payment_method) "
            "VALUES (%s, 50.00, 'USD', 'card') RETURNING id",
            buyer,
        )
        for n in (1, 2):
            ticket = one(
                sql,
                "INSERT INTO tickets (ticket_type_id, user_id, event_id, ticket_number) "
                "VALUES (%s, %s, %s, %s) RETURNING id",
                ticket_type,
                buyer,
                event_id,
                f"BLT-{n:04d}",
            )
            sql.execute(
                "INSERT INTO payment_items (payment_id, ticket_id, item_type, amount) "
                "VALUES (%s, %s, 'ticket', 25.00)",
                (payment, ticket),
            )
        pump(sql, inproc_worker)
        assert smtp_server.to("ben@bilten.test") == []  # pending: nothing is confirmed yet
        with (
            serve(get_settings()) as base,
            httpx.Client(base_url=base, timeout=30) as client,
        ):
            ok = pi_event("evt_bilten_ok", str(payment))
            assert post_signed(client, ok).status_code == 200
            pump(sql, inproc_worker)
            # Stripe retries the same event, and a late failure of the same intent arrives
            assert post_signed(client, ok).status_code == 200
            late = pi_event("evt_bilten_late", str(payment), "payment_intent.payment_failed")
            assert post_signed(client, late).status_code == 200
            # a forged signature is refused and changes nothing
            forged = client.post(
                PATH,
                content=json.dumps(pi_event("evt_forged", str(payment))).encode(),
                headers={"Content-Type": "application/json", "Stripe-Signature": "t=1,v1=00"},
            )
            assert forged.status_code == 400
            pump(sql, inproc_worker)
        row = sql.execute(
            "SELECT status::text, transaction_id FROM payments WHERE id = %s", (payment,)
        ).fetchone()
        assert row == ("completed", "pi_evt_bilten_ok")
        mails = smtp_server.to("ben@bilten.test")
        assert len(mails) == 1, [m["Subject"] for m in mails]
        assert (
            mails[0]["Subject"] == "Your Bilten tickets: BLT-0001 (Late Set), BLT-0002 (Late Set)"
        )
        plain = mails[0].get_body(("plain",))
        assert plain is not None
        body = plain.get_content()
        assert "Hello Ben Buyer" in body and "50.00 USD" in body
        events: dict[str, str] = dict(
            sql.execute("SELECT id, status FROM tidemill.webhook_events").fetchall()
        )
        assert events == {"evt_bilten_ok": "processed", "evt_bilten_late": "processed"}

        # --- backups: a daily compressed dump, kept 30 days ---
        from apps import get_profile
        from schedules.schedule import load_schedules

        schedules = {s.name: s for s in load_schedules()}
        assert (schedules["backup-full"].cron, schedules["backup-full"].timezone) == (
            "0 3 * * *",
            "UTC",
        )
        assert schedules["backup-full"].actor == "backup_full"
        assert "backup-base" not in schedules  # the seed asks for dumps, not PITR
        backups = get_profile("bilten").backups
        assert backups is not None and backups.keep_days == 30 and backups.compressed
        assert schedules["backups-expire"].kwargs == {"name": "backups-expire"}
        installed = {
            r[0] for r in sql.execute("SELECT name FROM tidemill.schedule_state").fetchall()
        }
        assert {"backup-full", "backup-prune", "backups-expire"} <= installed

    # --- detach: tidemill's schema and triggers go, Bilten's rows stay ---
    before = _app_counts(bilten)
    out = run_cli("app", "detach", "bilten", env=servers.env(DATABASE_URL=bilten))
    assert out.returncode == 0, out.stdout + out.stderr
    assert _app_counts(bilten) == before
    with psycopg.connect(bilten, autocommit=True) as sql:
        assert one(sql, "SELECT count(*) FROM pg_namespace WHERE nspname = 'tidemill'") == 0
        assert one(sql, "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == 0
        sql.execute("UPDATE payments SET status = 'refunded'")  # no trigger left to fail


def _app_counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            )
        ]
        return {t: one(conn, f'SELECT count(*) FROM "{t}"') for t in tables}
