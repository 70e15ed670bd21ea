"""Payments with real worker processes: two processes at once, and one killed mid-event."""

from __future__ import annotations

import os
import signal
import subprocess
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.proc import stop_process, wait_until
from tests.conftest import start_cli
from tests.support import stripe_events as se
from tests.test_payments import (
    assert_balance_is_sum_of_ledger,
    customer_streams,
    fresh_state,
    in_order_state,
    make_user,
    shuffled_with_duplicates,
    snapshot,
)

pytestmark = pytest.mark.slow


def start_worker(*, processes: int, threads: int, **env: str) -> subprocess.Popen[bytes]:
    return start_cli(
        "worker",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--queue",
        "payments",
        env=dict(os.environ, **env),
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    stop_process(proc, sig=sig, timeout=60, group=True)


def pending(conn: Any) -> int:
    return int(
        conn.execute("SELECT count(*) FROM webhook_events WHERE status = 'received'").fetchone()[0]
    )


def settled(conn: Any, broker: Any) -> bool:
    """Every delivery handled: no event waiting for a try (received) or for its payment
    (waiting), and no message queued or scheduled for a retry (the delay queue: a refund that
    came before its payment and missed the payment's wake-up is retried after its backoff)."""
    unsettled = conn.execute(
        "SELECT count(*) FROM webhook_events WHERE status IN ('received', 'waiting')"
    ).fetchone()[0]
    return unsettled == 0 and all(
        broker.client.hlen(f"dramatiq:{queue}.msgs") == 0 for queue in ("payments", "payments.DQ")
    )


@settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 10_000), shuffle_seed=st.integers(0, 10_000))
def test_two_worker_processes_on_shuffled_duplicated_stream_equal_in_order(
    servers, db, seed, shuffle_seed
) -> None:
    from workers.broker import broker
    from workers.payments import process_event

    users, events = customer_streams(seed, customers=6)
    expected = in_order_state(servers, users, events)
    delivered = shuffled_with_duplicates(events, shuffle_seed, copies=len(events))  # all twice
    with fresh_state(servers, users) as conn:
        broker.flush_all()
        se.store(delivered)
        for e in delivered:
            process_event.send(e["id"])
        worker = start_worker(processes=2, threads=4)
        try:
            assert wait_until(lambda: settled(conn, broker), timeout=180, interval=0.2)
        finally:
            stop(worker)
        assert snapshot(conn) == expected
        assert_balance_is_sum_of_ledger(conn)


def test_worker_killed_mid_event_applies_it_exactly_once(servers, db, sql) -> None:
    from workers.broker import broker
    from workers.payments import process_event

    broker.flush_all()
    uid = make_user(sql)
    e = se.event(
        "payment_intent.succeeded",
        se.payment_intent("pi_kill", user_id=uid, amount=4200),
        created=1_760_000_000,
    )
    se.store([e])
    env = {"TIDEMILL_HEARTBEAT_TIMEOUT_MS": "2000", "TIDEMILL_REDIS_MAINTENANCE_CHANCE": "1000000"}
    # Given another session holding the user's row, so the worker stops inside its transaction,
    # in the statement that has written the ledger entry and waits to move the balance
    with psycopg.connect(servers.database_url) as holder:
        holder.execute("SELECT 1 FROM users WHERE id = %s FOR NO KEY UPDATE", (uid,))
        process_event.send(e["id"])
        first = start_worker(processes=1, threads=2, **env)
        try:
            # (the statement's text is longer than pg_stat_activity keeps: ask who waits for
            # the holder instead)
            assert wait_until(
                lambda: (
                    sql.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE %s = ANY(pg_blocking_pids(pid)) AND wait_event_type = 'Lock'",
                        (holder.info.backend_pid,),
                    ).fetchone()[0]
                    == 1
                ),
                timeout=60,
            )
        finally:
            # When the worker is killed with SIGKILL mid-event
            stop(first, signal.SIGKILL)
        holder.rollback()
    # its uncommitted work is gone
    assert sql.execute("SELECT count(*) FROM ledger_entries").fetchone()[0] == 0
    # Then a new worker gets the message again and applies the event exactly once
    second = start_worker(processes=1, threads=2, **env)
    try:
        assert wait_until(lambda: pending(sql) == 0, timeout=90, interval=0.2)
    finally:
        stop(second)
    assert sql.execute("SELECT balance FROM users WHERE id = %s", (uid,)).fetchone()[0] == Decimal(
        "42.00"
    )
    assert sql.execute("SELECT count(*) FROM ledger_entries").fetchone()[0] == 1
    assert sql.execute("SELECT count(*) FROM notifications").fetchone()[0] == 1
    assert sql.execute("SELECT status FROM webhook_events").fetchone()[0] == "processed"
