"""Operator depth, after Oban Web / Sidekiq Web / Flower: one queue's messages by state and
its pause switch, one message with its attempts, the worker processes, and charts per queue
and actor over the last hour (per minute) or 30 days (per hour)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from web import auth
from web.dashboard import broker_state, queue_browser, store
from web.dashboard.chart import per_minute_chart
from web.dashboard.core import DashboardBase
from workers.pause import pause_queue, paused_queues, resume_queue

QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
RANGES = {"1h": (60, False), "24h": (24, True), "7d": (168, True), "30d": (720, True)}


class Operate(DashboardBase):
    def _queue(self, request: Request) -> str | None:
        name = request.path_params["queue"]
        return name if QUEUE_NAME.match(name) else None

    async def queue_page(self, request: Request, session: auth.Session) -> Response:
        queue = self._queue(request)
        if queue is None:
            return self.refuse(request, session, "bad queue name", 400)
        state = request.query_params.get("state") or "ready"
        if state not in queue_browser.STATES:
            return self.refuse(request, session, f"unknown state {state[:20]!r}", 400)
        cursor = request.query_params.get("cursor") or None
        if cursor is not None and not (cursor.isdigit() and len(cursor) < 19):
            return self.refuse(request, session, "bad page cursor", 400)

        def load() -> dict[str, Any]:
            client = broker_state.broker_redis(self.settings)
            names = broker_state.queue_names(client)
            [stats] = broker_state.queue_stats(client, [queue])
            return {
                "known": queue in names,
                "stats": stats,
                "page": queue_browser.browse(client, queue, state, cursor=cursor),
                "paused": paused_queues(self.settings).get(queue),
            }

        try:
            data = await run_in_threadpool(load)
        except broker_state.BrokerUnavailable as exc:
            return self.refuse(request, session, str(exc), 503)
        if not data["known"]:
            return self.refuse(request, session, "no such queue", 404)
        next_url = None
        if data["page"].next_cursor:
            next_url = f"/dashboard/queues/{queue}?" + urlencode(
                {"state": state, "cursor": data["page"].next_cursor}
            )
        return self.render(
            request,
            "dashboard/queue.html",
            session=session,
            queue=queue,
            state=state,
            states=queue_browser.STATES,
            next_url=next_url,
            **data,
        )

    async def message_page(self, request: Request, session: auth.Session) -> Response:
        queue = self._queue(request)
        rid = request.path_params["rid"][:100]
        if queue is None:
            return self.refuse(request, session, "bad queue name", 400)

        def load() -> Any:
            client = broker_state.broker_redis(self.settings)
            return queue_browser.message_detail(client, queue, rid)

        try:
            detail = await run_in_threadpool(load)
        except broker_state.BrokerUnavailable as exc:
            return self.refuse(request, session, str(exc), 503)
        if detail is None:
            return self.refuse(
                request, session, "no such message (processed, retried or deleted meanwhile)", 404
            )
        return self.render(request, "dashboard/message.html", session=session, m=detail)

    async def queue_pause(
        self, request: Request, session: auth.Session, form: dict[str, str]
    ) -> Response:
        queue = self._queue(request)
        op = request.path_params["op"]
        if queue is None or op not in ("pause", "resume"):
            return self.refuse(request, session, "unknown queue action", 404)

        def run() -> bool | None:
            client = broker_state.broker_redis(self.settings)
            known = queue in broker_state.queue_names(client)
            # a paused queue can always be resumed, even one the broker has forgotten
            if not known and not (op == "resume" and queue in paused_queues(self.settings)):
                return None
            changed = (
                pause_queue(queue, by=session.user, settings=self.settings)
                if op == "pause"
                else resume_queue(queue, settings=self.settings)
            )
            self.audit(session, f"queue.{op}", "queue", queue, changed=changed)
            return changed

        changed = await run_in_threadpool(run)
        if changed is None:
            return self.refuse(request, session, "no such queue", 404)
        word = "paused" if op == "pause" else "resumed"
        self.flash(
            session,
            f"Queue {queue} {word}."
            if changed
            else f"Queue {queue} was already {word}; nothing changed.",
        )
        return RedirectResponse(f"/dashboard/queues/{queue}", status_code=303)

    async def workers_page(self, request: Request, session: auth.Session) -> Response:
        def load() -> Any:
            return queue_browser.workers(broker_state.broker_redis(self.settings))

        rows = await run_in_threadpool(load)
        return self.render(request, "dashboard/workers.html", session=session, rows=rows)

    async def charts_page(self, request: Request, session: auth.Session) -> Response:
        q = request.query_params
        span = q.get("range") or "1h"
        if span not in RANGES:
            return self.refuse(request, session, f"unknown range {span[:10]!r}", 400)
        queue = (q.get("queue") or "").strip()[:100] or None
        actor = (q.get("actor") or "").strip()[:200] or None
        buckets, hourly = RANGES[span]

        def load() -> dict[str, Any]:
            client = broker_state.broker_redis(self.settings)
            points = queue_browser.series(
                client, queue=queue, actor=actor, buckets=buckets, hourly=hourly
            )
            return {
                "points": points,
                "queues": broker_state.queue_names(client),
                "actors": queue_browser.actors_seen(client),
            }

        data = await run_in_threadpool(load)
        step = 3600 if hourly else 60
        series = [(t // step, total, failed) for t, total, failed in data["points"]]
        return self.render(
            request,
            "dashboard/charts.html",
            session=session,
            chart=per_minute_chart(series, bucket_s=step),
            span=span,
            ranges=list(RANGES),
            queue=queue,
            actor=actor,
            totals=(sum(p[1] for p in series), sum(p[2] for p in series)),
            queues=data["queues"],
            actors=data["actors"],
        )

    # --- schedules: tick history; backups: back up now / verify --------------------------------

    async def schedule_page(self, request: Request, session: auth.Session) -> Response:
        from schedules.schedule import load_schedules

        name = request.path_params["name"]
        before = None
        if request.query_params.get("before"):
            try:
                before = datetime.fromisoformat(request.query_params["before"])
            except ValueError:
                return self.refuse(request, session, "bad page cursor", 400)

        def load() -> tuple[Any, list[Any], Any]:
            schedule = next((s for s in load_schedules(self.settings) if s.name == name), None)
            if schedule is None:
                return None, [], None
            # this schedule's state only (schedules.control.list_schedules reads every one's
            # last run, which the planner can make slow with many runs)
            paused = store.schedule_paused(self.settings, name)
            now = datetime.now(UTC)
            status = {
                "paused": paused,
                "next_fire": None if paused else schedule.trigger().get_next_fire_time(None, now),
            }
            return schedule, store.schedule_ticks(self.settings, schedule, before=before), status

        schedule, ticks, status = await run_in_threadpool(load)
        if schedule is None:
            return self.refuse(request, session, "no such schedule", 404)
        next_url = None
        if len(ticks) == store.PAGE:
            next_url = f"/dashboard/schedules/{quote(name)}?" + urlencode(
                {"before": ticks[-1]["tick"].isoformat()}
            )
        return self.render(
            request,
            "dashboard/schedule.html",
            session=session,
            schedule=schedule,
            status=status,
            ticks=ticks,
            next_url=next_url,
        )

    async def backup_action(
        self, request: Request, session: auth.Session, form: dict[str, str]
    ) -> Response:
        op = request.path_params["op"]
        if op not in BACKUP_ACTIONS:
            return self.refuse(request, session, "unknown backup action", 404)
        schedule_name, done = BACKUP_ACTIONS[op]

        def run() -> str:
            # through the schedule's own manual tick: the same outbox row, actor and run
            # record a nightly backup (or drill) gets, and it shows in the tick history
            from schedules import control

            try:
                tick = control.trigger(schedule_name, by=session.user, settings=self.settings)
            except LookupError:
                self.audit(session, f"backup.{op}", "schedule", schedule_name, outcome="unknown")
                return f"No {schedule_name} schedule is configured; nothing queued."
            self.audit(session, f"backup.{op}", "schedule", schedule_name, tick=tick.isoformat())
            return done

        self.flash(session, await run_in_threadpool(run))
        return RedirectResponse("/dashboard/backups", status_code=303)


BACKUP_ACTIONS = {
    "backup": ("backup-full", "Backup queued: a backups worker takes a full backup now."),
    "verify": (
        "backup-drill",
        "Verification queued: a restore drill restores the newest backup and checks it.",
    ),
}
