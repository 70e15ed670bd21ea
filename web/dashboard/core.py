"""The dashboard's plumbing: templates and their filters, sessions, rendering, the page and
action wrappers (sign-in, CSRF, role, audit), and the 503 page for a store that is down."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import redis
import sqlalchemy.exc
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from core.log import get_logger, mask_personal
from core.settings import Settings
from db.engine import ServiceUnreachable
from db.redis import get_redis
from web import auth
from web.dashboard import broker_state

log = get_logger("web.dashboard")

WEB = Path(__file__).resolve().parent.parent
MISSING = "-"
TEMPLATES = Environment(
    loader=FileSystemLoader(WEB / "templates"),
    autoescape=select_autoescape(["html"]),
)
# a store that is down answers 503 with its name, not a bare 500; OSError covers the builtin
# ConnectionError/TimeoutError a broker client raises outside redis-py's own errors
STORE_ERRORS = (
    redis.RedisError,
    sqlalchemy.exc.DBAPIError,
    ServiceUnreachable,
    broker_state.RetryFailed,
    OSError,
)
MAX_FORM_BYTES = 64 * 1024
REFRESH_S = 10
FLASH = {
    "retried": "Retried {n} dead letter(s): back on their queue.",
    "deleted": "Deleted {n} dead letter(s).",
    "gone": "Nothing done: the dead letter is no longer there (retried or deleted meanwhile).",
    "bulk_expired": "That selection expired; select again.",
    "paused": "Schedule paused.",
    "resumed": "Schedule resumed.",
    "triggered": "Schedule triggered (manual tick queued).",
    "unknown_schedule": "No such schedule.",
    "replay_queued": "Replay queued: a payments worker will process the event shortly.",
    "already_applied": "Nothing to replay: the event is already {status}.",
    "unknown_event": "No such webhook event.",
}

# an unauthenticated refusal (CSRF on the sign-in form, a held sign-in) is audited at most
# once per address and reason in this many seconds: a flood of POSTs cannot flood the table
AUDIT_THROTTLE_S = 10


def _fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _fmt_bytes(n: Any) -> str:
    if n is None:
        return MISSING
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _fmt_time(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M:%S %Z}".strip()
    if isinstance(value, int | float):
        return f"{datetime.fromtimestamp(float(value)).astimezone():%Y-%m-%d %H:%M:%S %Z}"
    return str(value)


TEMPLATES.filters["age"] = _fmt_age
TEMPLATES.filters["bytes"] = _fmt_bytes
TEMPLATES.filters["ts"] = _fmt_time
TEMPLATES.filters["num"] = lambda n: MISSING if n is None else f"{int(n):,}"


def error_detail(error: BaseException | None) -> dict[str, str]:
    """The audit field for a failed action: the error's type and (masked) text."""
    if error is None:
        return {}
    return {"error": mask_personal(f"{type(error).__name__}: {error}")[:500]}


def local_target(value: str | None, default: str) -> str:
    """A redirect target from a form: only a dashboard path (never an open redirect)."""
    if not value or not value.startswith("/dashboard") or value.startswith("//"):
        return default
    if "\\" in value or any(ord(c) < 32 for c in value):
        return default
    return value


Handler = Callable[[Request, auth.Session], Awaitable[Response]]
ActionHandler = Callable[[Request, auth.Session, dict[str, str]], Awaitable[Response]]


class DashboardBase:
    """Bound to one settings object and account list; sessions and limits live in Redis."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.accounts = auth.load_accounts(settings)
        if not self.accounts:
            log.warning("dashboard_no_accounts")
        self.proxies = auth.parse_proxies(settings.trusted_proxies)

    # --- plumbing ----------------------------------------------------------------------------

    @property
    def redis(self) -> Any:
        return get_redis(self.settings)

    @property
    def sessions(self) -> auth.SessionStore:
        return auth.SessionStore(self.redis, ttl_s=self.settings.session_ttl_s)

    def limiter(self) -> auth.LoginLimiter:
        return auth.limiter_for(self.settings, self.redis)

    def address(self, request: Request) -> str:
        return auth.client_address(
            request.client.host if request.client else None,
            request.headers.getlist("x-forwarded-for"),
            self.proxies,
        )

    def session_of(self, request: Request) -> auth.Session | None:
        store = self.sessions
        session = store.load(request.cookies.get(auth.SESSION_COOKIE))
        if session is None:
            return None
        account = self.accounts.get(session.user)
        if account is None or account.role != session.role:
            # removed from settings, or given another role, since signing in: every session
            # of the account ends now (the next sign-in gets the current role)
            ended = store.end_all(session.user)
            log.info(
                "dashboard_sessions_ended",
                user=session.user,
                sessions=ended,
                reason="account removed" if account is None else "role changed",
            )
            return None
        return session

    def flash(self, session: auth.Session, message: str) -> None:
        self.sessions.flash(session, message)

    def done(self, session: auth.Session, url: str, code: str, **fmt: Any) -> RedirectResponse:
        """Flash FLASH[code] to this session and send the browser to `url`."""
        self.flash(session, FLASH[code].format(**fmt))
        return RedirectResponse(url, status_code=303)

    def render(
        self,
        request: Request,
        template: str,
        *,
        session: auth.Session | None,
        status_code: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        # the flash comes from the server-side session only: a link cannot put words in our
        # mouth (`?done=deleted&n=500` shows nothing)
        # (not by the page's own background refresh: the flash is for the page a person opens)
        refresh = request.headers.get("x-refresh") == "1"
        flash = None
        if session is not None and session.sid and not refresh:
            flash = self.sessions.pop_flash(session)
        html = TEMPLATES.get_template(template).render(
            session=session,
            path=request.url.path,
            flash=flash,
            refresh_s=REFRESH_S,
            **context,
        )
        return HTMLResponse(html, status_code=status_code)

    @staticmethod
    async def form(request: Request) -> dict[str, str]:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise ValueError("form too large")
        parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[-1] for k, v in parsed.items()}

    def refuse(
        self, request: Request, session: auth.Session | None, reason: str, status: int
    ) -> HTMLResponse:
        log.warning(
            "dashboard_request_refused",
            reason=reason,
            path=request.url.path,
            user=session.user if session else None,
        )
        return self.render(
            request, "dashboard/refused.html", session=session, reason=reason, status_code=status
        )

    def audit_throttled(
        self, request: Request, *, actor: str | None, action: str, key: str, **details: Any
    ) -> None:
        """Audit a refusal nobody signed in caused, once per address and key per throttle
        window (and log every one)."""
        address = self.address(request)
        log.warning("dashboard_refusal", action=action, address=address, **details)
        marker = (
            "tidemill:dash:audit_throttle:"
            + hashlib.sha256(f"{action}|{address}|{key}".encode()).hexdigest()[:24]
        )
        if not self.redis.set(marker, "1", nx=True, ex=AUDIT_THROTTLE_S):
            return
        auth.audit(
            self.settings,
            actor=actor,  # type: ignore[arg-type]
            action=action,
            entity_type="dashboard_session",
            details={"address": address, "path": request.url.path, **details},
        )

    async def refuse_csrf(self, request: Request, session: auth.Session | None) -> HTMLResponse:
        if session is not None:
            await run_in_threadpool(
                auth.audit,
                self.settings,
                actor=session.user,
                action="dashboard.csrf_refused",
                entity_type="dashboard",
                entity_id=request.url.path,
                details={"address": self.address(request), "path": request.url.path},
            )
        else:
            await run_in_threadpool(
                self.audit_throttled,
                request,
                actor=None,
                action="dashboard.csrf_refused",
                key=request.url.path,
            )
        return self.refuse(request, session, "missing or wrong CSRF token", 403)

    def page(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                session = await run_in_threadpool(self.session_of, request)
            except redis.RedisError as exc:
                return self.unavailable(request, None, exc)
            if session is None:
                target = quote(
                    str(request.url.path) + ("?" + request.url.query if request.url.query else "")
                )
                return RedirectResponse(f"/dashboard/login?next={target}", status_code=303)
            try:
                return await handler(request, session)
            except STORE_ERRORS as exc:
                return self.unavailable(request, session, exc)

        return endpoint

    def unavailable(
        self, request: Request, session: auth.Session | None, exc: Exception
    ) -> HTMLResponse:
        """Redis, Postgres or the broker is down: a 503 page that says which, not a bare 500."""
        if isinstance(exc, broker_state.RetryFailed):
            return self._refused_plain(
                request,
                session,
                f"the broker failed after {exc.moved} letter(s) were retried "
                f"({type(exc.error).__name__}); the other {len(exc.remaining)} are still "
                "dead letters",
                503,
            )
        if isinstance(exc, redis.RedisError):
            store = "Redis"
        elif isinstance(exc, OSError):
            store = "The broker"
        else:
            store = "Postgres"
        return self._refused_plain(
            request, session, f"{store} is unreachable right now ({type(exc).__name__})", 503
        )

    def _refused_plain(
        self, request: Request, session: auth.Session | None, reason: str, status: int
    ) -> HTMLResponse:
        # no flash lookup: Redis may be the store that is down
        log.warning("dashboard_request_refused", reason=reason, path=request.url.path)
        html = TEMPLATES.get_template("dashboard/refused.html").render(
            session=session, path=request.url.path, flash=None, refresh_s=REFRESH_S, reason=reason
        )
        return HTMLResponse(html, status_code=status)

    def action(
        self, handler: ActionHandler, *, name: str
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                session = await run_in_threadpool(self.session_of, request)
            except redis.RedisError as exc:
                return self.unavailable(request, None, exc)
            if session is None:
                return self.refuse(request, None, "not signed in", 401)
            try:
                form = await self.form(request)
            except ValueError:
                return self.refuse(request, session, "form too large", 413)
            try:
                if not auth.csrf_ok(session.csrf, form.get("csrf")):
                    return await self.refuse_csrf(request, session)
                if not session.can_act:
                    await run_in_threadpool(
                        auth.audit,
                        self.settings,
                        actor=session.user,
                        action="dashboard.refused",
                        entity_type="dashboard",
                        entity_id=name,
                        details={"role": session.role, "path": request.url.path},
                    )
                    return self.refuse(
                        request,
                        session,
                        f"the {session.role} role cannot {name.replace('_', ' ')}",
                        403,
                    )
                return await handler(request, session, form)
            except STORE_ERRORS as exc:
                return self.unavailable(request, session, exc)

        return endpoint

    def audit(
        self,
        session: auth.Session,
        action: str,
        entity_type: str,
        entity_id: str | None,
        **details: Any,
    ) -> None:
        auth.audit(
            self.settings,
            actor=session.user,
            action=f"dashboard.{action}",
            entity_type=entity_type,
            entity_id=entity_id,
            details=details,
        )
        log.info(
            "dashboard_action",
            action=action,
            user=session.user,
            entity=entity_type,
            entity_id=entity_id,
            **details,
        )

    def set_cookie(
        self, request: Request, response: Response, name: str, value: str, *, max_age: int
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/dashboard",
        )
