"""HTTP: /healthz, /metrics and the operator dashboard (``web.dashboard``). The server persists
and enqueues; it never processes."""

from __future__ import annotations

import asyncio
import json
import weakref
from typing import Any

from sqlalchemy import text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.log import get_logger
from core.settings import Settings
from db.engine import get_database
from db.redis import get_redis
from web import webhooks
from web.dashboard.headers import COMMON, SecurityHeaders
from web.dashboard.views import WEB, dashboard_routes

log = get_logger(__name__)


def _check_postgres(settings: Settings) -> str:
    try:
        with get_database(settings).engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:
        return f"error: {type(exc).__name__}"


def _check_redis(settings: Settings) -> str:
    try:
        get_redis(settings).ping()
        return "ok"
    except Exception as exc:
        return f"error: {type(exc).__name__}"


MAX_TARGET_BYTES = 8 * 1024  # path or query string; longer ones are refused before routing


class BodyTimeout(Exception):
    """The request body did not arrive within the deadline."""


class _BodyRead:
    """One request's body read: its deadline and the task now waiting in ``receive``."""

    __slots__ = ("complete", "deadline", "expired", "task")

    def __init__(self) -> None:
        self.deadline = 0.0
        self.task: asyncio.Task[Any] | None = None  # set while inside receive()
        self.expired = False
        self.complete = False


class _BodyDeadlines:
    """The body reads in progress, oldest first, watched by one timer for the oldest.

    All reads get the same allowance, so the order they started in is the order their
    deadlines fall in: the timer only looks at the front. An overdue read waiting in
    ``receive`` is cancelled (and turned into `BodyTimeout` there); one that is not gets
    `BodyTimeout` at its next ``receive``. Per request this costs a dict entry, where an
    ``asyncio.timeout`` around every ``receive`` cost a timer handle and a context manager
    (~8 us of the webhook's CPU)."""

    def __init__(self, allowance_s: float) -> None:
        self.allowance_s = allowance_s
        self.reads: dict[_BodyRead, None] = {}  # insertion-ordered: oldest first
        self.timer: asyncio.TimerHandle | None = None

    def start(self, read: _BodyRead, loop: asyncio.AbstractEventLoop) -> None:
        read.deadline = loop.time() + self.allowance_s
        self.reads[read] = None
        if self.timer is None:
            self.timer = loop.call_at(read.deadline, self._expire, loop)

    def finish(self, read: _BodyRead) -> None:
        read.complete = True
        self.reads.pop(read, None)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        now = loop.time()
        while self.reads:
            read = next(iter(self.reads))
            if read.deadline > now:
                self.timer = loop.call_at(read.deadline, self._expire, loop)
                return
            del self.reads[read]
            read.expired = True
            if read.task is not None:
                read.task.cancel()


class RequestLimits:
    """Cheap refusals before any route runs, so no unauthenticated request can hold the
    server: an over-long path or query string gets 414, and a body that has not fully arrived
    within ``web_body_timeout_s`` of the first read gets 408 (a slow client cannot hold a
    connection and a handler indefinitely). With ``shield``, it also does what Starlette's
    error middleware does for an app without it: an unexpected exception is logged and
    answered 500 (if no answer has started), never a dropped connection."""

    def __init__(self, app: ASGIApp, *, body_timeout_s: float, shield: bool = False) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.shield = shield
        # One watch per event loop: its timer belongs to that loop (uvicorn runs one; a test
        # client may run one per request, and a timer left on a closed loop would never fire).
        self.deadlines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _BodyDeadlines] = (
            weakref.WeakKeyDictionary()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        target = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        if len(target) > MAX_TARGET_BYTES or len(scope.get("query_string", b"")) > MAX_TARGET_BYTES:
            await _refuse(send, 414, "request target too long")
            return
        read: _BodyRead | None = None
        started = False
        loop = asyncio.get_running_loop()
        deadlines = self.deadlines.get(loop)
        if deadlines is None:
            deadlines = self.deadlines[loop] = _BodyDeadlines(self.body_timeout_s)

        async def timed_receive() -> Message:
            nonlocal read
            if read is None:
                read = _BodyRead()
                deadlines.start(read, loop)
            elif read.complete:  # the body is in: later reads wait for a disconnect, unbounded
                return await receive()
            if read.expired:
                raise BodyTimeout
            task = read.task = asyncio.current_task()
            try:
                message = await receive()
            except asyncio.CancelledError:
                if read.expired and task is not None and task.uncancel() == 0:
                    raise BodyTimeout from None
                raise
            finally:
                read.task = None
            if message["type"] != "http.request" or not message.get("more_body", False):
                deadlines.finish(read)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, timed_receive, watched_send)
        except BodyTimeout:
            log.warning("request_body_timeout", method=scope.get("method"))
            if not started:
                await _refuse(send, 408, "request body timeout")
        except Exception:
            if not self.shield:
                raise
            log.exception("request_failed", method=scope.get("method"), path=scope.get("path"))
            if not started:
                await _refuse(send, 500, "internal error")
        finally:
            if read is not None and not read.complete:
                deadlines.finish(read)  # the handler stopped reading (refused, or failed)


async def _refuse(send: Send, status: int, reason: str) -> None:
    body = json.dumps({"error": reason}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Front:
    """The server's ASGI app: ``POST /webhooks/stripe``, most of the traffic, goes straight
    to the receiver under the same request limits; everything else (the dashboard, health,
    metrics, lifespan) to the Starlette app. The router and the middleware layers it skips
    cost ~40 us per request, as much as the receiver's own checks."""

    def __init__(self, app: Starlette, webhook: ASGIApp, *, body_timeout_s: float) -> None:
        self.app = app
        self.webhook = RequestLimits(webhook, body_timeout_s=body_timeout_s, shield=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == webhooks.PATH:
            await self.webhook(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_app(settings: Settings) -> Front:
    async def healthz(request: Request) -> JSONResponse:
        pg = await run_in_threadpool(_check_postgres, settings)
        rd = await run_in_threadpool(_check_redis, settings)
        ok = pg == "ok" and rd == "ok"
        return JSONResponse(
            {"status": "ok" if ok else "degraded", "postgres": pg, "redis": rd},
            status_code=200 if ok else 503,
        )

    async def metrics(request: Request) -> PlainTextResponse:
        from web.metrics import authorized, render

        if not authorized(settings, request.headers.get("authorization")):
            log.warning("metrics_unauthorized")
            return PlainTextResponse(
                "unauthorized\n", status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        body, content_type = await run_in_threadpool(render, settings)
        return PlainTextResponse(body, media_type=content_type)

    async def root(request: Request) -> RedirectResponse:
        return RedirectResponse("/dashboard")

    async def favicon(request: Request) -> FileResponse:
        return FileResponse(WEB / "static" / "favicon.svg", media_type="image/svg+xml")

    webhook = webhooks.StripeWebhook(settings, headers=COMMON)
    app = Starlette(
        middleware=[Middleware(SecurityHeaders)],
        routes=[
            webhooks.route(webhook),
            Route("/", root),
            Route("/favicon.ico", favicon),
            Route("/healthz", healthz),
            Route("/metrics", metrics),
            *dashboard_routes(settings),
        ],
    )
    app.add_middleware(RequestLimits, body_timeout_s=settings.web_body_timeout_s)
    return Front(app, webhook, body_timeout_s=settings.web_body_timeout_s)
