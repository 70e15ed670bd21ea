"""Backup retention: plan (pure) then apply.

Seed Lovendo: daily fulls 30 days (moved to GLACIER on s3), hourly incrementals 7 days,
WAL 7 days. Rules, in ``plan_retention`` (no I/O, time is a parameter):

- complete logical fulls and full base backups older than the full retention expire, except
  the newest complete one of each kind (a stalled schedule must not prune the last backup);
- incrementals older than their retention expire, and so does one whose parent base is gone
  (it cannot be restored alone); a parent of a kept incremental is kept;
- archived WAL older than the WAL retention is deleted, but never a segment the PITR window
  needs: everything from the start of the base backup that anchors the window (the newest kept
  base at or before now - WAL retention, else the oldest kept base) is kept, as is the
  [start, end] range of every kept base (our tars carry that WAL too; belt and braces).
  ``.history`` files are never deleted;
- a folder without a manifest is incomplete: it never counts as a kept backup; after a day
  (long past any running backup) its objects are deleted;
- on s3, fulls older than ``TIDEMILL_BACKUP_COLD_AFTER_DAYS`` move to the cold storage class
  (the daily drill has restored them by then; a cold object needs an S3 restore first).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from core.log import get_logger
from core.settings import Settings, get_settings
from core.storage import ObjectInfo, Storage, open_storage
from db.engine import libpq_url
from pipelines.backups.logical import MANIFEST, CatalogEntry, catalog
from pipelines.backups.physical import WAL_PREFIX, wal_position

log = get_logger(__name__)

INCOMPLETE_GRACE = timedelta(days=1)


def profile_keep_days(settings: Settings, default: int = 30) -> int:
    """How long the served app keeps its full backups (its profile's `Backups.keep_days`)."""
    from apps import get_profile  # issue 14: the served app's backup plan

    backups = get_profile(settings.app).backups
    return backups.keep_days if backups is not None else default


@dataclass(frozen=True)
class RetentionPolicy:
    full_days: int = 30
    incremental_days: int = 7
    wal_days: int = 7
    cold_after_days: int = 1
    cold_storage_class: str = "GLACIER"

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        """The settings' windows; full backups follow the served app's profile (`keep_days`)
        unless TIDEMILL_BACKUP_FULL_RETENTION_DAYS says otherwise."""
        return cls(
            full_days=settings.backup_full_retention_days or profile_keep_days(settings),
            incremental_days=settings.backup_incremental_retention_days,
            wal_days=settings.wal_retention_days,
            cold_after_days=settings.backup_cold_after_days,
            cold_storage_class=settings.backup_cold_storage_class,
        )


@dataclass
class RetentionPlan:
    keep: list[CatalogEntry] = field(default_factory=list)
    expire: list[CatalogEntry] = field(default_factory=list)
    incomplete: list[CatalogEntry] = field(default_factory=list)
    delete_wal: list[str] = field(default_factory=list)
    wal_kept_from: str | None = None
    to_cold: list[CatalogEntry] = field(default_factory=list)
    swept_uploads: int = 0  # abandoned uploads removed (file:// temp files, s3 multipart)
    interrupted: int = 0  # catalogue rows 'running' for over a day, marked failed

    def describe(self) -> list[str]:
        lines = [f"keep {len(self.keep)} backup(s)"]
        lines += [
            f"expire {e.folder} ({e.kind}, started {e.started_at:%Y-%m-%d})" for e in self.expire
        ]
        lines += [f"delete incomplete {e.folder} (no manifest)" for e in self.incomplete]
        lines += [f"move {e.folder} to cold storage" for e in self.to_cold]
        if self.delete_wal:
            lines.append(
                f"delete {len(self.delete_wal)} WAL file(s): {self.delete_wal[0]} … "
                f"{self.delete_wal[-1]}"
            )
        lines.append(f"WAL kept from segment {self.wal_kept_from or '(all kept)'}")
        if self.swept_uploads:
            lines.append(f"removed {self.swept_uploads} abandoned upload(s)")
        if self.interrupted:
            lines.append(f"marked {self.interrupted} interrupted backup(s) failed")
        return lines


def plan_retention(
    entries: Sequence[CatalogEntry],
    wal: Sequence[ObjectInfo],
    *,
    now: datetime,
    policy: RetentionPolicy,
    cold_capable: bool = False,
) -> RetentionPlan:
    plan = RetentionPlan()
    full_cut = now - timedelta(days=policy.full_days)
    incr_cut = now - timedelta(days=policy.incremental_days)
    wal_cut = now - timedelta(days=policy.wal_days)
    complete = [e for e in entries if e.complete]
    for e in entries:
        if not e.complete and (e.modified or e.started_at) < now - INCOMPLETE_GRACE:
            plan.incomplete.append(e)

    kept: dict[str, CatalogEntry] = {}
    for kind in ("full", "base"):
        of_kind = sorted((e for e in complete if e.kind == kind), key=lambda e: e.started_at)
        for i, e in enumerate(of_kind):
            if e.started_at >= full_cut or i == len(of_kind) - 1:
                kept[e.folder] = e
    bases = {e.folder: e for e in complete if e.kind == "base"}
    for e in complete:
        if e.kind != "incremental" or e.started_at < incr_cut:
            continue
        assert e.manifest is not None
        parent = bases.get(e.manifest.get("parent") or "")
        if parent is not None:
            kept[e.folder] = e
            kept[parent.folder] = parent  # its incremental is useless without it
    plan.keep = sorted(kept.values(), key=lambda e: e.started_at)
    plan.expire = [e for e in complete if e.folder not in kept]

    # WAL: the window's anchor base and every kept base's own range stay.
    physical = [e for e in plan.keep if e.kind in ("base", "incremental") and e.manifest]
    protected: list[tuple[str, str]] = []
    for e in physical:
        assert e.manifest is not None
        start, end = e.manifest.get("wal_start"), e.manifest.get("wal_end")
        if start and end:
            protected.append((start[8:24], end[8:24]))
    anchors = [e for e in physical if e.kind == "base" and (e.data_at or now) <= wal_cut]
    anchor = anchors[-1] if anchors else (physical[0] if physical else None)
    if anchor is not None and anchor.manifest is not None and anchor.manifest.get("wal_start"):
        keep_from: str | None = anchor.manifest["wal_start"][8:24]
        plan.wal_kept_from = anchor.manifest["wal_start"]
    else:
        keep_from = None  # no base backup: WAL is all there is; keep it
    if keep_from is not None:
        for info in wal:
            position = wal_position(info.key)
            if position is None or position >= keep_from:
                continue
            if info.modified is None or info.modified >= wal_cut:
                continue
            if any(lo <= position <= hi for lo, hi in protected):
                continue
            plan.delete_wal.append(info.key)

    if cold_capable:
        cold_cut = now - timedelta(days=policy.cold_after_days)
        for e in plan.keep:
            if e.kind == "full" and e.started_at < cold_cut and e.manifest is not None:
                dump = e.manifest["objects"][0]
                if dump.get("storage_class") != policy.cold_storage_class:
                    plan.to_cold.append(e)
    return plan


def _catalogue_update(settings: Settings, query: str, keys: list[str], *extra: Any) -> None:
    if not keys or not settings.database_url:
        return
    try:
        with psycopg.connect(libpq_url(settings.database_url), autocommit=True) as conn:
            if conn.execute("SELECT to_regclass('backups') IS NOT NULL").fetchone() == (True,):
                conn.execute(query, (*extra, keys))
    except psycopg.Error as exc:  # storage is the truth; the catalogue catches up next time
        log.warning("backup_catalogue_update_failed", error=str(exc))


def apply_retention(storage: Storage, plan: RetentionPlan, *, settings: Settings) -> None:
    for e in plan.expire + plan.incomplete:
        # The manifest goes first: a half-deleted backup must never look complete.
        for key in sorted(e.objects, key=lambda k: not k.endswith(f"/{MANIFEST}")):
            storage.delete(key)
        log.info("backup_expired" if e.complete else "backup_incomplete_deleted", folder=e.folder)
    _catalogue_update(
        settings,
        "UPDATE backups SET status = 'expired' WHERE key = ANY(%s)",
        [k for e in plan.expire for k in e.objects],
    )
    _catalogue_update(
        settings,
        """UPDATE backups SET status = 'failed', finished_at = coalesce(finished_at, now()),
           error = coalesce(error, 'incomplete: no manifest') WHERE key = ANY(%s)
           AND status IN ('running', 'failed')""",
        [k for e in plan.incomplete for k in e.objects],
    )
    for key in plan.delete_wal:
        storage.delete(key)
    if plan.delete_wal:
        log.info("wal_pruned", files=len(plan.delete_wal), kept_from=plan.wal_kept_from)
    policy = RetentionPolicy.from_settings(settings)
    for e in plan.to_cold:
        assert e.manifest is not None
        dump = e.manifest["objects"][0]
        storage.set_storage_class(dump["key"], policy.cold_storage_class)
        dump["storage_class"] = policy.cold_storage_class
        storage.put_bytes(
            f"{e.folder}/{MANIFEST}", json.dumps(e.manifest, indent=2, sort_keys=True).encode()
        )
        _catalogue_update(
            settings,
            "UPDATE backups SET storage_class = %s WHERE key = ANY(%s)",
            [dump["key"]],
            policy.cold_storage_class,
        )
        log.info("backup_moved_to_cold", folder=e.folder, storage_class=policy.cold_storage_class)


def run_retention(
    settings: Settings | None = None,
    *,
    storage: Storage | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
) -> RetentionPlan:
    from core.storage import S3Storage

    settings = settings or get_settings()
    storage = storage or open_storage(settings=settings)
    plan = plan_retention(
        catalog(storage),
        list(storage.list(WAL_PREFIX)),
        now=now or datetime.now(UTC),
        policy=RetentionPolicy.from_settings(settings),
        cold_capable=isinstance(storage, S3Storage),
    )
    log.info(
        "backup_retention_planned",
        dry_run=dry_run,
        keep=len(plan.keep),
        expire=len(plan.expire),
        incomplete=len(plan.incomplete),
        wal=len(plan.delete_wal),
        cold=len(plan.to_cold),
    )
    if not dry_run:
        apply_retention(storage, plan, settings=settings)
        # Crashed uploads: a file:// temp file the size of the object, or an s3 multipart
        # upload whose parts are billed, neither visible to list() nor counted above.
        plan.swept_uploads = storage.sweep_incomplete(INCOMPLETE_GRACE)
        if plan.swept_uploads:
            log.info("backup_abandoned_uploads_removed", count=plan.swept_uploads)
        plan.interrupted = mark_interrupted(settings, before=(now or datetime.now(UTC)))
    return plan


def mark_interrupted(settings: Settings, *, before: datetime) -> int:
    """Catalogue rows still 'running' more than a day before ``before``: the process that
    owned them died (a backup that long would have failed or finished). Marked failed."""
    if not settings.database_url:
        return 0
    try:
        with psycopg.connect(libpq_url(settings.database_url), autocommit=True) as conn:
            if conn.execute("SELECT to_regclass('backups') IS NOT NULL").fetchone() != (True,):
                return 0
            cur = conn.execute(
                """UPDATE backups SET status = 'failed', finished_at = coalesce(finished_at, now()),
                   error = coalesce(error, 'interrupted')
                   WHERE status = 'running' AND started_at < %s""",
                (before - INCOMPLETE_GRACE,),
            )
            count = cur.rowcount
    except psycopg.Error as exc:  # storage is the truth; the catalogue catches up next time
        log.warning("backup_catalogue_update_failed", error=str(exc))
        return 0
    if count:
        log.warning("backup_interrupted_marked_failed", count=count)
    return count
