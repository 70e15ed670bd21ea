"""`tidemill backup|wal|restore …`: backups, WAL archiving, point-in-time restore (issue #7).

`wal push` / `wal fetch` are run by the Postgres server itself (archive_command,
restore_command), once per WAL segment: they import only what they use.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import cli_settings, fail, friendly_errors, require_services
from core.log import get_logger

app = typer.Typer(help="Logical and physical backups.", no_args_is_help=True)
wal_app = typer.Typer(help="WAL archiving (archive_command).", no_args_is_help=True)
log = get_logger("tidemill.backup")

# restore_command exit status for "cannot tell": PostgreSQL aborts recovery on a status > 125
# (1 would mean "not archived", i.e. the end of the archive, and recovery would promote early).
WAL_FETCH_ABORT = 255

StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage", help="storage URL (file://PATH or s3://BUCKET/PREFIX); default: STORAGE_URL"
    ),
]


def _storage(url: str | None, settings: Any) -> Any:
    from core.storage import StorageError, open_storage

    try:
        return open_storage(url, settings=settings)
    except StorageError as exc:
        fail(str(exc))


def _guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Backup errors and storage errors: one line, exit 1 (the log line has the details)."""
    from core.envelope import EnvelopeError
    from core.storage import StorageError
    from pipelines.backups.logical import BackupError

    try:
        return fn(*args, **kwargs)
    except (BackupError, StorageError, EnvelopeError) as exc:
        log.error("backup_command_failed", step=fn.__name__, error=str(exc))
        fail(str(exc), code=1)


def parse_time(raw: str) -> datetime:
    """ISO 8601; a time without an offset is UTC."""
    text = raw.strip().replace("Z", "+00:00").replace("z", "+00:00")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        log.warning("restore_bad_time", value=raw[:40])
        fail(f"--to {raw!r} is not a time; use ISO 8601, e.g. 2026-11-23T14:05:00Z")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _age(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "-"
    seconds = int((now - moment).total_seconds())
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


# --------------------------------------------------------------------------------------- backup


@app.command("full")
@friendly_errors
def full_command(
    storage: StorageOpt = None,
    reason: Annotated[str, typer.Option(help="recorded in the manifest")] = "manual",
) -> None:
    """Logical backup: pg_dump (custom format) | zstd -> storage, manifest written last."""
    from pipelines.backups.logical import run_full_backup

    settings = cli_settings()
    require_services(settings, broker=False)
    result = _guarded(run_full_backup, settings, storage=_storage(storage, settings), reason=reason)
    print(
        f"{result.folder}: {_size(result.size)} in {result.duration_s:.1f}s, "
        f"sha256 {result.sha256[:16]}…, {len(result.manifest['tables'])} tables"
    )


@app.command("base")
@friendly_errors
def base_command(
    incremental: Annotated[
        bool, typer.Option("--incremental", help="against the latest full base (PG 17+)")
    ] = False,
    storage: StorageOpt = None,
) -> None:
    """Physical base backup: pg_basebackup (tar) | zstd -> storage, for point-in-time restore."""
    from pipelines.backups.physical import run_base_backup

    settings = cli_settings()
    require_services(settings, broker=False)
    result = _guarded(
        run_base_backup,
        settings,
        storage=_storage(storage, settings),
        incremental=incremental,
        reason="manual",
    )
    print(
        f"{result.folder}: {_size(result.size)} in {result.duration_s:.1f}s, "
        f"WAL from {result.manifest['wal_start']}"
    )


@app.command("list")
@friendly_errors
def list_command(
    storage: StorageOpt = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="hash every object now (reads everything)")
    ] = False,
) -> None:
    """Every backup in storage: kind, size, age, checksum status. Incomplete ones say so."""
    from rich.console import Console
    from rich.table import Table

    from core.storage import StorageError
    from pipelines.backups.logical import BackupError, catalog, catalogue_rows, verify_entry

    settings = cli_settings()
    store = _storage(storage, settings)
    entries = _guarded(catalog, store)
    rows: dict[str, Any] = {}
    if settings.database_url:
        try:
            rows = catalogue_rows(settings.database_url)
        except Exception as exc:  # the list still works from storage alone
            log.warning("backup_catalogue_unavailable", error=str(exc))
    now = datetime.now(UTC)
    table = Table()
    for column in ("backup", "kind", "size", "age", "data as of", "checksum"):
        table.add_column(column, no_wrap=True)
    bad = 0
    for entry in entries:
        if not entry.complete:
            status = "INCOMPLETE (no manifest): not restorable"
        else:
            assert entry.manifest is not None
            row = rows.get(entry.manifest["objects"][0]["key"])
            status = (
                f"verified {_age(row['verified_at'], now)} ago"
                if row and row.get("verified_at")
                else "recorded, not verified"
            )
            cold = _cold_class(entry.manifest)
            if verify and cold:
                status = f"cold ({cold}), not verifiable"
            elif verify:
                try:
                    verify_entry(store, entry, settings=settings)
                    status = "verified now"
                except BackupError as exc:
                    status = f"BAD: {exc}"
                    bad += 1
                except StorageError as exc:  # one unreadable backup must not end the list
                    log.warning("backup_verify_failed", folder=entry.folder, error=str(exc))
                    if "InvalidObjectState" in str(exc):
                        status = "cold, not verifiable"
                    else:
                        status = f"CANNOT VERIFY: {_one_line(exc)}"
                        bad += 1
                except FileNotFoundError as exc:
                    status = f"BAD: object missing: {_one_line(exc)}"
                    bad += 1
        data_at = entry.data_at
        table.add_row(
            entry.folder.removeprefix("backups/"),
            entry.kind,
            _size(entry.size),
            _age(entry.started_at, now),
            f"{data_at:%Y-%m-%d %H:%M:%S}" if data_at else "-",
            status,
        )
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    good = sum(1 for e in entries if e.complete)
    print(f"{good} complete, {len(entries) - good} incomplete")
    if bad:
        raise typer.Exit(1)


_COLD_CLASSES = ("GLACIER", "DEEP_ARCHIVE")  # GLACIER_IR is readable at once: not cold


def _cold_class(manifest: dict[str, Any]) -> str | None:
    """The cold storage class a backup's objects were moved to (retention records it), if any."""
    for obj in manifest.get("objects", []):
        cls = obj.get("storage_class")
        if cls in _COLD_CLASSES:
            return str(cls)
    return None


@app.command("verify")
@friendly_errors
def verify_command(
    storage: StorageOpt = None,
    wal: Annotated[
        bool, typer.Option("--wal/--no-wal", help="also check the WAL archive and its chain")
    ] = True,
) -> None:
    """Check every backup object against its manifest and the WAL chain for damage and gaps
    (from each base backup's start to the newest segment); names each bad object, exit 1."""
    from pipelines.backups.verify import verify_storage

    settings = cli_settings(adopt_running=False)
    report = _guarded(
        verify_storage,
        _storage(storage, settings),
        check_wal=wal,
        database_url=settings.database_url,
    )
    for line in report.describe():
        print(line)
    print(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@app.command("prune")
@friendly_errors
def prune_command(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan only")] = False,
    storage: StorageOpt = None,
) -> None:
    """Retention: fulls 30 d (cold storage on s3), incrementals 7 d, WAL 7 d (never what the
    oldest kept base backup needs)."""
    from pipelines.backups.retention import run_retention

    settings = cli_settings()
    plan = _guarded(run_retention, settings, storage=_storage(storage, settings), dry_run=dry_run)
    for line in plan.describe():
        print(line)
    print("(dry run: nothing changed)" if dry_run else "done")


@app.command("drill")
@friendly_errors
def drill_command(
    backup: Annotated[
        str | None, typer.Option(help="backup folder or id; default: the latest full")
    ] = None,
    storage: StorageOpt = None,
    physical: Annotated[
        bool,
        typer.Option(
            "--physical",
            help="drill the latest base backup instead: restore it into a scratch cluster "
            "(to the backup's own end), start it, count every table",
        ),
    ] = False,
) -> None:
    """Restore drill: verify and restore the latest full backup into a scratch database,
    compare row counts with the manifest, record RTO / RPO in backup_drills."""
    from pipelines.backups.drill import run_drill

    settings = cli_settings()
    require_services(settings, broker=False)
    result = _guarded(
        run_drill,
        settings,
        storage=_storage(storage, settings),
        ref=backup,
        physical=physical,
    )
    print(result.summary())
    if result.status != "passed":
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------ wal


@wal_app.command("push")
def wal_push_command(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="%p: the file to archive")],
    name: Annotated[str, typer.Argument(metavar="NAME", help="%f: its WAL file name")],
    storage: StorageOpt = None,
) -> None:
    """archive_command: store one WAL file (idempotent; refuses different content)."""
    from pipelines.backups.physical import push_wal

    settings = cli_settings(adopt_running=False)
    store = _storage(storage, settings)
    _guarded(push_wal, store, path, name, level=settings.backup_zstd_level)


@wal_app.command("fetch")
def wal_fetch_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="%f: the WAL file wanted")],
    path: Annotated[Path, typer.Argument(metavar="PATH", help="%p: where to put it")],
    storage: StorageOpt = None,
) -> None:
    """restore_command: exit 0 with the file in place, 1 only when the archive lacks it, and
    255 on anything else (storage unreachable or denied, a corrupt or unreadable object, a
    local write error), so that recovery aborts instead of taking the failure for the end of
    the archive and promoting early. PostgreSQL aborts recovery on an exit status above 125."""
    try:
        from pipelines.backups.physical import fetch_wal

        settings = cli_settings(adopt_running=False)
        store = _storage(storage, settings)
        found = fetch_wal(store, name, path)
    except typer.Exit as exc:
        if exc.exit_code == 0:
            raise
        # e.g. a bad STORAGE_URL: the message is already printed; still abort recovery
        raise typer.Exit(WAL_FETCH_ABORT) from None
    except Exception as exc:
        log.error("wal_fetch_failed", wal=name, error=f"{type(exc).__name__}: {exc}")
        fail(f"wal fetch {name}: {_one_line(exc)}", code=WAL_FETCH_ABORT)
    if not found:
        raise typer.Exit(1)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# -------------------------------------------------------------------------------------- restore


@friendly_errors
def restore_command(
    to: Annotated[
        str | None,
        typer.Option("--to", metavar="TIME", help="ISO 8601 (UTC if no offset); default: latest"),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="new data directory (must not exist or be empty)"),
    ] = None,
    port: Annotated[int | None, typer.Option(help="port of the restored server")] = None,
    start: Annotated[bool, typer.Option("--start/--no-start", help="start it")] = True,
    storage: StorageOpt = None,
    logical: Annotated[
        bool,
        typer.Option("--logical", help="restore a logical backup (pg_dump) as a database instead"),
    ] = False,
    backup: Annotated[
        str | None, typer.Option(help="--logical: backup folder or id; default: the newest")
    ] = None,
    database: Annotated[
        str | None, typer.Option(help="--logical: the database to create (or --replace)")
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="--logical: replace an existing database")
    ] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="--logical: parallel jobs")] = 1,
    no_owner: Annotated[
        bool, typer.Option("--no-owner", help="--logical: do not restore object owners")
    ] = False,
    no_privileges: Annotated[
        bool, typer.Option("--no-privileges", help="--logical: do not restore grants")
    ] = False,
    no_roles: Annotated[
        bool, typer.Option("--no-roles", help="--logical: do not create the backup's roles")
    ] = False,
) -> None:
    """Point-in-time restore: a base backup (+ incremental) and archived WAL up to TIME, into a
    new data directory, then start it (it keeps running; the command prints how to stop it).
    With --logical: a logical backup restored as a database (new, or --replace), with its
    roles, owners and grants."""
    from core.proc import free_port
    from pipelines.backups.restore import restore_database, restore_to_time

    if logical:
        settings = cli_settings()
        require_services(settings, broker=False)
        if not database:
            fail("--logical needs --database NAME (new, or existing with --replace)")
        if jobs < 1:
            fail("--jobs must be at least 1")
        done = _guarded(
            restore_database,
            settings,
            database=database,
            ref=backup,
            replace=replace,
            jobs=jobs,
            owners=not no_owner,
            privileges=not no_privileges,
            roles=not no_roles,
            storage=_storage(storage, settings),
        )
        for line in done.describe():
            print(line)
        return
    settings = cli_settings(adopt_running=False)
    target = parse_time(to) if to else None
    directory = data_dir or settings.data_dir / f"restore-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    result = _guarded(
        restore_to_time,
        settings,
        target=target,
        data_dir=directory,
        port=port or free_port(),
        start=start,
        storage=_storage(storage, settings),
    )
    for line in result.describe():
        print(line)


def backup_before_migrate(settings: Any, revision: str) -> None:
    """`tidemill migrate` with TIDEMILL_BACKUP_BEFORE_MIGRATE: a logical backup first; if it
    fails, the migration does not run (exit 1)."""
    from pipelines.backups.logical import run_full_backup

    result = _guarded(run_full_backup, settings, reason=f"before migrate to {revision}")
    print(f"backup before migrate: {result.folder} ({_size(result.size)})")
