"""Actor family: backups. Thin: the tick comes in, a pipeline function does the work.

The backup functions keep their own connections (the catalogue row must commit on its own,
and a failure must be recorded even though the message fails), so the unit of work is unused.
"""

from __future__ import annotations

from core.log import get_logger
from db.engine import UnitOfWork
from workers.base import PermanentError, actor

log = get_logger(__name__)

# A dump or base backup of a large database runs for a long time; the default 10-minute limit
# would interrupt every one of them.
BACKUP_TIME_LIMIT_MS = 6 * 3600 * 1000


class BackupRejected(PermanentError):
    """A backup that retrying cannot help (e.g. incremental asked of PostgreSQL 16)."""


@actor(queue_name="backups", time_limit=BACKUP_TIME_LIMIT_MS, max_retries=2)
def backup_full(uow: UnitOfWork, tick: str | None = None) -> None:
    from pipelines.backups.logical import BackupBusy, run_full_backup

    try:
        run_full_backup(reason=f"tick {tick}" if tick else "manual")
    except BackupBusy:
        log.info("backup_tick_skipped_busy", kind="full", tick=tick)


@actor(queue_name="backups", time_limit=BACKUP_TIME_LIMIT_MS, max_retries=2)
def backup_base(uow: UnitOfWork, tick: str | None = None, incremental: bool = False) -> None:
    from pipelines.backups.logical import BackupError
    from pipelines.backups.physical import IncrementalUnavailable, NoParentBase, run_base_backup

    reason = f"tick {tick}" if tick else "manual"
    try:
        run_base_backup(incremental=incremental, reason=reason)
    except NoParentBase as exc:
        # The first hourly tick after a fresh start (or after pruning): a full base backup is
        # the restore point the next incrementals will be relative to.
        log.warning("backup_incremental_fell_back_to_full", reason=str(exc), tick=tick)
        try:
            run_base_backup(incremental=False, reason=reason)
        except BackupError as again:
            raise BackupRejected(str(again)) from None
    except IncrementalUnavailable as exc:
        # PostgreSQL < 17 or summarize_wal off: an hourly *full* base backup would be far too
        # heavy; WAL archiving already keeps the RPO, so this tick does nothing, loudly.
        log.warning("backup_incremental_unavailable", reason=str(exc), tick=tick)


@actor(queue_name="backups", time_limit=BACKUP_TIME_LIMIT_MS, max_retries=0)
def backup_drill(uow: UnitOfWork, tick: str | None = None) -> None:
    from pipelines.backups.drill import run_drill

    # A failed drill is recorded (backup_drills) and logged by run_drill; retrying the same
    # backup would only repeat it, so the message succeeds either way.
    run_drill()


@actor(queue_name="backups", max_retries=2)
def backup_prune(uow: UnitOfWork, tick: str | None = None) -> None:
    from pipelines.backups.retention import run_retention

    run_retention()
