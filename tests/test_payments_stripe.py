"""Stripe as Stripe defines it: histories generated from Stripe's own lifecycles (subscription
status transitions with previous_attributes, dispute inquiries and chargebacks with their
balance transactions), delivered in every order, duplicated and within one second, must end
in Stripe's last object state; money per currency in its minor units; errors sorted at the
error (content fails now with its reason, a missing payment is a visible, bounded wait)."""

from __future__ import annotations

import contextlib
import json
import random
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.currency import exponent, from_minor
from tests.support import stripe_events as se
from tests.test_payments import apply, assert_balance_is_sum_of_ledger, make_user
from workers.payments import process_event, replay
from workers.stripe_effects import (
    AwaitingPayment,
    EventContentError,
    plan_subscription,
    subscription_state,
)

T0 = 1_760_000_000
MONTH = 30 * 86400
GAPS = st.sampled_from([0, 0, 0, 1, 5, 3600])  # mostly the same second, as Stripe sends them


# --- generated Stripe histories -----------------------------------------------------------------


class SubscriptionStory:
    """Builds the events Stripe sends for one subscription, in Stripe's order."""

    def __init__(self, draw: Any, *, sub: str, customer: str, user_id: str) -> None:
        self.draw, self.sub, self.customer, self.user_id = draw, sub, customer, user_id
        self.t = T0
        self.state: dict[str, Any] = {
            "status": "incomplete",
            "period_start": T0,
            "period_end": T0 + MONTH,
            "cancel": False,
            "tier": draw(st.sampled_from(["premium", "elite"])),
        }
        self.events: list[dict[str, Any]] = []

    def tick(self) -> None:
        self.t += self.draw(GAPS)

    def obj(self) -> dict[str, Any]:
        s = self.state
        return se.subscription(
            self.sub,
            customer=self.customer,
            user_id=self.user_id,
            tier=s["tier"],
            status=s["status"],
            period_start=s["period_start"],
            period_end=s["period_end"],
            cancel=s["cancel"],
        )

    def emit(self, type_: str, prev: dict[str, Any] | None = None) -> None:
        self.events.append(se.event(type_, self.obj(), created=self.t, previous_attributes=prev))

    def change(self, **changes: Any) -> None:
        """A customer.subscription.updated carrying the old values of what changed."""
        names = {
            "status": "status",
            "period_start": "current_period_start",
            "period_end": "current_period_end",
            "cancel": "cancel_at_period_end",
            "tier": "metadata",
        }
        prev = {}
        for key, value in changes.items():
            old = self.state[key]
            prev[names[key]] = {"user_id": self.user_id, "tier": old} if key == "tier" else old
            self.state[key] = value
        self.emit("customer.subscription.updated", prev)

    def invoice(self, type_: str) -> None:
        inv = se.invoice(
            se.new_id("in"),
            sub=self.sub,
            customer=self.customer,
            period_start=self.state["period_start"],
            period_end=self.state["period_end"],
        )
        self.events.append(se.event(type_, inv, created=self.t))

    def paid_then_active(self, from_status: str, **roll: Any) -> None:
        # invoice.paid and the update it causes come in either order, often in one second
        if self.draw(st.booleans()):
            self.invoice("invoice.paid")
            self.tick()
            self.change(status="active", **roll)
        else:
            self.change(status="active", **roll)
            self.tick()
            self.invoice("invoice.paid")

    def roll(self) -> dict[str, int]:
        s = self.state
        return {"period_start": s["period_end"], "period_end": s["period_end"] + MONTH}

    def build(self) -> list[dict[str, Any]]:
        draw = self.draw
        start = draw(st.sampled_from(["incomplete", "trialing", "active"]))
        self.state["status"] = start
        self.emit("customer.subscription.created")
        self.tick()
        if start == "incomplete":
            outcome = draw(st.sampled_from(["paid", "paid", "expired", "pending"]))
            if outcome == "expired":
                self.change(status="incomplete_expired")
                return self.events
            if outcome == "pending":
                return self.events
            self.paid_then_active("incomplete")
        elif start == "trialing":
            if not draw(st.booleans()):
                return self.events  # still in trial
            self.paid_then_active("trialing", **self.roll())
        for _ in range(draw(st.integers(0, 2))):
            self.tick()
            if draw(st.booleans()):
                self.change(cancel=not self.state["cancel"])
                self.tick()
            if draw(st.booleans()):
                self.change(tier="elite" if self.state["tier"] == "premium" else "premium")
                self.tick()
            self.change(**self.roll())
            self.tick()
            if draw(st.booleans()):
                if self.state["status"] == "past_due":  # paying settles it: Stripe updates
                    self.paid_then_active("past_due")
                else:
                    self.invoice("invoice.paid")
            else:
                self.invoice("invoice.payment_failed")
                self.tick()
                if self.state["status"] != "past_due":
                    self.change(status="past_due")
                if draw(st.booleans()):
                    self.tick()
                    self.paid_then_active("past_due")
        if draw(st.booleans()):
            self.tick()
            self.state["status"] = "canceled"
            self.emit("customer.subscription.deleted")
        return self.events


def last_object_state(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Stripe's final subscription object: that of the last subscription event sent."""
    last = [e for e in events if e["type"].startswith("customer.subscription.")][-1]
    return subscription_state(
        last["data"]["object"], deleted=last["type"] == "customer.subscription.deleted"
    )


@st.composite
def subscription_histories(draw: Any) -> list[dict[str, Any]]:
    return SubscriptionStory(
        draw, sub="sub_h", customer="cus_h", user_id=str(uuid.UUID(int=7))
    ).build()


def deliveries(
    draw: Any, events: list[dict[str, Any]]
) -> list[dict[str, Any]]:  # any order, some twice
    dupes = draw(st.lists(st.sampled_from(events), max_size=len(events)))
    return draw(st.permutations(events + dupes))


KEPT = ("status", "tier", "period_start", "period_end", "cancel_at_period_end")


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_plan_reaches_stripes_last_subscription_object_in_any_delivery(data) -> None:
    # Given a subscription's events as Stripe sends them (many in one second)
    events = data.draw(subscription_histories())
    expected = {k: last_object_state(events)[k] for k in KEPT}
    # When they arrive in any order, some twice
    delivered = deliveries(data.draw, events)
    # Then the planned state is Stripe's last object, whatever the order
    state = plan_subscription(delivered)
    assert state is not None
    assert {k: state[k] for k in KEPT} == expected


def test_same_second_created_incomplete_then_updated_active_ends_active() -> None:
    # The case: created (incomplete) and updated (active, previous status incomplete)
    # in one second, the update's event id sorting first
    sub = se.subscription(
        "sub_x", customer="c", user_id="u", tier="elite", status="incomplete",
        period_start=T0, period_end=T0 + MONTH,
    )  # fmt: skip
    created = se.event("customer.subscription.created", sub, created=T0, event_id="evt_z")
    updated = se.event(
        "customer.subscription.updated",
        {**sub, "status": "active"},
        created=T0,
        event_id="evt_a",
        previous_attributes={"status": "incomplete"},
    )
    for order in ([created, updated], [updated, created]):
        state = plan_subscription(order)
        assert state is not None and state["status"] == "active" and state["tier"] == "elite"


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_subscription_histories_applied_one_by_one_end_in_stripes_state(sql, data) -> None:
    sql.execute("TRUNCATE users, subscriptions, webhook_events CASCADE")
    uid = str(uuid.UUID(int=7))
    sql.execute(
        "INSERT INTO users (id, email, full_name, stripe_customer_id) "
        "VALUES (%s, 'h@example.com', 'H', 'cus_h')",
        (uid,),
    )
    events = data.draw(subscription_histories())
    expected = last_object_state(events)
    # each event applied as it arrives, seeing only the events before it
    apply(deliveries(data.draw, events))
    row = sql.execute(
        "SELECT status, tier, extract(epoch FROM current_period_start)::bigint, "
        "extract(epoch FROM current_period_end)::bigint, cancel_at_period_end FROM subscriptions"
    ).fetchone()
    assert row == (
        expected["status"],
        expected["tier"],
        expected["period_start"],
        expected["period_end"],
        expected["cancel_at_period_end"],
    )
    tier = sql.execute("SELECT subscription_tier FROM users").fetchone()[0]
    entitled = expected["status"] in ("active", "trialing", "past_due")
    assert tier == (expected["tier"] if entitled else "free")


# --- disputes ---------------------------------------------------------------------------------


@st.composite
def dispute_histories(draw: Any) -> tuple[list[dict[str, Any]], str, bool, bool]:
    """A payment and its dispute as Stripe sends them; (events, last status, withdrawn,
    reinstated)."""
    pi, ch, dp = "pi_d", "ch_d", "dp_d"
    amount = 2000
    t = T0
    pay = se.event(
        "payment_intent.succeeded",
        se.payment_intent(pi, user_id=str(uuid.UUID(int=9)), amount=amount, charge=ch),
        created=t,
    )
    events = [pay]
    bts: list[dict[str, Any]] = []
    status = "warning_needs_response"

    def send(type_: str) -> None:
        nonlocal t
        t += draw(GAPS)
        obj = se.dispute(
            dp, ch=ch, pi=pi, amount=amount, status=status, balance_transactions=list(bts)
        )
        events.append(se.event(type_, obj, created=t))

    path = draw(st.sampled_from(["inquiry", "escalated", "chargeback"]))
    if path != "chargeback":
        send("charge.dispute.created")
        if draw(st.booleans()):
            status = "warning_under_review"
            send("charge.dispute.updated")
        if path == "inquiry":
            status = "warning_closed"
            send("charge.dispute.closed")
            return events, status, False, False
        status = "needs_response"
        send("charge.dispute.updated")
    else:
        status = "needs_response"
        send("charge.dispute.created")
    bts.append(se.balance_transaction(dp, amount=-amount, currency="usd", created=t))
    send("charge.dispute.funds_withdrawn")
    if draw(st.booleans()):
        status = "under_review"
        send("charge.dispute.updated")
    outcome = draw(st.sampled_from(["won", "lost", "open"]))
    if outcome == "open":
        return events, status, True, False
    status = outcome
    if outcome == "won":
        bts.append(se.balance_transaction(dp, amount=amount, currency="usd", created=t))
        send("charge.dispute.funds_reinstated")
    send("charge.dispute.closed")
    return events, status, True, outcome == "won"


def deliver_until_settled(events: list[dict[str, Any]]) -> None:
    """Apply each delivery as it comes; a dispute ahead of its payment waits (as the worker's
    retry would) and is woken through the outbox when the payment is applied."""
    se.store(events)
    for e in events:
        with contextlib.suppress(AwaitingPayment):
            process_event(e["id"])
    woken = se.woken_event_ids()
    for event_id in woken:
        process_event(event_id)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_dispute_histories_move_money_as_stripes_balance_did(sql, data) -> None:
    sql.execute("TRUNCATE users, transactions, webhook_events, outbox CASCADE")
    uid = str(uuid.UUID(int=9))
    sql.execute(
        "INSERT INTO users (id, email, full_name, currency) VALUES (%s, 'd@x.io', 'D', 'USD')",
        (uid,),
    )
    events, last_status, withdrawn, reinstated = data.draw(dispute_histories())
    deliver_until_settled(deliveries(data.draw, events))
    # every event is applied, the waiting ones too
    statuses = sql.execute("SELECT DISTINCT status FROM webhook_events").fetchall()
    assert statuses == [("processed",)]
    kept = Decimal("20.00") if withdrawn and not reinstated else Decimal(0)
    balance, dispute_status = sql.execute(
        "SELECT u.balance, t.dispute_status FROM users u JOIN transactions t ON t.user_id = u.id"
    ).fetchone()
    assert balance == Decimal("20.00") - kept
    assert dispute_status == last_status
    kinds = sorted(r[0] for r in sql.execute("SELECT kind FROM ledger_entries").fetchall())
    assert kinds == sorted(
        ["payment"] + ["dispute_hold"] * withdrawn + ["dispute_release"] * reinstated
    )
    assert_balance_is_sum_of_ledger(sql)


def test_inquiry_created_then_closed_moves_no_money(sql) -> None:
    # The case: an inquiry opened and closed took the user's 10.00
    uid = make_user(sql)
    pay = se.event(
        "payment_intent.succeeded",
        se.payment_intent("pi_i", user_id=uid, amount=1000, charge="ch_i"),
        created=T0,
    )
    opened = se.event(
        "charge.dispute.created",
        se.dispute("dp_i", ch="ch_i", pi="pi_i", amount=1000, status="warning_needs_response"),
        created=T0 + 1,
    )
    closed = se.event(
        "charge.dispute.closed",
        se.dispute("dp_i", ch="ch_i", pi="pi_i", amount=1000, status="warning_closed"),
        created=T0 + 2,
    )
    apply([pay, opened, closed])
    assert sql.execute("SELECT balance FROM users").fetchone()[0] == Decimal("10.00")
    assert sql.execute("SELECT dispute_status FROM transactions").fetchone()[0] == "warning_closed"
    assert sql.execute("SELECT count(*) FROM ledger_entries").fetchone()[0] == 1


def test_dispute_ahead_of_its_payment_waits_visibly_and_is_woken_by_it(sql) -> None:
    uid = make_user(sql)
    dispute = se.event(
        "charge.dispute.created",
        se.dispute("dp_w", ch="ch_w", pi="pi_w", amount=500, status="needs_response"),
        created=T0 + 1,
    )
    se.store([dispute])
    with pytest.raises(AwaitingPayment):
        replay(dispute["id"])  # a direct run of an event still being retried
    # Then it waits with a visible status and reason, and is not failed
    status, error, attempts = sql.execute(
        "SELECT status, last_error, attempts FROM webhook_events"
    ).fetchone()
    assert (status, attempts) == ("waiting", 1)
    assert "waiting for payment pi_w" in error
    # When the payment arrives, the waiting event is queued again at once
    pay = se.event(
        "payment_intent.succeeded",
        se.payment_intent("pi_w", user_id=uid, amount=500, charge="ch_w"),
        created=T0,
    )
    apply([pay])
    assert se.woken_event_ids() == [dispute["id"]]
    process_event(dispute["id"])
    assert sql.execute("SELECT balance FROM users").fetchone()[0] == Decimal("0.00")
    assert_balance_is_sum_of_ledger(sql)


# --- money per currency -----------------------------------------------------------------------


def test_exponents_follow_stripe_over_iso_where_stripe_says_so() -> None:
    assert [exponent(c) for c in ("usd", "try", "jpy", "krw", "kwd", "bhd", "tnd")] == [
        2,
        2,
        0,
        0,
        3,
        3,
        3,
    ]
    # ISK, HUF, TWD: two-decimal in Stripe's API; UGX zero-decimal in Stripe's API
    assert [exponent(c) for c in ("isk", "huf", "twd", "ugx")] == [2, 2, 2, 0]
    assert from_minor(5120, "KWD") == Decimal("5.120")
    assert from_minor(500, "jpy") == Decimal(500)
    assert from_minor(1050, "usd") == Decimal("10.50")


def test_user_paid_in_several_currencies_has_one_balance_per_currency(sql) -> None:
    # Given a TRY user paying in USD, KWD (three decimals), JPY (none) and TRY
    uid = make_user(sql, currency="TRY")
    pays = [
        ("pi_usd", "usd", 1050),
        ("pi_kwd", "kwd", 5120),
        ("pi_jpy", "jpy", 500),
        ("pi_try", "try", 9999),
    ]
    events = [
        se.event(
            "payment_intent.succeeded",
            se.payment_intent(pi, user_id=uid, amount=amount, currency=cur, charge=f"ch{pi[2:]}"),
            created=T0 + i,
        )
        for i, (pi, cur, amount) in enumerate(pays)
    ]
    refund = se.event(
        "charge.refunded",
        se.charge("ch_kwd", pi="pi_kwd", user_id=uid, amount=5120, refunded=1005, currency="kwd"),
        created=T0 + 10,
    )
    apply([*events, refund])
    # Then each currency has its own balance in its own minor units, never summed
    balances = dict(
        sql.execute("SELECT currency, amount FROM user_balances WHERE user_id = %s", (uid,))
    )
    assert balances == {
        "USD": Decimal("10.50"),
        "KWD": Decimal("4.115"),
        "JPY": Decimal("500"),
        "TRY": Decimal("99.99"),
    }
    # users.balance is the user's own currency only
    assert sql.execute("SELECT balance FROM users").fetchone()[0] == Decimal("99.99")
    amounts = dict(sql.execute("SELECT currency, amount FROM transactions"))
    assert amounts["KWD"] == Decimal("5.120") and amounts["JPY"] == Decimal("500")
    assert_balance_is_sum_of_ledger(sql)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("currency", "xyz", "unknown currency"),
        ("currency", None, "unknown currency"),
        ("amount", 10**15, "out of range"),
        ("amount", -5, "out of range"),
        ("amount", "100", "not an integer"),
    ],
)
def test_content_errors_fail_at_once_with_a_reason(sql, field, value, reason) -> None:
    uid = make_user(sql)
    pi = {**se.payment_intent("pi_bad", user_id=uid, amount=100), field: value}
    pi["amount_received"] = pi["amount"]
    e = se.event("payment_intent.succeeded", pi, created=T0)
    se.store([e])
    with pytest.raises(EventContentError, match=reason):
        process_event(e["id"])
    status, attempts, error = sql.execute(
        "SELECT status, attempts, last_error FROM webhook_events"
    ).fetchone()
    assert (status, attempts) == ("failed", 1) and reason in error
    assert sql.execute("SELECT count(*) FROM ledger_entries").fetchone()[0] == 0


def test_database_refusal_of_event_content_is_permanent(inproc_worker, sql) -> None:
    from workers.broker import broker

    # Given two payments Stripe would never send: different intents naming one charge
    uid = make_user(sql)
    first, second = (
        se.event(
            "payment_intent.succeeded",
            se.payment_intent(pi, user_id=uid, amount=100, charge="ch_same"),
            created=T0 + i,
        )
        for i, pi in enumerate(("pi_one", "pi_two"))
    )
    apply([first])
    se.store([second])
    # When a worker processes the second
    process_event.send(second["id"])
    broker.join("payments", timeout=60_000)
    inproc_worker.join()
    # Then it failed once, with the database's reason, and was not retried
    status, attempts, error = sql.execute(
        "SELECT status, attempts, last_error FROM webhook_events WHERE id = %s", (second["id"],)
    ).fetchone()
    assert (status, attempts) == ("failed", 1)
    assert "the database refused the event" in error and "UniqueViolation" in error


def test_payment_for_a_deleted_moment_is_credited_and_the_reference_recorded(sql) -> None:
    uid = make_user(sql)
    moment = str(uuid.uuid4())  # never existed, or deleted before the payment arrived
    pi = se.payment_intent("pi_m", user_id=uid, amount=700)
    pi["metadata"]["moment_id"] = moment
    apply([se.event("payment_intent.succeeded", pi, created=T0)])
    assert sql.execute("SELECT status FROM webhook_events").fetchone()[0] == "processed"
    assert sql.execute("SELECT balance FROM users").fetchone()[0] == Decimal("7.00")
    moment_id, meta = sql.execute("SELECT moment_id, metadata FROM transactions").fetchone()
    assert moment_id is None and meta == {"unlinked_moment_id": moment}


def test_random_currency_amounts_round_trip_exactly(sql) -> None:
    uid = make_user(sql, currency="KWD")
    rnd = random.Random(13)
    total = Decimal(0)
    events = []
    for i in range(20):
        minor = rnd.randint(1, 10**9)
        total += Decimal(minor).scaleb(-3)
        events.append(
            se.event(
                "payment_intent.succeeded",
                se.payment_intent(f"pi_r{i}", user_id=uid, amount=minor, currency="kwd"),
                created=T0 + i,
            )
        )
    apply(events)
    assert sql.execute("SELECT balance FROM users").fetchone()[0] == total
    assert_balance_is_sum_of_ledger(sql)


# --- optional: the object re-read from Stripe's API (a local server answering like it) ---------


@contextlib.contextmanager
def stripe_api(answers: dict[str, Any], monkeypatch: Any) -> Iterator[list[str]]:
    """A local HTTP server answering ``GET /v1/subscriptions/<id>`` as Stripe's API does
    (an object, or an error status with Stripe's error body); tidemill pointed at it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from core.settings import reset_settings_cache

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(f"{self.path} {self.headers.get('Authorization', '')}")
            answer = answers.get(self.path.rsplit("/", 1)[-1], 404)
            status, body = (
                (answer, {"error": {"type": "invalid_request_error", "message": "No such"}})
                if isinstance(answer, int)
                else (200, answer)
            )
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_local")
    monkeypatch.setenv("STRIPE_API_BASE", f"http://127.0.0.1:{server.server_port}")
    reset_settings_cache()
    try:
        yield seen
    finally:
        server.shutdown()
        monkeypatch.undo()
        reset_settings_cache()


def _sub_events(uid: str) -> list[dict[str, Any]]:
    sub = se.subscription(
        "sub_api", customer="cus_api", user_id=uid, tier="elite", status="incomplete",
        period_start=T0, period_end=T0 + MONTH,
    )  # fmt: skip
    return [
        se.event("customer.subscription.created", sub, created=T0),
        se.event(
            "customer.subscription.updated",
            {**sub, "status": "active"},
            created=T0,
            previous_attributes={"status": "incomplete"},
        ),
    ]


def test_with_an_api_key_the_object_read_from_stripe_wins(sql, monkeypatch) -> None:
    uid = make_user(sql, customer="cus_api")
    events = _sub_events(uid)
    now = {
        **events[1]["data"]["object"],
        "status": "canceled",
        "cancel_at_period_end": True,
    }  # what Stripe holds now: the events of its cancellation are still on their way
    with stripe_api({"sub_api": now}, monkeypatch) as seen:
        apply(events)
    assert seen and seen[0] == "/v1/subscriptions/sub_api Bearer sk_test_local"
    assert sql.execute("SELECT status, cancel_at_period_end FROM subscriptions").fetchone() == (
        "canceled",
        True,
    )
    assert sql.execute("SELECT subscription_tier FROM users").fetchone()[0] == "free"


def test_an_api_refusal_leaves_the_events_to_decide(sql, monkeypatch) -> None:
    uid = make_user(sql, customer="cus_api")
    with stripe_api({"sub_api": 404}, monkeypatch):
        apply(_sub_events(uid))
    assert sql.execute("SELECT status FROM subscriptions").fetchone()[0] == "active"


def test_an_api_outage_is_retried_not_failed(sql, monkeypatch) -> None:
    from core.stripe_api import StripeUnavailable
    from workers.base import PermanentError

    uid = make_user(sql, customer="cus_api")
    events = _sub_events(uid)
    se.store(events)
    with stripe_api({"sub_api": 503}, monkeypatch), pytest.raises(StripeUnavailable) as caught:
        replay(events[0]["id"])  # a direct run of an event a worker is still retrying
    assert not isinstance(caught.value, PermanentError)
    assert sql.execute(
        "SELECT status, attempts FROM webhook_events WHERE id = %s", (events[0]["id"],)
    ).fetchone() == ("received", 1)
    apply(events)  # Stripe answers again (no key here: the events decide)
    assert sql.execute("SELECT status FROM subscriptions").fetchone()[0] == "active"
