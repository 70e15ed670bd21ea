"""HTTP: /healthz, /metrics and the operator dashboard (``web.dashboard``). The server persists
and enqueues; it never processes."""

from __future__ import annotations

from sqlalchemy import text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse
from starlette.routing import Route

from core.log import get_logger
from core.settings import Settings
from db.engine import get_database
from db.redis import get_redis
from web import webhooks
from web.dashboard.headers import SecurityHeaders
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


def create_app(settings: Settings) -> Starlette:
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

    return Starlette(
        middleware=[Middleware(SecurityHeaders)],
        routes=[
            Route("/", root),
            Route("/favicon.ico", favicon),
            Route("/healthz", healthz),
            Route("/metrics", metrics),
            webhooks.route(settings),
            *dashboard_routes(settings),
        ],
    )
