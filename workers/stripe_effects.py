"""What a Stripe event does to our tables. Called by ``workers.payments.process_event`` inside
the message's unit of work, with the event row already locked.

Each handler reads the event, plans (pure functions: ``plan_dispute``, ``plan_subscription``)
and applies. Exactly once, whatever the order:
- money moves only through ``ledger_entries`` rows unique on their Stripe source id, and the
  user's balance in that entry's currency (``user_balances``; ``users.balance`` for the user's
  own currency) moves in the same statement as the insert that created the entry;
- amounts are read in their currency's minor units (``core.currency``): zero-, two- and
  three-decimal currencies; amounts in different currencies are never added together;
- all events of one payment serialise on its ``transactions`` row (``SELECT … FOR UPDATE``),
  so a refund's delta is computed against every refund already applied;
- a dispute moves money as Stripe's balance does: an inquiry (``warning_*``) moves nothing,
  funds leave once when withdrawn and come back once when reinstated;
- a subscription's state is Stripe's latest object, chosen from every applied event by a rule
  that never looks at event ids (``plan_subscription``), under a per-subscription lock.

Errors are sorted where they arise: ``EventContentError`` (the event itself cannot be applied:
permanent, with a readable reason) and ``AwaitingPayment`` (a known wait, retried).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import dramatiq

from core.currency import UnknownCurrency, from_minor
from core.log import get_logger
from core.settings import get_settings
from core.stripe_api import fetch_subscription
from db.engine import UnitOfWork
from workers.base import PermanentError

log = get_logger(__name__)

Event = dict[str, Any]
ENTITLED = ("active", "trialing", "past_due")  # past_due: Stripe is still retrying the card
# Stripe's largest amounts are 12 digits (IDR); ledger columns hold 12 integer digits.
MAX_MINOR_UNITS = 10**12 - 1


class EventContentError(PermanentError):
    """The event's content cannot be applied (unknown currency, absurd amount, a reference
    the database refuses): retrying cannot help, so the event fails now with this reason."""


class UnknownCustomer(EventContentError):
    """No user can be found for the event: retrying cannot help; replay after fixing data."""


class AwaitingPayment(dramatiq.Retry):
    """A refund or dispute arrived before its payment (Stripe does not order events), and
    only the payment tells whose money it is: an expected wait, retried with backoff."""

    def __init__(self, intent_id: str) -> None:
        super().__init__(f"waiting for payment {intent_id}: not seen yet")
        self.intent_id = intent_id


# --- reading amounts --------------------------------------------------------------------------


def currency_of(obj: dict[str, Any]) -> str:
    """The object's currency as an upper-case ISO code, or `EventContentError`."""
    currency = obj.get("currency")
    try:
        from_minor(0, currency)  # type: ignore[arg-type]
    except UnknownCurrency as exc:
        raise EventContentError(f"{_name(obj)}: {exc}") from None
    return str(currency).upper()


def amount_of(obj: dict[str, Any], field: str, currency: str) -> Decimal:
    """``obj[field]`` (minor units) in major units of `currency`, or `EventContentError`."""
    value = obj.get(field)
    # bool is an int subclass: `true` is not an amount
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventContentError(f"{_name(obj)}: {field} is not an integer amount")
    if not 0 <= value <= MAX_MINOR_UNITS:
        raise EventContentError(f"{_name(obj)}: {field} {value} is out of range")
    return from_minor(value, currency)


def _name(obj: dict[str, Any]) -> str:
    return f"{str(obj.get('object'))[:32]} {str(obj.get('id'))[:64]}"


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except (TypeError, ValueError):
        return None


def _metadata(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _stripe_id(value: Any, field: str, obj: dict[str, Any]) -> str:
    if isinstance(value, dict):  # an expanded object
        value = value.get("id")
    if not isinstance(value, str) or not value or len(value) > 255:
        raise EventContentError(f"{_name(obj)}: {field} is missing or not an id")
    return value


# --- SQL ----------------------------------------------------------------------------------------

_USER_BY_ID = "SELECT id FROM users WHERE id = %(id)s"
_USER_BY_CUSTOMER = "SELECT id FROM users WHERE stripe_customer_id = %(customer)s"

# The balances move in the statement that inserted the entry, and only if the entry is new
# (`entry` returned it): the per-currency balance always, users.balance only for an entry in
# the user's own currency.
_MOVE_BALANCES = """
    per_currency AS (
        INSERT INTO user_balances (user_id, currency, amount)
        SELECT user_id, currency, amount FROM entry WHERE user_id IS NOT NULL
        ON CONFLICT (user_id, currency) DO UPDATE
            SET amount = user_balances.amount + EXCLUDED.amount, updated_at = now()
    ), home AS (
        UPDATE users SET balance = users.balance + entry.amount, updated_at = now()
        FROM entry WHERE users.id = entry.user_id AND upper(users.currency) = entry.currency
    )
"""
_CREDIT = f"""
    WITH entry AS (
        INSERT INTO ledger_entries (user_id, source_id, kind, amount, currency, stripe_charge_id,
                                    stripe_event_id)
        VALUES (%(user_id)s, %(source_id)s, %(kind)s, %(amount)s, %(currency)s, %(charge_id)s,
                %(event_id)s)
        ON CONFLICT (source_id) DO NOTHING
        RETURNING user_id, amount, currency
    ), {_MOVE_BALANCES}
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
                              stripe_payment_intent_id, stripe_charge_id, metadata)
    VALUES (%(user_id)s, %(moment_id)s, 'payment', %(amount)s, %(currency)s, 'pending',
            %(intent_id)s, %(charge_id)s, %(meta)s::jsonb)
    ON CONFLICT (stripe_payment_intent_id) DO UPDATE
        SET stripe_charge_id = COALESCE(transactions.stripe_charge_id, EXCLUDED.stripe_charge_id)
    RETURNING id, user_id, status, dispute_status
"""
# A payment's whole effect in one statement (one round trip, where it took four): find its
# user (metadata.user_id if it names one, else the Stripe customer's), complete the
# transaction (created if the app never wrote it), credit it once (`entry` is empty when
# the payment was credited before, and then nothing below it moves) and notify the user.
# No row when no user is found, and then nothing is written.
_SUCCEED_PAYMENT = f"""
    WITH owner AS (
        SELECT id FROM users WHERE id = %(candidate)s::uuid
        UNION ALL
        SELECT id FROM users WHERE stripe_customer_id = %(customer)s::text
            AND NOT EXISTS (SELECT FROM users WHERE id = %(candidate)s::uuid)
    ), payment AS (
        INSERT INTO transactions (user_id, moment_id, type, amount, currency, status,
                                  stripe_payment_intent_id, stripe_charge_id, metadata)
        SELECT owner.id, %(moment_id)s::uuid, 'payment', %(amount)s::numeric,
               %(currency)s::text, 'completed', %(intent_id)s::text, %(charge_id)s::text,
               %(meta)s::jsonb
        FROM owner
        ON CONFLICT (stripe_payment_intent_id) DO UPDATE
            SET status = 'completed', amount = EXCLUDED.amount, currency = EXCLUDED.currency,
                updated_at = now(),
                stripe_charge_id = COALESCE(transactions.stripe_charge_id,
                                            EXCLUDED.stripe_charge_id),
                metadata = CASE WHEN EXCLUDED.metadata IS NULL THEN transactions.metadata
                                ELSE COALESCE(transactions.metadata, '{{}}') || EXCLUDED.metadata
                           END
        RETURNING user_id
    ), entry AS (
        INSERT INTO ledger_entries (user_id, source_id, kind, amount, currency, stripe_charge_id,
                                    stripe_event_id)
        SELECT COALESCE(payment.user_id, owner.id), %(intent_id)s::text, 'payment',
               %(amount)s::numeric, %(currency)s::text, %(charge_id)s::text, %(event_id)s::text
        FROM payment CROSS JOIN owner
        ON CONFLICT (source_id) DO NOTHING
        RETURNING user_id, amount, currency
    ), {_MOVE_BALANCES}, notice AS (
        INSERT INTO notifications (user_id, type, title, body, data)
        SELECT user_id, 'payment_succeeded', 'Payment received', NULL, %(notice)s::jsonb
        FROM entry
    )
    SELECT id AS owner FROM owner
"""
# FOR KEY SHARE: the moment cannot be deleted between this check and the insert that refers
# to it, so the foreign key cannot fail later in this transaction.
_MOMENT_EXISTS = "SELECT id FROM moments WHERE id = %(id)s FOR KEY SHARE"
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
# Refunds and disputes that waited for this payment go again now, not at their next backoff.
# Looked for first: an outbox INSERT, even of no rows, fires the relay's wake-up NOTIFY, and
# NOTIFY serialises commits. A statement of its own, after the payment's: its snapshot is taken
# once the payment row is locked, so a refund that gave up while this payment waited for the
# lock is seen (a check inside the payment's statement would read the older snapshot).
_ANY_WAITING = """
    SELECT 1 FROM webhook_events
    WHERE subject_id = %(subject)s AND status IN ('waiting', 'failed') LIMIT 1
"""
_WAKE_WAITING = """
    WITH woken AS (
        UPDATE webhook_events SET status = 'received'
        WHERE subject_id = %(subject)s AND status IN ('waiting', 'failed') RETURNING id
    )
    INSERT INTO outbox (actor, queue_name, args)
    SELECT 'process_event', 'payments', jsonb_build_array(id) FROM woken
"""


def payment_subject(intent_id: str) -> str:
    """The webhook_events.subject_id of an event waiting for PaymentIntent `intent_id`."""
    return f"payment:{intent_id}"


def _user_keys(obj: dict[str, Any]) -> tuple[uuid.UUID | None, str | None]:
    """What names the object's user: metadata.user_id (if a UUID) and the Stripe customer."""
    customer = obj.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    return _uuid(_metadata(obj).get("user_id")), customer if isinstance(customer, str) else None


def find_user(uow: UnitOfWork, obj: dict[str, Any]) -> uuid.UUID:
    """metadata.user_id when it names a user, else the user with this Stripe customer."""
    candidate, customer = _user_keys(obj)
    if candidate is not None:
        row = uow.sql(_USER_BY_ID, {"id": candidate}).fetchone()
        if row:
            return uuid.UUID(str(row.id))
    if customer:
        row = uow.sql(_USER_BY_CUSTOMER, {"customer": customer}).fetchone()
        if row:
            return uuid.UUID(str(row.id))
    raise UnknownCustomer(f"no user for {_name(obj)}")


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


@dataclass(frozen=True)
class MomentLink:
    moment_id: uuid.UUID | None
    meta: str | None  # JSON recorded on the transaction when the reference could not be kept


def link_moment(uow: UnitOfWork, obj: dict[str, Any]) -> MomentLink:
    """The payment's moment, if it still exists. A received payment is never lost because
    its moment was deleted (or never existed): it is applied without the reference, and the
    reference is recorded in the transaction's metadata."""
    raw = _metadata(obj).get("moment_id")
    if raw is None:
        return MomentLink(None, None)
    moment = _uuid(raw)
    if moment is not None and uow.sql(_MOMENT_EXISTS, {"id": moment}).fetchone():
        return MomentLink(moment, None)
    log.warning("payment_moment_missing", object_id=str(obj.get("id"))[:64])
    return MomentLink(None, json.dumps({"unlinked_moment_id": str(raw)[:64]}))


def lock_payment(
    uow: UnitOfWork,
    *,
    intent_id: str,
    user_id: uuid.UUID | None,
    amount: Decimal,
    currency: str,
    moment: MomentLink | None = None,
    charge_id: str | None = None,
) -> Any:
    """The transaction row of a PaymentIntent, created pending if the app never wrote it,
    locked for the rest of the unit of work."""
    moment = moment or MomentLink(None, None)
    return uow.sql(
        _LOCK_PAYMENT,
        {
            "user_id": user_id,
            "moment_id": moment.moment_id,
            "meta": moment.meta,
            "amount": amount,
            "currency": currency,
            "intent_id": intent_id,
            "charge_id": charge_id,
        },
    ).fetchone()


# --- payments -----------------------------------------------------------------------------------


def payment_succeeded(uow: UnitOfWork, event: Event) -> None:
    pi = event["data"]["object"]
    intent_id = _stripe_id(pi.get("id"), "id", pi)
    currency = currency_of(pi)
    received = "amount_received" if pi.get("amount_received") else "amount"
    amount = amount_of(pi, received, currency)
    charge = pi.get("latest_charge")
    charge_id = _stripe_id(charge, "latest_charge", pi) if charge else None
    candidate, customer = _user_keys(pi)
    moment = link_moment(uow, pi)
    subject = {"subject": payment_subject(intent_id)}
    notice = {"payment_intent": intent_id, "amount": str(amount), "currency": currency}
    row = uow.sql(
        _SUCCEED_PAYMENT,
        {
            "candidate": candidate,
            "customer": customer or None,
            "moment_id": moment.moment_id,
            "meta": moment.meta,
            "amount": amount,
            "currency": currency,
            "intent_id": intent_id,
            "charge_id": charge_id,
            "event_id": event["id"],
            "notice": json.dumps(notice),
        },
    ).fetchone()
    if row is None:
        raise UnknownCustomer(f"no user for {_name(pi)}")
    if uow.sql(_ANY_WAITING, subject).fetchone():
        uow.sql(_WAKE_WAITING, subject)


def payment_failed(uow: UnitOfWork, event: Event) -> None:
    pi = event["data"]["object"]
    intent_id = _stripe_id(pi.get("id"), "id", pi)
    currency = currency_of(pi)
    amount = amount_of(pi, "amount", currency)
    user_id = find_user(uow, pi)
    row = lock_payment(
        uow,
        intent_id=intent_id,
        user_id=user_id,
        amount=amount,
        currency=currency,
        moment=link_moment(uow, pi),
    )
    if row.status == "pending":  # never downgrade a completed payment; failed is already failed
        uow.sql(_FAIL_PAYMENT, {"id": row.id})
        notify(
            uow,
            row.user_id or user_id,
            "payment_failed",
            "Payment failed",
            {"payment_intent": intent_id},
        )


def _payment_for_charge(uow: UnitOfWork, obj: dict[str, Any], *, charge_id: str) -> Any:
    """The locked payment a refund or dispute belongs to; `AwaitingPayment` while neither the
    payment nor a user named by the object is known."""
    intent = obj.get("payment_intent")
    if not intent:
        raise EventContentError(f"{_name(obj)} has no payment_intent")
    intent_id = _stripe_id(intent, "payment_intent", obj)
    row = uow.sql(_PAYMENT_FOR_UPDATE, {"intent_id": intent_id}).fetchone()
    if row is not None and row.user_id is not None:
        return row
    try:
        user_id = find_user(uow, obj)
    except UnknownCustomer:
        raise AwaitingPayment(intent_id) from None
    currency = currency_of(obj)
    return lock_payment(
        uow,
        intent_id=intent_id,
        user_id=user_id,
        amount=amount_of(obj, "amount", currency),
        currency=currency,
        charge_id=charge_id,
    )


def charge_refunded(uow: UnitOfWork, event: Event) -> None:
    charge = event["data"]["object"]
    charge_id = _stripe_id(charge.get("id"), "id", charge)
    currency = currency_of(charge)
    total = amount_of(charge, "amount_refunded", currency)
    row = _payment_for_charge(uow, charge, charge_id=charge_id)
    # amount_refunded is cumulative: refund only what no earlier event has refunded. The
    # payment row lock above serialises every refund event of this charge.
    refunded = uow.sql(_REFUNDED_SO_FAR, {"charge_id": charge_id}).fetchone()
    already = Decimal(refunded.refunded) if refunded else Decimal(0)
    delta = total - already
    if delta > 0:
        credit(
            uow,
            user_id=row.user_id,
            source_id=f"{charge_id}:refunded:{total}",
            kind="refund",
            amount=-delta,
            currency=currency,
            charge_id=charge_id,
            event_id=event["id"],
        )


# --- disputes: money follows Stripe's balance transactions ------------------------------------

# A dispute's status only moves forward; an inquiry (warning_*) either closes or escalates.
DISPUTE_STATUS_RANK = {
    "open": 2,  # written by earlier versions for needs_response
    "warning_needs_response": 0,
    "warning_under_review": 1,
    "needs_response": 2,
    "under_review": 3,
    "warning_closed": 4,
    "won": 5,
    "lost": 5,
}
_FUNDS_OUT = ("needs_response", "under_review", "lost")  # Stripe withdrew the disputed amount


@dataclass(frozen=True)
class DisputePlan:
    status: str | None
    withdrawn: bool  # funds left the balance (a chargeback, not an inquiry)
    reinstated: bool  # and came back (won)


def plan_dispute(event: Event) -> DisputePlan:
    """What this snapshot of a dispute says has happened to the money. Pure.

    The balance transactions Stripe lists on the dispute are the record (negative amount:
    withdrawn; positive: reinstated); status and event type tell the same for snapshots that
    list none: an inquiry moves nothing, a chargeback withdraws, `won` reinstates."""
    dispute = event["data"]["object"]
    status = dispute.get("status") if isinstance(dispute.get("status"), str) else None
    moves = [
        _int(bt.get("amount"))
        for bt in dispute.get("balance_transactions") or []
        if isinstance(bt, dict) and isinstance(bt.get("amount"), int)
    ]
    withdrawn = any(m < 0 for m in moves) or status in _FUNDS_OUT
    reinstated = any(m > 0 for m in moves) or status == "won"
    withdrawn = withdrawn or event["type"] == "charge.dispute.funds_withdrawn"
    reinstated = reinstated or event["type"] == "charge.dispute.funds_reinstated"
    return DisputePlan(status=status, withdrawn=withdrawn or reinstated, reinstated=reinstated)


def dispute_event(uow: UnitOfWork, event: Event) -> None:
    dispute = event["data"]["object"]
    dispute_id = _stripe_id(dispute.get("id"), "id", dispute)
    charge_id = _stripe_id(dispute.get("charge"), "charge", dispute)
    currency = currency_of(dispute)
    amount = amount_of(dispute, "amount", currency)
    plan = plan_dispute(event)
    row = _payment_for_charge(uow, dispute, charge_id=charge_id)
    for step, sign, due in (("hold", -1, plan.withdrawn), ("release", +1, plan.reinstated)):
        if due:  # each movement once per dispute: the source id is unique
            credit(
                uow,
                user_id=row.user_id,
                source_id=f"{dispute_id}:{step}",
                kind=f"dispute_{step}",
                amount=sign * amount,
                currency=currency,
                charge_id=charge_id,
                event_id=event["id"],
            )
    old = DISPUTE_STATUS_RANK.get(row.dispute_status or "", -1)
    if plan.status in DISPUTE_STATUS_RANK and DISPUTE_STATUS_RANK[plan.status] > old:
        uow.sql(_SET_DISPUTE, {"status": plan.status, "id": row.id})


# --- subscriptions: Stripe's latest object, chosen without event ids ------------------------

TERMINAL = ("canceled", "incomplete_expired")
_TYPE_RANK = {
    "customer.subscription.created": 0,
    "customer.subscription.updated": 1,
    "customer.subscription.deleted": 2,
}


def subscription_id_of(event: Event) -> str | None:
    obj = event["data"]["object"]
    if obj.get("object") == "subscription":
        return str(obj["id"])
    sub = obj.get("subscription")
    if sub is None:  # API versions >= 2025: invoice.parent.subscription_details.subscription
        parent = obj.get("parent") if isinstance(obj.get("parent"), dict) else {}
        details = parent.get("subscription_details")
        sub = details.get("subscription") if isinstance(details, dict) else None
    if isinstance(sub, dict):
        sub = sub.get("id")
    return str(sub)[:255] if sub else None


def stripe_time(value: Any) -> datetime | None:
    """A Stripe timestamp (epoch seconds) as an aware datetime; None when absent or absurd."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 253_402_300_799:
        return None
    return datetime.fromtimestamp(value, UTC)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _first_item(sub: dict[str, Any]) -> dict[str, Any]:
    items = sub.get("items")
    data = items.get("data") if isinstance(items, dict) else None
    first = data[0] if isinstance(data, list) and data else None
    return first if isinstance(first, dict) else {}


def _tier(sub: dict[str, Any]) -> str:
    tier = _metadata(sub).get("tier")
    if not tier:
        price = _first_item(sub).get("price")
        price = price if isinstance(price, dict) else {}
        tier = price.get("lookup_key") or _metadata(price).get("tier")
    return str(tier or "premium")[:64]


def subscription_state(sub: dict[str, Any], *, deleted: bool = False) -> dict[str, Any]:
    """The fields we keep from one subscription object. Pure."""
    item = _first_item(sub)
    # API versions >= 2025-03 moved the period onto the items
    start = _int(sub.get("current_period_start") or item.get("current_period_start"))
    end = _int(sub.get("current_period_end") or item.get("current_period_end"))
    customer = sub.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    return {
        "status": "canceled" if deleted else str(sub.get("status") or "active")[:32],
        "tier": _tier(sub),
        "period_start": start,
        "period_end": end,
        "cancel_at_period_end": bool(sub.get("cancel_at_period_end")),
        "customer": str(customer)[:255] if customer else None,
    }


@dataclass(frozen=True)
class Snapshot:
    """One subscription event: the object after it, and before it (previous_attributes)."""

    created: int
    type: str
    state: dict[str, Any]
    before: dict[str, Any] | None
    metadata: dict[str, Any]

    @property
    def order(self) -> tuple[bool, int, int]:
        # A canceled subscription never changes again; current_period_start only grows;
        # within a period, event time. Ties (one second) are settled by previous_attributes.
        return (self.state["status"] in TERMINAL, self.state["period_start"], self.created)


def snapshot(event: Event) -> Snapshot:
    obj = event["data"]["object"]
    deleted = event["type"] == "customer.subscription.deleted"
    prev = (event.get("data") or {}).get("previous_attributes")
    before = subscription_state({**obj, **prev}) if isinstance(prev, dict) and prev else None
    return Snapshot(
        created=_int(event.get("created")),
        type=event["type"],
        state=subscription_state(obj, deleted=deleted),
        before=before,
        metadata=_metadata(obj),
    )


def _node(state: dict[str, Any]) -> str:
    return json.dumps(state, sort_keys=True)


def latest_snapshot(snapshots: Iterable[Snapshot]) -> Snapshot | None:
    """Stripe's latest subscription object among `snapshots`, without looking at event ids.

    Order is (terminal, current_period_start, event.created). The events of one such step
    (typically one second) form a path through states: each update goes from the state its
    previous_attributes describe to the state of its object (a created event comes from
    nothing). The path ends at the state entered once more than it was left; a path that
    returns to where it began ends there. Only when events are missing is that ambiguous,
    and a fixed tie-break (type, then the state itself) decides."""
    snaps = list(snapshots)
    if not snaps:
        return None
    current: Snapshot | None = None
    for order in sorted({s.order for s in snaps}):
        group = [s for s in snaps if s.order == order]
        balance: dict[str, int] = {}
        states: dict[str, Snapshot] = {}
        for s in group:
            node = _node(s.state)
            states[node] = max((states.get(node, s), s), key=lambda x: _TYPE_RANK.get(x.type, 1))
            balance[node] = balance.get(node, 0) + 1
            if s.before is not None:
                before = _node(s.before)
                balance[before] = balance.get(before, 0) - 1
        entry = _node(current.state) if current is not None else None
        ends = [n for n in states if balance[n] > 0]
        if len(ends) == 1:
            end = ends[0]
        elif not ends and entry in states:
            end = entry  # the step came back to the state it started from
        else:
            end = max(
                ends or states,
                key=lambda n: (n != entry, balance.get(n, 0), _TYPE_RANK.get(states[n].type, 1), n),
            )
        current = states[end]
    return current


def _invoice_period(invoice: dict[str, Any]) -> tuple[int, int]:
    lines = invoice.get("lines")
    data = lines.get("data") if isinstance(lines, dict) else None
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    raw = first.get("period")
    period = raw if isinstance(raw, dict) else {}
    return _int(period.get("start")), _int(period.get("end"))


def plan_subscription(
    events: list[Event], *, current: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The subscription's state after every event in `events`, in whatever order they came,
    or `current`'s (the object read from Stripe's API after them) when given. Pure. None
    while no subscription object has been seen (only invoices)."""
    if current is not None:
        latest_created = max((_int(e.get("created")) for e in events), default=0)
        return dict(
            subscription_state(current), metadata=_metadata(current), event_created=latest_created
        )
    unique = {str(e.get("id")): e for e in events}.values()  # a redelivery is one event
    snaps = [snapshot(e) for e in unique if e["type"] in _TYPE_RANK]
    latest = latest_snapshot(snaps)
    if latest is None:
        return None
    state = dict(latest.state, metadata=latest.metadata, event_created=latest.created)
    # Invoices only tell what the subscription objects do not yet show: a payment newer than
    # the latest object settles its period, a failure newer than it for a later period makes
    # it past_due. An invoice no newer than the latest object is already reflected in it.
    invoices = [e for e in unique if e["type"] in ("invoice.paid", "invoice.payment_failed")]
    for inv in sorted(invoices, key=lambda e: (_int(e.get("created")), e["type"])):
        created = _int(inv.get("created"))
        start, end = _invoice_period(inv["data"]["object"])
        if created <= latest.created or state["status"] in TERMINAL:
            continue
        if inv["type"] == "invoice.paid":
            if start > state["period_start"]:
                state.update(period_start=start, period_end=end, status="active")
            elif start == state["period_start"] and state["status"] in (
                "incomplete",
                "past_due",
                "unpaid",
            ):
                state["status"] = "active"
        elif start > state["period_start"] and state["status"] != "incomplete":
            state.update(period_start=start, period_end=end, status="past_due")
        state["event_created"] = max(state["event_created"], created)
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
    state = plan_subscription(payloads, current=fetch_subscription(get_settings(), sub_id))
    if state is None:
        return  # only invoices so far: the subscription row waits for its subscription event
    user_id = find_user(
        uow,
        {
            "object": "subscription",
            "id": sub_id,
            "metadata": state["metadata"],
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
            "period_start": stripe_time(state["period_start"]),
            "period_end": stripe_time(state["period_end"]),
            "cancel": state["cancel_at_period_end"],
            "event_created": stripe_time(state["event_created"]),
            "event_id": event["id"],
        },
    )
    uow.sql(_USER_TIER, {"user_id": user_id, "entitled": list(ENTITLED)})


HANDLERS: dict[str, Callable[[UnitOfWork, Event], None]] = {
    "payment_intent.succeeded": payment_succeeded,
    "payment_intent.payment_failed": payment_failed,
    "charge.refunded": charge_refunded,
    "charge.dispute.created": dispute_event,
    "charge.dispute.updated": dispute_event,
    "charge.dispute.closed": dispute_event,
    "charge.dispute.funds_withdrawn": dispute_event,
    "charge.dispute.funds_reinstated": dispute_event,
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
    obj = (event.get("data") or {}).get("object")
    if not isinstance(obj, dict):
        raise EventContentError(f"event {event['id']} has no data.object")
    handler(uow, event)
    return "processed"
