"""What a Stripe event does to SaltBitter's tables: subscription and invoice events fold into
``subscriptions`` (one row per Stripe subscription) and set ``users.subscription_tier`` to the
tier of the user's entitled subscription, else 'free'.

Events arrive in any order and more than once: like tidemill's Lovendo effects, every applied
event of the subscription is re-folded in (created, id) order under a per-subscription lock
(``plan_subscription`` from workers/stripe_effects.py), so the row is the same whatever the
order the events came in."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from db.engine import UnitOfWork

_SUBSCRIPTION_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0))"
_EVENTS = """
    WITH tagged AS (
        UPDATE webhook_events SET subject_id = %(sub_id)s WHERE id = %(event_id)s RETURNING id
    )
    SELECT payload FROM webhook_events
    WHERE (subject_id = %(sub_id)s AND status = 'processed') OR id = %(event_id)s
"""
_USER = """
    SELECT id FROM users WHERE id = %(uid)s
    UNION ALL
    SELECT user_id FROM subscriptions WHERE stripe_customer_id = %(customer)s
    LIMIT 1
"""
_UPSERT = """
    INSERT INTO subscriptions (user_id, tier, stripe_subscription_id, stripe_customer_id, status,
        current_period_start, current_period_end, cancel_at_period_end)
    VALUES (%(user_id)s, %(tier)s, %(sub_id)s, %(customer)s, %(status)s, %(period_start)s,
        %(period_end)s, %(cancel)s)
    ON CONFLICT (user_id) DO UPDATE SET
        tier = EXCLUDED.tier, stripe_subscription_id = EXCLUDED.stripe_subscription_id,
        stripe_customer_id = EXCLUDED.stripe_customer_id, status = EXCLUDED.status,
        current_period_start = EXCLUDED.current_period_start,
        current_period_end = EXCLUDED.current_period_end,
        cancel_at_period_end = EXCLUDED.cancel_at_period_end, updated_at = now()
"""
# SaltBitter keeps one subscription per user (user_id UNIQUE); the tier follows its status.
_TIER = """
    UPDATE users SET subscription_tier = COALESCE((
        SELECT tier FROM subscriptions
        WHERE user_id = %(user_id)s AND status = ANY(%(entitled)s)), 'free'),
        updated_at = now()
    WHERE id = %(user_id)s
"""


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def apply_stripe_event(uow: UnitOfWork, event: Mapping[str, Any]) -> str | None:
    from core.settings import get_settings
    from workers.stripe_effects import (
        ENTITLED,
        fetch_subscription,
        plan_subscription,
        stripe_time,
        subscription_id_of,
    )

    kind = event["type"]
    if not (kind.startswith("customer.subscription.") or kind.startswith("invoice.")):
        return "ignored"
    sub_id = subscription_id_of(dict(event))
    if sub_id is None:
        return "ignored"
    uow.sql(_SUBSCRIPTION_LOCK, {"key": f"subscription:{sub_id}"})
    payloads = [r.payload for r in uow.sql(_EVENTS, {"sub_id": sub_id, "event_id": event["id"]})]
    state = plan_subscription(payloads, current=fetch_subscription(get_settings(), sub_id))
    if state is None:
        return "processed"  # invoices only so far: the subscription event folds them in
    row = uow.sql(
        _USER,
        {"uid": _uuid((state.get("metadata") or {}).get("user_id")), "customer": state["customer"]},
    ).fetchone()
    if row is None:
        from workers.stripe_effects import UnknownCustomer

        raise UnknownCustomer(f"no SaltBitter user for subscription {sub_id}")
    user_id = row[0]
    uow.sql(
        _UPSERT,
        {
            "user_id": user_id,
            "tier": state["tier"],
            "sub_id": sub_id,
            "customer": state["customer"],
            "status": state["status"],
            "period_start": stripe_time(state["period_start"]),
            "period_end": stripe_time(state["period_end"]),
            "cancel": state["cancel_at_period_end"],
        },
    )
    uow.sql(_TIER, {"user_id": user_id, "entitled": list(ENTITLED)})
    return "processed"
