"""What a Stripe event does to Bilten's tables: a succeeded PaymentIntent completes the Bilten
payment its metadata names (``metadata.payment_id``); a failed one marks it failed. The
payments trigger sends the confirmation once the row says completed."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from db.engine import UnitOfWork

_COMPLETE = """
    UPDATE payments SET status = 'completed', transaction_id = %(pi)s,
           gateway_response = %(resp)s::jsonb, updated_at = now()
    WHERE id = %(id)s AND status <> 'completed'
"""
# A failure arriving after the success (Stripe does not order events) changes nothing.
_FAIL = """
    UPDATE payments SET status = 'failed', transaction_id = %(pi)s,
           gateway_response = %(resp)s::jsonb, updated_at = now()
    WHERE id = %(id)s AND status = 'pending'
"""


def _payment_id(obj: Mapping[str, Any]) -> uuid.UUID | None:
    try:
        return uuid.UUID(str((obj.get("metadata") or {}).get("payment_id")))
    except ValueError:
        return None


def apply_stripe_event(uow: UnitOfWork, event: Mapping[str, Any]) -> str | None:
    kind = event["type"]
    if kind not in ("payment_intent.succeeded", "payment_intent.payment_failed"):
        return "ignored"
    pi = event["data"]["object"]
    payment = _payment_id(pi)
    if payment is None:
        return "ignored"  # not one of Bilten's ticket payments
    resp = json.dumps({"event": event["id"], "status": pi.get("status")})
    sql = _COMPLETE if kind == "payment_intent.succeeded" else _FAIL
    uow.sql(sql, {"id": payment, "pi": pi["id"], "resp": resp})
    if uow.sql("SELECT 1 FROM payments WHERE id = %(id)s", {"id": payment}).fetchone() is None:
        return "ignored"  # names no Bilten payment (another system's intent, or a typo)
    return "processed"
