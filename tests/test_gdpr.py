"""GDPR erase and export against real Postgres and Redis, with a scan for leftovers."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from core.storage import open_storage
from pipelines.engine import run_pipeline
from pipelines.gdpr import MESSAGE_DELETED, TOMBSTONE_ID, NotEligible, erase, export
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
        WHERE c.table_schema IN ('public', 'partitions') AND t.table_type = 'BASE TABLE'
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
    assert all(not s.startswith(("delete ", "detach ", "anonymize ")) for s in order[order.index("delete users") + 1 :])


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
