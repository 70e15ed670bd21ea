"""Realistic Stripe events: the shapes Stripe sends, with controllable ids and times.

Used by `tidemill stripe send` (try the payment flow without Stripe) and by the tests.
"""

from __future__ import annotations

import itertools
import secrets
import time
from typing import Any

_ids = itertools.count(1)
_run = secrets.token_hex(3)


def new_id(prefix: str) -> str:
    return f"{prefix}_{_run}{next(_ids):06d}"


def event(
    type_: str,
    obj: dict[str, Any],
    *,
    created: int,
    event_id: str | None = None,
    previous_attributes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {"object": obj}
    if previous_attributes is not None:  # *.updated events: the changed fields' old values
        data["previous_attributes"] = previous_attributes
    return {
        "id": event_id or new_id("evt"),
        "object": "event",
        "api_version": "2024-06-20",
        "created": created,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": type_,
        "data": data,
    }


def payment_intent(
    pi: str,
    *,
    user_id: str,
    amount: int,
    status: str = "succeeded",
    currency: str = "usd",
    charge: str | None = None,
) -> dict[str, Any]:
    return {
        "id": pi,
        "object": "payment_intent",
        "amount": amount,
        "amount_received": amount if status == "succeeded" else 0,
        "currency": currency,
        "status": status,
        "latest_charge": charge,
        "customer": None,
        "metadata": {"user_id": user_id},
    }


def charge(
    ch: str, *, pi: str, user_id: str, amount: int, refunded: int, currency: str = "usd"
) -> dict[str, Any]:
    return {
        "id": ch,
        "object": "charge",
        "amount": amount,
        "amount_refunded": refunded,
        "currency": currency,
        "payment_intent": pi,
        "refunded": refunded >= amount,
        "metadata": {"user_id": user_id},
    }


def balance_transaction(dp: str, *, amount: int, currency: str, created: int) -> dict[str, Any]:
    """A dispute's balance transaction: negative when funds were withdrawn, positive when
    they were reinstated (Stripe lists zero, one or two on the dispute)."""
    step = "withdrawal" if amount < 0 else "reversal"
    return {
        "id": f"txn_{dp[3:]}_{step}",
        "object": "balance_transaction",
        "amount": amount,
        "currency": currency,
        "created": created,
        "fee": 1500 if amount < 0 else -1500,
        "net": amount - 1500 if amount < 0 else amount + 1500,
        "reporting_category": "dispute" if amount < 0 else "dispute_reversal",
        "source": dp,
        "status": "pending",
        "type": "adjustment",
    }


def dispute(
    dp: str,
    *,
    ch: str,
    pi: str,
    amount: int,
    status: str,
    currency: str = "usd",
    balance_transactions: list[dict[str, Any]] | None = None,
    created: int = 0,
) -> dict[str, Any]:
    return {
        "id": dp,
        "object": "dispute",
        "amount": amount,
        "balance_transactions": balance_transactions or [],
        "charge": ch,
        "created": created,
        "currency": currency,
        "is_charge_refundable": status.startswith("warning_"),
        "livemode": False,
        "metadata": {},
        "payment_intent": pi,
        "reason": "fraudulent",
        "status": status,
    }


def subscription(
    sub: str,
    *,
    customer: str,
    user_id: str,
    tier: str,
    status: str,
    period_start: int,
    period_end: int,
    cancel: bool = False,
) -> dict[str, Any]:
    return {
        "id": sub,
        "object": "subscription",
        "customer": customer,
        "status": status,
        "cancel_at_period_end": cancel,
        "current_period_start": period_start,
        "current_period_end": period_end,
        "metadata": {"user_id": user_id, "tier": tier},
        "items": {"object": "list", "data": [{"price": {"lookup_key": tier}}]},
    }


def invoice(
    inv: str, *, sub: str, customer: str, period_start: int, period_end: int
) -> dict[str, Any]:
    return {
        "id": inv,
        "object": "invoice",
        "customer": customer,
        "subscription": sub,
        "lines": {"data": [{"period": {"start": period_start, "end": period_end}}]},
    }


SAMPLE_TYPES = (
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "charge.refunded",
    "charge.dispute.created",
    "charge.dispute.funds_withdrawn",
    "charge.dispute.funds_reinstated",
    "charge.dispute.closed",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.paid",
    "invoice.payment_failed",
)


def sample(
    type_: str,
    *,
    user_id: str,
    amount: int = 2500,
    currency: str = "try",
    ref: str | None = None,
    refunded: int | None = None,
    outcome: str = "won",
    tier: str = "premium",
    customer: str | None = None,
) -> dict[str, Any]:
    """One realistic event of `type_` for `user_id`. `ref` names the PaymentIntent (payment
    events) or subscription (subscription events) so several events can tell one story."""
    now = int(time.time())
    month = 30 * 86400
    cus = customer or f"cus_{user_id.replace('-', '')[:14]}"
    if type_.startswith("payment_intent."):
        pi = ref or new_id("pi")
        status = "succeeded" if type_.endswith("succeeded") else "requires_payment_method"
        return event(
            type_,
            payment_intent(
                pi,
                user_id=user_id,
                amount=amount,
                status=status,
                currency=currency,
                charge=f"ch_{pi[3:]}",
            ),
            created=now,
        )
    if type_ == "charge.refunded":
        pi = ref or new_id("pi")
        return event(
            type_,
            charge(
                f"ch_{pi[3:]}",
                pi=pi,
                user_id=user_id,
                amount=amount,
                refunded=amount if refunded is None else refunded,
                currency=currency,
            ),
            created=now,
        )
    if type_.startswith("charge.dispute."):
        pi = ref or new_id("pi")
        inquiry = outcome.startswith("warning_")
        status = {
            "charge.dispute.created": "warning_needs_response" if inquiry else "needs_response",
            "charge.dispute.funds_withdrawn": "needs_response",
            "charge.dispute.funds_reinstated": "won",
        }.get(type_, outcome)
        moves = [] if inquiry else [-amount] + ([amount] if status == "won" else [])
        dp = f"dp_{pi[3:]}"
        return event(
            type_,
            dispute(
                dp,
                ch=f"ch_{pi[3:]}",
                pi=pi,
                amount=amount,
                status=status,
                currency=currency,
                balance_transactions=[
                    balance_transaction(dp, amount=m, currency=currency, created=now) for m in moves
                ],
                created=now,
            ),
            created=now,
        )
    if type_.startswith("customer.subscription."):
        sub = ref or new_id("sub")
        status = {"created": "active", "updated": "active", "deleted": "canceled"}[
            type_.rsplit(".", 1)[1]
        ]
        return event(
            type_,
            subscription(
                sub,
                customer=cus,
                user_id=user_id,
                tier=tier,
                status=status,
                period_start=now,
                period_end=now + month,
            ),
            created=now,
        )
    if type_.startswith("invoice."):
        sub = ref or new_id("sub")
        return event(
            type_,
            invoice(new_id("in"), sub=sub, customer=cus, period_start=now, period_end=now + month),
            created=now,
        )
    raise ValueError(f"no sample for {type_!r}; known: {', '.join(SAMPLE_TYPES)}")
