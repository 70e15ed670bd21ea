"""Dashboard pages and actions. Every page needs a signed session; every POST needs the
session's CSRF token, an operator, and leaves an audit_logs row (refusals too)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import redis
import sqlalchemy.exc
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from core.log import get_logger, mask_personal
from core.settings import Settings
from db.engine import ServiceUnreachable
from db.redis import get_redis
from web import auth
from web.dashboard import broker_state, store
from web.dashboard.chart import per_minute_chart

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
SELECTION_TTL_S = 900
REFRESH_S = 10
# Sidekiq's page size: a screenful, and what the page costs does not grow with the dead set
DEAD_PER_PAGE = 25

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
    return str(value)


TEMPLATES.filters["age"] = _fmt_age
TEMPLATES.filters["bytes"] = _fmt_bytes
TEMPLATES.filters["ts"] = _fmt_time
TEMPLATES.filters["num"] = lambda n: MISSING if n is None else f"{int(n):,}"


class Dashboard:
    """The pages, bound to one settings object, account list and session key."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.accounts = auth.load_accounts(settings)
        if not self.accounts:
            log.warning("dashboard_no_accounts")
        self.signer = auth.SessionSigner(settings.session_secret, ttl_s=settings.session_ttl_s)

    # --- plumbing ----------------------------------------------------------------------------

    @property
    def redis(self) -> Any:
        return get_redis(self.settings)

    def limiter(self) -> auth.LoginLimiter:
        return auth.LoginLimiter(
            self.redis,
            max_failures=self.settings.login_max_failures,
            window_s=self.settings.login_window_s,
        )

    def session_of(self, request: Request) -> auth.Session | None:
        session = self.signer.load(request.cookies.get(auth.SESSION_COOKIE))
        if session is None:
            return None
        account = self.accounts.get(session.user)
        if account is None:  # removed from settings since signing in
            return None
        # the role comes from the current settings, not from the cookie
        return auth.Session(account.name, account.role, session.csrf, session.expires)

    def render(
        self,
        request: Request,
        template: str,
        *,
        session: auth.Session | None,
        status_code: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        done = request.query_params.get("done")
        flash = None
        if done in FLASH:
            # the query string is anyone's to write: only a number and a known status get into
            # the message, never free text (a crafted link must not put words in our mouth)
            n = request.query_params.get("n", "0")
            status = request.query_params.get("status", "")
            flash = FLASH[done].format(
                n=int(n) if n.isascii() and n.isdigit() and len(n) < 10 else 0,
                status=status if status in store.WEBHOOK_STATUSES else "?",
            )
        html = TEMPLATES.get_template(template).render(
            session=session,
            path=request.url.path,
            flash=flash,
            refresh_s=REFRESH_S,
            **context,
        )
        response = HTMLResponse(html, status_code=status_code)
        # pages carry CSRF tokens and operational data: never cached, never framed
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
        )
        return response

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

    def page(
        self, handler: Callable[[Request, auth.Session], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = self.session_of(request)
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
            return self.refuse(
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
        return self.refuse(
            request, session, f"{store} is unreachable right now ({type(exc).__name__})", 503
        )

    def action(
        self,
        handler: Callable[[Request, auth.Session, dict[str, str]], Awaitable[Response]],
        *,
        name: str,
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = self.session_of(request)
            if session is None:
                return self.refuse(request, None, "not signed in", 401)
            try:
                form = await self.form(request)
            except ValueError:
                return self.refuse(request, session, "form too large", 413)
            if not auth.csrf_ok(session.csrf, form.get("csrf")):
                return self.refuse(request, session, "missing or wrong CSRF token", 403)
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
            try:
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

    # --- sign-in -------------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        token = request.cookies.get(auth.LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)
        response = self.render(
            request,
            "dashboard/login.html",
            session=None,
            csrf=token,
            next=request.query_params.get("next", "/dashboard"),
            error=None,
            no_accounts=not self.accounts,
        )
        self._set_cookie(request, response, auth.LOGIN_CSRF_COOKIE, token, max_age=3600)
        return response

    def _set_cookie(
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

    async def login(self, request: Request) -> Response:
        try:
            form = await self.form(request)
        except ValueError:
            return self.refuse(request, None, "form too large", 413)
        cookie_token = request.cookies.get(auth.LOGIN_CSRF_COOKIE)
        if not auth.csrf_ok(cookie_token, form.get("csrf")):
            return self.refuse(request, None, "missing or wrong CSRF token", 403)
        user = form.get("username", "").strip()[:100]
        password = form.get("password", "")
        address = request.client.host if request.client else "unknown"
        target = form.get("next") or "/dashboard"
        if not target.startswith("/dashboard") or target.startswith("//"):
            target = "/dashboard"  # never an open redirect

        def again(error: str, status: int) -> Response:
            return self.render(
                request,
                "dashboard/login.html",
                session=None,
                csrf=cookie_token,
                next=target,
                error=error,
                no_accounts=not self.accounts,
                status_code=status,
            )

        limiter = self.limiter()
        # counted before the password check, so concurrent guesses cannot all slip past
        if not await run_in_threadpool(limiter.attempt, user, address):
            log.warning("dashboard_login_rate_limited", user=user)
            return again("Too many failed sign-ins; wait a few minutes.", 429)
        account = self.accounts.get(user)
        ok = await run_in_threadpool(
            auth.verify_password, password, account.password_hash if account else auth.dummy_hash()
        )
        if account is None or not ok:
            await run_in_threadpool(
                auth.audit,
                self.settings,
                actor=user or None,  # type: ignore[arg-type]
                action="dashboard.login_failed",
                entity_type="dashboard_session",
                details={"address": address, "known_account": account is not None},
            )
            log.warning("dashboard_login_failed", user=user, known_account=account is not None)
            return again("Wrong name or password.", 401)
        await run_in_threadpool(limiter.succeeded, user, address)
        _, cookie = self.signer.issue(account)
        await run_in_threadpool(
            auth.audit,
            self.settings,
            actor=account.name,
            action="dashboard.login",
            entity_type="dashboard_session",
            details={"address": address, "role": account.role},
        )
        log.info("dashboard_login", user=account.name, role=account.role)
        response = RedirectResponse(target, status_code=303)
        self._set_cookie(
            request, response, auth.SESSION_COOKIE, cookie, max_age=self.settings.session_ttl_s
        )
        response.delete_cookie(auth.LOGIN_CSRF_COOKIE, path="/dashboard")
        return response

    async def logout(
        self, request: Request, session: auth.Session, form: dict[str, str]
    ) -> Response:
        response = RedirectResponse("/dashboard/login", status_code=303)
        response.delete_cookie(auth.SESSION_COOKIE, path="/dashboard")
        return response

    async def logout_endpoint(self, request: Request) -> Response:
        # signing out is allowed for every role, but still needs the CSRF token
        session = self.session_of(request)
        if session is None:
            return RedirectResponse("/dashboard/login", status_code=303)
        form = await self.form(request)
        if not auth.csrf_ok(session.csrf, form.get("csrf")):
            return self.refuse(request, session, "missing or wrong CSRF token", 403)
        await run_in_threadpool(
            auth.audit,
            self.settings,
            actor=session.user,
            action="dashboard.logout",
            entity_type="dashboard_session",
        )
        return await self.logout(request, session, form)

    # --- overview ------------------------------------------------------------------------------

    def overview_data(self) -> dict[str, Any]:
        broker_error = None
        queues: list[broker_state.QueueStats] = []
        processes: list[broker_state.WorkerProcess] = []
        series: list[tuple[int, int, int]] = []
        try:
            client = broker_state.broker_redis(self.settings)
            queues = broker_state.queue_stats(client, broker_state.queue_names(client))
            processes = broker_state.live_workers(client)
            series = broker_state.per_minute(client, minutes=60)
        except broker_state.BrokerUnavailable as exc:
            broker_error = str(exc)
        except redis.RedisError as exc:
            log.warning("dashboard_broker_unreachable", error=type(exc).__name__)
            broker_error = f"the broker is unreachable right now ({type(exc).__name__})"
        backlog, oldest = store.outbox_backlog(self.settings)
        hour = store.webhook_window(self.settings, seconds=3600)
        total = sum(hour.values())
        return {
            "queues": queues,
            "totals": {
                "ready": sum(q.ready for q in queues),
                "delayed": sum(q.delayed for q in queues),
                "in_flight": sum(q.in_flight for q in queues),
                "dead": sum(q.dead for q in queues),
            },
            "processes": processes,
            "chart": per_minute_chart(series) if series else None,
            "last_minutes": series[-5:],
            "outbox_backlog": backlog,
            "outbox_oldest_s": oldest,
            "jobs_in_flight": store.jobs_in_flight(self.settings),
            "webhooks_hour": hour,
            "webhook_error_rate": (hour["failed"] / total) if total else None,
            "backup": store.backup_health(self.settings),
            "broker_error": broker_error,
        }

    async def overview(self, request: Request, session: auth.Session) -> Response:
        data = await run_in_threadpool(self.overview_data)
        return self.render(request, "dashboard/overview.html", session=session, **data)

    # --- queues and dead letters ---------------------------------------------------------------

    @staticmethod
    def dead_filter(params: Any) -> broker_state.DeadFilter:
        def clean(key: str) -> str | None:
            value = (params.get(key) or "").strip()[:200]
            return value or None

        return broker_state.DeadFilter(queue=clean("queue"), actor=clean("actor"), text=clean("q"))

    async def queues(self, request: Request, session: auth.Session) -> Response:
        flt = self.dead_filter(request.query_params)
        try:
            per_page = int(request.query_params.get("per_page") or DEAD_PER_PAGE)
        except ValueError:
            return self.refuse(request, session, "per_page must be a number", 400)
        if not 1 <= per_page <= 200:
            return self.refuse(request, session, "per_page must be between 1 and 200", 400)
        before_raw = request.query_params.get("before")
        try:
            cursor = broker_state.Cursor.decode(before_raw) if before_raw else None
        except ValueError:
            return self.refuse(request, session, "bad page cursor", 400)

        def load() -> dict[str, Any]:
            client = broker_state.broker_redis(self.settings)
            names = broker_state.queue_names(client)
            stats = broker_state.queue_stats(client, names)
            page = broker_state.dead_page(client, names, flt, cursor=cursor, limit=per_page)
            return {"queues": stats, "names": names, "page": page}

        try:
            data = await run_in_threadpool(load)
        except broker_state.BrokerUnavailable as exc:
            return self.refuse(request, session, str(exc), 503)
        params = {
            k: v for k, v in (("queue", flt.queue), ("actor", flt.actor), ("q", flt.text)) if v
        }
        next_url = None
        if data["page"].next_cursor is not None:
            next_url = "/dashboard/queues?" + urlencode(
                {
                    **params,
                    **({"per_page": per_page} if per_page != DEAD_PER_PAGE else {}),
                    "before": data["page"].next_cursor,
                }
            )
        return self.render(
            request,
            "dashboard/queues.html",
            session=session,
            flt=flt,
            next_url=next_url,
            filter_query=urlencode(params),
            **data,
        )

    async def dead_one(
        self, request: Request, session: auth.Session, form: dict[str, str]
    ) -> Response:
        op = request.path_params["op"]
        if op == "one":  # the row's form: one form, the button pressed names the action
            op = form.get("op", "")
        if op not in ("retry", "delete"):
            return self.refuse(request, session, "unknown dead-letter action", 400)
        queue, rid = form.get("queue", ""), form.get("id", "")
        back = form.get("back") or "/dashboard/queues"
        if not back.startswith("/dashboard"):
            back = "/dashboard/queues"
        if not queue or not rid:
            return self.refuse(request, session, "queue and id are required", 400)

        def run() -> int:
            n, error = 0, None
            try:
                client = broker_state.broker_redis(self.settings)
                if op == "retry":
                    from workers.broker import broker

                    n = broker_state.retry(client, [(queue, rid)], broker=broker)
                else:
                    n = broker_state.delete(client, [(queue, rid)])
                return n
            except broker_state.RetryFailed as exc:
                n, error = exc.moved, exc.error
                raise
            except Exception as exc:
                error = exc
                raise
            finally:  # audited whether or not it worked
                self.audit(
                    session,
                    f"dead_letter.{op}",
                    "dead_letter",
                    f"{queue}/{rid}",
                    count=n,
                    **_error_detail(error),
                )

        n = await run_in_threadpool(run)
        code = ("retried" if op == "retry" else "deleted") if n else "gone"
        return RedirectResponse(_with_flash(back, done=code, n=n), status_code=303)

    async def dead_select(
        self, request: Request, session: auth.Session, form: dict[str, str]
    ) -> Response:
        """Step one of a bulk action: find exactly which letters match, keep that set, show
        how many it is. Step two acts on the kept set, not on a new search."""
        flt = self.dead_filter(form)
        op = form.get("op", "retry")
        if op not in ("retry", "delete"):
            return self.refuse(request, session, "unknown bulk action", 400)

        def run() -> tuple[str, int, dict[str, int]]:
            client = broker_state.broker_redis(self.settings)
            items = broker_state.select_all(client, broker_state.queue_names(client), flt)
            token = secrets.token_urlsafe(16)
            key = f"tidemill:dash:selection:{token}"
            pipe = self.redis.pipeline(transaction=True)
            # the filter is kept in the audit trail: e-mails typed into it are masked first
            meta = {
                "op": op,
                "filter": mask_personal(flt.describe()),
                "user": session.user,
                "count": len(items),
            }
            pipe.hset(f"{key}:meta", mapping={k: str(v) for k, v in meta.items()})
            for start in range(0, len(items), 1000):
                pipe.rpush(key, *[json.dumps(i) for i in items[start : start + 1000]])
            pipe.expire(key, SELECTION_TTL_S)
            pipe.expire(f"{key}:meta", SELECTION_TTL_S)
            pipe.execute()
            per_queue: dict[str, int] = {}
            for q, _ in items:
                per_queue[q] = per_queue.get(q, 0) + 1
            return token, len(items), per_queue

        token, count, per_queue = await run_in_threadpool(run)
        return self.render(
            request,
            "dashboard/confirm.html",
            session=session,
            token=token,
            op=op,
            count=count,
            per_queue=per_queue,
            filter_text=flt.describe(),
            error=None,
        )

    def _keep_selection(self, key: str, remaining: list[tuple[str, str]]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(key)
        for start in range(0, len(remaining), 1000):
            pipe.rpush(key, *[json.dumps(i) for i in remaining[start : start + 1000]])
        pipe.hset(f"{key}:meta", "count", str(len(remaining)))
        pipe.expire(key, SELECTION_TTL_S)
        pipe.expire(f"{key}:meta", SELECTION_TTL_S)
        pipe.execute()

    async def dead_bulk(
        self, request: Request, session: auth.Session, form: dict[str, str]
    ) -> Response:
        token = form.get("token", "")
        key = f"tidemill:dash:selection:{token}"

        def run() -> tuple[str, int, int] | None:
            meta = self.redis.hgetall(f"{key}:meta")
            if not meta or not token:
                return None
            meta = {
                k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                for k, v in meta.items()
            }
            if meta["user"] != session.user:
                return None
            raw = self.redis.lrange(key, 0, -1)
            items = [(str(q), str(i)) for q, i in (json.loads(r) for r in raw)]
            n, error = 0, None
            try:
                client = broker_state.broker_redis(self.settings)
                if meta["op"] == "retry":
                    from workers.broker import broker

                    n = broker_state.retry(client, items, broker=broker)
                else:
                    n = broker_state.delete(client, items)
            except broker_state.RetryFailed as exc:
                n, error = exc.moved, exc.error
                # keep only what was not moved, so confirming again finishes the job
                self._keep_selection(key, exc.remaining)
                raise
            except Exception as exc:
                error = exc  # the selection is kept whole: letters already gone are skipped
                raise
            finally:  # audited whether or not it worked, with what was actually done
                self.audit(
                    session,
                    f"dead_letters.bulk_{meta['op']}",
                    "dead_letter",
                    None,
                    filter=meta["filter"],
                    selected=len(items),
                    done=n,
                    **_error_detail(error),
                )
            self.redis.delete(key, f"{key}:meta")  # used once, and only once it worked
            return meta["op"], n, len(items)

        try:
            result = await run_in_threadpool(run)
        except broker_state.RetryFailed as exc:
            per_queue: dict[str, int] = {}
            for q, _ in exc.remaining:
                per_queue[q] = per_queue.get(q, 0) + 1
            meta = self.redis.hgetall(f"{key}:meta")
            filter_text = meta.get(b"filter", meta.get("filter", b""))
            if isinstance(filter_text, bytes):
                filter_text = filter_text.decode()
            log.warning("dashboard_bulk_retry_failed", moved=exc.moved, left=len(exc.remaining))
            return self.render(
                request,
                "dashboard/confirm.html",
                session=session,
                token=token,
                op="retry",
                count=len(exc.remaining),
                per_queue=per_queue,
                filter_text=filter_text,
                error=(
                    f"The broker failed ({type(exc.error).__name__}) after {exc.moved} "
                    f"letter(s) were retried. The other {len(exc.remaining)} are still dead "
                    "letters and still selected: confirm again to retry them."
                ),
                status_code=503,
            )
        if result is None:
            return RedirectResponse("/dashboard/queues?done=bulk_expired", status_code=303)
        op, n, _selected = result
        return RedirectResponse(
            _with_flash("/dashboard/queues", done="retried" if op == "retry" else "deleted", n=n),
            status_code=303,
        )

    # --- schedules -----------------------------------------------------------------------------

    async def schedules(self, request: Request, session: auth.Session) -> Response:
        rows = await run_in_threadpool(store.schedules, self.settings)
        return self.render(request, "dashboard/schedules.html", session=session, rows=rows)

    async def schedule_action(
        self, request: Request, session: auth.Session, form: dict[str, str]
    ) -> Response:
        name = request.path_params["name"]
        op = request.path_params["op"]
        if op not in ("pause", "resume", "trigger"):
            return self.refuse(request, session, "unknown schedule action", 404)

        def run() -> str:
            from schedules import control

            try:
                result = getattr(control, op)(name, by=session.user, settings=self.settings)
            except LookupError:
                return "unknown_schedule"
            self.audit(
                session, f"schedule.{op}", "schedule", name, result=str(result) if result else None
            )
            return {"pause": "paused", "resume": "resumed", "trigger": "triggered"}[op]

        code = await run_in_threadpool(run)
        return RedirectResponse(f"/dashboard/schedules?done={code}", status_code=303)

    # --- pipelines -----------------------------------------------------------------------------

    async def pipelines(self, request: Request, session: auth.Session) -> Response:
        pipeline = request.query_params.get("pipeline") or None
        before = request.query_params.get("before")
        before_id = int(before) if before and before.isdigit() else None
        rows = await run_in_threadpool(
            store.pipeline_runs, self.settings, pipeline=pipeline, before_id=before_id
        )
        next_url = None
        if len(rows) == store.PAGE:
            next_url = "/dashboard/pipelines?" + urlencode(
                {k: v for k, v in (("pipeline", pipeline), ("before", rows[-1]["id"])) if v}
            )
        return self.render(
            request,
            "dashboard/pipelines.html",
            session=session,
            rows=rows,
            pipeline=pipeline,
            next_url=next_url,
        )

    async def pipeline_detail(self, request: Request, session: auth.Session) -> Response:
        run = await run_in_threadpool(
            store.pipeline_run, self.settings, int(request.path_params["run_id"])
        )
        if run is None:
            return self.refuse(request, session, "no such pipeline run", 404)
        details = {k: v for k, v in run.items()}
        return self.render(
            request,
            "dashboard/pipeline_run.html",
            session=session,
            run=run,
            progress=json.dumps(details.get("progress"), indent=2, default=str)
            if details.get("progress")
            else None,
            extra={k: v for k, v in details.items() if k not in _RUN_SHOWN},
        )

    # --- backups -------------------------------------------------------------------------------

    async def backups(self, request: Request, session: auth.Session) -> Response:
        available, items, drills = await run_in_threadpool(store.backups, self.settings)
        health = await run_in_threadpool(store.backup_health, self.settings)
        return self.render(
            request,
            "dashboard/backups.html",
            session=session,
            available=available,
            items=items,
            drills=drills,
            health=health,
        )

    # --- webhooks ------------------------------------------------------------------------------

    async def webhooks(self, request: Request, session: auth.Session) -> Response:
        status = request.query_params.get("status") or None
        if status and status not in store.WEBHOOK_STATUSES:
            return self.refuse(request, session, f"unknown status {status[:20]!r}", 400)
        search = (request.query_params.get("q") or "").strip()[:200] or None
        before = None
        if request.query_params.get("before_at") and request.query_params.get("before_id"):
            try:
                before = (
                    datetime.fromisoformat(request.query_params["before_at"]),
                    request.query_params["before_id"],
                )
            except ValueError:
                return self.refuse(request, session, "bad page cursor", 400)

        def load() -> dict[str, Any]:
            return {
                "rows": store.webhook_events(
                    self.settings, status=status, search=search, before=before
                ),
                "day": store.webhook_window(self.settings, seconds=86400, cache_s=60),
                "hour": store.webhook_window(self.settings, seconds=3600),
            }

        data = await run_in_threadpool(load)
        next_url = None
        if len(data["rows"]) == store.PAGE:
            last = data["rows"][-1]
            next_url = "/dashboard/webhooks?" + urlencode(
                {
                    k: v
                    for k, v in (
                        ("status", status),
                        ("q", search),
                        ("before_at", last["received_at"].isoformat()),
                        ("before_id", last["id"]),
                    )
                    if v
                }
            )
        return self.render(
            request,
            "dashboard/webhooks.html",
            session=session,
            status=status,
            search=search,
            statuses=store.WEBHOOK_STATUSES,
            next_url=next_url,
            **data,
        )

    async def webhook_replay(
        self, request: Request, session: auth.Session, form: dict[str, str]
    ) -> Response:
        event_id = request.path_params["event_id"]

        def run() -> tuple[str, str | None]:
            # The web process never processes: the event is reopened and handed to a payments
            # worker through the outbox, in one transaction (the relay sends it after commit).
            from db.engine import unit_of_work
            from workers.payments import EventNotFound, queue_replay

            try:
                with unit_of_work(self.settings) as uow:
                    was = queue_replay(uow, event_id)
            except EventNotFound:
                return "unknown_event", None
            if was in ("processed", "ignored"):
                self.audit(session, "webhook.replay", "webhook_event", event_id, outcome=was)
                return "already_applied", was
            self.audit(
                session, "webhook.replay", "webhook_event", event_id, outcome="queued", was=was
            )
            return "replay_queued", None

        code, status = await run_in_threadpool(run)
        return RedirectResponse(
            _with_flash("/dashboard/webhooks", done=code, status=status), status_code=303
        )

    # --- audit ---------------------------------------------------------------------------------

    async def audit_page(self, request: Request, session: auth.Session) -> Response:
        rows = await run_in_threadpool(store.audit_entries, self.settings)
        return self.render(request, "dashboard/audit.html", session=session, rows=rows)

    # --- routes --------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/dashboard", self.page(self.overview)),
            Route("/dashboard/login", self.login_form, methods=["GET"]),
            Route("/dashboard/login", self.login, methods=["POST"]),
            Route("/dashboard/logout", self.logout_endpoint, methods=["POST"]),
            Route("/dashboard/queues", self.page(self.queues)),
            Route(
                "/dashboard/dead/{op:str}",
                self.action(self.dead_one, name="change_dead_letters"),
                methods=["POST"],
            ),
            Route(
                "/dashboard/dead-select",
                self.action(self.dead_select, name="change_dead_letters"),
                methods=["POST"],
            ),
            Route(
                "/dashboard/dead-bulk",
                self.action(self.dead_bulk, name="change_dead_letters"),
                methods=["POST"],
            ),
            Route("/dashboard/schedules", self.page(self.schedules)),
            Route(
                "/dashboard/schedules/{name:str}/{op:str}",
                self.action(self.schedule_action, name="control_schedules"),
                methods=["POST"],
            ),
            Route("/dashboard/pipelines", self.page(self.pipelines)),
            Route("/dashboard/pipelines/{run_id:int}", self.page(self.pipeline_detail)),
            Route("/dashboard/backups", self.page(self.backups)),
            Route("/dashboard/webhooks", self.page(self.webhooks)),
            Route(
                "/dashboard/webhooks/{event_id:str}/replay",
                self.action(self.webhook_replay, name="replay_webhooks"),
                methods=["POST"],
            ),
            Route("/dashboard/audit", self.page(self.audit_page)),
            Mount(
                "/dashboard/static", StaticFiles(directory=WEB / "static"), name="dashboard-static"
            ),
        ]


_RUN_SHOWN = {
    "id",
    "pipeline",
    "tick",
    "started_at",
    "finished_at",
    "status",
    "rows_scanned",
    "rows_affected",
    "bytes_written",
    "objects",
    "error",
    "dry_run",
    "progress",
    "duration_s",
}


def _error_detail(error: BaseException | None) -> dict[str, str]:
    """The audit field for a failed action: the error's type and (masked) text."""
    if error is None:
        return {}
    return {"error": mask_personal(f"{type(error).__name__}: {error}")[:500]}


def _with_flash(url: str, **params: Any) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}{urlencode({k: v for k, v in params.items() if v is not None})}"


def dashboard_routes(settings: Settings) -> list[BaseRoute]:
    return Dashboard(settings).routes()


__all__ = ["Dashboard", "dashboard_routes"]
