"""The retention engine: one run of one policy, recorded, locked, batched, resumable.

A run is a ``pipeline_runs`` row. The same pipeline never runs twice at once: the run holds a
session-level advisory lock on its own connection, which Postgres releases when that
connection ends, so a process killed with SIGKILL frees it too. Work is done in keyset batches,
each in its own short transaction with ``SET LOCAL lock_timeout`` / ``statement_timeout``,
so a run never holds locks for long and app writes never queue behind it.

A new run first closes what a dead run left: its row is marked ``interrupted`` and, for an
archive, an object uploaded but never committed (no ``archive_objects`` row: its rows are still
in Postgres) is removed before those rows are archived again. A run that fails after an upload
removes that object in its failure handler (best effort); if it cannot (storage down), the key
stays pending on its row and the next run removes it, as for a dead run. Deletes need nothing
more: a batch either committed or did not, and the next run starts from the oldest remaining row.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from core.log import get_logger
from core.settings import Settings, get_settings
from db.engine import direct_url, libpq_url
from pipelines.policies import Policy, PolicyError, check_against_database, get_policy

log = get_logger(__name__)

ProgressFn = Callable[[int, int | None], None]  # (rows affected so far, rows expected)


class PipelineError(Exception):
    """Root of the pipelines' own errors."""


class PipelineBusy(PipelineError):
    """Another run of the same pipeline holds its lock."""


@dataclass
class RunStats:
    rows_scanned: int = 0
    rows_affected: int = 0
    bytes_written: int = 0
    objects: int = 0
    batches: int = 0
    max_txn_s: float = 0.0


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


def connect(settings: Settings) -> psycopg.Connection[Any]:
    if settings.database_url is None:
        from db.engine import ServiceUnreachable

        raise ServiceUnreachable("DATABASE_URL is unset and no embedded Postgres is running")
    return psycopg.connect(libpq_url(direct_url(settings)), autocommit=True)


def lock_key(pipeline: str) -> str:
    return f"tidemill.pipeline:{pipeline}"


class RunContext:
    """What an action needs: the policy, a work connection, the run row, counters."""

    def __init__(
        self,
        *,
        policy: Policy,
        settings: Settings,
        meta: psycopg.Connection[Any],
        work: psycopg.Connection[Any],
        run_id: int,
        now: datetime,
        dry_run: bool,
        progress: ProgressFn | None,
        after_batch: Callable[[RunContext], None] | None = None,
    ) -> None:
        self.policy = policy
        self.settings = settings
        self.meta = meta
        self.work = work
        self.run_id = run_id
        self.now = now
        self.dry_run = dry_run
        self.stats = RunStats()
        self.expected: int | None = None
        self._progress = progress
        self._after_batch = after_batch
        self._storage: Any = None
        self._last_log = time.monotonic()
        self._last_saved = 0.0

    @property
    def cutoff(self) -> datetime:
        return self.policy.cutoff(self.now)

    @property
    def storage(self) -> Any:
        if self._storage is None:
            from core.storage import open_storage

            self._storage = open_storage(settings=self.settings)
        return self._storage

    @contextmanager
    def batch(self, *, durable: bool = True) -> Iterator[psycopg.Connection[Any]]:
        """One short transaction with the pipeline's lock and statement timeouts.

        ``durable=False`` skips the wait for the WAL flush at commit (synchronous_commit off):
        only for work that is safe to redo, e.g. a purge batch, which a server crash can at
        worst undo, so that the next run deletes those rows again.
        """
        started = time.monotonic()
        with self.work.transaction():
            if not durable:
                self.work.execute("SET LOCAL synchronous_commit = off")
            self.work.execute(
                sql.SQL("SET LOCAL lock_timeout = {}").format(
                    sql.Literal(self.settings.pipeline_lock_timeout_ms)
                )
            )
            self.work.execute(
                sql.SQL("SET LOCAL statement_timeout = {}").format(
                    sql.Literal(self.settings.pipeline_statement_timeout_ms)
                )
            )
            yield self.work
        self.stats.max_txn_s = max(self.stats.max_txn_s, time.monotonic() - started)

    def note_pending(self, key: str) -> None:
        """Committed before an upload starts: if we die before the batch commits, the next run
        knows which object may be an orphan."""
        self.meta.execute(
            "UPDATE pipeline_runs SET progress = coalesce(progress, '{}'::jsonb) || "
            "jsonb_build_object('pending', %s::text) WHERE id = %s",
            (key, self.run_id),
        )

    def advance(
        self,
        *,
        scanned: int,
        affected: int,
        bytes_written: int = 0,
        objects: int = 0,
        cursor: dict[str, Any] | None = None,
    ) -> None:
        s = self.stats
        s.rows_scanned += scanned
        s.rows_affected += affected
        s.bytes_written += bytes_written
        s.objects += objects
        s.batches += 1
        if self._progress is not None:
            self._progress(s.rows_affected, self.expected)
        if self._after_batch is not None:
            self._after_batch(self)
        # The run row is a progress report, not the truth (the tables are): refreshing it
        # once a second spares a commit per batch.
        if time.monotonic() - self._last_saved < 1.0:
            return
        self._last_saved = time.monotonic()
        progress = {"batches": s.batches}
        if cursor is not None:
            progress["cursor"] = cursor  # type: ignore[assignment]
        self.meta.execute(
            "UPDATE pipeline_runs SET rows_scanned = %s, rows_affected = %s, "
            "bytes_written = %s, objects = %s, "
            "progress = coalesce(progress, '{}'::jsonb) || %s::jsonb WHERE id = %s",
            (
                s.rows_scanned,
                s.rows_affected,
                s.bytes_written,
                s.objects,
                json.dumps(progress, default=str),
                self.run_id,
            ),
        )
        if time.monotonic() - self._last_log >= 5:
            self._last_log = time.monotonic()
            log.info(
                "pipeline_progress",
                pipeline=self.policy.name,
                run_id=self.run_id,
                rows_affected=s.rows_affected,
                expected=self.expected,
                batches=s.batches,
            )


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
        from pipelines.archive import remove_orphan, write_manifest

        # A run that died, or failed after an upload (read-back mismatch, storage-class move or
        # catalogue insert failing) and could not remove its object then, left it pending: its
        # rows are still in Postgres, so the object goes before they are archived again (unless
        # a committed batch, of that run or a later one, owns that key). A storage error here
        # stops this run: archiving again beside an orphan would store those rows twice.
        leftovers = meta.execute(
            "SELECT id, progress->>'pending' FROM pipeline_runs WHERE pipeline = %s "
            "AND status IN ('interrupted', 'failed') AND progress ? 'pending' ORDER BY id",
            (policy.name,),
        ).fetchall()
        for run_id, pending in leftovers:
            remove_orphan(meta, settings, pending, pipeline=policy.name, run_id=run_id)
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
    return ids


def clear_pending(meta: psycopg.Connection[Any], run_id: int) -> None:
    meta.execute(
        "UPDATE pipeline_runs SET progress = progress - 'pending' WHERE id = %s", (run_id,)
    )


def _remove_failed_upload(
    meta: psycopg.Connection[Any], settings: Settings, policy: Policy, run_id: int
) -> None:
    """Best effort, in the failure handler: the object of the batch that did not commit."""
    from pipelines.archive import remove_orphan

    row = meta.execute(
        "SELECT progress->>'pending' FROM pipeline_runs WHERE id = %s", (run_id,)
    ).fetchone()
    pending = row[0] if row else None
    if not pending:
        return
    try:
        remove_orphan(meta, settings, pending, pipeline=policy.name, run_id=run_id)
    except Exception as exc:  # storage may be what failed; the next run's _recover retries
        log.warning(
            "archive_orphan_removal_deferred", run_id=run_id, key=pending, error=_describe(exc)
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
) -> RunResult:
    """Run one policy now. Raises PipelineBusy if it is already running; records any failure
    in its ``pipeline_runs`` row and re-raises it."""
    settings = settings or get_settings()
    policy = policy or get_policy(name, settings)
    now = now or datetime.now(UTC)
    with connect(settings) as meta, connect(settings) as work:
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
        if not dry_run:
            _recover(meta, policy, settings)
        row = meta.execute(
            "INSERT INTO pipeline_runs (pipeline, tick, dry_run) VALUES (%s, %s, %s) RETURNING id",
            (policy.name, tick, dry_run),
        ).fetchone()
        assert row is not None
        ctx = RunContext(
            policy=policy,
            settings=settings,
            meta=meta,
            work=work,
            run_id=row[0],
            now=now,
            dry_run=dry_run,
            progress=progress,
            after_batch=after_batch,
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
                from pipelines.archive import write_manifest

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
        manifest_key = None
        if policy.action == "archive" and not dry_run:
            from pipelines.archive import write_manifest

            manifest_key = write_manifest(meta, settings, policy, ctx.run_id)
        meta.execute(
            "UPDATE pipeline_runs SET status = 'succeeded', finished_at = now(), "
            "rows_scanned = %s, rows_affected = %s, bytes_written = %s, objects = %s, "
            "progress = coalesce(progress, '{}'::jsonb) - 'pending' WHERE id = %s",
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
        from pipelines import purge

        return purge.run(ctx)
    if action == "archive":
        from pipelines import archive

        return archive.run(ctx)
    if action == "erase-users":
        from pipelines import gdpr

        return gdpr.run_erase_policy(ctx)
    if action == "partitions":
        from pipelines import purge

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
