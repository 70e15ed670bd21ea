"""Fan-out: set-based inserts in keyset batches, filtered in SQL, pushed through a local server
speaking Expo's push API (with its DeviceNotRegistered tickets and receipts)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import workers.actors  # noqa: F401  (the relay must know every actor the triggers name)
from core.proc import wait_until
from core.push import ExpoPush, PushError
from db.engine import unit_of_work
from tests.support import expo as _expo
from tests.support.expo import ExpoServer
from workers.base import PermanentError
from workers.broker import broker
from workers.notifications import UnknownKind, apply_receipts, deliver_fan_out
from workers.outbox import drain

expo_server = _expo.expo_server  # the fixture, registered by assignment


def user(sql: Any, name: str, *, token: str | None = None, deleted: bool = False) -> str:
    row = sql.execute(
        "INSERT INTO users (email, full_name, push_token, deleted_at) "
        "VALUES (%s, %s, %s, CASE WHEN %s THEN now() END) RETURNING id",
        (f"{name}@example.com", name, token, deleted),
    ).fetchone()
    return str(row[0])


def moment(sql: Any, owner: str, *, status: str = "active") -> str:
    row = sql.execute(
        "INSERT INTO moments (user_id, title, category, location, date, status) "
        "VALUES (%s, 'Sunset walk', 'outdoors', 'Moda', now(), %s) RETURNING id",
        (owner, status),
    ).fetchone()
    return str(row[0])


def follow(sql: Any, follower: str, followee: str) -> None:
    sql.execute(
        "INSERT INTO follows (follower_id, followee_id) VALUES (%s, %s)", (follower, followee)
    )


def notified(sql: Any, moment_id: str) -> set[str]:
    rows = sql.execute(
        "SELECT user_id FROM notifications WHERE dedup_key = %s", (f"new_moment:{moment_id}",)
    ).fetchall()
    return {str(r[0]) for r in rows}


def token(name: str) -> str:
    return f"ExponentPushToken[{name}]"


@pytest.fixture
def audience(sql: Any) -> dict[str, str]:
    """A creator and one user for every rule the fan-out must apply."""
    u: dict[str, str] = {}
    u["creator"] = user(sql, "creator", token=token("creator"))
    for name in ("fan1", "fan2", "fan3", "notoken", "deadsend", "deadreceipt", "nopush"):
        u[name] = user(sql, name, token=None if name == "notoken" else token(name))
    for name in ("blocked", "blocker", "deleted", "optedout", "stranger"):
        u[name] = user(sql, name, token=token(name), deleted=name == "deleted")
    u["favouriter"] = user(sql, "favouriter", token=token("favouriter"))
    for name in (
        "fan1",
        "fan2",
        "fan3",
        "notoken",
        "deadsend",
        "deadreceipt",
        "nopush",
        "blocked",
        "blocker",
        "deleted",
        "optedout",
    ):
        follow(sql, u[name], u["creator"])
    # the favouriter does not follow but liked an older moment of the creator; fan1 did both
    old = moment(sql, u["creator"], status="completed")
    for name in ("favouriter", "fan1", "creator"):
        sql.execute("INSERT INTO favorites (user_id, moment_id) VALUES (%s, %s)", (u[name], old))
    sql.execute(
        "INSERT INTO blocks (blocker_id, blocked_id) VALUES (%s, %s), (%s, %s)",
        (u["creator"], u["blocked"], u["blocker"], u["creator"]),
    )
    sql.execute(
        "INSERT INTO notification_preferences (user_id, kind, enabled, push) VALUES "
        "(%s, 'new_moment', false, true), (%s, 'new_moment', true, false), "
        "(%s, 'messages', false, false)",
        (u["optedout"], u["nopush"], u["fan2"]),
    )
    return u


EXPECTED = {"fan1", "fan2", "fan3", "notoken", "deadsend", "deadreceipt", "nopush", "favouriter"}
PUSHED = EXPECTED - {"notoken", "nopush"}


@pytest.mark.parametrize("batch", [1, 3, 5000])
def test_fan_out_applies_audience_rules_and_pushes_only_inserted_rows(
    sql, audience, expo_server: ExpoServer, batch: int
) -> None:
    u = audience
    expo_server.dead_at_send.add(token("deadsend"))
    expo_server.dead_at_receipt.add(token("deadreceipt"))
    mid = moment(sql, u["creator"])
    push = ExpoPush(expo_server.url)
    # When the fan-out runs (keyset batches of `batch`)
    with unit_of_work() as uow:
        result = deliver_fan_out(uow, "new_moment", mid, push=push, batch=batch)
    # Then followers and favouriters are notified once, minus blocks (both ways), deleted
    # users, opt-outs and the creator; pushes go to those with a token and push on
    assert notified(sql, mid) == {u[n] for n in EXPECTED}
    assert result.inserted == len(EXPECTED)
    assert sorted(expo_server.tokens_sent()) == sorted(token(n) for n in PUSHED)
    assert all(size <= max(batch, 1) for size in expo_server.requests)
    # the token Expo rejected at send time is cleared at once
    tokens = dict(sql.execute("SELECT full_name, push_token FROM users").fetchall())
    assert tokens["deadsend"] is None and tokens["deadreceipt"] == token("deadreceipt")
    assert result.tokens_cleared == 1
    # a retry of the same message inserts nothing and pushes nothing
    with unit_of_work() as uow:
        again = deliver_fan_out(uow, "new_moment", mid, push=push, batch=batch)
    assert again.inserted == 0 and again.audience == result.audience
    assert len(expo_server.sent) == len(PUSHED)
    # the receipts, fetched later, clear the token whose device is gone (the tickets as the
    # check_push_receipts message carries them: ticket id -> [user id, token])
    assert result.receipt_checks == len(PUSHED) - 1
    owners = dict(sql.execute("SELECT push_token, id::text FROM users").fetchall())
    tickets = {tid: [owners[tok], tok] for tid, tok in expo_server.tickets.items()}
    with unit_of_work() as uow:
        assert apply_receipts(uow, tickets, push=push) == 1
    tokens = dict(sql.execute("SELECT full_name, push_token FROM users").fetchall())
    assert tokens["deadreceipt"] is None and tokens["fan1"] == token("fan1")
    row = sql.execute(
        "SELECT type, title, body, data->>'moment_id', created_at = "
        "(SELECT created_at FROM moments WHERE id = %s) FROM notifications LIMIT 1",
        (mid,),
    ).fetchone()
    assert row == ("new_moment", "New moment from creator", "Sunset walk", mid, True)


def test_push_requests_hold_at_most_100_messages(sql, expo_server: ExpoServer) -> None:
    creator = user(sql, "big")
    sql.execute(
        "INSERT INTO users (email, push_token) SELECT 'f' || g || '@example.com', "
        "'ExponentPushToken[f' || g || ']' FROM generate_series(1, 250) g"
    )
    sql.execute(
        "INSERT INTO follows (follower_id, followee_id) "
        "SELECT id, %s FROM users WHERE email LIKE 'f%%'",
        (creator,),
    )
    mid = moment(sql, creator)
    with unit_of_work() as uow:
        result = deliver_fan_out(uow, "new_moment", mid, push=ExpoPush(expo_server.url))
    assert result.inserted == 250 and result.pushed == 250
    assert sorted(expo_server.requests) == [50, 100, 100]


def test_one_failed_push_request_does_not_drop_the_others(sql, expo_server: ExpoServer) -> None:
    # Given 250 followers with tokens, every tenth uninstalled, and Expo failing the second
    # of the three send requests (HTTP 500)
    creator = user(sql, "big")
    sql.execute(
        "INSERT INTO users (email, push_token) SELECT 'f' || g || '@example.com', "
        "'ExponentPushToken[f' || g || ']' FROM generate_series(1, 250) g"
    )
    sql.execute(
        "INSERT INTO follows (follower_id, followee_id) "
        "SELECT id, %s FROM users WHERE email LIKE 'f%%'",
        (creator,),
    )
    dead = {token(f"f{g}") for g in range(10, 251, 10)}
    expo_server.dead_at_send |= dead
    expo_server.fail_requests.add(2)
    mid = moment(sql, creator)
    # When the fan-out pushes them in one batch
    with unit_of_work() as uow:
        result = deliver_fan_out(uow, "new_moment", mid, push=ExpoPush(expo_server.url), batch=500)
    # Then the third request is still sent after the failed second one
    assert result.inserted == 250
    assert expo_server.send_attempts == 3 and expo_server.requests == [100, 50]
    sent = set(expo_server.tokens_sent())
    # the dead tokens Expo answered for are cleared, those of the failed request are kept
    left = {r[0] for r in sql.execute("SELECT push_token FROM users WHERE push_token IS NOT NULL")}
    assert dead & sent and not (dead & sent & left)
    assert dead - sent <= left
    assert result.tokens_cleared == len(dead & sent)
    # and every ok ticket is pushed and goes to the receipt check
    assert result.pushed == result.receipt_checks == len(sent - dead) == 150 - len(dead & sent)


def test_unreachable_push_service_keeps_the_notifications(sql, audience) -> None:
    from core.proc import free_port

    mid = moment(sql, audience["creator"])
    with unit_of_work() as uow:
        result = deliver_fan_out(
            uow, "new_moment", mid, push=ExpoPush(f"http://127.0.0.1:{free_port()}")
        )
    assert result.inserted == len(EXPECTED) and result.pushed == 0
    with pytest.raises(PushError):
        ExpoPush(f"http://127.0.0.1:{free_port()}").receipts(["x"])


def test_skips_and_bad_input(sql, audience) -> None:
    u = audience
    draft = moment(sql, u["creator"], status="draft")
    with unit_of_work() as uow:
        assert deliver_fan_out(uow, "new_moment", draft).skipped == "status_draft"
    with unit_of_work() as uow:
        missing = "00000000-0000-0000-0000-00000000abcd"
        assert deliver_fan_out(uow, "new_moment", missing).skipped == "missing_subject"
    gone = moment(sql, u["deleted"])
    with unit_of_work() as uow:
        assert deliver_fan_out(uow, "new_moment", gone).skipped == "creator_deleted"
    with pytest.raises(UnknownKind), unit_of_work() as uow:
        deliver_fan_out(uow, "new_spam", draft)
    with pytest.raises(PermanentError), unit_of_work() as uow:
        deliver_fan_out(uow, "new_moment", "42")
    assert sql.execute("SELECT count(*) FROM notifications").fetchone() == (0,)


def test_moment_insert_reaches_followers_through_outbox_and_worker(
    sql, audience, inproc_worker
) -> None:
    # Given an app inserting an active moment (push transport: the dev default, log://)
    mid = moment(sql, audience["creator"])
    # When the relay moves the trigger's row and a worker runs fan_out
    drain(broker, batch=100)
    broker.join("notifications", timeout=30_000)
    inproc_worker.join()
    # Then the audience is notified
    assert wait_until(lambda: len(notified(sql, mid)) == len(EXPECTED), timeout=10)
    assert notified(sql, mid) == {audience[n] for n in EXPECTED}


def test_bad_push_settings_are_clear_errors() -> None:
    from core.push import LogPush, open_push
    from core.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="PUSH_URL='ftp://push' has scheme 'ftp'"):
        Settings.from_env({"PUSH_URL": "ftp://push"})
    with pytest.raises(SettingsError, match="TIDEMILL_FANOUT_BATCH='0' must be at least 1"):
        Settings.from_env({"TIDEMILL_FANOUT_BATCH": "0"})
    with pytest.raises(SettingsError, match="unsupported scheme"):
        open_push("ftp://push")
    assert isinstance(open_push(settings=Settings.from_env({})), LogPush)


def test_keyset_batches_do_not_skip_anyone_around_the_creators_own_id(sql) -> None:
    # Given ids in a known order: the creator sits among its own favouriters and followers
    def uid(n: int) -> str:
        return f"00000000-0000-0000-0000-{n:012d}"

    for n in range(1, 12):
        sql.execute("INSERT INTO users (id, email) VALUES (%s, %s)", (uid(n), f"k{n}@example.com"))
    creator = uid(3)
    old = moment(sql, creator, status="completed")
    for n in (1, 2, 3, 4, 5, 6):  # the creator favourited its own moment too
        sql.execute("INSERT INTO favorites (user_id, moment_id) VALUES (%s, %s)", (uid(n), old))
    for n in (7, 8, 9, 10, 11):
        follow(sql, uid(n), creator)
    mid = moment(sql, creator)
    # When fan-out walks them two at a time
    with unit_of_work() as uow:
        result = deliver_fan_out(uow, "new_moment", mid, batch=2)
    # Then everyone but the creator is notified
    assert notified(sql, mid) == {uid(n) for n in range(1, 12) if n != 3}
    assert result.audience == 10


def test_worker_pushes_then_checks_receipts_later(
    sql, audience, expo_server: ExpoServer, inproc_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import reset_settings_cache

    # Given the worker configured for the local Expo server, receipts checked 0.2 s later
    monkeypatch.setenv("PUSH_URL", expo_server.url)
    monkeypatch.setenv("TIDEMILL_PUSH_RECEIPT_DELAY_S", "0.2")
    reset_settings_cache()
    expo_server.dead_at_send.add(token("deadsend"))
    expo_server.dead_at_receipt.add(token("deadreceipt"))
    try:
        # When an app inserts an active moment and the relay moves the trigger's row
        moment(sql, audience["creator"])
        drain(broker, batch=100)

        # Then both dead tokens end up cleared: one from its ticket, one from its receipt
        def cleared() -> bool:
            rows = dict(sql.execute("SELECT full_name, push_token FROM users").fetchall())
            return rows["deadsend"] is None and rows["deadreceipt"] is None

        assert wait_until(cleared, timeout=30)
        assert expo_server.receipt_requests  # the delayed check_push_receipts ran
        assert sorted(expo_server.tokens_sent()) == sorted(token(n) for n in PUSHED)
    finally:
        reset_settings_cache()


@st.composite
def audiences(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(2, 10))
    others = list(range(1, n))
    subset = st.lists(st.sampled_from(others), unique=True) if others else st.just([])
    return {
        "n": n,
        "followers": draw(subset),
        "favouriters": draw(subset),
        "self_favourite": draw(st.booleans()),
        "blocked_by_creator": draw(subset),
        "blocking_creator": draw(subset),
        "deleted": draw(subset),
        "opted_out": draw(subset),
        "batch": draw(st.integers(1, 4)),
    }


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=audiences())
def test_fan_out_matches_the_rules_for_any_audience(sql, case: dict[str, Any]) -> None:
    # Given users 0..n-1 (0 is the creator) related at random
    tag = uuid.uuid4().hex[:8]
    ids = [user(sql, f"h{tag}-{i}", deleted=i in case["deleted"]) for i in range(case["n"])]
    creator = ids[0]
    old = moment(sql, creator, status="completed")
    fans = case["favouriters"] + ([0] if case["self_favourite"] else [])
    for i in fans:
        sql.execute("INSERT INTO favorites (user_id, moment_id) VALUES (%s, %s)", (ids[i], old))
    for i in case["followers"]:
        follow(sql, ids[i], creator)
    for i in case["blocked_by_creator"]:
        sql.execute(
            "INSERT INTO blocks (blocker_id, blocked_id) VALUES (%s, %s)", (creator, ids[i])
        )
    for i in case["blocking_creator"]:
        sql.execute(
            "INSERT INTO blocks (blocker_id, blocked_id) VALUES (%s, %s)", (ids[i], creator)
        )
    for i in case["opted_out"]:
        sql.execute(
            "INSERT INTO notification_preferences (user_id, kind, enabled) "
            "VALUES (%s, 'new_moment', false)",
            (ids[i],),
        )
    mid = moment(sql, creator)
    # When fan-out runs in batches of `batch`, twice (a retry)
    for _ in range(2):
        with unit_of_work() as uow:
            deliver_fan_out(uow, "new_moment", mid, batch=case["batch"])
    # Then exactly the audience that passes every rule is notified, once each
    audience = set(case["followers"]) | set(case["favouriters"])
    excluded = (
        set(case["blocked_by_creator"])
        | set(case["blocking_creator"])
        | set(case["deleted"])
        | set(case["opted_out"])
    )
    assert notified(sql, mid) == {ids[i] for i in audience - excluded}
    rows = sql.execute(
        "SELECT count(*) FROM notifications WHERE dedup_key = %s", (f"new_moment:{mid}",)
    ).fetchone()
    assert rows[0] == len(audience - excluded)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(3, 12),
    batch=st.integers(1, 5),
    holes=st.sets(st.integers(0, 11)),
)
def test_a_retry_after_a_partial_fan_out_fills_only_the_holes(
    sql, expo_server: ExpoServer, n: int, batch: int, holes: set[int]
) -> None:
    # Given a fan-out that notified only part of the audience (a crash between batches, or
    # batches lost anywhere: the first batch may be complete while a later one is not)
    tag = uuid.uuid4().hex[:8]
    creator = user(sql, f"p{tag}-c")
    fans = [user(sql, f"p{tag}-{i}", token=token(f"p{tag}-{i}")) for i in range(n)]
    for f in fans:
        follow(sql, f, creator)
    mid = moment(sql, creator)
    push = ExpoPush(expo_server.url)
    with unit_of_work() as uow:
        deliver_fan_out(uow, "new_moment", mid, push=push, batch=batch)
    missing = [fans[i] for i in sorted(holes) if i < n]
    sql.execute(
        "DELETE FROM notifications WHERE dedup_key = %s AND user_id = ANY(%s::uuid[])",
        (f"new_moment:{mid}", missing),
    )
    pushed_before = len(expo_server.tokens_sent())
    # When the message is run again
    with unit_of_work() as uow:
        again = deliver_fan_out(uow, "new_moment", mid, push=push, batch=batch)
    # Then exactly the missing ones are inserted and pushed; nobody has two rows
    assert again.inserted == len(missing)
    assert again.conflicts == (len(missing) < n)
    assert notified(sql, mid) == set(fans)
    rows = sql.execute(
        "SELECT count(*) FROM notifications WHERE dedup_key = %s", (f"new_moment:{mid}",)
    ).fetchone()
    assert rows[0] == n
    sent = expo_server.tokens_sent()[pushed_before:]
    assert sorted(sent) == sorted(token(f"p{tag}-{i}") for i in sorted(holes) if i < n)


def test_two_copies_of_one_message_at_once_notify_each_recipient_once(sql) -> None:
    import threading

    # Given a large enough audience that the two runs overlap batch by batch
    tag = uuid.uuid4().hex[:8]
    creator = user(sql, f"d{tag}-c")
    sql.execute(
        "INSERT INTO users (email) "
        "SELECT %s || g || '@example.com' FROM generate_series(1, 3000) g",
        (f"d{tag}-",),
    )
    sql.execute(
        "INSERT INTO follows (follower_id, followee_id) "
        "SELECT id, %s FROM users WHERE email LIKE %s AND id <> %s",
        (creator, f"d{tag}-%", creator),
    )
    mid = moment(sql, creator)
    results: list[Any] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run() -> None:
        try:
            start.wait()
            with unit_of_work() as uow:
                results.append(deliver_fan_out(uow, "new_moment", mid, batch=200))
        except BaseException as exc:  # reported below
            errors.append(exc)

    # When two workers run the same fan-out message at the same moment
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    # Then both finish, between them every follower got one row, and neither counted a row
    # the other inserted
    assert not errors, errors
    rows = sql.execute(
        "SELECT count(*), count(DISTINCT user_id) FROM notifications WHERE dedup_key = %s",
        (f"new_moment:{mid}",),
    ).fetchone()
    assert rows[0] == rows[1] == 3000
    assert sum(r.inserted for r in results) == 3000
