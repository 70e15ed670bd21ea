"""What the dashboard reads from Postgres: webhook events, pipeline runs, backups and drills,
schedules. Every query is bounded (a time window on an index, or a keyset page), so a page costs
the same with a million webhook events as with none.

``backups`` / ``backup_drills`` belong to the backups issue and may not exist yet: pages then
say "no backups yet" instead of failing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from core.log import get_logger
from core.settings import Settings
from db.engine import get_database
from db.redis import get_redis

log = get_logger("web.dashboard")

WEBHOOK_STATUSES = ("received", "waiting", "processed", "ignored", "failed")
PAGE = 50


def _conn(settings: Settings) -> Any:
    return get_database(settings).engine.connect()


def _exists(conn: Connection, table: str) -> bool:
    return conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table}).scalar_one()


def _rows(conn: Connection, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
    return list(conn.execute(text(sql), params or {}).mappings().all())


# --- overview ---------------------------------------------------------------------------------


def outbox_backlog(settings: Settings) -> tuple[int, float | None]:
    """Pending outbox rows and the age of the oldest (rows the relay refused are not pending)."""
    from workers.outbox import outbox_backlog as pending

    return pending(settings)


def jobs_in_flight(settings: Settings) -> tuple[int, float | None]:
    """Jobs dispatched but not done (all queues) and the age of the oldest, from Postgres."""
    from workers.rescuer import in_flight

    rows = in_flight(settings)
    return sum(n for _, n, _ in rows), max((age for *_, age in rows), default=None)


def webhook_window(settings: Settings, *, seconds: int, cache_s: int = 0) -> dict[str, int]:
    """Events received in the last `seconds`, per status (an index range, not a table scan).

    With `cache_s`, the counts are kept that long in Redis and shared by every web replica: a
    day of events is ~10^5 index entries, too many to count on every 10-second page refresh.
    """
    key = f"tidemill:dash:webhook_window:{seconds}"
    if cache_s:
        cached = get_redis(settings).get(key)
        if cached:
            return {str(k): int(v) for k, v in json.loads(cached).items()}
    with _conn(settings) as conn:
        rows = conn.execute(
            text(
                "SELECT status, count(*) FROM webhook_events "
                "WHERE received_at > now() - make_interval(secs => :s) GROUP BY status"
            ),
            {"s": seconds},
        ).all()
    counts = dict.fromkeys(WEBHOOK_STATUSES, 0)
    counts.update({str(s): int(n) for s, n in rows})
    if cache_s:
        get_redis(settings).set(key, json.dumps(counts), ex=cache_s)
    return counts


@dataclass(frozen=True)
class BackupHealth:
    available: bool  # the backups tables exist
    last_complete_at: datetime | None
    age_s: float | None
    rpo_s: int
    failed_drills_7d: int
    last_drill: dict[str, Any] | None

    @property
    def within_rpo(self) -> bool:
        return self.age_s is not None and self.age_s <= self.rpo_s


def backup_health(settings: Settings) -> BackupHealth:
    with _conn(settings) as conn:
        if not _exists(conn, "backups"):
            return BackupHealth(False, None, None, settings.dashboard_rpo_s, 0, None)
        last = conn.execute(
            text(
                "SELECT max(finished_at), EXTRACT(EPOCH FROM now() - max(finished_at)) "
                "FROM backups WHERE status = 'complete'"
            )
        ).one()
        failed = 0
        last_drill = None
        if _exists(conn, "backup_drills"):
            failed = conn.execute(
                text(
                    "SELECT count(*) FROM backup_drills "
                    "WHERE status = 'failed' AND started_at > now() - interval '7 days'"
                )
            ).scalar_one()
            drills = _rows(
                conn,
                "SELECT id, status, started_at, restore_seconds, data_age_seconds "
                "FROM backup_drills ORDER BY started_at DESC LIMIT 1",
            )
            last_drill = dict(drills[0]) if drills else None
    return BackupHealth(
        True,
        last[0],
        float(last[1]) if last[1] is not None else None,
        settings.dashboard_rpo_s,
        int(failed),
        last_drill,
    )


# --- webhooks ---------------------------------------------------------------------------------


def webhook_events(
    settings: Settings,
    *,
    status: str | None = None,
    search: str | None = None,
    before: tuple[datetime, str] | None = None,
    limit: int = PAGE,
) -> list[Any]:
    """Newest events first, one keyset page. `search` is an event id (exact, or a prefix) or an
    event type (exact)."""
    where = ["TRUE"]
    params: dict[str, Any] = {"limit": limit}
    if status:
        where.append("status = :status")
        params["status"] = status
    if search:
        # id prefix: the primary key's btree serves it (text_pattern_ops is not needed under C
        # collation, and the range form works under any collation).
        where.append("(id = :q OR type = :q OR (id >= :q AND id < :q || chr(1114111)))")
        params["q"] = search
    if before:
        where.append("(received_at, id) < (:before_at, :before_id)")
        params["before_at"], params["before_id"] = before
    sql = (
        "SELECT id, type, status, attempts, received_at, processed_at, last_error "
        f"FROM webhook_events WHERE {' AND '.join(where)} "
        "ORDER BY received_at DESC, id DESC LIMIT :limit"
    )
    with _conn(settings) as conn:
        return _rows(conn, sql, params)


def webhook_event(settings: Settings, event_id: str) -> Any | None:
    with _conn(settings) as conn:
        rows = _rows(
            conn,
            "SELECT id, type, status, attempts, received_at, processed_at, last_error, "
            "created, subject_id FROM webhook_events WHERE id = :id",
            {"id": event_id},
        )
    return rows[0] if rows else None


# --- pipelines --------------------------------------------------------------------------------


RUN_STATUSES = ("running", "succeeded", "failed", "interrupted")


def pipeline_runs(
    settings: Settings,
    *,
    pipeline: str | None = None,
    status: str | None = None,
    before_id: int | None = None,
) -> list[Any]:
    where = ["TRUE"]
    params: dict[str, Any] = {"limit": PAGE}
    if pipeline:
        where.append("pipeline = :pipeline")
        params["pipeline"] = pipeline
    if status:
        where.append("status = :status")
        params["status"] = status
    if before_id:
        where.append("id < :before_id")
        params["before_id"] = before_id
    sql = (
        "SELECT id, pipeline, tick, started_at, finished_at, status, rows_scanned, rows_affected, "
        "bytes_written, objects, error, dry_run, progress, "
        "EXTRACT(EPOCH FROM coalesce(finished_at, now()) - started_at) AS duration_s "
        f"FROM pipeline_runs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT :limit"
    )
    with _conn(settings) as conn:
        return _rows(conn, sql, params)


def pipeline_run(settings: Settings, run_id: int) -> Any | None:
    with _conn(settings) as conn:
        rows = _rows(
            conn,
            "SELECT *, EXTRACT(EPOCH FROM coalesce(finished_at, now()) - started_at) AS duration_s "
            "FROM pipeline_runs WHERE id = :id",
            {"id": run_id},
        )
    return rows[0] if rows else None


# --- backups ----------------------------------------------------------------------------------


def backups(settings: Settings) -> tuple[bool, list[Any], list[Any]]:
    """(tables exist, newest backups, newest drills)."""
    with _conn(settings) as conn:
        if not _exists(conn, "backups"):
            return False, [], []
        items = _rows(
            conn,
            "SELECT id, kind, status, started_at, finished_at, key, size_bytes, sha256, "
            "verified_at, error, EXTRACT(EPOCH FROM finished_at - started_at) AS duration_s "
            "FROM backups ORDER BY started_at DESC, id DESC LIMIT 100",
        )
        drills = []
        if _exists(conn, "backup_drills"):
            drills = _rows(
                conn,
                "SELECT id, backup_id, started_at, finished_at, status, restore_seconds, "
                "data_age_seconds, tables_checked, mismatches, error "
                "FROM backup_drills ORDER BY started_at DESC, id DESC LIMIT 50",
            )
    return True, items, drills


# --- schedules --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleRow:
    name: str
    cron: str
    timezone: str
    actor: str
    paused: bool
    next_fire: datetime | None
    last_tick: datetime | None
    last_run_status: str | None
    misfire: str


def schedules(settings: Settings, *, now: datetime | None = None) -> list[ScheduleRow]:
    """Every schedule with its state, through ``schedules.control`` (the scheduler's own view:
    pause state, next fire, last tick and the status of the run it caused)."""
    from schedules import control

    return [
        ScheduleRow(
            name=s.name,
            cron=s.cron,
            timezone=str(s.timezone),
            actor=s.actor,
            paused=bool(s.paused),
            next_fire=s.next_fire,
            last_tick=s.last_tick,
            last_run_status=s.last_run_status,
            misfire=str(s.misfire),
        )
        for s in control.list_schedules(settings, now=now)
    ]


def schedule_paused(settings: Settings, name: str) -> bool:
    with _conn(settings) as conn:
        row = conn.execute(
            text("SELECT paused FROM schedule_state WHERE name = :n"), {"n": name}
        ).first()
    return bool(row and row[0])


BACKUP_KINDS = {"backup_full": "full", "backup_base": "base"}


def schedule_ticks(
    settings: Settings,
    schedule: Any,
    *,
    before: datetime | None = None,
    limit: int = PAGE,
) -> list[Any]:
    """One schedule's ticks, newest first (a keyset page on the (schedule, tick) unique index),
    each with what became of it: the outbox message, and the run it caused: the pipeline run
    carrying the tick, or the backup / drill that started between this tick and the next."""
    from schedules.schedule import PIPELINE_ACTOR

    params: dict[str, Any] = {"s": schedule.name, "limit": limit, "before": before}
    run_join = "NULL::bigint AS run_id, NULL::text AS run_status, NULL::text AS run_kind"
    lateral = ""
    if schedule.actor == PIPELINE_ACTOR:
        run_join = "r.id AS run_id, r.status AS run_status, 'pipeline' AS run_kind"
        lateral = (
            "LEFT JOIN LATERAL (SELECT id, status FROM pipeline_runs "
            "WHERE pipeline = t.schedule AND tick = t.tick ORDER BY id DESC LIMIT 1) r ON true"
        )
    else:
        kind = BACKUP_KINDS.get(schedule.actor)
        if schedule.actor == "backup_base" and schedule.kwargs.get("incremental"):
            kind = "incremental"
        table = None
        with _conn(settings) as conn:
            if kind and _exists(conn, "backups"):
                table = "backups"
            elif schedule.actor == "backup_drill" and _exists(conn, "backup_drills"):
                table = "backup_drills"
        if table:
            kind_filter = "AND kind = :kind" if table == "backups" else ""
            params["kind"] = kind
            run_join = f"r.id AS run_id, r.status AS run_status, '{table}' AS run_kind"
            lateral = (
                f"LEFT JOIN LATERAL (SELECT id, status FROM {table} "
                f"WHERE started_at >= t.tick {kind_filter} "
                "AND (t.next_tick IS NULL OR started_at < t.next_tick) "
                "ORDER BY started_at ASC LIMIT 1) r ON true"
            )
    # the cursor's condition only when there is one: `:before IS NULL OR …` hides the index
    # range from a generic plan
    page_filter = "AND tick < :before " if before is not None else ""
    sql = (
        "WITH t AS (SELECT id, schedule, tick, kind, fired_at, fired_by, outbox_id, "
        "lag(tick) OVER (ORDER BY tick DESC) AS next_tick FROM ("
        f"  SELECT * FROM schedule_ticks WHERE schedule = :s {page_filter}"
        "  ORDER BY tick DESC LIMIT :limit) page) "
        f"SELECT t.tick, t.kind, t.fired_at, t.fired_by, t.outbox_id, "
        f"o.dispatched_at, o.last_error, {run_join} "
        f"FROM t LEFT JOIN outbox o ON o.id = t.outbox_id {lateral} ORDER BY t.tick DESC"
    )
    with _conn(settings) as conn:
        return _rows(conn, sql, params)


def _like_prefix(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def audit_entries(
    settings: Settings,
    *,
    actor: str | None = None,
    action: str | None = None,
    entity: str | None = None,
    before: tuple[datetime, str] | None = None,
    limit: int = PAGE,
) -> list[Any]:
    """The dashboard's audit rows, newest first, one keyset page on (performed_at, id).
    `action` is a prefix (``dashboard.login`` finds every sign-in outcome); `entity` is an
    exact entity id."""
    where = ["action LIKE 'dashboard.%'"]
    params: dict[str, Any] = {"limit": limit}
    if actor:
        where.append("actor = :actor")
        params["actor"] = actor
    if action:
        where.append("action LIKE :action")
        full = action if action.startswith("dashboard.") else f"dashboard.{action}"
        params["action"] = _like_prefix(full)
    if entity:
        where.append("entity_id = :entity")
        params["entity"] = entity
    if before:
        where.append("(performed_at, id) < (:before_at, CAST(:before_id AS uuid))")
        params["before_at"], params["before_id"] = before
    with _conn(settings) as conn:
        return _rows(
            conn,
            "SELECT id, performed_at, actor, action, entity_type, entity_id, details "
            f"FROM audit_logs WHERE {' AND '.join(where)} "
            "ORDER BY performed_at DESC, id DESC LIMIT :limit",
            params,
        )
