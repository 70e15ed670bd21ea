"""What a pipeline action is handed: the run's context, its counters, its connections.

``archive``, ``purge`` and ``gdpr`` take a ``RunContext`` from here and ``engine`` builds it,
so the actions never import the engine and the engine imports them plainly: no import circle.

A dry run is a property of the context, not a branch of each action: a dry context's
connections are READ ONLY sessions (``default_transaction_read_only``), so any write an action
forgets to skip fails loudly instead of changing the database, and no run row is written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from core.log import get_logger
from core.settings import Settings
from db.engine import direct_url, libpq_url

if TYPE_CHECKING:
    from core.storage import Storage
    from pipelines.lifecycle.policies import Policy

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


def connect(settings: Settings, *, read_only: bool = False) -> psycopg.Connection[Any]:
    """An autocommit session on the database. ``read_only``: every transaction of the session
    is READ ONLY, so a dry run that forgot a branch fails with an error instead of writing."""
    if settings.database_url is None:
        from db.engine import ServiceUnreachable

        raise ServiceUnreachable("DATABASE_URL is unset and no embedded Postgres is running")
    # A session connection (DATABASE_DIRECT_URL): the pipeline's advisory lock and the dry
    # run's session-wide READ ONLY must not travel through a transaction-mode pooler.
    conn = psycopg.connect(libpq_url(direct_url(settings)), autocommit=True)
    if read_only:
        conn.execute("SET default_transaction_read_only = on")
    return conn


def read_only_database_url(database_url: str) -> str:
    """``database_url`` with every session read-only: for subprocesses of a dry run."""
    from urllib.parse import quote

    sep = "&" if "?" in database_url else "?"
    return f"{database_url}{sep}options={quote('-c default_transaction_read_only=on')}"


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
        by: str | None = None,
    ) -> None:
        self.policy = policy
        self.settings = settings
        self.meta = meta
        self.work = work
        self.run_id = run_id
        self.now = now
        self.dry_run = dry_run
        self.by = by  # who started the run (recorded on the run row and passed to erasures)
        self.stats = RunStats()
        self.expected: int | None = None
        self._progress = progress
        self._after_batch = after_batch
        self._storage: Storage | None = None
        self._last_log = time.monotonic()
        self._last_saved = 0.0

    @property
    def cutoff(self) -> datetime:
        return self.policy.cutoff(self.now)

    @property
    def storage(self) -> Storage:
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
        if self.dry_run:
            raise PipelineError("a dry run uploads nothing")
        self.meta.execute(
            "UPDATE pipeline_runs SET progress = coalesce(progress, '{}'::jsonb) || "
            "jsonb_build_object('pending', %s::text) WHERE id = %s",
            (key, self.run_id),
        )

    def note_pending_keys(self, keys: list[str]) -> None:
        """note_pending for objects that commit together (a whole partition's): all of them
        are named before the first upload starts; ``[]`` once they committed."""
        if self.dry_run:
            raise PipelineError("a dry run uploads nothing")
        self.meta.execute(
            "UPDATE pipeline_runs SET progress = coalesce(progress, '{}'::jsonb) || "
            "jsonb_build_object('pending_keys', %s::jsonb) WHERE id = %s",
            (json.dumps(keys), self.run_id),
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
        # once a second spares a commit per batch. A dry run has no row.
        if self.dry_run or time.monotonic() - self._last_saved < 1.0:
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
