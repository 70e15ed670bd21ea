"""Realistic Stripe events for tests: the shapes stripe sends, with controllable ids and times."""

from __future__ import annotations

import itertools
import json
from typing import Any

from sqlalchemy import text

from db.engine import unit_of_work

_ids = itertools.count(1)


def event(
    type_: str, obj: dict[str, Any], *, created: int, event_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": event_id or f"evt_{next(_ids):08d}",
        "object": "event",
        "api_version": "2024-06-20",
        "created": created,
        "livemode": False,
        "type": type_,
        "data": {"object": obj},
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


def dispute(
    dp: str, *, ch: str, pi: str, amount: int, status: str, currency: str = "usd"
) -> dict[str, Any]:
    return {
        "id": dp,
        "object": "dispute",
        "amount": amount,
        "charge": ch,
        "currency": currency,
        "payment_intent": pi,
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


def store(events: list[dict[str, Any]]) -> None:
    """Insert events as the receiver would (status received), ignoring duplicates."""
    with unit_of_work() as uow:
        for e in events:
            uow.execute(
                text("""
                INSERT INTO webhook_events (id, type, created, livemode, api_version, payload)
                VALUES (:id, :type, to_timestamp(:created), :livemode, :api, CAST(:p AS jsonb))
                ON CONFLICT (id) DO NOTHING
            """),
                {
                    "id": e["id"],
                    "type": e["type"],
                    "created": e["created"],
                    "livemode": e["livemode"],
                    "api": e["api_version"],
                    "p": json.dumps(e),
                },
            )
