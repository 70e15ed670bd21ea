"""Stripe effects: exactly once under duplicates and any order; balance == sum(ledger)."""

from __future__ import annotations

import random
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import stripe_events as se
from workers.payments import process_event, replay

T0 = 1_760_000_000


def make_user(sql: Any, *, customer: str | None = None, currency: str = "USD") -> str:
    uid = str(uuid.uuid4())
    sql.execute(
        "INSERT INTO users (id, email, full_name, stripe_customer_id, currency) "
        "VALUES (%s, %s, 'U', %s, %s)",
        (uid, f"{uid}@example.com", customer, currency),
    )
    return uid


def apply(events: list[dict[str, Any]]) -> None:
    se.store(events)
    for e in events:
        process_event(e["id"])


def snapshot(sql: Any) -> dict[str, Any]:
    q = lambda s: [tuple(r) for r in sql.execute(s).fetchall()]  # noqa: E731
    return {
        "users": q("SELECT id, balance, subscription_tier FROM users ORDER BY id"),
        "balances": q("SELECT user_id, currency, amount FROM user_balances ORDER BY 1, 2"),
        # entry keys of partial refunds depend on arrival order (one delta or several); the
        # money per user, kind and charge must not
        "ledger": q(
            "SELECT user_id, kind, COALESCE(stripe_charge_id, source_id), sum(amount) "
            "FROM ledger_entries GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        ),
        "transactions": q(
            "SELECT stripe_payment_intent_id, status, amount, dispute_status, user_id "
            "FROM transactions ORDER BY 1"
        ),
        "subscriptions": q(
            "SELECT stripe_subscription_id, tier, status, current_period_end, "
            "cancel_at_period_end, user_id FROM subscriptions ORDER BY 1"
        ),
        "notifications": q(
            "SELECT user_id, type, count(*) FROM notifications GROUP BY 1, 2 ORDER BY 1, 2"
        ),
    }


def assert_balance_is_sum_of_ledger(sql: Any) -> None:
    """users.balance = the user's entries in their own currency; user_balances = the entries
    per currency; no balance ever adds two currencies."""
    drift = sql.execute("""
        SELECT u.id, u.balance, COALESCE(sum(l.amount), 0) FROM users u
        LEFT JOIN ledger_entries l ON l.user_id = u.id AND l.currency = upper(u.currency)
        GROUP BY u.id, u.balance
        HAVING u.balance <> COALESCE(sum(l.amount), 0)""").fetchall()
    assert drift == []
    per_currency = sql.execute("""
        SELECT coalesce(b.user_id, l.user_id), coalesce(b.currency, l.currency), b.amount, l.total
        FROM user_balances b FULL JOIN (
            SELECT user_id, currency, sum(amount) AS total FROM ledger_entries
            WHERE user_id IS NOT NULL GROUP BY 1, 2) l
          ON l.user_id = b.user_id AND l.currency = b.currency
        WHERE b.amount IS DISTINCT FROM l.total""").fetchall()
    assert per_currency == []


def test_payment_succeeded_credits_once_and_notifies(sql) -> None:
    uid = make_user(sql)
    e = se.event(
        "payment_intent.succeeded",
        se.payment_intent("pi_1", user_id=uid, amount=12_50, charge="ch_1"),
        created=T0,
    )
    apply([e, e])
    process_event(e["id"])  # a redelivered message
    assert sql.execute("SELECT balance FROM users WHERE id = %s", (uid,)).fetchone()[0] == Decimal(
        "12.50"
    )
    assert sql.execute("SELECT status, amount, stripe_charge_id FROM transactions").fetchall() == [
        ("completed", Decimal("12.50"), "ch_1")
    ]
    assert (
        sql.execute(
            "SELECT count(*) FROM notifications WHERE type = 'payment_succeeded'"
        ).fetchone()[0]
        == 1
    )
    assert sql.execute("SELECT status, attempts FROM webhook_events").fetchall() == [
        ("processed", 1)
    ]
    assert_balance_is_sum_of_ledger(sql)


def test_existing_app_transaction_is_completed_not_duplicated(sql) -> None:
    uid = make_user(sql)
    sql.execute(
        "INSERT INTO transactions (user_id, type, amount, status, stripe_payment_intent_id) "
        "VALUES (%s, 'payment', 10, 'pending', 'pi_app')",
        (uid,),
    )
    apply(
        [
            se.event(
                "payment_intent.succeeded",
                se.payment_intent("pi_app", user_id=uid, amount=1000),
                created=T0,
            )
        ]
    )
    assert sql.execute("SELECT count(*), max(status) FROM transactions").fetchone() == (
        1,
        "completed",
    )


@pytest.mark.parametrize("order", ["failed_first", "succeeded_first"])
def test_failure_never_downgrades_a_completed_payment(sql, order) -> None:
    uid = make_user(sql)
    ok = se.event(
        "payment_intent.succeeded",
        se.payment_intent("pi_2", user_id=uid, amount=500),
        created=T0 + 10,
    )
    bad = se.event(
        "payment_intent.payment_failed",
        se.payment_intent("pi_2", user_id=uid, amount=500, status="requires_payment_method"),
        created=T0,
    )
    apply([bad, ok] if order == "failed_first" else [ok, bad])
    assert sql.execute("SELECT status FROM transactions").fetchone()[0] == "completed"
    assert sql.execute("SELECT balance FROM users").fetchone()[0] == Decimal("5.00")


def test_partial_refunds_apply_the_delta_in_any_order(sql) -> None:
    uid = make_user(sql)
    pay = se.event(
        "payment_intent.succeeded",
        se.payment_intent("pi_3", user_id=uid, amount=1000, charge="ch_3"),
        created=T0,
    )
    r1 = se.event(
        "charge.refunded",
        se.charge("ch_3", pi="pi_3", user_id=uid, amount=1000, refunded=300),
        created=T0 + 1,
    )
    r2 = se.event(
        "charge.refunded",
        se.charge("ch_3", pi="pi_3", user_id=uid, amount=1000, refunded=500),
        created=T0 + 2,
    )
    apply([r2, pay, r1, r2])
    assert sql.execute("SELECT balance FROM users").fetchone()[0] == Decimal("5.00")
    assert_balance_is_sum_of_ledger(sql)


@pytest.mark.parametrize("outcome", ["won", "lost"])
@pytest.mark.parametrize("closed_first", [False, True])
def test_dispute_holds_then_releases_or_loses(sql, outcome, closed_first) -> None:
    uid = make_user(sql)
    pay = se.event(
        "payment_intent.succeeded",
        se.payment_intent("pi_4", user_id=uid, amount=2000, charge="ch_4"),
        created=T0,
    )
    opened = se.event(
        "charge.dispute.created",
        se.dispute("dp_4", ch="ch_4", pi="pi_4", amount=2000, status="needs_response"),
        created=T0 + 1,
    )
    closed = se.event(
        "charge.dispute.closed",
        se.dispute("dp_4", ch="ch_4", pi="pi_4", amount=2000, status=outcome),
        created=T0 + 2,
    )
    apply([pay, closed, opened] if closed_first else [pay, opened, closed])
    balance, status = sql.execute(
        "SELECT u.balance, t.dispute_status FROM users u JOIN transactions t ON t.user_id = u.id"
    ).fetchone()
    assert status == outcome
    assert balance == (Decimal("20.00") if outcome == "won" else Decimal("0.00"))
    assert_balance_is_sum_of_ledger(sql)


def test_unknown_type_is_stored_as_ignored(sql) -> None:
    e = se.event("customer.created", {"id": "cus_1", "object": "customer"}, created=T0)
    apply([e])
    assert sql.execute("SELECT status FROM webhook_events").fetchone()[0] == "ignored"


def test_unknown_customer_fails_permanently_and_replay_applies_after_fix(sql) -> None:
    e = se.event(
        "payment_intent.succeeded",
        {**se.payment_intent("pi_5", user_id="nobody", amount=100), "customer": "cus_x"},
        created=T0,
    )
    se.store([e])
    with pytest.raises(Exception, match="no user"):
        process_event(e["id"])
    assert sql.execute("SELECT status, attempts, last_error FROM webhook_events").fetchone()[
        :2
    ] == ("failed", 1)
    make_user(sql, customer="cus_x")
    assert replay(e["id"]) == "processed"
    assert sql.execute("SELECT balance FROM users").fetchone()[0] == Decimal("1.00")


def test_payment_goes_to_the_metadata_user_else_the_customers_and_nothing_to_nobody(sql) -> None:
    # Given one user named by metadata and another owning the Stripe customer
    named = make_user(sql)
    owner = make_user(sql, customer="cus_own")
    pi = lambda n, uid, cus: {  # noqa: E731
        **se.payment_intent(f"pi_own_{n}", user_id=uid, amount=100 * n),
        "customer": cus,
    }
    events = [
        # metadata names an existing user: that user, whatever the customer says
        se.event("payment_intent.succeeded", pi(1, named, "cus_own"), created=T0),
        # metadata names a UUID no user has: the customer's user
        se.event("payment_intent.succeeded", pi(2, str(uuid.uuid4()), "cus_own"), created=T0),
        # an expanded customer object counts as its id
        se.event("payment_intent.succeeded", pi(4, "", {"id": "cus_own"}), created=T0),
    ]
    nobody = se.event("payment_intent.succeeded", pi(8, str(uuid.uuid4()), "cus_no"), created=T0)
    apply(events)
    se.store([nobody])
    # When no user is found, the event fails permanently and writes nothing
    with pytest.raises(Exception, match="no user"):
        process_event(nobody["id"])
    # Then each payment went to its user, once, with its notification
    rows = sql.execute(
        "SELECT t.stripe_payment_intent_id, t.user_id::text, l.user_id::text, n.user_id::text "
        "FROM transactions t JOIN ledger_entries l ON l.source_id = t.stripe_payment_intent_id "
        "JOIN notifications n ON n.data ->> 'payment_intent' = t.stripe_payment_intent_id "
        "ORDER BY 1"
    ).fetchall()
    assert rows == [
        ("pi_own_1", named, named, named),
        ("pi_own_2", owner, owner, owner),
        ("pi_own_4", owner, owner, owner),
    ]
    balances = dict(sql.execute("SELECT id::text, balance FROM users").fetchall())
    assert balances == {named: Decimal("1.00"), owner: Decimal("6.00")}
    assert (
        sql.execute(
            "SELECT count(*) FROM transactions WHERE stripe_payment_intent_id = 'pi_own_8'"
        ).fetchone()[0]
        == 0
    )
    status = sql.execute("SELECT status FROM webhook_events WHERE id = %s", (nobody["id"],))
    assert status.fetchone()[0] == "failed"
    assert_balance_is_sum_of_ledger(sql)


def subscription_stream(uid: str, sub: str, cus: str, t: int) -> list[dict[str, Any]]:
    month = 30 * 86400
    return [
        se.event(
            "customer.subscription.created",
            se.subscription(
                sub,
                customer=cus,
                user_id=uid,
                tier="premium",
                status="incomplete",
                period_start=t,
                period_end=t + month,
            ),
            created=t,
        ),
        se.event(
            "invoice.paid",
            se.invoice(f"in_{sub}_1", sub=sub, customer=cus, period_start=t, period_end=t + month),
            created=t + 1,
        ),
        se.event(
            "customer.subscription.updated",
            se.subscription(
                sub,
                customer=cus,
                user_id=uid,
                tier="elite",
                status="active",
                period_start=t,
                period_end=t + month,
            ),
            created=t + 2,
        ),
        se.event(
            "invoice.payment_failed",
            se.invoice(
                f"in_{sub}_2",
                sub=sub,
                customer=cus,
                period_start=t + month,
                period_end=t + 2 * month,
            ),
            created=t + 3,
        ),
        se.event(
            "customer.subscription.updated",
            se.subscription(
                sub,
                customer=cus,
                user_id=uid,
                tier="elite",
                status="active",
                period_start=t + month,
                period_end=t + 2 * month,
                cancel=True,
            ),
            created=t + 4,
        ),
        se.event(
            "customer.subscription.deleted",
            se.subscription(
                sub,
                customer=cus,
                user_id=uid,
                tier="elite",
                status="canceled",
                period_start=t + month,
                period_end=t + 2 * month,
                cancel=True,
            ),
            created=t + 5,
        ),
    ]


def test_subscription_lifecycle_reversed_ends_like_in_order(sql, db) -> None:
    uid = make_user(sql, customer="cus_s")
    stream = subscription_stream(uid, "sub_1", "cus_s", T0)
    apply(list(reversed(stream[:5])))  # everything but the deletion, newest first
    row = sql.execute("SELECT tier, status, cancel_at_period_end FROM subscriptions").fetchone()
    assert row == ("elite", "active", True)
    assert sql.execute("SELECT subscription_tier FROM users").fetchone()[0] == "elite"
    apply([stream[5]])
    assert sql.execute("SELECT status FROM subscriptions").fetchone()[0] == "canceled"
    assert sql.execute("SELECT subscription_tier FROM users").fetchone()[0] == "free"


# --- property: any order, any duplication, several worker threads = in-order state ----------


def customer_streams(seed: int, customers: int) -> tuple[list[str], list[dict[str, Any]]]:
    """Per customer: a payment with partial refunds and a dispute, a failed payment, and a
    subscription lifecycle; times increase per object, as Stripe's do."""
    rnd = random.Random(seed)
    users: list[str] = []
    events: list[dict[str, Any]] = []
    for c in range(customers):
        uid = str(uuid.UUID(int=rnd.getrandbits(128)))
        users.append(uid)
        t = T0 + c * 1000
        amount = rnd.randint(5, 500) * 100
        pi, ch, dp = f"pi_{seed}_{c}", f"ch_{seed}_{c}", f"dp_{seed}_{c}"
        events.append(
            se.event(
                "payment_intent.succeeded",
                se.payment_intent(pi, user_id=uid, amount=amount, charge=ch),
                created=t,
            )
        )
        refunded = 0
        for k in range(rnd.randint(0, 3)):
            refunded = min(amount, refunded + rnd.randint(1, amount // 2))
            events.append(
                se.event(
                    "charge.refunded",
                    se.charge(ch, pi=pi, user_id=uid, amount=amount, refunded=refunded),
                    created=t + 10 + k,
                )
            )
        if rnd.random() < 0.5:
            hold = rnd.randint(1, amount)
            events.append(
                se.event(
                    "charge.dispute.created",
                    se.dispute(dp, ch=ch, pi=pi, amount=hold, status="needs_response"),
                    created=t + 20,
                )
            )
            events.append(
                se.event(
                    "charge.dispute.closed",
                    se.dispute(dp, ch=ch, pi=pi, amount=hold, status=rnd.choice(["won", "lost"])),
                    created=t + 21,
                )
            )
        failed_pi = f"pi_{seed}_{c}_f"
        events.append(
            se.event(
                "payment_intent.payment_failed",
                se.payment_intent(
                    failed_pi, user_id=uid, amount=999, status="requires_payment_method"
                ),
                created=t + 30,
            )
        )
        events.extend(
            subscription_stream(uid, f"sub_{seed}_{c}", f"cus_{seed}_{c}", t + 40)[
                : rnd.randint(1, 6)
            ]
        )
    return users, events


def fresh_state(servers: Any, users: list[str]) -> Any:
    import psycopg

    from db.engine import dispose_all
    from tests.conftest import _recreate_test_database

    dispose_all()
    _recreate_test_database()
    conn = psycopg.connect(servers.database_url, autocommit=True)
    for uid in users:
        conn.execute(
            "INSERT INTO users (id, email, full_name, currency) VALUES (%s, %s, 'U', 'USD')",
            (uid, f"{uid}@x.io"),
        )
    return conn


def in_order_state(servers: Any, users: list[str], events: list[dict[str, Any]]) -> dict[str, Any]:
    """The snapshot after applying `events` once each, in Stripe's order, on a fresh database."""
    with fresh_state(servers, users) as conn:
        apply(sorted(events, key=lambda e: (e["created"], e["id"])))
        assert_balance_is_sum_of_ledger(conn)
        return snapshot(conn)


def shuffled_with_duplicates(
    events: list[dict[str, Any]], seed: int, *, copies: int
) -> list[dict[str, Any]]:
    """All events plus `copies` of them again, in a random order."""
    rnd = random.Random(seed)
    delivered = events + rnd.sample(events, k=copies)
    rnd.shuffle(delivered)
    return delivered


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 10_000), shuffle_seed=st.integers(0, 10_000))
def test_any_order_and_duplication_with_threads_equals_in_order(
    servers, db, seed, shuffle_seed
) -> None:
    import dramatiq

    from workers.broker import broker

    users, events = customer_streams(seed, customers=3)
    # Given the state after one in-order delivery
    expected = in_order_state(servers, users, events)
    # When the same events arrive shuffled, half of them twice, on 8 worker threads at once
    delivered = shuffled_with_duplicates(events, shuffle_seed, copies=len(events) // 2)
    with fresh_state(servers, users) as conn:
        broker.flush_all()
        se.store(delivered)
        worker = dramatiq.Worker(broker, worker_threads=8, worker_timeout=50)
        worker.start()
        try:
            for e in delivered:
                process_event.send(e["id"])
            broker.join("payments", timeout=120_000)
            worker.join()
        finally:
            worker.stop()
        # Then the final state is the same, with zero drift in any balance
        assert snapshot(conn) == expected
        assert_balance_is_sum_of_ledger(conn)
        assert (
            conn.execute(
                "SELECT count(*) FROM webhook_events WHERE status NOT IN ('processed', 'ignored')"
            ).fetchone()[0]
            == 0
        )


def test_exhausted_retries_mark_the_event_failed_and_dead_letter_it(
    inproc_worker, sql, redis_client
) -> None:
    from workers.broker import broker

    # Given a refund whose payment never arrives: an expected wait, retried with backoff
    uid = make_user(sql)
    refund = se.event(
        "charge.refunded",
        {
            **se.charge("ch_lost", pi="pi_lost", user_id=uid, amount=900, refunded=900),
            "metadata": {},
        },
        created=T0,
    )
    se.store([refund])
    process_event.send(refund["id"])
    broker.join("payments", timeout=60_000)
    inproc_worker.join()
    # Then after the last retry the event is failed with its error, and the message is dead
    status, attempts, error = sql.execute(
        "SELECT status, attempts, last_error FROM webhook_events"
    ).fetchone()
    assert status == "failed"
    assert attempts == 1 + process_event.options["max_retries"]
    assert "waiting for payment pi_lost" in error
    assert redis_client.zcard("dramatiq:payments.XQ") == 1
    assert sql.execute("SELECT count(*) FROM ledger_entries").fetchone()[0] == 0
    # and once the payment is in, a replay applies it
    apply(
        [
            se.event(
                "payment_intent.succeeded",
                se.payment_intent("pi_lost", user_id=uid, amount=900, charge="ch_lost"),
                created=T0 - 5,
            )
        ]
    )
    assert replay(refund["id"]) == "processed"
    assert sql.execute("SELECT balance FROM users").fetchone()[0] == Decimal("0.00")
    assert_balance_is_sum_of_ledger(sql)
