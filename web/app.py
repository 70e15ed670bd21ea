"""HTTP: /healthz, /metrics and the operator dashboard. The server persists and enqueues;
it never processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from starlette.routing import Route

from core.log import get_logger
from core.settings import Settings
from db.engine import get_database
from db.redis import get_redis
from web import webhooks

log = get_logger(__name__)

TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
)
QUEUES = ("default", "payments", "emails", "notifications", "cache", "maintenance", "pipelines")


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


def overview(settings: Settings) -> dict[str, Any]:
    """Queue depths (ready / delayed / dead) and outbox backlog, read straight from the stores."""
    r = get_redis(settings)
    pipe = r.pipeline(transaction=False)
    for q in QUEUES:
        pipe.llen(f"dramatiq:{q}")
        pipe.zcard(f"dramatiq:{q}.DQ")
        pipe.zcard(f"dramatiq:{q}.XQ")
    counts = pipe.execute()
    queues = [
        {"name": q, "ready": counts[3 * i], "delayed": counts[3 * i + 1], "dead": counts[3 * i + 2]}
        for i, q in enumerate(QUEUES)
    ]
    with get_database(settings).engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at)) "
                "FROM outbox WHERE dispatched_at IS NULL"
            )
        ).one()
    backlog: int = row[0]
    oldest: Any = row[1]
    return {
        "queues": queues,
        "outbox_backlog": backlog,
        "outbox_oldest_s": round(float(oldest), 1) if oldest is not None else None,
    }


def create_app(settings: Settings) -> Starlette:
    async def healthz(request: Request) -> JSONResponse:
        pg = await run_in_threadpool(_check_postgres, settings)
        rd = await run_in_threadpool(_check_redis, settings)
        ok = pg == "ok" and rd == "ok"
        return JSONResponse(
            {"status": "ok" if ok else "degraded", "postgres": pg, "redis": rd},
            status_code=200 if ok else 503,
        )

    async def dashboard(request: Request) -> HTMLResponse:
        data = await run_in_threadpool(overview, settings)
        html = TEMPLATES.get_template("dashboard.html").render(**data)
        return HTMLResponse(html)

    async def metrics(request: Request) -> PlainTextResponse:
        from web.metrics import render

        body, content_type = await run_in_threadpool(render, settings)
        return PlainTextResponse(body, media_type=content_type)

    async def root(request: Request) -> RedirectResponse:
        return RedirectResponse("/dashboard")

    return Starlette(
        routes=[
            Route("/", root),
            Route("/healthz", healthz),
            Route("/dashboard", dashboard),
            Route("/metrics", metrics),
            webhooks.route(settings),
        ]
    )
