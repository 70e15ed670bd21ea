"""Dashboard pages and actions: overview, schedules, pipelines, backups, webhooks, audit, and
the routes of all of them. Queues and dead letters are in ``dead_letters``, the operator pages
in ``operate``, signing in and out in ``signin``, the plumbing in ``core``. Every page needs a
server-side session; every POST needs the session's CSRF token, an operator, and leaves an
audit_logs row (refusals too)."""

from __future__ import annotations

import functools
import json
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import redis
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from core.log import get_logger
from core.settings import Settings
from web import auth
from web.dashboard import broker_state, store
from web.dashboard.chart import per_minute_chart
from web.dashboard.core import REFRESH_S, WEB
from web.dashboard.dead_letters import DeadLetters
from web.dashboard.operate import Operate
from web.dashboard.signin import SignIn

log = get_logger("web.dashboard")

__all__ = ["REFRESH_S", "WEB", "Dashboard", "dashboard_routes"]


class Dashboard(SignIn, DeadLetters, Operate):
    """Every page and action; routes() lists them."""

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
        return self.done(session, "/dashboard/schedules", code)

    # --- pipelines -----------------------------------------------------------------------------

    async def pipelines(self, request: Request, session: auth.Session) -> Response:
        pipeline = (request.query_params.get("pipeline") or "").strip()[:200] or None
        status = request.query_params.get("status") or None
        if status and status not in store.RUN_STATUSES:
            return self.refuse(request, session, f"unknown status {status[:20]!r}", 400)
        before = request.query_params.get("before")
        before_id = int(before) if before and before.isdigit() and len(before) < 19 else None
        rows = await run_in_threadpool(
            functools.partial(
                store.pipeline_runs,
                self.settings,
                pipeline=pipeline,
                status=status,
                before_id=before_id,
            )
        )
        next_url = None
        if len(rows) == store.PAGE:
            next_url = "/dashboard/pipelines?" + urlencode(
                {
                    k: v
                    for k, v in (
                        ("pipeline", pipeline),
                        ("status", status),
                        ("before", rows[-1]["id"]),
                    )
                    if v
                }
            )
        return self.render(
            request,
            "dashboard/pipelines.html",
            session=session,
            rows=rows,
            pipeline=pipeline,
            status=status,
            statuses=store.RUN_STATUSES,
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
        return self.done(session, "/dashboard/webhooks", code, status=status)

    # --- audit ---------------------------------------------------------------------------------

    async def audit_page(self, request: Request, session: auth.Session) -> Response:
        q = request.query_params

        def clean(key: str) -> str | None:
            return (q.get(key) or "").strip()[:200] or None

        filters = {"actor": clean("actor"), "action": clean("action"), "entity": clean("entity")}
        before = None
        if q.get("before_at") and q.get("before_id"):
            try:
                before = (datetime.fromisoformat(q["before_at"]), str(uuid.UUID(q["before_id"])))
            except ValueError:
                return self.refuse(request, session, "bad page cursor", 400)
        rows = await run_in_threadpool(
            functools.partial(
                store.audit_entries,
                self.settings,
                actor=filters["actor"],
                action=filters["action"],
                entity=filters["entity"],
                before=before,
            )
        )
        next_url = None
        if len(rows) == store.PAGE:
            last = rows[-1]
            next_url = "/dashboard/audit?" + urlencode(
                {
                    **{k: v for k, v in filters.items() if v},
                    "before_at": last["performed_at"].isoformat(),
                    "before_id": str(last["id"]),
                }
            )
        return self.render(
            request,
            "dashboard/audit.html",
            session=session,
            rows=rows,
            filters=filters,
            next_url=next_url,
        )

    # --- routes --------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/dashboard", self.page(self.overview)),
            Route("/dashboard/login", self.login_form, methods=["GET"]),
            Route("/dashboard/login", self.login, methods=["POST"]),
            Route("/dashboard/logout", self.logout, methods=["POST"]),
            Route("/dashboard/logout-everywhere", self.logout_everywhere, methods=["POST"]),
            Route("/dashboard/queues", self.page(self.queues)),
            Route("/dashboard/queues/{queue:str}", self.page(self.queue_page)),
            Route("/dashboard/queues/{queue:str}/messages/{rid:str}", self.page(self.message_page)),
            Route(
                "/dashboard/queues/{queue:str}/{op:str}",
                self.action(self.queue_pause, name="pause_queues"),
                methods=["POST"],
            ),
            Route("/dashboard/workers", self.page(self.workers_page)),
            Route("/dashboard/charts", self.page(self.charts_page)),
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
            Route("/dashboard/schedules/{name:str}", self.page(self.schedule_page)),
            Route(
                "/dashboard/schedules/{name:str}/{op:str}",
                self.action(self.schedule_action, name="control_schedules"),
                methods=["POST"],
            ),
            Route("/dashboard/pipelines", self.page(self.pipelines)),
            Route("/dashboard/pipelines/{run_id:int}", self.page(self.pipeline_detail)),
            Route("/dashboard/backups", self.page(self.backups)),
            Route(
                "/dashboard/backups/{op:str}",
                self.action(self.backup_action, name="start_backups"),
                methods=["POST"],
            ),
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


def dashboard_routes(settings: Settings) -> list[BaseRoute]:
    return Dashboard(settings).routes()
