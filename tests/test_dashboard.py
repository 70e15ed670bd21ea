"""The operator dashboard over real HTTP (uvicorn in a thread), real Postgres and Valkey, dead
letters made by dramatiq's own broker commands or by a real worker."""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dramatiq
import httpx
import pytest
from dramatiq.middleware import MiddlewareError
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from core.settings import Settings, SettingsError
from tests.support import dashboard as support
from tests.support.dashboard import (
    DASH_QUEUE,
    DASH_QUEUE_2,
    OPERATOR,
    VIEWER,
    audit_rows,
    csrf_of,
    dashboard_env,
    dead_letter,
    flaky_until_released,
    flash_after,
    page_csrf,
    processed_rows,
    sign_in,
    wait_for,
)
from web.auth import LoginLimiter, hash_password, load_accounts, verify_password
from workers.stats import dead_errors_keys

# fixtures from the support module
dash_settings = support.dash_settings
dash_url = support.dash_url

PAGES = (
    "/dashboard",
    "/dashboard/queues",
    "/dashboard/schedules",
    "/dashboard/pipelines",
    "/dashboard/backups",
    "/dashboard/webhooks",
    "/dashboard/audit",
    "/dashboard/workers",
    "/dashboard/charts",
    f"/dashboard/queues/{DASH_QUEUE}",
)
XQ = f"dramatiq:{DASH_QUEUE}.XQ"


def dead_ids(redis_client: Any, queue: str = DASH_QUEUE) -> list[str]:
    return list(redis_client.zrange(f"dramatiq:{queue}.XQ", 0, -1))


# --- access -------------------------------------------------------------------------------------


def test_nothing_is_shown_without_signing_in(dash_url: str, redis_client: Any) -> None:
    dead_letter("flaky_until_released", "k1")
    with httpx.Client(base_url=dash_url, timeout=30) as anon:
        for path in PAGES:
            resp = anon.get(path)
            assert resp.status_code == 303, path
            assert resp.headers["location"].startswith("/dashboard/login?next="), path
        resp = anon.post("/dashboard/dead/delete", data={"queue": DASH_QUEUE, "id": "x"})
        assert resp.status_code == 401
    assert len(dead_ids(redis_client)) == 1


def test_every_page_renders_for_a_viewer(dash_url: str) -> None:
    with sign_in(dash_url, VIEWER) as viewer:
        for path in PAGES:
            resp = viewer.get(path)
            assert resp.status_code == 200, (path, resp.text[:500])
            assert "victor (viewer)" in resp.text
            assert resp.headers["cache-control"] == "no-store"


def test_wrong_password_is_refused_logged_and_audited(dash_url: str, sql: Any, caplog) -> None:
    with httpx.Client(base_url=dash_url, timeout=30) as client:
        page = client.get("/dashboard/login")
        resp = client.post(
            "/dashboard/login",
            data={"username": OPERATOR[0], "password": "nope", "csrf": csrf_of(page.text)},
        )
        assert resp.status_code == 401
        assert "Wrong name or password" in resp.text
        assert client.get("/dashboard").status_code == 303  # still signed out
    rows = audit_rows(sql, "dashboard.login_failed")
    assert [(r[0], r[4]["known_account"]) for r in rows] == [(OPERATOR[0], True)]
    assert "nope" not in caplog.text


def login_as(
    base: str, user: tuple[str, str], *, address: str | None = None, password: str | None = None
) -> httpx.Response:
    """One sign-in attempt, from `address` (through the trusted-proxy header) if given."""
    headers = {"X-Forwarded-For": address} if address else {}
    with httpx.Client(base_url=base, timeout=30, headers=headers) as client:
        token = csrf_of(client.get("/dashboard/login").text)
        return client.post(
            "/dashboard/login",
            data={"username": user[0], "password": password or user[1], "csrf": token},
        )


def test_failures_slow_the_attacker_not_the_operator_elsewhere(
    dash_url: str, dash_settings: Settings, sql: Any
) -> None:
    attacker, operator = "203.0.113.7", "198.51.100.20"
    free = dash_settings.login_max_failures
    # Given an attacker who fails `free` times for olga from one address
    for _ in range(free):
        assert login_as(dash_url, OPERATOR, address=attacker, password="guess").status_code == 401
    # Then the attacker waits, even with the right password
    held = login_as(dash_url, OPERATOR, address=attacker)
    assert held.status_code == 429
    assert int(held.headers["retry-after"]) >= 1
    # but olga signs in from her own address at once
    assert login_as(dash_url, OPERATOR, address=operator).status_code == 303
    # and the held attempt was audited, with the address the proxy reported
    [row] = audit_rows(sql, "dashboard.login_rate_limited")
    assert row[0] == OPERATOR[0] and row[4]["address"] == attacker
    assert row[4]["reason"] == "delay"


def test_the_forwarded_header_is_ignored_from_an_untrusted_peer(db: str) -> None:
    from web.auth import client_address, parse_proxies

    proxies = parse_proxies("10.0.0.0/8, 127.0.0.1")
    # a client that is not our proxy cannot choose its address
    assert client_address("198.51.100.1", ["1.2.3.4"], proxies) == "198.51.100.1"
    # through our proxies: the first hop from the right that is not ours
    assert client_address("127.0.0.1", ["1.2.3.4, 198.51.100.9, 10.1.1.1"], proxies) == (
        "198.51.100.9"
    )
    assert client_address("127.0.0.1", ["garbage, 10.0.0.2"], proxies) == "10.0.0.2"
    assert client_address("127.0.0.1", [], proxies) == "127.0.0.1"
    assert client_address("127.0.0.1", ["x"], ()) == "127.0.0.1"
    with pytest.raises(SettingsError, match="TIDEMILL_TRUSTED_PROXIES"):
        parse_proxies("10.0.0.0/33")


HOPS = st.sampled_from(["10.0.0.1", "10.9.9.9", "127.0.0.1", "198.51.100.7", "203.0.113.9", "x"])


@hsettings(max_examples=200, deadline=None)
@given(peer=HOPS, header=st.lists(HOPS, max_size=8), split=st.booleans())
def test_the_client_address_is_never_one_the_client_wrote_past_an_untrusted_hop(
    peer: str, header: list[str], split: bool
) -> None:
    from web.auth import client_address, parse_proxies

    proxies = parse_proxies("10.0.0.0/8,127.0.0.1")
    values = [", ".join(header[:2]), ", ".join(header[2:])] if split else [", ".join(header)]
    got = client_address(peer, values, proxies)
    trusted = {"10.0.0.1", "10.9.9.9", "127.0.0.1"}
    if peer not in trusted:
        assert got == peer  # a client that is not our proxy is its own address
        return
    assert got == peer or got in header
    # the answer is the rightmost hop that is not ours; hops left of it are never believed
    chain = [peer, *reversed(header)]
    for i, hop in enumerate(chain):
        if hop not in trusted:
            expected = hop if hop != "x" else chain[i - 1]
            assert got == expected
            break
    else:
        assert got == chain[-1]


def test_login_limiter_pair_delay_address_cap_and_account_soft_limit(
    dash_settings: Settings,
) -> None:
    from db.redis import get_redis

    limiter = LoginLimiter(
        get_redis(dash_settings), free=2, window_s=600, address_cap=4, account_soft=3
    )
    t = 1000.0
    # per pair: two free failures, then 1 s, then 2 s between attempts
    assert limiter.attempt("alice", "a1", now=t).allowed
    assert limiter.attempt("alice", "a1", now=t).allowed
    held = limiter.attempt("alice", "a1", now=t + 0.5)
    assert (held.allowed, held.reason) == (False, "delay")
    assert limiter.attempt("alice", "a1", now=t + 1.1).allowed
    assert not limiter.attempt("alice", "a1", now=t + 2.5).allowed
    # the account is past its soft limit (3): a1 has failed and is held, a fresh address is not
    assert not limiter.attempt("alice", "a1", now=t + 100).allowed
    assert limiter.attempt("alice", "fresh", now=t + 100).allowed
    limiter.succeeded("alice", "fresh")
    # per address: the cap counts every account's failures from it
    for name in ("b", "c", "d"):
        assert limiter.attempt(name, "a9", now=t).allowed
    assert limiter.attempt("e", "a9", now=t).allowed
    verdict = limiter.attempt("f", "a9", now=t)
    assert (verdict.allowed, verdict.reason) == (False, "address")
    # unlock forgets the account's failures from every address
    assert limiter.unlock("alice") >= 2
    assert limiter.attempt("alice", "a1", now=t + 100).allowed


@hsettings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    attacks=st.lists(
        st.tuples(
            st.sampled_from(["olga", "OLGA", "victor"]), st.integers(0, 30), st.floats(0, 900)
        ),
        max_size=60,
    )
)
def test_no_attack_from_elsewhere_blocks_a_fresh_address(
    dash_settings: Settings, attacks: list[tuple[str, int, float]]
) -> None:
    """Whatever failures attackers pile up from other addresses, olga's first attempt from an
    address with no failures has its password checked."""
    from db.redis import get_redis

    client = get_redis(dash_settings)
    for key in client.scan_iter(match="tidemill:login:*"):
        client.delete(key)
    limiter = LoginLimiter(client, free=3, window_s=600, address_cap=10, account_soft=5)
    for name, host, offset in sorted(attacks, key=lambda a: a[2]):
        limiter.attempt(name, f"10.9.0.{host}", now=1000.0 + offset)
    assert limiter.attempt("olga", "192.0.2.1", now=1000.0 + 901).allowed


def test_concurrent_wrong_passwords_cannot_pass_the_limit(dash_settings: Settings) -> None:
    """Counting happens before the slow password check: however many guesses arrive at once,
    no more than the free ones are let through."""
    import threading

    from db.redis import get_redis

    limiter = LoginLimiter(get_redis(dash_settings), free=5, window_s=600, first_delay_s=60)
    verdicts: list[bool] = []
    start = threading.Barrier(15)

    def guess() -> None:
        start.wait()
        verdicts.append(limiter.attempt("olga", "10.0.0.1").allowed)

    threads = [threading.Thread(target=guess) for _ in range(15)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(verdicts) == [False] * 10 + [True] * 5


def test_non_ascii_tokens_are_refused_not_crashing(dash_url: str) -> None:
    with httpx.Client(base_url=dash_url, timeout=30) as client:
        client.get("/dashboard/login")
        resp = client.post(
            "/dashboard/login",
            data={"username": OPERATOR[0], "password": OPERATOR[1], "csrf": "é"},
        )
        assert resp.status_code == 403
    with httpx.Client(base_url=dash_url, timeout=30) as forger:
        resp = forger.get("/dashboard", headers={b"Cookie": "tidemill_session=é".encode()})
        assert resp.status_code == 303  # signed out, not a 500


def test_cli_unlock_lets_a_held_address_try_again(dash_url: str, dash_settings: Settings) -> None:
    from typer.testing import CliRunner

    from cli.dashboard import app

    address = "203.0.113.50"
    for _ in range(dash_settings.login_max_failures):
        login_as(dash_url, OPERATOR, address=address, password="guess")
    assert login_as(dash_url, OPERATOR, address=address).status_code == 429
    result = CliRunner().invoke(app, ["unlock", OPERATOR[0]])
    assert result.exit_code == 0, result.output
    assert "unlocked olga" in result.output
    assert login_as(dash_url, OPERATOR, address=address).status_code == 303


def test_with_no_accounts_the_login_page_says_how_to_make_one(db: str) -> None:
    with dashboard_env(TIDEMILL_DASHBOARD_USERS="") as settings, support.serve(settings) as url:
        page = httpx.get(f"{url}/dashboard/login", timeout=30).text
    assert "tidemill dashboard add-user NAME --role operator" in page
    assert "export TIDEMILL_DASHBOARD_USERS=" in page
    assert "make up" in page


def test_login_needs_its_csrf_token_and_never_redirects_off_site(dash_url: str) -> None:
    with httpx.Client(base_url=dash_url, timeout=30) as client:
        resp = client.post(
            "/dashboard/login", data={"username": OPERATOR[0], "password": OPERATOR[1]}
        )
        assert resp.status_code == 403
        token = csrf_of(client.get("/dashboard/login").text)
        resp = client.post(
            "/dashboard/login",
            data={
                "username": OPERATOR[0],
                "password": OPERATOR[1],
                "csrf": token,
                "next": "https://evil.example/",
            },
        )
        assert resp.status_code == 303
        assert resp.headers["location"] == "/dashboard"


def test_every_post_needs_the_sessions_csrf_token(dash_url: str, redis_client: Any) -> None:
    letter = dead_letter("flaky_until_released", "k1")
    rid = letter.options["redis_message_id"]
    with sign_in(dash_url, OPERATOR) as operator:
        for data in ({}, {"csrf": "forged"}):
            resp = operator.post(
                "/dashboard/dead/delete", data={"queue": DASH_QUEUE, "id": rid, **data}
            )
            assert resp.status_code == 403
            assert "CSRF" in resp.text
    assert dead_ids(redis_client) == [rid]


def test_a_viewer_cannot_act_and_the_refusal_is_audited(
    dash_url: str, redis_client: Any, sql: Any
) -> None:
    letter = dead_letter("flaky_until_released", "k1")
    rid = letter.options["redis_message_id"]
    with sign_in(dash_url, VIEWER) as viewer:
        page = viewer.get("/dashboard/queues")
        assert rid in page.text
        assert "retry-one" not in page.text  # no buttons for a viewer
        resp = viewer.post(
            "/dashboard/dead/retry",
            data={"queue": DASH_QUEUE, "id": rid, "csrf": csrf_of(page.text)},
        )
        assert resp.status_code == 403
        assert "viewer role cannot" in resp.text
    assert dead_ids(redis_client) == [rid]
    refused = audit_rows(sql, "dashboard.refused")
    assert [(r[0], r[3]) for r in refused] == [(VIEWER[0], "change_dead_letters")]


def test_a_forged_or_expired_session_is_signed_out(dash_url: str, dash_settings: Settings) -> None:
    from db.redis import get_redis
    from web.auth import SessionStore

    with sign_in(dash_url, VIEWER) as viewer:
        cookie = viewer.cookies.get("tidemill_session")
        assert cookie
        viewer.cookies.clear()
        viewer.cookies.set("tidemill_session", cookie[:-1] + "x", path="/dashboard")
        assert viewer.get("/dashboard").status_code == 303
    store = SessionStore(get_redis(dash_settings), ttl_s=10)
    account = load_accounts(
        Settings.from_env({"TIDEMILL_DASHBOARD_USERS": "a:viewer:" + hash_password("password1")})
    )["a"]
    _, issued = store.create(account, address="x", now=time.time())
    assert store.load(issued) is not None
    assert store.load(issued, now=time.time() + 11) is None
    assert store.load(issued) is None  # an expired record is deleted on sight


def test_sign_out_ends_the_session_and_a_replayed_cookie_is_refused(
    dash_url: str, sql: Any, redis_client: Any
) -> None:
    letter = dead_letter("flaky_until_released", "k1")
    with sign_in(dash_url, OPERATOR) as operator:
        cookie = operator.cookies.get("tidemill_session") or ""
        csrf = page_csrf(operator)
        resp = operator.post("/dashboard/logout", data={"csrf": csrf})
        assert resp.status_code == 303
        assert operator.get("/dashboard").status_code == 303
    # an attacker who copied the cookie (and the CSRF token) before sign-out gets nothing
    with httpx.Client(base_url=dash_url, timeout=30) as replay:
        replay.cookies.set("tidemill_session", cookie, path="/dashboard")
        assert replay.get("/dashboard/queues").status_code == 303
        resp = replay.post(
            "/dashboard/dead/delete",
            data={"queue": DASH_QUEUE, "id": letter.options["redis_message_id"], "csrf": csrf},
        )
        assert resp.status_code == 401
    assert len(dead_ids(redis_client)) == 1
    assert [r[0] for r in audit_rows(sql, "dashboard.logout")] == [OPERATOR[0]]


def test_sign_out_everywhere_ends_every_session_of_the_account(dash_url: str, sql: Any) -> None:
    with (
        sign_in(dash_url, OPERATOR) as laptop,
        sign_in(dash_url, OPERATOR) as phone,
        sign_in(dash_url, VIEWER) as other,
    ):
        assert phone.get("/dashboard").status_code == 200
        resp = laptop.post("/dashboard/logout-everywhere", data={"csrf": page_csrf(laptop)})
        assert resp.status_code == 303
        assert phone.get("/dashboard").status_code == 303
        assert laptop.get("/dashboard").status_code == 303
        assert other.get("/dashboard").status_code == 200  # another account is untouched
    [row] = audit_rows(sql, "dashboard.logout_everywhere")
    assert row[0] == OPERATOR[0] and row[4]["sessions"] == 2


def test_sign_in_rotates_the_session_id(dash_url: str) -> None:
    with sign_in(dash_url, VIEWER) as client:
        first = client.cookies.get("tidemill_session")
        token = csrf_of(client.get("/dashboard/login").text)
        resp = client.post(
            "/dashboard/login",
            data={"username": VIEWER[0], "password": VIEWER[1], "csrf": token},
        )
        assert resp.status_code == 303
        second = client.cookies.get("tidemill_session")
        assert first and second and first != second
    with httpx.Client(base_url=dash_url, timeout=30) as replay:
        replay.cookies.set("tidemill_session", first, path="/dashboard")
        assert replay.get("/dashboard").status_code == 303  # the pre-sign-in id is dead


@pytest.mark.parametrize("change", ["removed", "demoted"])
def test_a_removed_or_demoted_account_loses_its_sessions_at_once(
    dash_url: str, change: str
) -> None:
    from web.auth import hash_password as make

    with sign_in(dash_url, OPERATOR) as operator:
        cookie = operator.cookies.get("tidemill_session") or ""
        users = f"{VIEWER[0]}:viewer:{make(VIEWER[1])}"
        if change == "demoted":
            users += f",{OPERATOR[0]}:viewer:{make(OPERATOR[1])}"
        # another replica (or this one restarted) with the account removed or made a viewer
        with (
            dashboard_env(TIDEMILL_DASHBOARD_USERS=users) as changed,
            support.serve(changed) as url,
            httpx.Client(base_url=url, timeout=30) as c,
        ):
            c.cookies.set("tidemill_session", cookie, path="/dashboard")
            assert c.get("/dashboard").status_code == 303
        # and the session is over everywhere, the old replica included
        assert operator.get("/dashboard").status_code == 303


def test_flash_comes_from_the_session_never_from_the_link(dash_url: str, redis_client: Any) -> None:
    with sign_in(dash_url, OPERATOR) as operator:
        for params in (
            {"done": "deleted", "n": "500"},
            {"done": "already_applied", "status": "hacked, call us"},
        ):
            page = operator.get("/dashboard/queues", params=params).text
            assert 'id="flash"' not in page and "500" not in page and "call us" not in page
        letter = dead_letter("flaky_until_released", "k1")
        resp = operator.post(
            "/dashboard/dead/delete",
            data={
                "queue": DASH_QUEUE,
                "id": letter.options["redis_message_id"],
                "csrf": page_csrf(operator),
            },
        )
        assert resp.status_code == 303 and "done" not in resp.headers["location"]
        page = operator.get(resp.headers["location"]).text
        assert "Deleted 1 dead letter(s)." in page
        # shown once
        assert "Deleted 1 dead letter" not in operator.get("/dashboard/queues").text


def test_csrf_refusals_are_audited(dash_url: str, sql: Any) -> None:
    with sign_in(dash_url, OPERATOR) as operator:
        assert operator.post("/dashboard/logout", data={"csrf": "forged"}).status_code == 403
    with httpx.Client(base_url=dash_url, timeout=30) as anon:
        anon.get("/dashboard/login")
        resp = anon.post("/dashboard/login", data={"username": "x", "password": "y"})
        assert resp.status_code == 403
    rows = audit_rows(sql, "dashboard.csrf_refused")
    assert sorted((r[0] or "") for r in rows) == ["", OPERATOR[0]]


def test_security_headers_on_every_dashboard_response(dash_url: str) -> None:
    with sign_in(dash_url, VIEWER) as viewer:
        for path in (*PAGES, "/dashboard/login", "/dashboard/static/dashboard.css"):
            resp = viewer.get(path)
            assert resp.status_code == 200, path
            h = resp.headers
            assert "frame-ancestors 'none'" in h["content-security-policy"], path
            assert "script-src 'self'" in h["content-security-policy"], path
            assert h["x-content-type-options"] == "nosniff", path
            assert h["referrer-policy"] == "no-referrer", path
            assert h["x-frame-options"] == "DENY", path
            if "static" not in path:
                assert h["cache-control"] == "no-store", path
        icon = viewer.get("/favicon.ico")
        assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg")
        assert viewer.get("/dashboard").text.count('rel="icon"') == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("olga", "is not NAME:ROLE:HASH"),
        ("olga:admin:scrypt$1$1$1$AA$AA", "role 'admin'"),
        ("olga:viewer:plaintext", "no valid hash"),
        ("olga:viewer:{h},olga:operator:{h}", "listed twice"),
    ],
)
def test_bad_accounts_setting_names_the_variable(value: str, message: str) -> None:
    value = value.format(h=hash_password("password1"))
    with pytest.raises(SettingsError) as err:
        load_accounts(Settings.from_env({"TIDEMILL_DASHBOARD_USERS": value}))
    assert "TIDEMILL_DASHBOARD_USERS" in str(err.value)
    assert message in str(err.value)
    assert "scrypt$" not in str(err.value)  # never echoes a hash


def test_password_hashes_verify_only_their_password() -> None:
    encoded = hash_password("correct horse")
    assert encoded.startswith("scrypt$")
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct horsE", encoded)
    assert not verify_password("correct horse", "garbage")
    assert hash_password("correct horse") != encoded  # salted


# --- dead letters -------------------------------------------------------------------------------


def test_dead_letter_shows_actor_masked_arguments_and_the_real_error(
    dash_url: str, inproc_worker: Any, redis_client: Any
) -> None:
    # Given a message that fails for good in a real worker
    flaky_until_released.send("k-err", email="alice.smith@example.com")
    assert wait_for(lambda: len(dead_ids(redis_client)) == 1)
    with sign_in(dash_url, VIEWER) as viewer:
        page = viewer.get("/dashboard/queues", params={"queue": DASH_QUEUE}).text
    assert "flaky_until_released" in page
    assert "a***@example.com" in page
    assert "alice.smith" not in page
    # the final attempt's error, recorded by workers.stats when the message was dead-lettered
    assert "PermanentError: not released yet for a***@example.com" in page


def test_push_tokens_in_dead_letters_are_masked(dash_url: str, redis_client: Any) -> None:
    dead_letter(
        "notifications.check_push_receipts",
        [{"id": "r1", "to": "ExponentPushToken[abcSECRET123]"}],
    )
    with sign_in(dash_url, VIEWER) as viewer:
        page = viewer.get("/dashboard/queues", params={"queue": DASH_QUEUE}).text
        assert "check_push_receipts" in page
        assert "ExponentPushToken[***]" in page
        assert "abcSECRET123" not in page
        # nor can the token be found by searching for it
        found = viewer.get("/dashboard/queues", params={"queue": DASH_QUEUE, "q": "abcSECRET"})
        assert "check_push_receipts" not in found.text


def test_search_matches_the_masked_text_not_the_hidden_one(
    dash_url: str, redis_client: Any
) -> None:
    rid = dead_letter("flaky_until_released", "k-probe", email="alice.smith@example.com").options[
        "redis_message_id"
    ]
    with sign_in(dash_url, VIEWER) as viewer:
        for probe in ("alice.smith@example.com", "alice.smith"):
            resp = viewer.get("/dashboard/queues", params={"queue": DASH_QUEUE, "q": probe})
            assert resp.status_code == 200
            assert rid not in resp.text, probe  # the mask cannot be probed by searching
        shown = viewer.get("/dashboard/queues", params={"queue": DASH_QUEUE, "q": "a***@example"})
        assert rid in shown.text


def test_operator_retries_a_dead_letter_and_a_worker_processes_it(
    dash_url: str, inproc_worker: Any, redis_client: Any, sql: Any
) -> None:
    flaky_until_released.send("k-retry")
    assert wait_for(lambda: len(dead_ids(redis_client)) == 1)
    [rid] = dead_ids(redis_client)
    error_keys = dead_errors_keys(DASH_QUEUE, redis_client.zscore(XQ, rid))
    assert any(redis_client.hexists(k, rid) for k in error_keys)
    redis_client.set("release:k-retry", "1")
    with sign_in(dash_url, OPERATOR) as operator:
        resp = operator.post(
            "/dashboard/dead/retry",
            data={"queue": DASH_QUEUE, "id": rid, "csrf": page_csrf(operator)},
        )
        assert resp.status_code == 303
        assert "Retried 1 dead letter" in flash_after(operator, resp)
        assert wait_for(lambda: processed_rows(sql, "k-retry") == 1)
        assert dead_ids(redis_client) == []
        assert not any(redis_client.hexists(k, rid) for k in error_keys)  # its error went too
        # retrying it again finds nothing: a letter is moved once
        resp = operator.post(
            "/dashboard/dead/retry",
            data={"queue": DASH_QUEUE, "id": rid, "csrf": page_csrf(operator)},
        )
        assert "no longer there" in flash_after(operator, resp)
    rows = audit_rows(sql, "dashboard.dead_letter.retry")
    assert [(r[0], r[3], r[4]["count"]) for r in rows] == [
        (OPERATOR[0], f"{DASH_QUEUE}/{rid}", 1),
        (OPERATOR[0], f"{DASH_QUEUE}/{rid}", 0),
    ]


def test_retried_letter_gets_a_fresh_age_and_retry_budget(dash_url: str, redis_client: Any) -> None:
    letter = dead_letter("flaky_until_released", "k-old")
    rid = letter.options["redis_message_id"]
    # make the stored letter look 10 days old and out of retries
    raw = json.loads(redis_client.hget(f"{XQ}.msgs", rid))
    raw["message_timestamp"] -= 10 * 86400 * 1000
    raw["options"].update(retries=20, traceback="Traceback...\nRuntimeError: boom")
    redis_client.hset(f"{XQ}.msgs", rid, json.dumps(raw))
    with sign_in(dash_url, OPERATOR) as operator:
        operator.post(
            "/dashboard/dead/retry",
            data={"queue": DASH_QUEUE, "id": rid, "csrf": page_csrf(operator)},
        )
    [new_id] = redis_client.lrange(f"dramatiq:{DASH_QUEUE}", 0, -1)
    moved = json.loads(redis_client.hget(f"dramatiq:{DASH_QUEUE}.msgs", new_id))
    assert moved["message_id"] == letter.message_id
    assert moved["args"] == ["k-old"]
    assert "retries" not in moved["options"] and "traceback" not in moved["options"]
    assert moved["message_timestamp"] > raw["message_timestamp"] + 9 * 86400 * 1000


def test_operator_deletes_one_dead_letter(dash_url: str, redis_client: Any, sql: Any) -> None:
    keep = dead_letter("flaky_until_released", "keep").options["redis_message_id"]
    drop = dead_letter("flaky_until_released", "drop").options["redis_message_id"]
    with sign_in(dash_url, OPERATOR) as operator:
        resp = operator.post(
            "/dashboard/dead/delete",
            data={"queue": DASH_QUEUE, "id": drop, "csrf": page_csrf(operator)},
        )
        assert "Deleted 1 dead letter" in flash_after(operator, resp)
    assert dead_ids(redis_client) == [keep]
    assert redis_client.hget(f"{XQ}.msgs", drop) is None
    assert redis_client.llen(f"dramatiq:{DASH_QUEUE}") == 0


def test_search_by_actor_and_text(dash_url: str) -> None:
    dead_letter("flaky_until_released", "order-alpha-1")
    dead_letter("flaky_until_released", "order-beta-2")
    dead_letter("other_actor", "order-alpha-3")
    with sign_in(dash_url, VIEWER) as viewer:

        def shown(**params: str) -> int:
            return viewer.get("/dashboard/queues", params=params).text.count('class="dead-letter"')

        assert shown() == 3
        assert shown(q="ALPHA") == 2
        assert shown(actor="flaky_until_released") == 2
        assert shown(actor="flaky_until_released", q="alpha") == 1
        assert shown(q="no-such-thing") == 0
        assert shown(queue="payments") == 0


def test_dead_letter_pages_cover_every_letter_once(dash_url: str) -> None:
    made = {
        dead_letter("flaky_until_released", f"p{i}").options["redis_message_id"] for i in range(120)
    }
    seen: list[str] = []
    with sign_in(dash_url, VIEWER) as viewer:
        url: str | None = "/dashboard/queues"
        pages = 0
        while url:
            text = viewer.get(url).text
            seen += [
                part.split('"', 1)[0] for part in text.split('class="dead-letter" data-id="')[1:]
            ]
            nxt = text.split('id="next-page"')[0].rsplit('href="', 1)
            url = (
                nxt[1].split('"', 1)[0].replace("&amp;", "&") if 'id="next-page"' in text else None
            )
            pages += 1
            assert pages < 10
    assert len(seen) == len(made) and set(seen) == made
    assert pages >= 3


def test_bulk_retry_acts_on_exactly_the_set_it_counted(
    dash_url: str, redis_client: Any, sql: Any
) -> None:
    matching = {
        dead_letter("flaky_until_released", f"bulk-{i}").options["redis_message_id"]
        for i in range(5)
    }
    others = {
        dead_letter("flaky_until_released", f"keep-{i}").options["redis_message_id"]
        for i in range(3)
    }
    with sign_in(dash_url, OPERATOR) as operator:
        token = page_csrf(operator)
        preview = operator.post(
            "/dashboard/dead-select",
            data={"csrf": token, "op": "retry", "q": "bulk-", "queue": DASH_QUEUE},
        )
        assert preview.status_code == 200
        assert "Retry 5 dead letter(s)?" in preview.text
        assert set(redis_client.zrange(XQ, 0, -1)) == matching | others  # nothing happened yet
        # a letter that dies after the count is not part of the confirmed action
        late = dead_letter("flaky_until_released", "bulk-late").options["redis_message_id"]
        selection = preview.text.split('name="token" value="')[1].split('"')[0]
        done = operator.post("/dashboard/dead-bulk", data={"csrf": token, "token": selection})
        assert "Retried 5 dead letter" in flash_after(operator, done)
        # the selection is used once
        again = operator.post("/dashboard/dead-bulk", data={"csrf": token, "token": selection})
        assert "selection expired" in flash_after(operator, again)
    assert set(redis_client.zrange(XQ, 0, -1)) == others | {late}
    assert redis_client.llen(f"dramatiq:{DASH_QUEUE}") == 5
    [row] = audit_rows(sql, "dashboard.dead_letters.bulk_retry")
    assert row[0] == OPERATOR[0] and row[4]["selected"] == 5 and row[4]["done"] == 5


class ConnectionLost(MiddlewareError, ConnectionError):
    """A builtin ConnectionError (dramatiq only lets MiddlewareError out of a middleware)."""


class SocketGone(MiddlewareError, OSError):
    """A builtin OSError, likewise."""


class FailingEnqueue(dramatiq.Middleware):
    """Dramatiq middleware on the real broker: from the `fail_on`-th enqueue on, enqueueing
    raises as a lost connection would."""

    def __init__(self, *, fail_on: int, error: type[Exception] = ConnectionLost) -> None:
        self.fail_on = fail_on
        self.error = error
        self.calls = 0

    def before_enqueue(self, broker: Any, message: Any, delay: Any) -> None:
        self.calls += 1
        if self.calls >= self.fail_on:
            raise self.error("broker gone")


@contextmanager
def failing_enqueue(**kwargs: Any) -> Iterator[FailingEnqueue]:
    from workers.broker import broker

    mw = FailingEnqueue(**kwargs)
    broker.middleware.append(mw)
    try:
        yield mw
    finally:
        broker.middleware.remove(mw)


def test_bulk_retry_failing_partway_reports_audits_and_keeps_the_rest(
    dash_url: str, redis_client: Any, sql: Any
) -> None:
    for i in range(3):
        dead_letter("flaky_until_released", f"part-{i}")
    with sign_in(dash_url, OPERATOR) as operator:
        token = page_csrf(operator)
        preview = operator.post(
            "/dashboard/dead-select",
            data={"csrf": token, "op": "retry", "q": "part-", "queue": DASH_QUEUE},
        )
        selection = preview.text.split('name="token" value="')[1].split('"')[0]
        # When: the broker fails on the second enqueue
        with failing_enqueue(fail_on=2):
            failed = operator.post("/dashboard/dead-bulk", data={"csrf": token, "token": selection})
        # Then: a 503 that says how many moved, and offers the rest for confirming again
        assert failed.status_code == 503
        assert "after 1 letter(s) were retried" in failed.text
        assert "Retry 2 dead letter(s)?" in failed.text
        assert redis_client.llen(f"dramatiq:{DASH_QUEUE}") == 1
        assert len(dead_ids(redis_client)) == 2
        [row] = audit_rows(sql, "dashboard.dead_letters.bulk_retry")
        assert row[4]["done"] == 1 and row[4]["selected"] == 3
        assert "ConnectionLost" in row[4]["error"]
        # confirming again (the broker is back) retries exactly the remainder
        done = operator.post("/dashboard/dead-bulk", data={"csrf": token, "token": selection})
        assert "Retried 2 dead letter" in flash_after(operator, done)
    assert redis_client.llen(f"dramatiq:{DASH_QUEUE}") == 3
    assert dead_ids(redis_client) == []


def test_retry_one_with_the_broker_down_is_a_503_and_audited(
    dash_url: str, redis_client: Any, sql: Any
) -> None:
    rid = dead_letter("flaky_until_released", "down").options["redis_message_id"]
    with sign_in(dash_url, OPERATOR) as operator:
        token = page_csrf(operator)
        with failing_enqueue(fail_on=1, error=SocketGone):
            resp = operator.post(
                "/dashboard/dead/retry", data={"csrf": token, "queue": DASH_QUEUE, "id": rid}
            )
        assert resp.status_code == 503
        assert "after 0 letter(s) were retried" in resp.text
    assert dead_ids(redis_client) == [rid]
    [row] = audit_rows(sql, "dashboard.dead_letter.retry")
    assert row[4]["count"] == 0 and "SocketGone" in row[4]["error"]


def test_bulk_delete_of_a_filter(dash_url: str, redis_client: Any) -> None:
    for i in range(4):
        dead_letter("other_actor", f"x{i}")
    keep = dead_letter("flaky_until_released", "y").options["redis_message_id"]
    with sign_in(dash_url, OPERATOR) as operator:
        token = page_csrf(operator)
        preview = operator.post(
            "/dashboard/dead-select", data={"csrf": token, "op": "delete", "actor": "other_actor"}
        )
        assert "Delete 4 dead letter(s)?" in preview.text
        selection = preview.text.split('name="token" value="')[1].split('"')[0]
        operator.post("/dashboard/dead-bulk", data={"csrf": token, "token": selection})
    assert dead_ids(redis_client) == [keep]


def test_bad_input_answers_a_clear_error(dash_url: str) -> None:
    with sign_in(dash_url, OPERATOR) as operator:
        token = page_csrf(operator)
        assert operator.get("/dashboard/queues", params={"before": "abc"}).status_code == 400
        assert operator.get("/dashboard/webhooks", params={"status": "weird"}).status_code == 400
        resp = operator.post("/dashboard/dead-select", data={"csrf": token, "op": "explode"})
        assert resp.status_code == 400
        resp = operator.post("/dashboard/dead/retry", data={"csrf": token})
        assert resp.status_code == 400
        assert operator.get("/dashboard/pipelines/999999").status_code == 404
        resp = operator.post(
            "/dashboard/dead/retry",
            content=b"csrf=" + b"x" * 70_000,
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert resp.status_code == 413


# --- the Postgres pages ---------------------------------------------------------------------------


def _insert_event(
    sql: Any, event_id: str, *, type_: str, status: str, minutes_ago: int = 1
) -> None:
    sql.execute(
        "INSERT INTO webhook_events (id, type, created, livemode, payload, status, received_at, "
        "last_error) VALUES (%s, %s, now(), false, %s, %s, now() - make_interval(mins => %s), %s)",
        (
            event_id,
            type_,
            json.dumps({"id": event_id, "type": type_, "data": {"object": {}}}),
            status,
            minutes_ago,
            "boom" if status == "failed" else None,
        ),
    )


def test_webhooks_page_counts_searches_and_replays(dash_url: str, sql: Any) -> None:
    _insert_event(sql, "evt_ok1", type_="payment_intent.succeeded", status="processed")
    _insert_event(
        sql, "evt_ok2", type_="payment_intent.succeeded", status="processed", minutes_ago=120
    )
    _insert_event(sql, "evt_bad1", type_="customer.created", status="failed")
    with sign_in(dash_url, OPERATOR) as operator:
        page = operator.get("/dashboard/webhooks").text
        assert page.count("<tr data-event=") == 3
        assert (
            operator.get("/dashboard/webhooks", params={"status": "failed"}).text.count(
                "<tr data-event="
            )
            == 1
        )
        assert (
            operator.get("/dashboard/webhooks", params={"q": "evt_ok"}).text.count(
                "<tr data-event="
            )
            == 2
        )
        assert (
            operator.get("/dashboard/webhooks", params={"q": "customer.created"}).text.count(
                "<tr data-event="
            )
            == 1
        )
        overview = operator.get("/dashboard").text
        assert "50.0 %" in overview  # 1 failed of the 2 received in the last hour
        resp = operator.post("/dashboard/webhooks/evt_bad1/replay", data={"csrf": csrf_of(page)})
        assert resp.status_code == 303
        assert "Replay queued" in flash_after(operator, resp)
    # the web process did not process it: reopened, and handed to a worker through the outbox
    status = sql.execute("SELECT status FROM webhook_events WHERE id = 'evt_bad1'").fetchone()[0]
    assert status == "received"
    outbox = sql.execute(
        "SELECT actor, queue_name, args FROM outbox WHERE dispatched_at IS NULL"
    ).fetchall()
    assert [tuple(r) for r in outbox] == [("process_event", "payments", ["evt_bad1"])]
    [row] = audit_rows(sql, "dashboard.webhook.replay")
    assert row[0] == OPERATOR[0] and row[3] == "evt_bad1" and row[4]["outcome"] == "queued"


def test_replay_from_the_dashboard_is_processed_by_a_worker(
    dash_url: str, inproc_worker: Any, sql: Any
) -> None:
    from workers.broker import broker
    from workers.outbox import drain

    _insert_event(sql, "evt_bad2", type_="customer.created", status="failed")
    _insert_event(sql, "evt_done", type_="customer.created", status="processed")
    with sign_in(dash_url, OPERATOR) as operator:
        token = page_csrf(operator, "/dashboard/webhooks")
        resp = operator.post("/dashboard/webhooks/evt_bad2/replay", data={"csrf": token})
        assert "Replay queued" in flash_after(operator, resp)
        # an applied event is not queued again
        resp = operator.post("/dashboard/webhooks/evt_done/replay", data={"csrf": token})
        assert "already processed" in flash_after(operator, resp)
    # the relay's job, done here: send the outbox rows to the broker
    assert drain(broker, batch=10) == 1

    def status_of(event_id: str) -> str:
        row = sql.execute("SELECT status FROM webhook_events WHERE id = %s", (event_id,))
        return str(row.fetchone()[0])

    assert wait_for(lambda: status_of("evt_bad2") == "ignored")  # a type tidemill ignores
    assert status_of("evt_done") == "processed"


def test_pipelines_page_and_run_detail(dash_url: str, sql: Any) -> None:
    run_id = sql.execute(
        "INSERT INTO pipeline_runs (pipeline, started_at, finished_at, status, rows_scanned, "
        "rows_affected, bytes_written, objects, error) VALUES ('archive-messages', "
        "now() - interval '90 seconds', now(), 'failed', 5000, 4200, 3145728, 3, 'upload refused') "
        "RETURNING id"
    ).fetchone()[0]
    with sign_in(dash_url, VIEWER) as viewer:
        page = viewer.get("/dashboard/pipelines").text
        assert "archive-messages" in page and "4,200" in page and "3.0 MiB" in page
        assert "upload refused" in page and "90 s" in page
        detail = viewer.get(f"/dashboard/pipelines/{run_id}").text
        assert "5,000" in detail and "upload refused" in detail


def test_pipelines_filter_by_status_and_show_progress_while_running(
    dash_url: str, sql: Any
) -> None:
    sql.execute(
        "INSERT INTO pipeline_runs (pipeline, started_at, status, progress) VALUES "
        "('purge-sessions', now(), 'running', '{\"batches\": 17}'), "
        "('archive-messages', now(), 'succeeded', NULL)"
    )
    with sign_in(dash_url, VIEWER) as viewer:
        running = viewer.get("/dashboard/pipelines", params={"status": "running"}).text
        assert "purge-sessions" in running and "archive-messages" not in running
        assert "batches</span> 17" in running
        done = viewer.get("/dashboard/pipelines", params={"status": "succeeded"}).text
        assert "archive-messages" in done and "purge-sessions" not in done
        assert viewer.get("/dashboard/pipelines", params={"status": "x"}).status_code == 400


def test_audit_page_pages_and_filters(dash_url: str, sql: Any) -> None:
    # Given 120 audit rows by two accounts, one second apart
    sql.execute(
        "INSERT INTO audit_logs (action, entity_type, entity_id, actor, performed_at) "
        "SELECT CASE WHEN i % 3 = 0 THEN 'dashboard.schedule.pause' ELSE 'dashboard.login' END, "
        "'x', 'e' || i, CASE WHEN i % 2 = 0 THEN 'ann' ELSE 'bob' END, "
        "now() - make_interval(secs => i) FROM generate_series(1, 120) AS i"
    )
    with sign_in(dash_url, VIEWER) as viewer:
        # every row once, across pages, newest first
        seen: list[str] = []
        url: str | None = "/dashboard/audit?actor=ann"
        while url:
            page = viewer.get(url).text
            seen += re.findall(r'<span class="mono">(e\d+)</span>', page)
            match = re.search(r'href="([^"]+)" id="audit-older"', page)
            url = html.unescape(match.group(1)) if match else None
        assert seen == [f"e{i}" for i in range(2, 121, 2)]
        page = viewer.get("/dashboard/audit", params={"action": "schedule", "actor": "bob"}).text
        found = re.findall(r'<span class="mono">(e\d+)</span>', page)
        assert found == [f"e{i}" for i in range(3, 121, 6)]
        assert viewer.get("/dashboard/audit", params={"entity": "e7"}).text.count("e7<") == 1
        bad = viewer.get("/dashboard/audit", params={"before_at": "x", "before_id": "y"})
        assert bad.status_code == 400
        # a LIKE wildcard typed into the filter is a literal
        page = viewer.get("/dashboard/audit", params={"action": "%"}).text
        assert "no-audit" in page


def test_backups_page_without_and_with_backups(dash_url: str, sql: Any) -> None:
    with sign_in(dash_url, VIEWER) as viewer:
        exists = sql.execute("SELECT to_regclass('backups') IS NOT NULL").fetchone()[0]
        if exists:
            sql.execute("DELETE FROM backups")
        assert "No backups yet" in viewer.get("/dashboard/backups").text
        assert "no backups yet" in viewer.get("/dashboard").text
        if not exists:
            return  # the backups issue's tables are not there: the empty state is all we can show
        sql.execute(
            "INSERT INTO backups (kind, status, started_at, finished_at, key, size_bytes, sha256, "
            "storage_url) VALUES ('full', 'complete', now() - interval '20 minutes', "
            "now() - interval '19 minutes', 'backups/full/1.dump.zst', 1048576, "
            "'ab12cd34ef56ab78cd', 'file:///tmp/x')"
        )
        page = viewer.get("/dashboard/backups").text
        assert "1.0 MiB" in page and "ab12cd34ef56ab78" in page
        overview = viewer.get("/dashboard").text
        assert 'class="value bad" id="backup-age"' in overview  # 19 min old > RPO of 15 min


def test_schedules_page_lists_and_controls_every_schedule(
    dash_url: str, dash_settings: Settings, sql: Any
) -> None:
    from web.dashboard.store import schedules

    rows = schedules(dash_settings)
    assert rows, "there is at least one schedule"
    name = rows[0].name
    with sign_in(dash_url, OPERATOR) as operator:
        page = operator.get("/dashboard/schedules").text
        for row in rows:
            assert f'data-schedule="{row.name}"' in page
        token = csrf_of(page)
        resp = operator.post(f"/dashboard/schedules/{name}/pause", data={"csrf": token})
        assert "Schedule paused" in flash_after(operator, resp)
        assert [r.paused for r in schedules(dash_settings) if r.name == name] == [True]
        resp = operator.post(f"/dashboard/schedules/{name}/resume", data={"csrf": token})
        assert [r.paused for r in schedules(dash_settings) if r.name == name] == [False]
        resp = operator.post(f"/dashboard/schedules/{name}/trigger", data={"csrf": token})
        assert "Schedule triggered" in flash_after(operator, resp)
        resp = operator.post("/dashboard/schedules/no-such/trigger", data={"csrf": token})
        assert "No such schedule" in flash_after(operator, resp)
    fired = sql.execute("SELECT fired_by FROM schedule_ticks WHERE schedule = %s", (name,))
    assert [r[0] for r in fired.fetchall()] == [OPERATOR[0]]
    actions = sql.execute(
        "SELECT action FROM audit_logs WHERE action LIKE 'dashboard.schedule.%%' "
        "ORDER BY performed_at"
    ).fetchall()
    assert [r[0] for r in actions] == [
        "dashboard.schedule.pause",
        "dashboard.schedule.resume",
        "dashboard.schedule.trigger",
    ]


def test_a_viewer_cannot_pause_a_schedule(dash_url: str, dash_settings: Settings) -> None:
    from web.dashboard.store import schedules

    name = schedules(dash_settings)[0].name
    with sign_in(dash_url, VIEWER) as viewer:
        page = viewer.get("/dashboard/schedules").text
        assert "pause-schedule" not in page
        resp = viewer.post(f"/dashboard/schedules/{name}/pause", data={"csrf": csrf_of(page)})
        assert resp.status_code == 403
    assert [r.paused for r in schedules(dash_settings) if r.name == name] == [False]


def test_dashboard_refuses_to_start_with_bad_accounts() -> None:
    from web.app import create_app

    with (
        dashboard_env(TIDEMILL_DASHBOARD_USERS="olga:root:x") as settings,
        pytest.raises(SettingsError, match="TIDEMILL_DASHBOARD_USERS"),
    ):
        create_app(settings)


def test_cli_makes_an_account_entry_the_dashboard_accepts() -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    CLI = (sys.executable, "-m", "cli.main", "dashboard")
    done = subprocess.run(
        [*CLI, "add-user", "nina", "--role", "operator", "--password-stdin"],
        input="a-long-password\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    entry = done.stdout.strip()
    account = load_accounts(Settings.from_env({"TIDEMILL_DASHBOARD_USERS": entry}))["nina"]
    assert account.role == "operator"
    assert verify_password("a-long-password", account.password_hash)
    short = subprocess.run(
        [*CLI, "hash-password", "--password-stdin"],
        input="short\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
        timeout=60,
    )
    assert short.returncode == 2 and "at least 8 characters" in short.stderr


def test_pages_split_letters_that_died_in_the_same_millisecond(
    dash_settings: Settings, redis_client: Any
) -> None:
    from web.dashboard import broker_state

    # Given 30 letters in two queues, all scored the same millisecond (a recent one: dramatiq's
    # maintenance, which may run on any broker command, drops dead letters older than 7 days)
    same_ms = int(time.time() * 1000)
    made = set()
    for i in range(30):
        queue = DASH_QUEUE if i % 2 else DASH_QUEUE_2
        rid = dead_letter("flaky_until_released", f"t{i}", queue=queue).options["redis_message_id"]
        redis_client.zadd(f"dramatiq:{queue}.XQ", {rid: same_ms})
        made.add((queue, rid))
    client = broker_state.broker_redis(dash_settings)
    queues = [DASH_QUEUE, DASH_QUEUE_2]
    seen: list[tuple[str, str]] = []
    cursor = None
    for _ in range(10):
        page = broker_state.dead_page(
            client, queues, broker_state.DeadFilter(), cursor=cursor, limit=7
        )
        seen += [(d.queue, d.redis_id) for d in page.letters]
        if page.next_cursor is None:
            break
        cursor = broker_state.Cursor.decode(page.next_cursor)
    # Then every letter is shown exactly once
    assert len(seen) == 30 and set(seen) == made
    # and a filtered search that runs out of budget offers to continue where it stopped
    flt = broker_state.DeadFilter(text="t1")
    first = broker_state.dead_page(client, queues, flt, limit=50, scan_budget=5)
    assert first.scanned == 30  # a page never ends inside one millisecond
    assert {d.args for d in first.letters} >= {'{"args": ["t1"], "kwargs": {}}'}
    with pytest.raises(ValueError):
        broker_state.Cursor.decode("12:only-two")


def test_an_unreachable_broker_answers_503_naming_it(db: str) -> None:
    from core.proc import free_port

    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    with (
        dashboard_env(BROKER_URL=dead_broker) as settings,
        support.serve(settings) as url,
        sign_in(url, OPERATOR) as operator,
    ):
        resp = operator.get("/dashboard/queues")
        assert resp.status_code == 503
        assert "Redis is unreachable" in resp.text
        token = page_csrf(operator, "/dashboard/audit")
        resp = operator.post(
            "/dashboard/dead/retry", data={"queue": DASH_QUEUE, "id": "x", "csrf": token}
        )
        assert resp.status_code == 503
        # the overview still shows what Postgres knows, and says the broker is down
        resp = operator.get("/dashboard")
        assert resp.status_code == 200
        assert "broker is unreachable" in resp.text
        assert 'id="outbox-backlog"' in resp.text


def test_retry_never_loses_a_letter(dash_settings: Settings, redis_client: Any) -> None:
    from web.dashboard import broker_state
    from workers.broker import broker

    client = broker_state.broker_redis(dash_settings)
    ids = [
        dead_letter("flaky_until_released", f"r{i}").options["redis_message_id"] for i in range(3)
    ]
    # an unreadable letter is left where it is
    redis_client.hset(f"{XQ}.msgs", ids[0], "not json")
    assert broker_state.retry(client, [(DASH_QUEUE, ids[0])], broker=broker) == 0
    assert ids[0] in dead_ids(redis_client)

    class BrokerFailingOnSecond:
        """The real broker, whose second enqueue fails as a lost connection would."""

        calls = 0

        def enqueue(self, message: Any) -> Any:
            self.calls += 1
            if self.calls == 2:
                raise ConnectionError("broker gone")
            return broker.enqueue(message)

    with pytest.raises(broker_state.RetryFailed) as failed:
        broker_state.retry(
            client,
            [(DASH_QUEUE, i) for i in ids[1:]] + [(DASH_QUEUE, ids[0])],
            broker=BrokerFailingOnSecond(),
        )
    assert failed.value.moved == 1
    assert isinstance(failed.value.error, ConnectionError)
    assert failed.value.remaining == [(DASH_QUEUE, ids[2]), (DASH_QUEUE, ids[0])]
    # the first moved; the one that failed and the unreadable one are still dead letters
    assert redis_client.llen(f"dramatiq:{DASH_QUEUE}") == 1
    assert set(dead_ids(redis_client)) == set(ids) - {ids[1]}


def test_day_counts_are_cached_a_minute_hour_counts_are_not(
    dash_settings: Settings, sql: Any
) -> None:
    from web.dashboard.store import webhook_window

    _insert_event(sql, "evt_c1", type_="charge.refunded", status="failed")
    assert webhook_window(dash_settings, seconds=86400, cache_s=60)["failed"] == 1
    _insert_event(sql, "evt_c2", type_="charge.refunded", status="failed")
    assert webhook_window(dash_settings, seconds=86400, cache_s=60)["failed"] == 1  # cached
    assert webhook_window(dash_settings, seconds=3600)["failed"] == 2
    assert webhook_window(dash_settings, seconds=86400)["failed"] == 2


# --- operator depth -------------------------------------------------------------------------


def test_a_paused_queue_runs_nothing_until_resumed_across_worker_restarts(
    dash_url: str, redis_client: Any, sql: Any
) -> None:
    import dramatiq as dq

    from workers.broker import broker
    from workers.pause import QueuePause

    redis_client.set("release:paused-1", "1")
    with sign_in(dash_url, VIEWER) as viewer:
        token = page_csrf(viewer, f"/dashboard/queues/{DASH_QUEUE}")
        refused = viewer.post(f"/dashboard/queues/{DASH_QUEUE}/pause", data={"csrf": token})
        assert refused.status_code == 403 and "viewer role cannot" in refused.text
    with sign_in(dash_url, OPERATOR) as operator:
        token = page_csrf(operator, f"/dashboard/queues/{DASH_QUEUE}")
        resp = operator.post(f"/dashboard/queues/{DASH_QUEUE}/pause", data={"csrf": token})
        assert "Queue tests-dash paused" in flash_after(operator, resp)
        # Given a paused queue and two live workers (two replicas)
        flaky_until_released.send("paused-1")
        workers = [dq.Worker(broker, worker_threads=1, worker_timeout=100) for _ in range(2)]
        for w in workers:
            w.start()
        try:
            # a worker fetches the message and holds it (back to the delayed set), never runs it
            assert wait_for(lambda: redis_client.hlen(f"dramatiq:{DASH_QUEUE}.DQ.msgs") >= 1)
            time.sleep(1.5)
            assert processed_rows(sql, "paused-1") == 0
        finally:
            for w in workers:
                w.stop()
        # a restarted worker builds a new middleware: it reads the pause from Postgres
        assert DASH_QUEUE in QueuePause().paused(broker)
        page = operator.get(f"/dashboard/queues/{DASH_QUEUE}").text
        assert 'id="queue-paused"' in page and "Paused by olga" in page
        resp = operator.post(f"/dashboard/queues/{DASH_QUEUE}/resume", data={"csrf": token})
        assert "resumed" in flash_after(operator, resp)
    # When a worker starts after the resume, the message runs, once
    worker = dq.Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        assert wait_for(lambda: processed_rows(sql, "paused-1") == 1, timeout=30)
    finally:
        worker.stop()
    assert processed_rows(sql, "paused-1") == 1
    assert [r[3] for r in audit_rows(sql, "dashboard.queue.pause")] == [DASH_QUEUE]
    assert [r[3] for r in audit_rows(sql, "dashboard.queue.resume")] == [DASH_QUEUE]
    refusals = audit_rows(sql, "dashboard.refused")
    assert [(r[0], r[3]) for r in refusals] == [(VIEWER[0], "pause_queues")]


def test_queue_browser_and_message_page_mask_arguments(dash_url: str, redis_client: Any) -> None:
    from workers.broker import broker

    # Given a ready, a delayed and a dead message (no worker runs: they stay where they are)
    msg: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=DASH_QUEUE_2,
        actor_name="flaky_until_released",
        args=("ready-1",),
        kwargs={"email": "maria.lopez@example.com", "password": "hunter22"},
        options={},
    )
    # one message a worker has fetched and not yet acked (the broker's own fetch): in flight
    broker.enqueue(msg.copy(args=("inflight-1",)))
    assert support.redis_broker.do_fetch(DASH_QUEUE_2, 1)
    ready = broker.enqueue(msg)
    broker.enqueue(msg.copy(args=("delayed-1",)), delay=3_600_000)
    dead_letter("flaky_until_released", "dead-1", email="ann.lee@example.com")
    [dead_rid] = dead_ids(redis_client)
    with sign_in(dash_url, VIEWER) as viewer:
        page = viewer.get(f"/dashboard/queues/{DASH_QUEUE_2}").text
        assert "ready-1" in page and "m***@example.com" in page
        assert "maria.lopez" not in page and "hunter22" not in page
        page = viewer.get(f"/dashboard/queues/{DASH_QUEUE_2}", params={"state": "delayed"}).text
        assert "delayed-1" in page and "ready-1" not in page
        page = viewer.get(f"/dashboard/queues/{DASH_QUEUE_2}", params={"state": "in_flight"}).text
        assert "inflight-1" in page and "ready-1" not in page and "delayed-1" not in page
        detail = html.unescape(
            viewer.get(
                f"/dashboard/queues/{DASH_QUEUE_2}/messages/{ready.options['redis_message_id']}"
            ).text
        )
        assert ready.message_id in detail and '"password": "***"' in detail
        assert "maria.lopez" not in detail and "hunter22" not in detail
        page = viewer.get(f"/dashboard/queues/{DASH_QUEUE}", params={"state": "dead"}).text
        assert dead_rid in page and "ann.lee" not in page
        detail = viewer.get(f"/dashboard/queues/{DASH_QUEUE}/messages/{dead_rid}").text
        assert 'id="message-state">dead' in detail and "a***@example.com" in detail
        # bad input: clear errors, no 500
        assert viewer.get(f"/dashboard/queues/{DASH_QUEUE}/messages/nope").status_code == 404
        assert viewer.get("/dashboard/queues/no-such-queue").status_code == 404
        assert viewer.get("/dashboard/queues/bad%20name").status_code == 400
        bad = viewer.get(f"/dashboard/queues/{DASH_QUEUE}", params={"state": "x"})
        assert bad.status_code == 400
        bad = viewer.get(f"/dashboard/queues/{DASH_QUEUE}", params={"cursor": "-1"})
        assert bad.status_code == 400


def test_ready_pages_cover_every_message_once(dash_url: str) -> None:
    from workers.broker import broker

    for i in range(120):
        broker.enqueue(
            dramatiq.Message(
                queue_name=DASH_QUEUE_2,
                actor_name="flaky_until_released",
                args=(f"page-{i:03d}",),
                kwargs={},
                options={},
            )
        )
    seen: list[str] = []
    with sign_in(dash_url, VIEWER) as viewer:
        url: str | None = f"/dashboard/queues/{DASH_QUEUE_2}"
        while url:
            page = viewer.get(url).text
            seen += re.findall(r"page-(\d{3})", page)
            match = re.search(r'href="([^"]+)" id="messages-next"', page)
            url = html.unescape(match.group(1)) if match else None
    assert seen == [f"{i:03d}" for i in range(120)]


def test_workers_page_and_charts(
    dash_url: str, dash_settings: Settings, redis_client: Any, inproc_worker: Any
) -> None:
    import os

    redis_client.set("release:chart-1", "1")
    flaky_until_released.send("chart-1")
    flaky_until_released.send("chart-2", email="ann.lee@example.com")  # fails for good
    assert wait_for(lambda: len(dead_ids(redis_client)) == 1)
    [dead_rid] = dead_ids(redis_client)
    with sign_in(dash_url, VIEWER) as viewer:
        # the dead letter's page lists its attempt with the traceback, masked
        detail = viewer.get(f"/dashboard/queues/{DASH_QUEUE}/messages/{dead_rid}").text
        assert 'class="attempt"' in detail and "PermanentError" in detail
        assert "Traceback (most recent call last)" in detail
        assert "ann.lee" not in detail and "a***@example.com" in detail
        # the worker's heartbeat (every few seconds) carries host, pid, threads and memory
        assert wait_for(lambda: str(os.getpid()) in viewer.get("/dashboard/workers").text)
        page = viewer.get("/dashboard/workers").text
        assert 'class="worker"' in page and "MiB" in page
        # charts per queue and actor, and from the hourly rollups
        for params in (
            {"queue": DASH_QUEUE},
            {"actor": "flaky_until_released"},
            {"queue": DASH_QUEUE, "range": "30d"},
        ):
            assert wait_for(
                lambda p=params: (
                    "2 finished, 1 failed" in viewer.get("/dashboard/charts", params=p).text
                )
            ), params
        # the overview's per-minute totals count each message once (not again per actor)
        from web.dashboard import broker_state

        client = broker_state.broker_redis(dash_settings)
        assert sum(total for _, total, _ in broker_state.per_minute(client, minutes=5)) == 2
        page = viewer.get("/dashboard/charts", params={"queue": "payments", "range": "7d"}).text
        assert "0 finished, 0 failed" in page
        assert viewer.get("/dashboard/charts", params={"range": "1y"}).status_code == 400


def test_schedule_page_lists_ticks_linked_to_the_runs_they_caused(
    dash_url: str, dash_settings: Settings, sql: Any
) -> None:
    from schedules.schedule import PIPELINE_ACTOR, load_schedules

    name = next(s.name for s in load_schedules(dash_settings) if s.actor == PIPELINE_ACTOR)
    with sign_in(dash_url, VIEWER) as viewer:
        page = viewer.get(f"/dashboard/schedules/{name}").text
        assert "no-ticks" in page and "run-now" not in page
        refused = viewer.post(f"/dashboard/schedules/{name}/trigger", data={"csrf": csrf_of(page)})
        assert refused.status_code == 403
    with sign_in(dash_url, OPERATOR) as operator:
        page = operator.get(f"/dashboard/schedules/{name}").text
        resp = operator.post(f"/dashboard/schedules/{name}/trigger", data={"csrf": csrf_of(page)})
        assert "Schedule triggered" in flash_after(operator, resp)
        [tick] = sql.execute(
            "SELECT tick FROM schedule_ticks WHERE schedule = %s", (name,)
        ).fetchone()
        # the run the pipeline actor records for that tick
        run_id = sql.execute(
            "INSERT INTO pipeline_runs (pipeline, tick, started_at, status) "
            "VALUES (%s, %s, now(), 'running') RETURNING id",
            (name, tick),
        ).fetchone()[0]
        page = operator.get(f"/dashboard/schedules/{name}").text
        assert f'href="/dashboard/pipelines/{run_id}"' in page and "manual" in page
        assert OPERATOR[0] in page
        assert operator.get("/dashboard/schedules/no-such").status_code == 404
        bad = operator.get(f"/dashboard/schedules/{name}", params={"before": "x"})
        assert bad.status_code == 400


@pytest.mark.parametrize(
    ("op", "schedule"), [("backup", "backup-full"), ("verify", "backup-drill")]
)
def test_back_up_now_and_verify_queue_the_backup_schedules(
    dash_url: str, sql: Any, op: str, schedule: str
) -> None:
    with sign_in(dash_url, VIEWER) as viewer:
        page = viewer.get("/dashboard/backups").text
        assert f"{op}-now" not in page
        assert (
            viewer.post(f"/dashboard/backups/{op}", data={"csrf": csrf_of(page)}).status_code == 403
        )
    with sign_in(dash_url, OPERATOR) as operator:
        page = operator.get("/dashboard/backups").text
        resp = operator.post(f"/dashboard/backups/{op}", data={"csrf": csrf_of(page)})
        assert "queued" in flash_after(operator, resp)
        assert (
            operator.post("/dashboard/backups/nope", data={"csrf": csrf_of(page)}).status_code
            == 404
        )
    # a manual tick of the backup schedule, by the operator, with its outbox message
    rows = sql.execute(
        "SELECT t.kind, t.fired_by, o.actor FROM schedule_ticks t "
        "JOIN outbox o ON o.id = t.outbox_id WHERE t.schedule = %s",
        (schedule,),
    ).fetchall()
    assert [tuple(r) for r in rows] == [
        ("manual", OPERATOR[0], "backup_full" if op == "backup" else "backup_drill")
    ]
    [row] = audit_rows(sql, f"dashboard.backup.{op}")
    assert row[0] == OPERATOR[0] and row[3] == schedule


@pytest.mark.slow
def test_a_pause_holds_through_sigkilled_worker_processes_and_loses_nothing(
    db: str, sql: Any, redis_client: Any
) -> None:
    """Real worker processes (two replicas), SIGKILLed while holding a paused queue's message,
    and a new one started: nothing runs until the resume, then the message runs once."""
    import os
    import signal
    import subprocess

    from core.proc import stop_process
    from tests.conftest import start_cli
    from tests.support import actors
    from workers.broker import broker
    from workers.pause import pause_queue, resume_queue

    def start() -> subprocess.Popen[bytes]:
        return start_cli(
            "worker", "tests.support.actors", "--processes", "1", "--threads", "2",
            "--queue", "tests", env=env,
        )  # fmt: skip

    def done(key: str = "pz1") -> int:
        count = sql.execute("SELECT count(*) FROM audit_logs WHERE entity_id = %s", (key,))
        return int(count.fetchone()[0])

    broker.flush_all()
    env = dict(
        os.environ,
        TIDEMILL_HEARTBEAT_TIMEOUT_MS="2000",  # a killed worker's messages come back fast
        TIDEMILL_REDIS_MAINTENANCE_CHANCE="1000000",
    )
    client = support.redis_broker.client
    assert pause_queue("tests", by="test")
    actors.write_row.send("pz1")
    workers = [start(), start()]
    try:
        # a worker fetched it and put it back to the delayed set, unrun
        assert wait_for(lambda: client.hlen("dramatiq:tests.DQ.msgs") >= 1, timeout=90)
        time.sleep(7)  # past a recheck: it came back and was held again
        assert done() == 0
    finally:
        for w in workers:
            stop_process(w, sig=signal.SIGKILL, group=True)
    replacement = start()
    try:
        time.sleep(8)  # the killed workers' held messages are requeued; still paused
        assert done() == 0
        # When the broker's data is gone (FLUSHALL: a failover to an empty replica), the queue
        # is still paused: a message sent after the wipe is held too. (pz1 may survive the
        # wipe in the worker's memory, a delayed message waiting for its time, or be gone
        # with it: re-sending it is the outbox rescuer's job, not this test's.)
        client.flushall()
        actors.write_row.send("pz2")
        assert wait_for(lambda: client.hlen("dramatiq:tests.DQ.msgs") >= 1, timeout=90)
        time.sleep(7)  # past a recheck: held again
        assert done() == 0 and done("pz2") == 0
        assert resume_queue("tests")
        assert wait_for(lambda: done("pz2") == 1, timeout=90)
        assert wait_for(
            lambda: client.hlen("dramatiq:tests.msgs") + client.hlen("dramatiq:tests.DQ.msgs") == 0,
            timeout=60,
        )
    finally:
        stop_process(replacement, sig=signal.SIGTERM, group=True)
    assert done("pz2") == 1 and done() <= 1
