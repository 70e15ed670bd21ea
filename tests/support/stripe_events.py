"""Stripe event builders (from core.stripe_samples) plus storing events as the receiver does."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import text

from core.stripe_samples import (
    balance_transaction,
    charge,
    dispute,
    event,
    invoice,
    new_id,
    payment_intent,
    subscription,
)
from db.engine import unit_of_work

__all__ = [
    "balance_transaction",
    "charge",
    "dispute",
    "event",
    "invoice",
    "new_id",
    "payment_intent",
    "store",
    "subscription",
    "woken_event_ids",
]


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


def woken_event_ids() -> list[str]:
    """Events queued again through the outbox since the last call (woken by their payment),
    in queue order; the rows are marked dispatched so a later call sees only new ones."""
    with unit_of_work() as uow:
        rows = uow.execute(
            text("""
            UPDATE outbox SET dispatched_at = now()
            WHERE actor = 'process_event' AND dispatched_at IS NULL
              AND args ->> 0 IN (SELECT id FROM webhook_events WHERE status <> 'processed')
            RETURNING id, args ->> 0 AS event_id
        """)
        ).all()
    return [r.event_id for r in sorted(rows)]
