"""The restore drill: a backup nobody has restored is a hope, not a backup.

Daily: take the latest complete logical backup, hash it against its manifest, restore it into
a scratch database on the same server, count every table's rows and compare with the counts
the manifest recorded (taken in the dump's own snapshot, so they must match exactly), then
drop the scratch database. The measured restore time (RTO) and the age of the restored data
(RPO) go into ``backup_drills``; a failed drill is a row with status 'failed' (the dashboard's
metric) and an error log line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from core.log import get_logger
from core.settings import Settings, get_settings
from core.storage import Storage, open_storage
from db.engine import direct_url, libpq_url
from pipelines.backups.logical import (
    BackupError,
    CatalogEntry,
    catalog,
    count_rows,
    find_backup,
    restore_logical,
    table_checksums,
)

log = get_logger(__name__)


@dataclass
class DrillResult:
    drill_id: int | None
    status: str  # passed | failed
    backup: str | None
    restore_seconds: float | None = None
    data_age_seconds: float | None = None
    tables_checked: int = 0
    mismatches: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    kind: str = "logical"  # or "physical": a base backup restored into a scratch cluster
    checksums: dict[str, Any] = field(default_factory=dict)  # of the restored copy
    verify_problems: list[str] = field(default_factory=list)  # from `backup verify`

    def summary(self) -> str:
        if self.status == "passed" and self.kind == "physical":
            return (
                f"physical drill passed: {self.backup} restored and started in "
                f"{self.restore_seconds:.1f}s (RTO), data {self.data_age_seconds:.0f}s old "
                f"(RPO), {self.tables_checked} tables counted"
            )
        if self.status == "passed":
            return (
                f"drill passed: {self.backup} restored in {self.restore_seconds:.1f}s "
                f"(RTO), data {self.data_age_seconds:.0f}s old (RPO), "
                f"{self.tables_checked} tables match (rows and checksums), verify OK"
            )
        detail = self.error or f"{len(self.mismatches)} table(s) differ: {self.mismatches}"
        return f"drill FAILED on {self.backup or '(no backup)'}: {detail}"


def compare_counts(expected: dict[str, int], actual: dict[str, int]) -> dict[str, Any]:
    """Tables whose restored row count differs from the manifest (missing ones too)."""
    mismatches: dict[str, Any] = {}
    for table in sorted(set(expected) | set(actual)):
        want, got = expected.get(table), actual.get(table)
        if want != got:
            mismatches[table] = {"expected": want, "actual": got}
    return mismatches


def _scratch_url(database_url: str, name: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(libpq_url(database_url))
    return parts._replace(path=f"/{name}").geturl()


def run_drill(
    settings: Settings | None = None,
    *,
    storage: Storage | None = None,
    ref: str | None = None,
    database_url: str | None = None,
    physical: bool = False,
) -> DrillResult:
    """Run one drill and record it; never raises for a failed drill (it is a result).

    ``physical``: drill the latest base backup (+ its incremental, if newer) instead: restore
    it into a scratch cluster up to the backup's own end, check it starts and promotes, count
    every table (compared with the manifest when it has counts; base manifests usually do
    not). ``backup_drills`` has no kind column: such a drill's row carries
    ``{"drill": "physical"}`` in ``mismatches`` (its backup_id also points at a base)."""
    if physical and ref is not None:
        raise BackupError("--physical drills the latest base backup; --backup is for logical")
    settings = settings or get_settings()
    storage = storage or open_storage(settings=settings)
    database_url = database_url or (settings.database_url and direct_url(settings))
    if not database_url:
        raise BackupError("DATABASE_URL is unset and no embedded Postgres is running")
    drill_started = datetime.now(UTC)
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO backup_drills (status) VALUES ('running') RETURNING id"
        ).fetchone()
    assert row is not None
    drill_id = int(row[0])
    result = DrillResult(
        drill_id=drill_id,
        status="failed",
        backup=None,
        kind="physical" if physical else "logical",
    )
    entry: CatalogEntry | None = None
    try:
        if physical:
            from pipelines.backups.restore import plan_restore

            chain = plan_restore(catalog(storage, kinds=("base", "incremental")), None)
            entry = chain[-1]
            result.backup = " + ".join(e.folder for e in chain)
            actual = _physical_restore(settings, storage, result, drill_id)
        else:
            entry = _pick(storage, ref)
            result.backup = entry.folder
            actual = _logical_restore(storage, entry, result, database_url, drill_id)
        _finish_counts(result, entry, actual, drill_started, need_counts=not physical)
        _compare_checksums(result, entry)
        _run_verify(result, storage)
    except Exception as exc:  # a failed drill is recorded, not raised
        result.status = "failed"
        result.error = str(exc) or type(exc).__name__
    _record(database_url, result, entry, notes={"drill": "physical"} if physical else None)
    if result.status == "passed":
        log.info(
            "backup_drill_passed",
            drill_id=drill_id,
            kind=result.kind,
            backup=result.backup,
            restore_seconds=round(result.restore_seconds or 0, 3),
            data_age_seconds=round(result.data_age_seconds or 0, 1),
            tables_checked=result.tables_checked,
        )
    else:
        log.error(
            "backup_drill_failed",
            drill_id=drill_id,
            kind=result.kind,
            backup=result.backup,
            error=result.error,
            mismatches=result.mismatches or None,
        )
    return result


def _logical_restore(
    storage: Storage, entry: CatalogEntry, result: DrillResult, database_url: str, drill_id: int
) -> dict[str, int]:
    """Restore a logical backup into a scratch database, count its rows, drop it."""
    scratch = f"tidemill_drill_{drill_id}"
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(scratch))
        )
    try:
        target = _scratch_url(database_url, scratch)
        result.restore_seconds = restore_logical(storage, entry, target)
        assert entry.manifest is not None
        with psycopg.connect(target) as conn:
            sums = table_checksums(conn, sample=int(entry.manifest.get("checksum_sample") or 1))
        result.checksums = {name: c["sum"] for name, c in sums.items()}
        # GDPR (#15): the erasures recorded since the backup, as on every restore; after the
        # checksums, so they still check the backup against its manifest.
        from db.schema import role_search_path_sql
        from pipelines.lifecycle.gdpr import reapply_erasures

        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute(role_search_path_sql())  # the role's search_path is not in the dump
        reapply_erasures(target, since=entry.started_at, storage=storage)
        return {name: c["rows"] for name, c in sums.items()}
    finally:
        with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(scratch))
            )


def _physical_restore(
    settings: Settings, storage: Storage, result: DrillResult, drill_id: int
) -> dict[str, int]:
    """Restore the latest base (+ incremental) into a scratch cluster up to its consistent
    end, start it, count every table; the scratch cluster is removed whatever happens."""
    import shutil
    import tempfile
    from pathlib import Path

    from core.proc import free_port
    from pipelines.backups.restore import restore_to_time, stop_restored

    scratch = Path(tempfile.mkdtemp(prefix=f"tidemill-drill-{drill_id}-"))
    data_dir = scratch / "pgdata"
    try:
        restored = restore_to_time(
            settings,
            target=None,
            data_dir=data_dir,
            port=free_port(),
            storage=storage,
            immediate=True,
        )
        result.restore_seconds = restored.seconds
        with psycopg.connect(restored.url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            if row != (False,):
                raise BackupError("the restored cluster did not leave recovery")
            actual = count_rows(conn)
    finally:
        if (data_dir / "postmaster.pid").exists():  # started, even if it then failed
            stop_restored(data_dir)
        shutil.rmtree(scratch, ignore_errors=True)
    return actual


def _finish_counts(
    result: DrillResult,
    entry: CatalogEntry,
    actual: dict[str, int],
    drill_started: datetime,
    *,
    need_counts: bool = True,
) -> None:
    """Compare with the manifest's counts (a base backup's manifest has none: then the drill
    checks that every table could be counted on the started cluster)."""
    assert entry.manifest is not None
    counts = entry.manifest["tables"] if need_counts else entry.manifest.get("tables") or {}
    expected = {k: int(v) for k, v in counts.items()}
    result.tables_checked = len(expected) if expected else len(actual)
    result.mismatches = compare_counts(expected, actual) if expected else {}
    data_at = entry.data_at
    result.data_age_seconds = (drill_started - data_at).total_seconds() if data_at else None
    result.status = "failed" if result.mismatches else "passed"
    if result.mismatches:
        result.error = f"row counts differ in {len(result.mismatches)} table(s)"


def _compare_checksums(result: DrillResult, entry: CatalogEntry) -> None:
    """Contents, not only counts: every table's checksum against the one taken in the dump's
    snapshot (manifests from before checksums existed have none: counts only)."""
    assert entry.manifest is not None
    expected = entry.manifest.get("checksums") or {}
    if not expected or not result.checksums:
        return
    differ = {
        table: {"expected_checksum": want, "actual_checksum": result.checksums.get(table)}
        for table, want in expected.items()
        if result.checksums.get(table) != want
    }
    if differ:
        result.mismatches.update(differ)
        result.status = "failed"
        result.error = f"table contents differ in {len(differ)} table(s)"


def _run_verify(result: DrillResult, storage: Storage) -> None:
    """The drill also runs `backup verify`: every other backup and the WAL chain."""
    from pipelines.backups.verify import verify_storage

    report = verify_storage(storage)
    result.verify_problems = [p.line() for p in report.problems]
    if report.problems and result.status == "passed":
        result.status = "failed"
        result.error = f"backup verify found {len(report.problems)} problem(s): " + "; ".join(
            result.verify_problems[:3]
        )


def _pick(storage: Storage, ref: str | None) -> CatalogEntry:
    if ref is not None:
        entry = find_backup(storage, ref)
        if entry.kind != "full":
            raise BackupError(f"{entry.folder} is not a logical backup; the drill restores fulls")
        if not entry.complete:
            raise BackupError(f"{entry.folder} has no manifest; it is not a usable backup")
        return entry
    fulls = [e for e in catalog(storage, kinds=("full",)) if e.complete]
    if not fulls:
        raise BackupError("no complete logical backup in storage to drill")
    return fulls[-1]


def _record(
    database_url: str,
    result: DrillResult,
    entry: CatalogEntry | None,
    *,
    notes: dict[str, Any] | None = None,
) -> None:
    backup_id = entry.manifest.get("backup_id") if entry and entry.manifest else None
    recorded = {**(notes or {}), **result.mismatches}
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute(
            """UPDATE backup_drills SET
                 backup_id = (SELECT id FROM backups WHERE id = %(backup_id)s),
                 finished_at = now(), status = %(status)s,
                 restore_seconds = %(restore_seconds)s, data_age_seconds = %(data_age)s,
                 tables_checked = %(tables)s, mismatches = %(mismatches)s, error = %(error)s,
                 checksums = %(checksums)s, verify_problems = %(verify_problems)s
               WHERE id = %(id)s""",
            {
                "backup_id": backup_id,
                "status": result.status,
                "restore_seconds": result.restore_seconds,
                "data_age": result.data_age_seconds,
                "tables": result.tables_checked,
                "mismatches": Jsonb(recorded) if recorded else None,
                "error": result.error[:2000] if result.error else None,
                "checksums": Jsonb(result.checksums) if result.checksums else None,
                "verify_problems": Jsonb(result.verify_problems),
                "id": result.drill_id,
            },
        )
        if result.status == "passed" and backup_id is not None:
            # The drill hashed every object: the backup is verified as of now.
            conn.execute("UPDATE backups SET verified_at = now() WHERE id = %s", (backup_id,))


def latest_drill_age(database_url: str) -> float | None:
    """Seconds since the last passed drill (None: never); for checks and the dashboard."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        row = conn.execute(
            """SELECT extract(epoch FROM now() - max(finished_at)) FROM backup_drills
               WHERE status = 'passed'"""
        ).fetchone()
    return float(row[0]) if row and row[0] is not None else None
