"""Stripe event builders (from core.stripe_samples) plus storing events as the receiver does."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import text

from core.stripe_samples import charge, dispute, event, invoice, payment_intent, subscription
from db.engine import unit_of_work

__all__ = ["charge", "dispute", "event", "invoice", "payment_intent", "store", "subscription"]


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
