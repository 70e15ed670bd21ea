"""GDPR erase and export against real Postgres and Redis, with a scan for leftovers."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.storage import open_storage
from pipelines.lifecycle.engine import run_pipeline
from pipelines.lifecycle.gdpr import MESSAGE_DELETED, TOMBSTONE_ID, NotEligible, erase, export
from tests.conftest import run_cli
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


NOW = datetime.now(UTC)


def _person(sql, redis_client, *, deleted_days_ago: int | None) -> dict[str, Any]:
    """A user with data in every corner: moments, requests on them, messages, reviews,
    transactions, subscriptions, tokens, consents, outbox, webhook payloads, Redis keys."""
    tag = uuid.uuid4().hex[:8]
    p = {
        "email": f"zelda.{tag}@example.org",
        "full_name": f"Zelda Quartermain {tag}",
        "phone": f"+4915{tag[:6]}99",
        "username": f"zelda_{tag}",
        "push_token": f"ExponentPushToken[{tag}zz]",
        "stripe_customer_id": f"cus_{tag}ZQ",
    }
    deleted_at = NOW - timedelta(days=deleted_days_ago) if deleted_days_ago is not None else None
    uid = make_user(
        sql,
        email=p["email"],
        full_name=p["full_name"],
        phone=p["phone"],
        username=p["username"],
        push_token=p["push_token"],
        stripe_customer_id=p["stripe_customer_id"],
        bio="I love sailing",
        deleted_at=deleted_at,
    )
    p["id"] = str(uid)
    other = make_user(sql, full_name="Other Person")
    moment = sql.execute(
        "INSERT INTO moments (user_id, title, category, location, date) "
        "VALUES (%s, 'Sailing with Zelda', 'sport', 'Kiel', now()) RETURNING id",
        (uid,),
    ).fetchone()[0]
    sql.execute(
        "INSERT INTO requests (moment_id, user_id, message) VALUES (%s, %s, 'may I join?')",
        (moment, other),
    )
    sql.execute("INSERT INTO favorites (user_id, moment_id) VALUES (%s, %s)", (other, moment))
    conv = make_conversation(sql, [uid, other])
    add_messages(
        sql,
        conversation=conv,
        sender=uid,
        n=3,
        start=NOW - timedelta(days=5),
        content=f"hi, call me at {p['phone']}",
    )
    add_messages(
        sql, conversation=conv, sender=other, n=2, start=NOW - timedelta(days=5), content="see you"
    )
    sql.execute(
        "INSERT INTO reviews (reviewer_id, reviewed_id, rating, comment) VALUES "
        "(%s, %s, 5, 'great'), (%s, %s, 4, 'nice host')",
        (uid, other, other, uid),
    )
    sql.execute(
        "INSERT INTO transactions (user_id, moment_id, type, amount, description, metadata, "
        "stripe_payment_intent_id) VALUES (%s, %s, 'payment', 25, %s, %s, %s)",
        (
            uid,
            moment,
            f"Payment by {p['full_name']}",
            json.dumps({"user_id": p["id"]}),
            f"pi_{tag}",
        ),
    )
    sql.execute(
        "INSERT INTO subscriptions (user_id, tier, stripe_customer_id) VALUES (%s, 'premium', %s)",
        (uid, p["stripe_customer_id"]),
    )
    sql.execute(
        "INSERT INTO refresh_tokens (user_id, token_hash, expires_at, device_info) "
        "VALUES (%s, %s, now() + interval '7 days', 'Zelda''s phone')",
        (uid, f"hash{tag}"),
    )
    sql.execute(
        "INSERT INTO consent_logs (user_id, consent_type, granted, ip_address, user_agent) "
        "VALUES (%s, 'marketing', true, '203.0.113.7', 'Mozilla')",
        (uid,),
    )
    sql.execute(
        "INSERT INTO compliance_logs (user_id, action_type, metadata, ip_address) "
        "VALUES (%s, 'consent_given', %s, '203.0.113.7')",
        (uid, json.dumps({"email": p["email"]})),
    )
    sql.execute(
        "INSERT INTO reports (reporter_id, reported_user_id, reason, description) "
        "VALUES (%s, %s, 'spam', %s)",
        (other, uid, f"{p['full_name']} sends spam"),
    )
    sql.execute(
        "INSERT INTO email_verifications (user_id, email, code, expires_at) "
        "VALUES (%s, %s, %s, now())",
        (uid, p["email"], f"c{tag}"),
    )
    add_notifications(sql, user=uid, n=3, start=NOW - timedelta(days=2))
    sql.execute(
        "INSERT INTO notifications (user_id, type, title, data) VALUES (%s, 'request', %s, %s)",
        (other, f"{p['full_name']} accepted", json.dumps({"from": p["id"]})),
    )
    sql.execute(
        "INSERT INTO outbox (actor, kwargs) VALUES ('send_welcome_email', %s)",
        (json.dumps({"user_id": p["id"]}),),
    )
    sql.execute(
        "INSERT INTO webhook_events (id, type, created, livemode, payload) "
        "VALUES (%s, 'customer.created', now(), false, %s)",
        (
            f"evt_{tag}",
            json.dumps(
                {
                    "data": {
                        "object": {
                            "id": p["stripe_customer_id"],
                            "email": p["email"],
                            "name": p["full_name"],
                        }
                    }
                }
            ),
        ),
    )
    sql.execute(
        "INSERT INTO audit_logs (action, entity_type, entity_id, details) "
        "VALUES ('profile_updated', 'user', %s, %s)",
        (p["id"], json.dumps({"email": p["email"]})),
    )
    redis_client.set(f"user:{uid}", json.dumps({"email": p["email"]}))
    redis_client.set(f"user:email:{p['email']}", str(uid))
    redis_client.set(f"user:username:{p['username']}", str(uid))
    redis_client.set(f"session:{uid}:web", "1")
    redis_client.set("moment:unrelated", "keep me")
    p["other"] = str(other)
    return p


def _personal_strings(p: dict[str, Any]) -> list[str]:
    return [
        p[k]
        for k in (
            "id",
            "email",
            "full_name",
            "phone",
            "username",
            "push_token",
            "stripe_customer_id",
        )
    ]


def _scan_postgres(sql, needles: list[str]) -> list[str]:
    """Every text-like, json, array, uuid and inet column of every table, searched."""
    cols = sql.execute(
        """
        SELECT c.table_schema, c.table_name, c.column_name FROM information_schema.columns c
        JOIN information_schema.tables t
          ON t.table_schema = c.table_schema AND t.table_name = c.table_name
        WHERE c.table_schema IN ('public', 'partitions', 'tidemill') AND t.table_type = 'BASE TABLE'
          AND c.data_type IN ('text', 'character varying', 'jsonb', 'json', 'ARRAY', 'uuid',
                              'inet', 'USER-DEFINED')
        """
    ).fetchall()
    assert len(cols) > 50  # the scan covers the schema, not a handful of columns
    found = []
    for schema, table, column in cols:
        for needle in needles:
            hit = sql.execute(
                f'SELECT count(*) FROM "{schema}"."{table}" WHERE "{column}"::text LIKE %s',
                (f"%{needle}%",),
            ).fetchone()[0]
            if hit:
                found.append(f"{schema}.{table}.{column} contains {needle!r}")
    return found


def _redis_texts(redis_client, key: str) -> list[str]:
    """Every string stored under ``key``, whatever its type (hash fields and values, list
    items, set and sorted-set members, stream entries)."""
    kind = redis_client.type(key)
    if kind == "string":
        return [redis_client.get(key) or ""]
    if kind == "hash":
        return [t for kv in redis_client.hgetall(key).items() for t in kv]
    if kind == "list":
        return list(redis_client.lrange(key, 0, -1))
    if kind == "set":
        return list(redis_client.smembers(key))
    if kind == "zset":
        return list(redis_client.zrange(key, 0, -1))
    if kind == "stream":
        return [t for _id, fields in redis_client.xrange(key) for kv in fields.items() for t in kv]
    raise AssertionError(f"redis {key}: type {kind} not scanned")


def _scan_redis(redis_client, needles: list[str]) -> list[str]:
    found = []
    for key in redis_client.scan_iter(count=1000):
        texts = [key, *_redis_texts(redis_client, key)]
        for needle in needles:
            if any(needle in t for t in texts):
                found.append(f"redis {key} ({redis_client.type(key)}) contains {needle!r}")
    return found


def _broker() -> Any:
    """A dramatiq Redis broker on the broker URL tidemill uses (no middleware)."""
    from dramatiq.brokers.redis import RedisBroker

    from core.settings import get_settings

    broker = RedisBroker(url=get_settings().effective_broker_url, middleware=[])
    for queue in ("emails", "lifecycle", "notifications"):
        broker.declare_queue(queue)
    return broker


def _enqueue_about(p: dict[str, Any]) -> dict[str, str]:
    """Messages about the person: a queued welcome e-mail, a delayed export, and a
    dead-lettered e-mail by address; and one about the other user. Returns their Redis ids."""
    from dramatiq import Message

    broker = _broker()

    def msg(queue: str, actor: str, args: tuple[Any, ...] = (), **kwargs: Any) -> Message:
        return Message(queue_name=queue, actor_name=actor, args=args, kwargs=kwargs, options={})

    ids = {
        "queued": broker.enqueue(msg("emails", "send_welcome_email", user_id=p["id"])),
        "delayed": broker.enqueue(msg("lifecycle", "gdpr_export", (p["id"],)), delay=3_600_000),
        "other": broker.enqueue(msg("emails", "send_welcome_email", user_id=p["other"])),
    }
    dead = broker.enqueue(msg("notifications", "send_email", to=p["email"], subject="hi"))
    consumer = broker.consume("notifications", prefetch=1, timeout=1000)
    try:
        fetched = next(consumer)
        assert fetched is not None and fetched.message_id == dead.message_id
        consumer.nack(fetched)  # dramatiq's own path into the dead-letter queue
    finally:
        consumer.close()
    ids["dead"] = dead
    broker.close()
    return {k: m.options["redis_message_id"] for k, m in ids.items()}


def test_erase_leaves_no_personal_data_anywhere(sql, redis_client, file_storage) -> None:
    # Given a user soft-deleted 31 days ago with data everywhere, and another user
    p = _person(sql, redis_client, deleted_days_ago=31)
    needles = _personal_strings(p)
    assert _scan_postgres(sql, needles)  # the scan finds the data before the erase
    # and dramatiq messages about the person: queued, delayed and dead-lettered
    messages = _enqueue_about(p)
    before = _scan_redis(redis_client, needles)
    for queue in ("emails.msgs", "lifecycle.DQ.msgs", "notifications.XQ.msgs"):
        assert any(f"dramatiq:{queue} " in hit for hit in before), before
    others_messages = sql.execute(
        "SELECT count(*) FROM messages WHERE sender_id = %s", (p["other"],)
    ).fetchone()[0]
    # When erased
    result = erase(p["id"], by="test")
    # Then no trace of the person remains in Postgres or Redis
    assert _scan_postgres(sql, needles) == []
    assert _scan_redis(redis_client, needles) == []
    assert redis_client.get("moment:unrelated") == "keep me"
    # the tombstone that now signs the messages is nobody: no welcome e-mail for it
    assert (
        sql.execute(
            "SELECT count(*) FROM outbox WHERE args::text LIKE %s", (f"%{TOMBSTONE_ID}%",)
        ).fetchone()[0]
        == 0
    )
    assert result.redis_keys == 4
    # the messages about the person are gone from their queues; the other user's stays
    assert result.broker_messages == 3
    assert redis_client.hkeys("dramatiq:emails.msgs") == [messages["other"]]
    assert redis_client.lrange("dramatiq:emails", 0, -1) == [messages["other"]]
    assert redis_client.zcard("dramatiq:notifications.XQ") == 0
    assert redis_client.llen("dramatiq:lifecycle.DQ") == 0
    # messages stay for the conversation, anonymized as Lovendo's delete_user_data does
    kept = sql.execute(
        "SELECT content, sender_id, metadata FROM messages WHERE sender_id = %s", (TOMBSTONE_ID,)
    ).fetchall()
    assert len(kept) == 3 and {k[0] for k in kept} == {MESSAGE_DELETED}
    assert all(k[2] is None for k in kept)
    assert (
        sql.execute("SELECT count(*) FROM messages WHERE sender_id = %s", (p["other"],)).fetchone()[
            0
        ]
        == others_messages
    )
    # the transaction stays for the legal hold, detached
    tx = sql.execute(
        "SELECT user_id, amount, description, metadata, stripe_payment_intent_id FROM transactions"
    ).fetchone()
    assert tx[0] is None and tx[1] == 25 and tx[2] is None and tx[3] is None
    assert tx[4].startswith("pi_")
    # the compliance trail and the audit entry exist, naming the erasure, not the person
    trail = sql.execute(
        "SELECT action_type, subject_ref, user_id FROM compliance_logs "
        "WHERE subject_ref = %s ORDER BY created_at, action_type DESC",
        (result.reference,),
    ).fetchall()
    assert [t[0] for t in trail] == ["data_deletion_requested", "data_deletion_completed"]
    assert all(t[2] is None for t in trail)
    audit = sql.execute(
        "SELECT entity_type, entity_id, details FROM audit_logs WHERE action = 'gdpr_erase'"
    ).fetchone()
    assert audit[1] == result.reference and audit[2]["counts"]["users:delete"] == 1
    # the other user's own data is intact
    assert sql.execute("SELECT count(*) FROM users WHERE id = %s", (p["other"],)).fetchone()[0]


def test_erase_respects_the_grace_period_and_restores(sql, redis_client, file_storage) -> None:
    recent = _person(sql, redis_client, deleted_days_ago=29)
    active = _person(sql, redis_client, deleted_days_ago=None)
    for person in (recent, active):
        with pytest.raises(NotEligible):
            erase(person["id"])
        row = sql.execute(
            "SELECT email, full_name FROM users WHERE id = %s", (person["id"],)
        ).fetchone()
        assert row == (person["email"], person["full_name"])
        assert redis_client.get(f"user:email:{person['email']}") == person["id"]
    assert (
        sql.execute(
            "SELECT count(*) FROM compliance_logs WHERE action_type LIKE 'data_deletion%%'"
        ).fetchone()[0]
        == 0
    )


def test_erase_policy_erases_only_users_past_the_grace(sql, redis_client, file_storage) -> None:
    old = _person(sql, redis_client, deleted_days_ago=45)
    young = _person(sql, redis_client, deleted_days_ago=3)
    restored = _person(sql, redis_client, deleted_days_ago=None)
    result = run_pipeline("deleted-users-erase")
    assert result.stats.rows_affected == 1
    ids = {str(r[0]) for r in sql.execute("SELECT id FROM users")}
    assert old["id"] not in ids and young["id"] in ids and restored["id"] in ids


def test_tables_added_later_are_found_through_the_catalog(sql, redis_client, file_storage) -> None:
    """A new table referencing users (and one referencing it) is covered with no code change."""
    sql.execute(
        "CREATE TABLE user_badges (id serial PRIMARY KEY, "
        "user_id uuid NOT NULL REFERENCES users(id), label text)"
    )
    sql.execute(
        "CREATE TABLE badge_awards (id serial PRIMARY KEY, "
        "badge_id int NOT NULL REFERENCES user_badges(id), note text)"
    )
    p = _person(sql, redis_client, deleted_days_ago=40)
    badge = sql.execute(
        "INSERT INTO user_badges (user_id, label) VALUES (%s, %s) RETURNING id",
        (p["id"], f"badge of {p['full_name']}"),
    ).fetchone()[0]
    sql.execute("INSERT INTO badge_awards (badge_id, note) VALUES (%s, 'x')", (badge,))
    # NO ACTION foreign keys: a plain DELETE of the user would fail; FK order makes it work
    result = erase(p["id"])
    assert sql.execute("SELECT count(*) FROM user_badges").fetchone()[0] == 0
    assert sql.execute("SELECT count(*) FROM badge_awards").fetchone()[0] == 0
    assert result.counts["badge_awards:delete"] == 1
    order = result.steps
    awards = next(i for i, s in enumerate(order) if "badge_awards" in s)
    badges = next(i for i, s in enumerate(order) if s.endswith("user_badges.user_id"))
    assert awards < badges < order.index("delete users")
    # the database steps end with the user; storage, Redis and the record follow
    assert all(
        not s.startswith(("delete ", "detach ", "anonymize "))
        for s in order[order.index("delete users") + 1 :]
    )


def test_export_writes_the_users_data_to_storage(sql, redis_client, file_storage) -> None:
    p = _person(sql, redis_client, deleted_days_ago=None)
    result = export(p["id"], by="test")
    doc = json.loads(open_storage().get_bytes(result.key))
    assert doc["user"]["email"] == p["email"]
    assert len(doc["messages"]) == 3 and len(doc["moments"]) == 1
    assert len(doc["transactions"]) == 1 and len(doc["subscriptions"]) == 1
    assert len(doc["notifications"]) == 3 and len(doc["consents"]) == 1
    assert len(doc["reviews"]) == 1 and doc["exported_at"]
    assert p["id"] not in result.key
    actions = [
        r[0]
        for r in sql.execute(
            "SELECT action_type FROM compliance_logs WHERE user_id = %s AND action_type "
            "LIKE 'data_export%%' ORDER BY created_at, action_type DESC",
            (p["id"],),
        )
    ]
    assert actions == ["data_export_requested", "data_export_completed"]


def test_cli_erase_and_export(sql, redis_client, file_storage) -> None:
    bad = run_cli("gdpr", "erase", "not-a-uuid")
    assert bad.returncode == 2 and "is not a user id" in bad.stderr
    p = _person(sql, redis_client, deleted_days_ago=None)
    early = run_cli("gdpr", "erase", p["id"])
    assert early.returncode == 2 and "not soft-deleted" in early.stderr
    requested = run_cli("gdpr", "erase", p["id"], "--request")
    assert requested.returncode == 0 and "can be erased from" in requested.stdout
    still = run_cli("gdpr", "erase", p["id"])
    assert still.returncode == 2 and "grace period" in still.stderr
    exported = run_cli("gdpr", "export", p["id"])
    assert exported.returncode == 0 and exported.stdout.startswith("gdpr/exports/")
    sql.execute(
        "UPDATE users SET deleted_at = now() - interval '31 days' WHERE id = %s", (p["id"],)
    )
    dry = run_cli("gdpr", "erase", p["id"], "--dry-run")
    assert dry.returncode == 0 and "anonymize users -> messages.sender_id" in dry.stdout
    assert sql.execute("SELECT count(*) FROM users WHERE id = %s", (p["id"],)).fetchone()[0] == 1
    done = run_cli("gdpr", "erase", p["id"])
    assert done.returncode == 0, done.stderr
    assert sql.execute("SELECT count(*) FROM users WHERE id = %s", (p["id"],)).fetchone()[0] == 0


# --------------------------------------------------------------- everywhere, then restored

YEARS = timedelta(days=365)


def stripe_payloads(p: dict[str, Any], tag: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Events shaped like Stripe's (API reference): a Charge with billing_details,
    receipt_email and shipping; a Checkout Session with customer_details and customer_email;
    an Invoice with customer_name/email/phone/address; a Customer update with previous
    attributes. Each keeps the ids the ledger needs."""
    address = {
        "line1": f"{tag} Quartermain Lane 42",
        "line2": None,
        "city": "Kiel",
        "postal_code": "24103",
        "state": None,
        "country": "DE",
    }
    cus = p["stripe_customer_id"]
    return [
        (
            f"evt_ch_{tag}",
            "charge.succeeded",
            {
                "id": f"evt_ch_{tag}",
                "object": "event",
                "type": "charge.succeeded",
                "data": {
                    "object": {
                        "id": f"ch_{tag}",
                        "object": "charge",
                        "amount": 2500,
                        "currency": "eur",
                        "customer": cus,
                        "payment_intent": f"pi_{tag}",
                        "billing_details": {
                            "address": address,
                            "email": p["email"],
                            "name": p["full_name"],
                            "phone": p["phone"],
                            "tax_id": None,
                        },
                        "receipt_email": p["email"],
                        "shipping": {
                            "address": address,
                            "carrier": None,
                            "name": p["full_name"],
                            "phone": p["phone"],
                            "tracking_number": None,
                        },
                        "metadata": {"user_id": p["id"], "username": p["username"]},
                    }
                },
            },
        ),
        (
            f"evt_cs_{tag}",
            "checkout.session.completed",
            {
                "id": f"evt_cs_{tag}",
                "object": "event",
                "type": "checkout.session.completed",
                "data": {
                    "object": {
                        "id": f"cs_{tag}",
                        "object": "checkout.session",
                        "customer": cus,
                        "customer_email": p["email"],
                        "payment_intent": f"pi_{tag}",
                        "customer_details": {
                            "address": address,
                            "email": p["email"],
                            "name": p["full_name"],
                            "phone": p["phone"],
                            "tax_exempt": "none",
                            "tax_ids": [],
                        },
                        "collected_information": {
                            "shipping_details": {"address": address, "name": p["full_name"]}
                        },
                    }
                },
            },
        ),
        (
            f"evt_in_{tag}",
            "invoice.paid",
            {
                "id": f"evt_in_{tag}",
                "object": "event",
                "type": "invoice.paid",
                "data": {
                    "object": {
                        "id": f"in_{tag}",
                        "object": "invoice",
                        "customer": cus,
                        "charge": f"ch_{tag}",
                        "customer_email": p["email"],
                        "customer_name": p["full_name"],
                        "customer_phone": p["phone"],
                        "customer_address": address,
                        "customer_shipping": {"address": address, "name": p["full_name"]},
                    }
                },
            },
        ),
        (
            f"evt_cu_{tag}",
            "customer.updated",
            {
                "id": f"evt_cu_{tag}",
                "object": "event",
                "type": "customer.updated",
                "data": {
                    "object": {
                        "id": cus,
                        "object": "customer",
                        "email": p["email"],
                        "name": p["full_name"],
                        "phone": p["phone"],
                        "address": address,
                        "description": f"{p['username']} from the app",
                    },
                    "previous_attributes": {"email": f"old.{p['email']}", "address": address},
                },
            },
        ),
    ]


def _add_stripe_events(sql, p: dict[str, Any], *, days_ago: int, tag: str) -> list[str]:
    ids = []
    for event_id, kind, payload in stripe_payloads(p, tag):
        sql.execute(
            "INSERT INTO webhook_events (id, type, created, livemode, payload, status, "
            "received_at, processed_at) VALUES (%s, %s, now(), false, %s, 'processed', "
            "now() - make_interval(days => %s), now() - make_interval(days => %s))",
            (event_id, kind, json.dumps(payload), days_ago, days_ago),
        )
        ids.append(event_id)
    return ids


def _old_rows(sql, p: dict[str, Any]) -> None:
    """Rows old enough for each archive policy: messages (CSV), transactions (JSONL, legal
    hold), audit logs (CSV), compliance logs (JSONL); the other user's too."""
    conv = make_conversation(sql, [uuid.UUID(p["id"]), uuid.UUID(p["other"])])
    add_messages(
        sql,
        conversation=conv,
        sender=p["id"],
        n=4,
        start=NOW - 3 * YEARS,
        content=f"I am {p['full_name']}, call {p['phone']}",
    )
    add_messages(
        sql, conversation=conv, sender=p["other"], n=3, start=NOW - 3 * YEARS, content="hello"
    )
    # the user's old payment was for their own moment, which the erase deletes: a restored
    # copy must not point at it (ON DELETE SET NULL, as the live row)
    moment = sql.execute("SELECT id FROM moments WHERE user_id = %s", (p["id"],)).fetchone()[0]
    for who, text in ((p["id"], f"Payment by {p['full_name']}"), (p["other"], "other pays")):
        sql.execute(
            "INSERT INTO transactions (user_id, type, amount, description, metadata, "
            "stripe_payment_intent_id, created_at, moment_id) "
            "VALUES (%s, 'payment', 40, %s, %s, %s, %s, %s)",
            (
                who,
                text,
                json.dumps({"email": p["email"] if who == p["id"] else "x"}),
                f"pi_old_{uuid.uuid4().hex[:8]}",
                NOW - 8 * YEARS,
                moment,
            ),
        )
    sql.execute(
        "INSERT INTO audit_logs (action, entity_type, entity_id, details, performed_at) "
        "VALUES ('profile_updated', 'user', %s, %s, %s), ('login', 'user', %s, '{}', %s)",
        (p["id"], json.dumps({"email": p["email"]}), NOW - 2 * YEARS, p["other"], NOW - 2 * YEARS),
    )
    sql.execute(
        "INSERT INTO compliance_logs (user_id, action_type, metadata, ip_address, created_at) "
        "VALUES (%s, 'consent_given', %s, '203.0.113.7', %s), "
        "(%s, 'consent_given', '{}', '203.0.113.8', %s)",
        (p["id"], json.dumps({"phone": p["phone"]}), NOW - 8 * YEARS, p["other"], NOW - 8 * YEARS),
    )


ARCHIVES = (
    "messages-archive",
    "transactions-archive",
    "audit-logs-archive",
    "compliance-logs-archive",
)


def _redis_everywhere(redis_client, p: dict[str, Any]) -> list[str]:
    """A key under every declared pattern (the cache map's user keys and the app's extra
    ones), plus tidemill's own keys that carry the user in their values."""
    from core.settings import get_settings
    from db.cache_keys import USER_KEY_PATTERNS

    extra = (get_settings().gdpr_redis_patterns or "").split(",")
    keys = []
    for template in (*USER_KEY_PATTERNS, *[e for e in extra if e]):
        key = template.format(
            **{k: p.get(k, p["id"]) for k in ("id", "email", "username", "phone")}
        ).replace("*", "x")
        redis_client.set(key, json.dumps({"name": p["full_name"]}))
        keys.append(key)
    redis_client.rpush("tidemill:dash:selection:tok1", json.dumps({"to": p["email"]}), "other")
    redis_client.hset("tidemill:dead_errors:emails:20000", "rid1", f"bad address {p['email']}")
    redis_client.hset("tidemill:dead_errors:emails:20000", "rid2", "timeout")
    return keys


@pytest.mark.slow
def test_erase_leaves_nothing_in_tables_redis_exports_archives_or_a_restored_backup(
    sql, db, redis_client, file_storage, monkeypatch
) -> None:
    import psycopg

    from core.settings import get_settings, reset_settings_cache
    from pipelines.backups.logical import catalog, restore_logical, run_full_backup
    from pipelines.lifecycle.gdpr import reapply_erasures
    from tests.support.lifecycle import scan_storage

    monkeypatch.setenv("TIDEMILL_GDPR_REDIS_PATTERNS", "feed:{username}:*,otp:{phone}")
    reset_settings_cache()
    # Given a user in every table, old rows in every archived table, Stripe payloads
    p = _person(sql, redis_client, deleted_days_ago=31)
    _old_rows(sql, p)
    _add_stripe_events(sql, p, days_ago=1, tag=uuid.uuid4().hex[:6])
    needles = [p["email"], p["phone"], p["full_name"], p["username"]]
    # in Redis under every declared pattern, in an export, in archives of each kind
    declared = _redis_everywhere(redis_client, p)
    export(p["id"], by="test")
    for name in ARCHIVES:
        assert run_pipeline(name, by="test").stats.objects >= 1, name
    archived = scan_storage(file_storage, needles)
    for prefix in (
        "gdpr/exports/",
        "messages/",
        "transactions/",
        "audit_logs/",
        "compliance_logs/",
    ):
        assert any(hit.startswith(prefix) for hit in archived), (prefix, archived)
    # and in a backup
    settings = get_settings()
    run_full_backup(settings)
    assert any(h.startswith("backups/") for h in scan_storage(file_storage, needles))
    assert _scan_postgres(sql, needles) and _scan_redis(redis_client, needles)

    # When erased
    result = erase(p["id"], by="test")

    # Then no table, no Redis key or value, no stored object (decompressed) holds the user;
    # backups are immutable and expire with retention: a restore erases again (below)
    assert _scan_postgres(sql, needles) == []
    assert _scan_redis(redis_client, needles) == []
    assert all(redis_client.exists(k) == 0 for k in declared)
    assert redis_client.lrange("tidemill:dash:selection:tok1", 0, -1) == ["other"]
    assert redis_client.hkeys("tidemill:dead_errors:emails:20000") == ["rid2"]
    assert scan_storage(file_storage, needles, skip_prefixes=("backups/",)) == []
    assert result.exports_deleted == 1 and result.archives_rewritten == 4
    # the legal hold holds: the archived transactions still count both payments, detached
    objects = sql.execute(
        "SELECT table_name, sum(rows) FROM archive_objects GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert dict(objects) == {
        "audit_logs": 2,
        "compliance_logs": 2,
        "messages": 7,
        "transactions": 2,
    }
    assert sql.execute("SELECT count(*) FROM archive_superseded").fetchone()[0] == 0
    # every catalogued object is in storage with its sha256, and its manifest agrees
    from core.storage import open_storage

    storage = open_storage()
    for key, sha in sql.execute("SELECT key, sha256 FROM archive_objects").fetchall():
        assert storage.sha256(key) == sha
        table = key.split("/", 1)[0]
        manifests = [
            json.loads(storage.get_bytes(i.key)) for i in storage.list(f"manifests/{table}/")
        ]
        assert any(o["key"] == key and o["sha256"] == sha for m in manifests for o in m["objects"])
    # the erasure is recorded without personal data, in the database and in storage
    assert sql.execute("SELECT count(*) FROM erasures").fetchone()[0] == 1
    assert [i.key for i in storage.list("gdpr/erasures/")]

    # When the backup taken before the erase is restored into a new database
    entry = [e for e in catalog(storage) if e.kind == "full"][-1]
    with psycopg.connect(db, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS gdpr_restored WITH (FORCE)")
        admin.execute("CREATE DATABASE gdpr_restored TEMPLATE template0")
    restored_url = db.rsplit("/", 1)[0] + "/gdpr_restored"
    try:
        restore_logical(storage, entry, restored_url)
        with psycopg.connect(restored_url, autocommit=True) as restored:
            assert _scan_postgres(restored, needles)  # the backup brought the user back
            # Then the restore path erases them again before anyone gets the database
            assert reapply_erasures(restored_url, since=entry.started_at) == 1
            assert _scan_postgres(restored, needles) == []
            left = restored.execute("SELECT count(*) FROM users WHERE id = %s", (p["id"],))
            assert left.fetchone() == (0,)
            # and a second pass finds nobody (idempotent)
            assert reapply_erasures(restored_url, since=entry.started_at) == 0
    finally:
        with psycopg.connect(db, autocommit=True) as admin:
            admin.execute("DROP DATABASE IF EXISTS gdpr_restored WITH (FORCE)")


def test_archive_restore_after_erase_skips_or_anonymizes_the_erased_users_rows(
    sql, redis_client, file_storage
) -> None:
    """An old copy of an archive (a bucket restored from versioning, an object archived
    before the index existed) still holds the erased user's rows: restoring it brings back
    the others' rows and none of the user's, and says how many it held back."""
    from core.storage import open_storage

    p = _person(sql, redis_client, deleted_days_ago=31)
    _old_rows(sql, p)
    storage = open_storage()
    old_copies = {}
    for name in ("messages-archive", "transactions-archive"):
        run = run_pipeline(name)
        for (key,) in sql.execute(
            "SELECT key FROM archive_objects WHERE run_id = %s", (run.run_id,)
        ).fetchall():
            old_copies[key] = storage.get_bytes(key)
    erase(p["id"], by="test")
    # the old objects were rewritten under new keys and deleted
    assert all(not storage.exists(k) for k in old_copies)
    # When an old copy is put back and restored (it has no checksum on record any more)
    for key, data in old_copies.items():
        storage.put_bytes(key, data)
    needles = [p["email"], p["phone"], p["full_name"], p["username"], p["id"]]
    keys = sorted(old_copies)
    out = run_cli("archive", "restore", *keys, "--no-verify", "--by", "ops:test")
    # Then it succeeds (no ForeignKeyViolation), brings back the other user's rows ...
    assert out.returncode == 0, out.stderr
    assert "skipped or anonymized" in out.stdout
    held_back = int(out.stdout.rsplit(";", 1)[1].split()[0])
    assert held_back == 4 + 1  # 4 messages anonymized, 1 transaction detached
    assert (
        sql.execute(
            "SELECT count(*) FROM messages WHERE sender_id = %s AND created_at < now() - "
            "interval '2 years'",
            (p["other"],),
        ).fetchone()[0]
        == 3
    )
    # ... the erased user's messages only as the erase leaves them, the payment detached
    kept = sql.execute(
        "SELECT DISTINCT content FROM messages WHERE sender_id = %s AND created_at < now() - "
        "interval '2 years'",
        (TOMBSTONE_ID,),
    ).fetchall()
    assert kept == [(MESSAGE_DELETED,)]
    assert (
        sql.execute(
            "SELECT count(*) FROM transactions WHERE user_id IS NULL AND amount = 40"
        ).fetchone()[0]
        == 1
    )
    assert _scan_postgres(sql, needles) == []
    # and the restore is on the audit trail with who did it
    audit = sql.execute(
        "SELECT actor, details FROM audit_logs WHERE action = 'archive_restore'"
    ).fetchone()
    assert audit[0] == "ops:test" and audit[1]["rows_of_erased_users"] == held_back


def test_exports_expire_after_their_window_and_go_with_the_erase(
    sql, redis_client, file_storage, monkeypatch
) -> None:
    from core.storage import open_storage

    storage = open_storage()
    a = _person(sql, redis_client, deleted_days_ago=None)
    b = _person(sql, redis_client, deleted_days_ago=None)
    first = export(a["id"], by="test")
    second = export(b["id"], by="test")
    assert first.expires_at is not None
    assert timedelta(days=6, hours=23) < first.expires_at - datetime.now(UTC) <= timedelta(days=7)
    # a day before the window ends nothing goes; a minute after it the expired one goes
    early = run_pipeline("gdpr-exports-expire", now=first.expires_at - timedelta(days=1))
    assert early.stats.rows_affected == 0 and storage.exists(first.key)
    sql.execute(
        "UPDATE gdpr_exports SET expires_at = now() + interval '8 days' WHERE export_id = %s",
        (second.export_id,),
    )
    late = run_pipeline("gdpr-exports-expire", now=first.expires_at + timedelta(minutes=1))
    assert late.stats.rows_affected == 1
    assert not storage.exists(first.key) and storage.exists(second.key)
    assert sql.execute(
        "SELECT user_id::text, subject_ref FROM compliance_logs "
        "WHERE action_type = 'data_export_deleted'"
    ).fetchall() == [(a["id"], f"export:{first.export_id}")]
    assert sql.execute("SELECT count(*) FROM gdpr_exports").fetchone()[0] == 1
    # the other export goes with its user's erase, before its window ends
    sql.execute(
        "UPDATE users SET deleted_at = now() - interval '31 days' WHERE id = %s", (b["id"],)
    )
    assert erase(b["id"], by="test").exports_deleted == 1
    assert not storage.exists(second.key)
    assert sql.execute("SELECT count(*) FROM gdpr_exports").fetchone()[0] == 0


def test_erase_scrubs_stripe_payloads_live_and_archived_keeping_the_ledger_ids(
    sql, redis_client, file_storage
) -> None:
    """Personal data where Stripe puts it (billing_details, receipt_email, shipping,
    customer_details, customer_email/name/phone/address, the Customer object and its
    previous_attributes) leaves stored events and their archives; ids and amounts stay."""
    from tests.support.lifecycle import scan_storage, stored_texts

    p = _person(sql, redis_client, deleted_days_ago=31)
    tag_old, tag_new = uuid.uuid4().hex[:6], uuid.uuid4().hex[:6]
    old_ids = _add_stripe_events(sql, p, days_ago=40, tag=tag_old)
    new_ids = _add_stripe_events(sql, p, days_ago=1, tag=tag_new)
    # and someone else's event, which must stay as it was
    bystander = {
        "id": "evt_other",
        "data": {"object": {"id": "ch_other", "receipt_email": "someone@example.net"}},
    }
    sql.execute(
        "INSERT INTO webhook_events (id, type, created, livemode, payload, status) "
        "VALUES ('evt_other', 'charge.succeeded', now(), false, %s, 'processed')",
        (json.dumps(bystander),),
    )
    assert run_pipeline("webhook-events-archive").stats.rows_affected == len(old_ids)
    street = f"{tag_new} Quartermain Lane 42"
    needles = [
        p["email"],
        p["phone"],
        p["full_name"],
        p["username"],
        street,
        f"{tag_old} Quartermain Lane 42",
    ]
    assert scan_storage(file_storage, needles)  # the archive holds them before the erase

    result = erase(p["id"], by="test")

    assert result.counts["webhook_events:scrubbed"] == len(new_ids) + 1  # + _person's own
    assert result.archives_rewritten == 1
    payloads = {
        r[0]: r[1] for r in sql.execute("SELECT id, payload FROM webhook_events").fetchall()
    }
    assert payloads["evt_other"] == bystander
    charge = payloads[f"evt_ch_{tag_new}"]["data"]["object"]
    assert charge["billing_details"] is None and charge["receipt_email"] is None
    assert charge["shipping"] is None
    # the ledger's ids and amounts are kept
    assert (charge["id"], charge["payment_intent"], charge["amount"]) == (
        f"ch_{tag_new}",
        f"pi_{tag_new}",
        2500,
    )
    session = payloads[f"evt_cs_{tag_new}"]["data"]["object"]
    assert session["customer_details"] is None and session["customer_email"] is None
    assert session["collected_information"] is None and session["id"] == f"cs_{tag_new}"
    invoice = payloads[f"evt_in_{tag_new}"]["data"]["object"]
    assert [
        invoice[k]
        for k in (
            "customer_email",
            "customer_name",
            "customer_phone",
            "customer_address",
            "customer_shipping",
        )
    ] == [None] * 5
    assert invoice["charge"] == f"ch_{tag_new}"
    customer = payloads[f"evt_cu_{tag_new}"]["data"]
    assert [customer["object"][k] for k in ("email", "name", "phone", "address")] == [None] * 4
    assert customer["previous_attributes"] == {"email": None, "address": None}
    # nothing of the person is left in the table or in any stored object
    assert _scan_postgres(sql, needles) == []
    assert scan_storage(file_storage, needles) == []
    # and the archived events are all still there, with their ids
    archived = [
        json.loads(line)
        for key, data in stored_texts(file_storage).items()
        if key.startswith("webhook_events/")
        for line in data.decode().splitlines()
    ]
    assert sorted(e["id"] for e in archived) == sorted(old_ids)
    old_charge = next(e for e in archived if e["id"] == f"evt_ch_{tag_old}")
    assert old_charge["payload"]["data"]["object"]["payment_intent"] == f"pi_{tag_old}"
    assert old_charge["payload"]["data"]["object"]["billing_details"] is None


_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(["ch_1", "pi_2", "eur", "x"])
)
_keys = st.sampled_from(
    [
        "id",
        "object",
        "data",
        "metadata",
        "description",
        "name",
        "email",
        "billing_details",
        "items",
        "note",
        "customer",
        "previous_attributes",
        "address",
    ]
)


@given(
    doc=st.recursive(
        _json_leaf,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)
        ),
        max_leaves=25,
    ),
    spots=st.lists(st.integers(min_value=0, max_value=30), max_size=4),
)
@settings(max_examples=200, deadline=None)
def test_scrubbed_payloads_hold_no_identifier_wherever_it_was_put(
    doc: Any, spots: list[int]
) -> None:
    """Identifiers planted anywhere in any JSON shape (inside ids, metadata, lists, free
    text, mixed case) never survive scrub_stripe; strings without them are kept."""
    from pipelines.lifecycle.scrub import scrub_stripe

    needles = ["zelda@example.org", "Zelda Quartermain", "+491500099"]
    leaves: list[tuple[Any, Any]] = []

    def collect(node: Any) -> None:
        items = (
            node.items()
            if isinstance(node, dict)
            else enumerate(node)
            if isinstance(node, list)
            else []
        )
        for k, v in list(items):
            if isinstance(v, (dict, list)):
                collect(v)
            else:
                leaves.append((node, k))

    collect(doc)
    for i, spot in enumerate(spots):
        if leaves:
            node, k = leaves[spot % len(leaves)]
            node[k] = f"note {needles[i % 3].upper() if i % 2 else needles[i % 3]} end"
    scrubbed = scrub_stripe(doc, needles)
    out = json.dumps(scrubbed).lower()
    assert not any(n.lower() in out for n in needles)
    # ids the ledger needs are kept: an "id" without an identifier in it is untouched
    if isinstance(doc, dict) and isinstance(doc.get("id"), str) and "note" not in doc["id"]:
        assert scrubbed["id"] == doc["id"]
