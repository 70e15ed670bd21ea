"""Dashboard test helpers: two accounts, a real uvicorn server in a thread, signing in over
HTTP, and dead letters made the way dramatiq makes them (a real worker, or the broker's own
Lua fetch + nack)."""

from __future__ import annotations

import html
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dramatiq
import httpx
import pytest
from sqlalchemy import text

from core.settings import Settings, get_settings, reset_settings_cache
from db.engine import UnitOfWork
from db.redis import get_redis
from tests.support.web import serve
from web.auth import hash_password
from workers.base import PermanentError, actor
from workers.broker import broker

# imported now for its actor: declares the payments queue (the dashboard's webhook replay
# queues messages there) before any test starts a worker; see DASH_QUEUE_2 below
from workers.payments import process_event  # noqa: F401
from workers.stats import install

# The per-minute counts and dead-letter errors come from this middleware; the lead adds it to
# workers.broker's stack, and tests install it on the same broker in case it is not there yet.
install(broker)
# the Redis broker's own Lua commands (do_fetch, do_nack, …), which the Broker type does not declare
redis_broker: Any = broker

DASH_QUEUE = "tests-dash"
DASH_QUEUE_2 = "tests-dash-2"
# Declared now, before any test starts a worker: a queue declared later makes every Worker
# this process ever started (stopped ones included, dramatiq keeps their middleware) start a
# consumer for it, and those would take the messages a test puts there.
broker.declare_queue(DASH_QUEUE_2)
OPERATOR = ("olga", "operator-pass-1")
VIEWER = ("victor", "viewer-pass-1")
USERS_ENV = ",".join(
    [
        f"{OPERATOR[0]}:operator:{hash_password(OPERATOR[1])}",
        f"{VIEWER[0]}:viewer:{hash_password(VIEWER[1])}",
    ]
)
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


@actor(queue_name=DASH_QUEUE)
def flaky_until_released(uow: UnitOfWork, key: str, email: str = "") -> None:
    """Fails for good (straight to the dead-letter set) until `release:<key>` is set in Redis;
    then writes an audit_logs row that proves it ran."""
    if not get_redis().exists(f"release:{key}"):
        raise PermanentError(f"not released yet for {email or key}")
    uow.execute(
        text(
            "INSERT INTO audit_logs (action, entity_type, entity_id) "
            "VALUES ('processed', 'probe', :k)"
        ),
        {"k": key},
    )


def dead_letter(
    actor_name: str, *args: Any, queue: str = DASH_QUEUE, **kwargs: Any
) -> dramatiq.Message[Any]:
    """Enqueue, fetch and nack one message with the broker's own commands: the same Lua script
    a worker runs, so the letter lands in the dead-letter set exactly as a failed one does."""
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=queue, actor_name=actor_name, args=args, kwargs=kwargs, options={}
    )
    assert queue in broker.get_declared_queues(), f"declare {queue!r} at import (see above)"
    enqueued = broker.enqueue(message)
    fetched = redis_broker.do_fetch(queue, 1)
    assert fetched, "the message just enqueued was not fetched (another consumer took it)"
    redis_broker.do_nack(queue, enqueued.options["redis_message_id"])
    return enqueued


def processed_rows(sql: Any, key: str) -> int:
    return int(
        sql.execute(
            "SELECT count(*) FROM audit_logs WHERE action = 'processed' AND entity_id = %s", (key,)
        ).fetchone()[0]
    )


def audit_rows(sql: Any, action: str) -> list[Any]:
    return sql.execute(
        "SELECT actor, action, entity_type, entity_id, details FROM audit_logs "
        "WHERE action = %s ORDER BY performed_at",
        (action,),
    ).fetchall()


@contextmanager
def dashboard_env(**extra: str) -> Iterator[Settings]:
    """Settings with the two test accounts (and `extra` variables), restored afterwards."""
    # the test client is its own proxy: X-Forwarded-For from 127.0.0.1 stands for other addresses
    values = {
        "TIDEMILL_DASHBOARD_USERS": USERS_ENV,
        "TIDEMILL_SESSION_SECRET": "test-secret",
        "TIDEMILL_TRUSTED_PROXIES": "127.0.0.1",
    }
    values.update(extra)
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    reset_settings_cache()
    try:
        yield get_settings()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_settings_cache()


@pytest.fixture
def dash_settings(db: str) -> Iterator[Settings]:
    from web.dashboard.broker_state import forget_queue_scan

    forget_queue_scan()
    broker.flush_all()
    with dashboard_env() as settings:
        yield settings


@pytest.fixture
def dash_url(dash_settings: Settings) -> Iterator[str]:
    with serve(dash_settings) as url:
        yield url


def csrf_of(html: str) -> str:
    match = CSRF_FIELD.search(html)
    assert match, "no CSRF field in the page"
    return match.group(1)


@contextmanager
def sign_in(base_url: str, user: tuple[str, str]) -> Iterator[httpx.Client]:
    """An httpx client signed in as `user` (its cookies carry the session)."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        page = client.get("/dashboard/login")
        assert page.status_code == 200
        resp = client.post(
            "/dashboard/login",
            data={"username": user[0], "password": user[1], "csrf": csrf_of(page.text)},
        )
        assert resp.status_code == 303, resp.text
        yield client


def page_csrf(client: httpx.Client, path: str = "/dashboard") -> str:
    resp = client.get(path)
    assert resp.status_code == 200, resp.status_code
    return csrf_of(resp.text)


FLASH_DIV = re.compile(r'<div class="flash" id="flash">([^<]*)</div>')


def flash_after(client: httpx.Client, resp: httpx.Response) -> str:
    """Follow an action's redirect and return the flash the next page shows (or "")."""
    assert resp.status_code == 303, (resp.status_code, resp.text[:300])
    assert "done=" not in resp.headers["location"]  # never carried by the link
    match = FLASH_DIV.search(client.get(resp.headers["location"]).text)
    return html.unescape(match.group(1)) if match else ""


def wait_for(predicate: Any, *, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())
