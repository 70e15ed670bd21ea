"""What a Stripe event does to our tables. Called by ``workers.payments.process_event`` inside
the message's unit of work, with the event row already locked.

Exactly once, whatever the order:
- money moves only through ``ledger_entries`` rows unique on their Stripe source id, and a
  user's balance changes in the same statement batch as the insert that created the entry;
- all events of one payment serialise on its ``transactions`` row (``SELECT … FOR UPDATE``),
  so a refund's delta is computed against every refund already applied;
- a transaction's status only moves up (pending < failed < completed) and a closed dispute
  never reopens;
- a subscription's state is recomputed as a fold over every applied event for it in
  ``(created, id)`` order, under a per-subscription advisory lock, so the final state equals
  the in-order state whatever order the events arrived in.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import dramatiq

from db.engine import UnitOfWork
from workers.base import PermanentError

Event = dict[str, Any]
ENTITLED = ("active", "trialing", "past_due")  # past_due: Stripe is still retrying the card
ZERO_DECIMAL = {
    "bif",
    "clp",
    "djf",
    "gnf",
    "jpy",
    "kmf",
    "krw",
    "mga",
    "pyg",
    "rwf",
    "ugx",
    "vnd",
    "vuv",
    "xaf",
    "xof",
    "xpf",
}


class UnknownCustomer(PermanentError):
    """No user can be found for the event: retrying cannot help; replay after fixing data."""


class AwaitingPayment(dramatiq.Retry):
    """A refund or dispute arrived before its payment (Stripe does not order events), and
    only the payment tells whose money it is: an expected wait, retried with backoff."""


def money(minor: int, currency: str) -> Decimal:
    if currency.lower() in ZERO_DECIMAL:
        return Decimal(minor)
    return (Decimal(minor) / 100).quantize(Decimal("0.01"))


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except (TypeError, ValueError):
        return None


_USER_BY_ID = "SELECT id FROM users WHERE id = %(id)s"
_USER_BY_CUSTOMER = "SELECT id FROM users WHERE stripe_customer_id = %(customer)s"

# The entry and the balance move in one statement: the balance moves only if the entry is new.
_CREDIT = """
    WITH entry AS (
        INSERT INTO ledger_entries (user_id, source_id, kind, amount, currency, stripe_charge_id,
                                    stripe_event_id)
        VALUES (%(user_id)s, %(source_id)s, %(kind)s, %(amount)s, %(currency)s, %(charge_id)s,
                %(event_id)s)
        ON CONFLICT (source_id) DO NOTHING
        RETURNING user_id, amount
    ), moved AS (
        UPDATE users SET balance = users.balance + entry.amount, updated_at = now()
        FROM entry WHERE users.id = entry.user_id
    )
    SELECT count(*) AS inserted FROM entry
"""
_NOTIFY = """
    INSERT INTO notifications (user_id, type, title, body, data)
    VALUES (%(user_id)s, %(type)s, %(title)s, NULL, %(data)s::jsonb)
"""
# ON CONFLICT DO UPDATE locks the existing row as FOR UPDATE would, and returns it: one
# statement finds, creates if missing, and locks the payment's transaction.
_LOCK_PAYMENT = """
    INSERT INTO transactions (user_id, moment_id, type, amount, currency, status,
                              stripe_payment_intent_id, stripe_charge_id)
    VALUES (%(user_id)s, %(moment_id)s, 'payment', %(amount)s, %(currency)s, 'pending',
            %(intent_id)s, %(charge_id)s)
    ON CONFLICT (stripe_payment_intent_id) DO UPDATE
        SET stripe_charge_id = COALESCE(transactions.stripe_charge_id, EXCLUDED.stripe_charge_id)
    RETURNING id, user_id, status, dispute_status
"""
_COMPLETE_PAYMENT = """
    INSERT INTO transactions (user_id, moment_id, type, amount, currency, status,
                              stripe_payment_intent_id, stripe_charge_id)
    VALUES (%(user_id)s, %(moment_id)s, 'payment', %(amount)s, %(currency)s, 'completed',
            %(intent_id)s, %(charge_id)s)
    ON CONFLICT (stripe_payment_intent_id) DO UPDATE
        SET status = 'completed', amount = EXCLUDED.amount, updated_at = now(),
            stripe_charge_id = COALESCE(transactions.stripe_charge_id, EXCLUDED.stripe_charge_id)
    RETURNING id, user_id
"""
_FAIL_PAYMENT = "UPDATE transactions SET status = 'failed', updated_at = now() WHERE id = %(id)s"
_PAYMENT_FOR_UPDATE = """
    SELECT id, user_id, status, dispute_status FROM transactions
    WHERE stripe_payment_intent_id = %(intent_id)s FOR UPDATE
"""
_REFUNDED_SO_FAR = """
    SELECT COALESCE(-sum(amount), 0) AS refunded FROM ledger_entries
    WHERE stripe_charge_id = %(charge_id)s AND kind = 'refund'
"""
_SET_DISPUTE = "UPDATE transactions SET dispute_status = %(status)s WHERE id = %(id)s"


def find_user(uow: UnitOfWork, obj: dict[str, Any]) -> uuid.UUID:
    """metadata.user_id when it names a user, else the user with this Stripe customer."""
    candidate = _uuid((obj.get("metadata") or {}).get("user_id"))
    if candidate is not None:
        row = uow.sql(_USER_BY_ID, {"id": candidate}).fetchone()
        if row:
            return uuid.UUID(str(row.id))
    customer = obj.get("customer")
    if customer:
        row = uow.sql(_USER_BY_CUSTOMER, {"customer": customer}).fetchone()
        if row:
            return uuid.UUID(str(row.id))
    raise UnknownCustomer(f"no user for {obj.get('object')} {obj.get('id')}")


def credit(
    uow: UnitOfWork,
    *,
    user_id: uuid.UUID | None,
    source_id: str,
    kind: str,
    amount: Decimal,
    currency: str,
    charge_id: str | None,
    event_id: str,
) -> bool:
    """Insert the ledger entry and move the balance, once per source id. True if it moved."""
    row = uow.sql(
        _CREDIT,
        {
            "user_id": user_id,
            "source_id": source_id,
            "kind": kind,
            "amount": amount,
            "currency": currency.upper(),
            "charge_id": charge_id,
            "event_id": event_id,
        },
    ).fetchone()
    return bool(row and row.inserted)


def notify(
    uow: UnitOfWork, user_id: uuid.UUID, kind: str, title: str, data: dict[str, Any]
) -> None:
    uow.sql(_NOTIFY, {"user_id": user_id, "type": kind, "title": title, "data": json.dumps(data)})


def lock_payment(
    uow: UnitOfWork,
    *,
    intent_id: str,
    user_id: uuid.UUID | None,
    amount: Decimal,
    currency: str,
    moment_id: uuid.UUID | None = None,
    charge_id: str | None = None,
) -> Any:
    """The transaction row of a PaymentIntent, created pending if the app never wrote it,
    locked for the rest of the unit of work."""
    return uow.sql(
        _LOCK_PAYMENT,
        {
            "user_id": user_id,
            "moment_id": moment_id,
            "amount": amount,
            "currency": currency.upper(),
            "intent_id": intent_id,
            "charge_id": charge_id,
        },
    ).fetchone()


def _moment(obj: dict[str, Any]) -> uuid.UUID | None:
    return _uuid((obj.get("metadata") or {}).get("moment_id"))


def payment_succeeded(uow: UnitOfWork, event: Event) -> None:
    pi = event["data"]["object"]
    user_id = find_user(uow, pi)
    currency = pi.get("currency", "try")
    amount = money(int(pi.get("amount_received") or pi["amount"]), currency)
    charge = pi.get("latest_charge")
    row = uow.sql(
        _COMPLETE_PAYMENT,
        {
            "user_id": user_id,
            "moment_id": _moment(pi),
            "amount": amount,
            "currency": currency.upper(),
            "intent_id": pi["id"],
            "charge_id": charge,
        },
    ).fetchone()
    assert row is not None  # INSERT … ON CONFLICT DO UPDATE … RETURNING always returns the row
    owner = row.user_id or user_id
    if credit(
        uow,
        user_id=owner,
        source_id=pi["id"],
        kind="payment",
        amount=amount,
        currency=currency,
        charge_id=charge,
        event_id=event["id"],
    ):
        notify(
            uow,
            owner,
            "payment_succeeded",
            "Payment received",
            {"payment_intent": pi["id"], "amount": str(amount), "currency": currency.upper()},
        )


def payment_failed(uow: UnitOfWork, event: Event) -> None:
    pi = event["data"]["object"]
    user_id = find_user(uow, pi)
    currency = pi.get("currency", "try")
    amount = money(int(pi["amount"]), currency)
    row = lock_payment(
        uow,
        intent_id=pi["id"],
        user_id=user_id,
        amount=amount,
        currency=currency,
        moment_id=_moment(pi),
    )
    if row.status == "pending":  # never downgrade a completed payment; failed is already failed
        uow.sql(_FAIL_PAYMENT, {"id": row.id})
        notify(
            uow,
            row.user_id or user_id,
            "payment_failed",
            "Payment failed",
            {"payment_intent": pi["id"]},
        )


def _payment_for_charge(
    uow: UnitOfWork, obj: dict[str, Any], *, charge_id: str, intent_id: str | None
) -> Any:
    if not intent_id:
        raise PermanentError(f"{obj.get('object')} {obj.get('id')} has no payment_intent")
    row = uow.sql(_PAYMENT_FOR_UPDATE, {"intent_id": intent_id}).fetchone()
    if row is not None and row.user_id is not None:
        return row
    try:
        user_id = find_user(uow, obj)
    except UnknownCustomer:
        raise AwaitingPayment(f"payment {intent_id} not seen yet") from None
    currency = obj.get("currency", "try")
    return lock_payment(
        uow,
        intent_id=intent_id,
        user_id=user_id,
        amount=money(int(obj.get("amount", 0)), currency),
        currency=currency,
        charge_id=charge_id,
    )


def charge_refunded(uow: UnitOfWork, event: Event) -> None:
    charge = event["data"]["object"]
    currency = charge.get("currency", "try")
    row = _payment_for_charge(
        uow, charge, charge_id=charge["id"], intent_id=charge.get("payment_intent")
    )
    # amount_refunded is cumulative: refund only what no earlier event has refunded. The
    # payment row lock above serialises every refund event of this charge.
    refunded = uow.sql(_REFUNDED_SO_FAR, {"charge_id": charge["id"]}).fetchone()
    already = refunded.refunded if refunded else 0
    total = money(int(charge.get("amount_refunded") or 0), currency)
    delta = total - Decimal(already)
    if delta > 0:
        credit(
            uow,
            user_id=row.user_id,
            source_id=f"{charge['id']}:refunded:{total}",
            kind="refund",
            amount=-delta,
            currency=currency,
            charge_id=charge["id"],
            event_id=event["id"],
        )


def _dispute_payment(uow: UnitOfWork, dispute: dict[str, Any]) -> Any:
    return _payment_for_charge(
        uow, dispute, charge_id=dispute["charge"], intent_id=dispute.get("payment_intent")
    )


def _dispute_money(uow: UnitOfWork, event: Event, row: Any, *, step: str, sign: int) -> None:
    """Hold (sign -1) or release (sign +1) the disputed amount, once per dispute and step."""
    dispute = event["data"]["object"]
    currency = dispute.get("currency", "try")
    credit(
        uow,
        user_id=row.user_id,
        source_id=f"{dispute['id']}:{step}",
        kind=f"dispute_{step}",
        amount=sign * money(int(dispute["amount"]), currency),
        currency=currency,
        charge_id=dispute["charge"],
        event_id=event["id"],
    )


def dispute_created(uow: UnitOfWork, event: Event) -> None:
    row = _dispute_payment(uow, event["data"]["object"])
    _dispute_money(uow, event, row, step="hold", sign=-1)
    if row.dispute_status not in ("won", "lost"):  # a closed dispute never reopens
        uow.sql(_SET_DISPUTE, {"status": "open", "id": row.id})


def dispute_closed(uow: UnitOfWork, event: Event) -> None:
    dispute = event["data"]["object"]
    row = _dispute_payment(uow, dispute)
    outcome = "won" if dispute.get("status") == "won" else "lost"
    if outcome == "won":
        _dispute_money(uow, event, row, step="release", sign=+1)
    uow.sql(_SET_DISPUTE, {"status": outcome, "id": row.id})


# --- subscriptions: state is a fold over the subscription's events ------------------------------


def subscription_id_of(event: Event) -> str | None:
    obj = event["data"]["object"]
    if obj.get("object") == "subscription":
        return str(obj["id"])
    sub = obj.get("subscription")
    if sub is None:  # API versions >= 2025: invoice.parent.subscription_details.subscription
        sub = ((obj.get("parent") or {}).get("subscription_details") or {}).get("subscription")
    if isinstance(sub, dict):
        sub = sub.get("id")
    return str(sub) if sub else None


def _ts(value: Any) -> datetime | None:
    return datetime.fromtimestamp(int(value), UTC) if value else None


def _tier(sub: dict[str, Any]) -> str:
    tier = (sub.get("metadata") or {}).get("tier")
    if not tier:
        items = (sub.get("items") or {}).get("data") or []
        price = (items[0].get("price") or {}) if items else {}
        tier = price.get("lookup_key") or (price.get("metadata") or {}).get("tier")
    return str(tier or "premium")


def fold_subscription(events: list[Event]) -> dict[str, Any]:
    """The subscription's state after applying `events` in order. Pure: no I/O."""
    state: dict[str, Any] = {}
    for event in events:
        obj = event["data"]["object"]
        kind = event["type"]
        if kind.startswith("customer.subscription."):
            items = (obj.get("items") or {}).get("data") or [{}]
            state.update(
                customer=obj.get("customer"),
                tier=_tier(obj),
                status="canceled" if kind.endswith(".deleted") else obj.get("status", "active"),
                period_start=_ts(
                    obj.get("current_period_start") or items[0].get("current_period_start")
                ),
                period_end=_ts(obj.get("current_period_end") or items[0].get("current_period_end")),
                cancel_at_period_end=bool(obj.get("cancel_at_period_end")),
                metadata=obj.get("metadata") or {},
            )
        elif kind == "invoice.paid":
            if state.get("status") != "canceled":
                state["status"] = "active"
            lines = (obj.get("lines") or {}).get("data") or []
            period = (lines[0].get("period") or {}) if lines else {}
            if period.get("end"):
                state["period_start"] = _ts(period.get("start"))
                state["period_end"] = _ts(period["end"])
            state.setdefault("customer", obj.get("customer"))
        elif kind == "invoice.payment_failed":
            if state.get("status") != "canceled":
                state["status"] = "past_due"
            state.setdefault("customer", obj.get("customer"))
        state["event_created"] = _ts(event["created"])
        state["event_id"] = event["id"]
    return state


_SUBSCRIPTION_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0))"
# Tag this event with its subscription and read every applied event of it, this one included.
_SUBSCRIPTION_EVENTS = """
    WITH tagged AS (
        UPDATE webhook_events SET subject_id = %(sub_id)s WHERE id = %(event_id)s RETURNING id
    )
    SELECT payload FROM webhook_events
    WHERE subject_id = %(sub_id)s AND (status = 'processed' OR id = %(event_id)s)
    UNION ALL
    SELECT payload FROM webhook_events
    WHERE id = %(event_id)s AND subject_id IS DISTINCT FROM %(sub_id)s
"""
_UPSERT_SUBSCRIPTION = """
    INSERT INTO subscriptions (user_id, tier, status, stripe_subscription_id, stripe_customer_id,
        current_period_start, current_period_end, cancel_at_period_end, stripe_event_created,
        stripe_event_id)
    VALUES (%(user_id)s, %(tier)s, %(status)s, %(sub_id)s, %(customer)s, %(period_start)s,
        %(period_end)s, %(cancel)s, %(event_created)s, %(event_id)s)
    ON CONFLICT (stripe_subscription_id) DO UPDATE SET
        user_id = EXCLUDED.user_id, tier = EXCLUDED.tier, status = EXCLUDED.status,
        stripe_customer_id = EXCLUDED.stripe_customer_id,
        current_period_start = EXCLUDED.current_period_start,
        current_period_end = EXCLUDED.current_period_end,
        cancel_at_period_end = EXCLUDED.cancel_at_period_end,
        stripe_event_created = EXCLUDED.stripe_event_created,
        stripe_event_id = EXCLUDED.stripe_event_id, updated_at = now()
"""
_USER_TIER = """
    UPDATE users SET subscription_tier = COALESCE((
        SELECT tier FROM subscriptions
        WHERE user_id = %(user_id)s AND status = ANY(%(entitled)s)
        ORDER BY current_period_end DESC NULLS LAST, stripe_subscription_id LIMIT 1), 'free')
    WHERE id = %(user_id)s
"""


def subscription_event(uow: UnitOfWork, event: Event) -> None:
    sub_id = subscription_id_of(event)
    if sub_id is None:
        return  # an invoice not tied to a subscription: nothing to change
    # One subscription's events apply one at a time; after the lock this transaction sees
    # every event committed before it.
    uow.sql(_SUBSCRIPTION_LOCK, {"key": f"subscription:{sub_id}"})
    payloads = [
        r.payload
        for r in uow.sql(_SUBSCRIPTION_EVENTS, {"sub_id": sub_id, "event_id": event["id"]})
    ]
    state = fold_subscription(sorted(payloads, key=lambda e: (e["created"], e["id"])))
    if "tier" not in state:
        return  # only invoices so far: the subscription row waits for its subscription event
    user_id = find_user(
        uow,
        {
            "object": "subscription",
            "id": sub_id,
            "metadata": state.get("metadata"),
            "customer": state["customer"],
        },
    )
    uow.sql(
        _UPSERT_SUBSCRIPTION,
        {
            "user_id": user_id,
            "tier": state["tier"],
            "status": state["status"],
            "sub_id": sub_id,
            "customer": state["customer"],
            "period_start": state["period_start"],
            "period_end": state["period_end"],
            "cancel": state["cancel_at_period_end"],
            "event_created": state["event_created"],
            "event_id": state["event_id"],
        },
    )
    uow.sql(_USER_TIER, {"user_id": user_id, "entitled": list(ENTITLED)})


HANDLERS: dict[str, Callable[[UnitOfWork, Event], None]] = {
    "payment_intent.succeeded": payment_succeeded,
    "payment_intent.payment_failed": payment_failed,
    "charge.refunded": charge_refunded,
    "charge.dispute.created": dispute_created,
    "charge.dispute.closed": dispute_closed,
    "customer.subscription.created": subscription_event,
    "customer.subscription.updated": subscription_event,
    "customer.subscription.deleted": subscription_event,
    "invoice.paid": subscription_event,
    "invoice.payment_failed": subscription_event,
}


def apply_event(uow: UnitOfWork, event: Event) -> str:
    """Apply one event; 'processed', or 'ignored' for a type we do not act on."""
    from apps import active_profile  # issue 14: an app with effects of its own decides

    app_effect = active_profile().stripe
    if app_effect is not None:
        return app_effect(uow, event) or "ignored"
    handler = HANDLERS.get(event["type"])
    if handler is None:
        return "ignored"
    handler(uow, event)
    return "processed"
