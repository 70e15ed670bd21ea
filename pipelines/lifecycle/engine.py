"""The retention engine: one run of one policy, recorded, locked, batched, resumable.

A run is a ``pipeline_runs`` row. The same pipeline never runs twice at once: the run holds a
session-level advisory lock on its own connection, which Postgres releases when that
connection ends, so a process killed with SIGKILL frees it too. Work is done in keyset batches,
each in its own short transaction with ``SET LOCAL lock_timeout`` / ``statement_timeout``,
so a run never holds locks for long and app writes never queue behind it.

A new run first closes what a dead run left: its row is marked ``interrupted`` and, for an
archive, an object uploaded but never committed (no ``archive_objects`` row: its rows are still
in Postgres) is removed before those rows are archived again (a whole month's objects, which
commit together, are all noted as pending before the first upload). A run that fails after an upload
removes that object in its failure handler (best effort); if it cannot (storage down), the key
stays pending on its row and the next run removes it, as for a dead run. Deletes need nothing
more: a batch either committed or did not, and the next run starts from the oldest remaining row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from core.log import get_logger
from core.settings import Settings, get_settings
from pipelines.lifecycle import archive, gdpr, purge
from pipelines.lifecycle.archive import remove_orphan, write_manifest
from pipelines.lifecycle.context import (
    PipelineBusy,
    PipelineError,
    ProgressFn,
    RunContext,
    RunStats,
    connect,
)
from pipelines.lifecycle.policies import Policy, PolicyError, check_against_database, get_policy

__all__ = ["PipelineBusy", "PipelineError", "RunResult", "connect", "history", "run_pipeline"]

log = get_logger(__name__)


@dataclass
class RunResult:
    run_id: int
    pipeline: str
    status: str
    dry_run: bool
    stats: RunStats
    plan: Any = None
    manifest_key: str | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def lock_key(pipeline: str) -> str:
    return f"tidemill.pipeline:{pipeline}"


def _recover(meta: psycopg.Connection[Any], policy: Policy, settings: Settings) -> list[int]:
    """Close runs of this pipeline that died (we hold the lock, so none is alive)."""
    dead = meta.execute(
        "UPDATE pipeline_runs SET status = 'interrupted', finished_at = now(), "
        "error = coalesce(error, 'the process running it died mid-run') "
        "WHERE pipeline = %s AND status = 'running' RETURNING id, progress, dry_run",
        (policy.name,),
    ).fetchall()
    ids = []
    for run_id, _progress, _dry in dead:
        ids.append(run_id)
        log.warning("pipeline_run_interrupted", pipeline=policy.name, run_id=run_id)
    if policy.action == "archive":
        # A run that died, or failed after an upload (read-back mismatch, storage-class move or
        # catalogue insert failing) and could not remove its object then, left it pending: its
        # rows are still in Postgres, so the object goes before they are archived again (unless
        # a committed batch, of that run or a later one, owns that key). A storage error here
        # stops this run: archiving again beside an orphan would store those rows twice.
        # A whole-partition archive notes all its keys at once ('pending_keys'): its objects
        # commit together or not at all.
        leftovers = meta.execute(
            "SELECT id, progress->'pending', progress->'pending_keys' FROM pipeline_runs "
            "WHERE pipeline = %s AND status IN ('interrupted', 'failed') "
            "AND (progress ? 'pending' OR progress ? 'pending_keys') ORDER BY id",
            (policy.name,),
        ).fetchall()
        for run_id, pending, many in leftovers:
            for key in _pending_keys(pending, many):
                remove_orphan(meta, settings, key, pipeline=policy.name, run_id=run_id)
            clear_pending(meta, run_id)

        # Runs that died or failed after committing batches still get their manifest (a
        # failed run could not write it when storage was what failed).
        unfinished = meta.execute(
            "SELECT r.id FROM pipeline_runs r WHERE r.pipeline = %s AND r.manifest_key IS NULL "
            "AND r.status IN ('interrupted', 'failed') "
            "AND EXISTS (SELECT 1 FROM archive_objects o WHERE o.run_id = r.id) ORDER BY r.id",
            (policy.name,),
        ).fetchall()
        for (run_id,) in unfinished:
            write_manifest(meta, settings, policy, run_id)
        # Old objects an erase replaced but could not delete yet (a crash in between).
        from core.storage import open_storage

        archive.sweep_superseded(meta, open_storage(settings=settings))
    return ids


def _pending_keys(pending: Any, many: Any) -> list[str]:
    keys = [str(k) for k in many] if isinstance(many, list) else []
    return ([str(pending)] if pending else []) + keys


def clear_pending(meta: psycopg.Connection[Any], run_id: int) -> None:
    meta.execute(
        "UPDATE pipeline_runs SET progress = progress - 'pending' - 'pending_keys' WHERE id = %s",
        (run_id,),
    )


def _remove_failed_upload(
    meta: psycopg.Connection[Any], settings: Settings, policy: Policy, run_id: int
) -> None:
    """Best effort, in the failure handler: the objects of the batch (or the whole-partition
    archive) that did not commit."""
    row = meta.execute(
        "SELECT progress->'pending', progress->'pending_keys' FROM pipeline_runs WHERE id = %s",
        (run_id,),
    ).fetchone()
    keys = _pending_keys(row[0], row[1]) if row else []
    if not keys:
        return
    for key in keys:
        try:
            remove_orphan(meta, settings, key, pipeline=policy.name, run_id=run_id)
        except Exception as exc:  # storage may be what failed; the next run's _recover retries
            log.warning(
                "archive_orphan_removal_deferred", run_id=run_id, key=key, error=_describe(exc)
            )
            return
    clear_pending(meta, run_id)


def run_pipeline(
    name: str,
    *,
    tick: datetime | None = None,
    settings: Settings | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    progress: ProgressFn | None = None,
    policy: Policy | None = None,
    after_batch: Callable[[RunContext], None] | None = None,
    by: str | None = None,
) -> RunResult:
    """Run one policy now. Raises PipelineBusy if it is already running; records any failure
    in its ``pipeline_runs`` row and re-raises it."""
    settings = settings or get_settings()
    policy = policy or get_policy(name, settings)
    now = now or datetime.now(UTC)
    # A dry run works on READ ONLY sessions and writes no run row: it changes nothing.
    with (
        connect(settings, read_only=dry_run) as meta,
        connect(settings, read_only=dry_run) as work,
    ):
        got = meta.execute(
            "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (lock_key(policy.name),)
        ).fetchone()
        if not got or not got[0]:
            log.info("pipeline_busy", pipeline=policy.name)
            raise PipelineBusy(f"pipeline {policy.name} is already running")
        try:
            check_against_database([policy], meta)
        except PolicyError as exc:
            log.error("pipeline_policy_rejected", pipeline=policy.name, error=str(exc))
            raise
        run_id = 0
        if not dry_run:
            _recover(meta, policy, settings)
            row = meta.execute(
                "INSERT INTO pipeline_runs (pipeline, tick, dry_run, progress) "
                "VALUES (%s, %s, false, jsonb_build_object('by', %s::text)) RETURNING id",
                (policy.name, tick, by or "scheduler"),
            ).fetchone()
            assert row is not None
            run_id = int(row[0])
        ctx = RunContext(
            policy=policy,
            settings=settings,
            meta=meta,
            work=work,
            run_id=run_id,
            now=now,
            dry_run=dry_run,
            progress=progress,
            after_batch=after_batch,
            by=by,
        )
        log.info(
            "pipeline_started",
            pipeline=policy.name,
            run_id=ctx.run_id,
            action=policy.action,
            table=policy.table,
            cutoff=ctx.cutoff.isoformat(),
            dry_run=dry_run,
        )
        result = RunResult(ctx.run_id, policy.name, "running", dry_run, ctx.stats)
        try:
            result.plan = _dispatch(ctx, result)
        except BaseException as exc:
            error = _describe(exc)
            if dry_run:
                log.error("pipeline_dry_run_failed", pipeline=policy.name, error=error)
                raise
            meta.execute(
                "UPDATE pipeline_runs SET status = 'failed', finished_at = now(), error = %s, "
                "rows_scanned = %s, rows_affected = %s, bytes_written = %s, objects = %s "
                "WHERE id = %s",
                (
                    error,
                    ctx.stats.rows_scanned,
                    ctx.stats.rows_affected,
                    ctx.stats.bytes_written,
                    ctx.stats.objects,
                    ctx.run_id,
                ),
            )
            if policy.action == "archive" and not dry_run:
                try:
                    # Not when the work connection broke: its COMMIT may have gone through
                    # unseen, so the next run decides (by then the catalogue says).
                    if not work.broken:
                        _remove_failed_upload(meta, settings, policy, ctx.run_id)
                except Exception as cleanup:  # the meta connection itself may be gone
                    log.warning(
                        "archive_orphan_removal_deferred",
                        run_id=ctx.run_id,
                        error=_describe(cleanup),
                    )
                try:
                    write_manifest(meta, settings, policy, ctx.run_id)
                except Exception:  # storage may be what failed; the next run writes it
                    log.warning("archive_manifest_deferred", run_id=ctx.run_id)
            log.error(
                "pipeline_failed",
                pipeline=policy.name,
                run_id=ctx.run_id,
                error=error,
                rows_affected=ctx.stats.rows_affected,
            )
            raise
        if dry_run:
            result.status = "dry-run"
            log.info("pipeline_dry_run", pipeline=policy.name, expected=ctx.expected)
            return result
        manifest_key = None
        if policy.action == "archive":
            manifest_key = write_manifest(meta, settings, policy, ctx.run_id)
        meta.execute(
            "UPDATE pipeline_runs SET status = 'succeeded', finished_at = now(), "
            "rows_scanned = %s, rows_affected = %s, bytes_written = %s, objects = %s, "
            "progress = coalesce(progress, '{}'::jsonb) - 'pending' - 'pending_keys' WHERE id = %s",
            (
                ctx.stats.rows_scanned,
                ctx.stats.rows_affected,
                ctx.stats.bytes_written,
                ctx.stats.objects,
                ctx.run_id,
            ),
        )
        result.status = "succeeded"
        result.manifest_key = manifest_key
        log.info(
            "pipeline_finished",
            pipeline=policy.name,
            run_id=ctx.run_id,
            rows_scanned=ctx.stats.rows_scanned,
            rows_affected=ctx.stats.rows_affected,
            objects=ctx.stats.objects,
            bytes_written=ctx.stats.bytes_written,
            max_txn_s=round(ctx.stats.max_txn_s, 3),
            dry_run=dry_run,
        )
        return result


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _dispatch(ctx: RunContext, result: RunResult) -> Any:
    action = ctx.policy.action
    if action in ("delete", "expire"):
        return purge.run(ctx)
    if action == "archive":
        return archive.run(ctx)
    if action == "erase-users":
        return gdpr.run_erase_policy(ctx)
    if action == "expire-exports":
        return gdpr.run_expire_exports(ctx)
    if action == "partitions":
        return purge.run_partition_maintenance(ctx)
    raise PipelineError(f"unknown action {action!r}")


def history(
    *, settings: Settings | None = None, pipeline: str | None = None, limit: int = 20
) -> list[dict[str, Any]]:
    settings = settings or get_settings()
    with connect(settings) as conn:
        cur = conn.execute(
            "SELECT id, pipeline, tick, started_at, finished_at, status, rows_scanned, "
            "rows_affected, bytes_written, objects, error, dry_run, manifest_key "
            "FROM pipeline_runs WHERE (%(p)s::text IS NULL OR pipeline = %(p)s) "
            "ORDER BY id DESC LIMIT %(n)s",
            {"p": pipeline, "n": limit},
        )
        cols = [c.name for c in cur.description or ()]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
