"""`tidemill webhooks list|replay` and `tidemill stripe send`, as real subprocesses."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from core.proc import free_port, stop_process, wait_until
from tests.conftest import healthy, run_cli, start_cli
from tests.support import stripe_events as se
from tests.test_payments import make_user
from workers.payments import process_event


def test_list_shows_failed_events_and_replay_applies_after_the_fix(sql) -> None:
    ok = se.event("customer.created", {"id": "cus_1", "object": "customer"}, created=1_760_000_000)
    bad = se.event(
        "payment_intent.succeeded",
        {**se.payment_intent("pi_cli", user_id="nobody", amount=700), "customer": "cus_cli"},
        created=1_760_000_001,
    )
    se.store([ok, bad])
    process_event(ok["id"])
    with pytest.raises(Exception, match="no user"):
        process_event(bad["id"])

    listed = run_cli("webhooks", "list", "--status", "failed")
    assert listed.returncode == 0, listed.stderr
    assert bad["id"] in listed.stdout and ok["id"] not in listed.stdout
    assert "1 event(s)" in listed.stdout

    # replaying before the data is fixed fails again, clearly, and keeps the event failed
    again = run_cli("webhooks", "replay", bad["id"])
    assert (
        again.returncode == 1 and "failed again" in again.stderr and "Traceback" not in again.stderr
    )
    assert (
        sql.execute("SELECT status FROM webhook_events WHERE id = %s", (bad["id"],)).fetchone()[0]
        == "failed"
    )

    make_user(sql, customer="cus_cli")
    replayed = run_cli("webhooks", "replay", bad["id"])
    assert replayed.returncode == 0, replayed.stderr
    assert f"{bad['id']}: processed" in replayed.stdout
    assert sql.execute("SELECT balance FROM users").fetchone()[0] == 7


def test_replay_of_an_unknown_event_is_a_clear_error(db) -> None:
    result = run_cli("webhooks", "replay", "evt_missing")
    assert result.returncode == 2
    assert "evt_missing is not stored" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def running_system(db, tmp_path) -> Iterator[int]:
    """web + relay + payments worker as real processes on the test servers."""
    port = free_port()
    env = dict(os.environ, TIDEMILL_WEB_PORT=str(port), TIDEMILL_RELAY_POLL_S="0.5")
    procs = []
    for args in (["web"], ["relay"], ["worker", "--processes", "1", "--threads", "2"]):
        with open(tmp_path / f"{args[0]}.log", "wb") as log:  # kept for a failing test's reader
            procs.append(start_cli(*args, env=env, stderr=log))
    try:
        assert wait_until(lambda: healthy(port), timeout=60, interval=0.2)
        yield port
    finally:
        for proc in procs:
            stop_process(proc, timeout=60, group=True)


def test_stripe_send_walks_a_payment_through_the_running_system(running_system, sql) -> None:
    env = dict(os.environ, TIDEMILL_WEB_PORT=str(running_system))
    sent = run_cli(
        "stripe",
        "send",
        "payment_intent.succeeded",
        "--amount",
        "1234",
        "--ref",
        "pi_demo",
        "--wait",
        "30",
        env=env,
    )
    assert sent.returncode == 0, sent.stderr
    assert "-> 200" in sent.stdout
    assert "status processed; user balance 12.34" in sent.stdout
    refund = run_cli(
        "stripe",
        "send",
        "charge.refunded",
        "--amount",
        "1234",
        "--refunded",
        "234",
        "--ref",
        "pi_demo",
        "--wait",
        "30",
        env=env,
    )
    assert refund.returncode == 0, refund.stderr
    assert "status processed; user balance 10.00" in refund.stdout
    assert (
        sql.execute("SELECT count(*) FROM webhook_events WHERE status = 'processed'").fetchone()[0]
        == 2
    )


def test_stripe_send_rejects_an_unknown_type(db) -> None:
    result = run_cli("stripe", "send", "payment_intent.teleported")
    assert result.returncode == 2 and "unknown type" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("webhooks", "list", "--status", "bogus"), "unknown status 'bogus'"),
        (("stripe", "send", "charge.dispute.closed", "--outcome", "maybe"), "unknown outcome"),
        (("stripe", "send", "payment_intent.succeeded", "--currency", "xyz"), "unknown currency"),
    ],
)
def test_cli_choices_are_validated(db, args, message) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
