"""Queues and dead letters: the queues page with its dead-letter search and pages, retry and
delete of one letter, and bulk actions on a counted, kept selection."""

from __future__ import annotations

import json
import secrets
from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from core.log import get_logger, mask_personal
from web import auth
from web.dashboard import broker_state
from web.dashboard.core import DashboardBase, error_detail, local_target

log = get_logger("web.dashboard")

SELECTION_TTL_S = 900
# Sidekiq's page size: a screenful, and what the page costs does not grow with the dead set
DEAD_PER_PAGE = 25


class DeadLetters(DashboardBase):
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
        back = local_target(form.get("back"), "/dashboard/queues")
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
                    **error_detail(error),
                )

        n = await run_in_threadpool(run)
        code = ("retried" if op == "retry" else "deleted") if n else "gone"
        return self.done(session, back, code, n=n)

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
                    **error_detail(error),
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
            return self.done(session, "/dashboard/queues", "bulk_expired")
        op, n, _selected = result
        code = "retried" if op == "retry" else "deleted"
        return self.done(session, "/dashboard/queues", code, n=n)
