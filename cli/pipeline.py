"""`tidemill pipeline|archive|gdpr …`: data-lifecycle commands (issue #5)."""

from __future__ import annotations

import getpass
import json
import sys
from typing import Annotated, Any

import typer

from cli.common import cli_settings, fail, friendly_errors, require_services

app = typer.Typer(help="Data-lifecycle pipelines: list, run, history.", no_args_is_help=True)
archive_app = typer.Typer(help="Archived rows in object storage.", no_args_is_help=True)
gdpr_app = typer.Typer(help="GDPR erase and export.", no_args_is_help=True)

ByOpt = Annotated[str | None, typer.Option("--by", help="who is acting (default: cli:<os user>)")]


def _by(by: str | None) -> str:
    return by or f"cli:{getpass.getuser()}"


def _console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


@app.command("list")
@friendly_errors
def list_command(
    check: Annotated[
        bool, typer.Option(help="also check tables, columns and filters against the database")
    ] = True,
) -> None:
    """Every retention policy: table, action, age, schedule, batch size, storage class."""
    from rich.table import Table

    from pipelines.lifecycle.policies import PolicyError, check_against_database, load_policies

    settings = cli_settings()
    try:
        policies = load_policies(settings)
    except PolicyError as exc:
        fail(str(exc))
    problems: dict[str, str] = {}
    if check:
        require_services(settings, broker=False, redis=False)
        from pipelines.lifecycle.engine import connect

        with connect(settings) as conn:
            for p in policies:
                try:
                    check_against_database([p], conn)
                except PolicyError as exc:
                    problems[p.name] = str(exc)
    table = Table()
    for column in ("name", "action", "table", "age", "schedule", "batch", "storage"):
        table.add_column(column, no_wrap=True)
    table.add_column("check", overflow="fold")
    for p in policies:
        age = (
            f"{p.age_column} > {p.age.text}"
            if p.action != "partitions"
            else (f"{p.months_ahead} months ahead")
        )
        table.add_row(
            p.name,
            p.action,
            p.table,
            age,
            f"{p.schedule} {p.timezone}",
            str(p.batch_size),
            f"{p.storage_class or '-'} {p.format if p.action == 'archive' else ''}".strip(),
            problems.get(p.name, "ok" if check else "-"),
        )
    _console().print(table)
    print(f"{len(policies)} pipeline(s)")
    if problems:
        raise typer.Exit(1)


@app.command("run")
@friendly_errors
def run_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="pipeline name (see `list`)")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the plan, change nothing")
    ] = False,
    batch_size: Annotated[
        int | None, typer.Option(help="override the policy's batch size", min=1)
    ] = None,
    by: ByOpt = None,
) -> None:
    """Run one pipeline now, with a progress bar; --dry-run prints what it would do."""
    import dataclasses

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from core.storage import StorageError
    from pipelines.lifecycle.engine import PipelineBusy, run_pipeline
    from pipelines.lifecycle.policies import PolicyError, UnknownPipeline, get_policy

    settings = cli_settings()
    require_services(settings, broker=False, redis=False)
    try:
        policy = get_policy(name, settings)
    except (UnknownPipeline, PolicyError) as exc:
        fail(str(exc))
    if batch_size:
        policy = dataclasses.replace(policy, batch_size=batch_size)
    if policy.action == "erase-users":
        require_services(settings, broker=False)  # erasing also removes Redis keys
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
        disable=dry_run or not sys.stderr.isatty(),
        console=None,
    ) as bar:
        task = bar.add_task(name, total=None)

        def progress(done: int, expected: int | None) -> None:
            bar.update(task, completed=done, total=expected)

        try:
            result = run_pipeline(
                name,
                settings=settings,
                dry_run=dry_run,
                progress=progress,
                policy=policy,
                by=_by(by),
            )
        except PipelineBusy as exc:
            fail(str(exc), code=3)
        except PolicyError as exc:
            fail(str(exc))
        except StorageError as exc:
            fail(f"{name} failed, nothing of the failing batch was deleted: {exc}", code=1)
        except Exception as exc:
            fail(f"{name} failed: {type(exc).__name__}: {exc}", code=1)
    plan = result.plan
    lines = plan.lines() if hasattr(plan, "lines") else [str(line) for line in (plan or [])]
    if dry_run:
        print(f"dry run of {name}: nothing changed")
        for line in lines:
            print(f"  {line}")
        return
    s = result.stats
    print(
        f"{name}: {result.status} (run {result.run_id}); rows {s.rows_affected} of "
        f"{s.rows_scanned} scanned, {s.objects} object(s), {s.bytes_written} bytes, "
        f"{s.batches} batch(es), longest transaction {s.max_txn_s:.3f}s"
    )
    if result.manifest_key:
        print(f"manifest: {result.manifest_key}")


@app.command("history")
@friendly_errors
def history_command(
    pipeline: Annotated[str | None, typer.Option(help="only this pipeline")] = None,
    limit: Annotated[int, typer.Option(help="newest N runs")] = 20,
) -> None:
    """Recent runs, newest first: status, counts, bytes, errors."""
    from rich.table import Table

    from pipelines.lifecycle.engine import history

    settings = cli_settings()
    require_services(settings, broker=False, redis=False)
    rows = history(settings=settings, pipeline=pipeline, limit=limit)
    table = Table()
    for column in ("id", "pipeline", "started", "took", "status", "rows", "objects", "bytes"):
        table.add_column(column, no_wrap=True)
    table.add_column("error", overflow="fold")
    for r in rows:
        took = (
            f"{(r['finished_at'] - r['started_at']).total_seconds():.1f}s"
            if r["finished_at"]
            else "-"
        )
        status = r["status"] + (" (dry run)" if r["dry_run"] else "")
        table.add_row(
            str(r["id"]),
            r["pipeline"],
            f"{r['started_at']:%Y-%m-%d %H:%M:%S}",
            took,
            status,
            f"{r['rows_affected']}/{r['rows_scanned']}",
            str(r["objects"]),
            str(r["bytes_written"]),
            (r["error"] or "")[:80],
        )
    _console().print(table)
    print(f"{len(rows)} run(s)")


@archive_app.command("list")
@friendly_errors
def archive_list(
    table_name: Annotated[str | None, typer.Option("--table", help="only this table")] = None,
    run: Annotated[int | None, typer.Option(help="only objects of this run")] = None,
    limit: Annotated[int, typer.Option(help="newest N objects")] = 50,
) -> None:
    """Archived objects: key, rows, size, sha256, run."""
    from rich.table import Table

    from pipelines.lifecycle.engine import connect

    settings = cli_settings()
    require_services(settings, broker=False, redis=False)
    with connect(settings) as conn:
        rows = conn.execute(
            "SELECT key, table_name, rows, size_bytes, sha256, run_id FROM archive_objects "
            "WHERE (%(t)s::text IS NULL OR table_name = %(t)s) "
            "AND (%(r)s::bigint IS NULL OR run_id = %(r)s) ORDER BY id DESC LIMIT %(n)s",
            {"t": table_name, "r": run, "n": limit},
        ).fetchall()
    table = Table()
    for column in ("key", "table", "rows", "bytes", "sha256", "run"):
        table.add_column(column, no_wrap=column != "key", overflow="fold")
    for r in rows:
        table.add_row(r[0], r[1], str(r[2]), str(r[3]), r[4][:12], str(r[5] or "-"))
    _console().print(table)
    print(f"{len(rows)} object(s)")


@archive_app.command("restore")
@friendly_errors
def archive_restore(
    keys: Annotated[
        list[str] | None, typer.Argument(metavar="[KEY]...", help="archived object keys")
    ] = None,
    run: Annotated[int | None, typer.Option(help="every object of this pipeline run")] = None,
    into: Annotated[
        str | None, typer.Option(help="target table (default: the table it came from)")
    ] = None,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="restore even without a recorded sha256 (catalogue or run manifest) to check",
        ),
    ] = False,
    by: ByOpt = None,
) -> None:
    """Load archived rows back into a table; rows already present are skipped.

    Each object's sha256 is checked against the archive_objects catalogue or, in a database
    that has no row for it, against its run manifest in storage; with neither it is refused
    unless --no-verify. Rows of users erased since come back as the erase left them
    (deleted, detached or anonymized); the count is printed."""
    from core.storage import StorageError, open_storage
    from pipelines.lifecycle.archive import (
        ArchiveError,
        manifest_objects,
        objects_of_run,
        restore_object,
    )
    from pipelines.lifecycle.engine import connect

    settings = cli_settings()
    require_services(settings, broker=False, redis=False)
    wanted = list(keys or [])
    from_manifest: dict[str, str] = {}
    if run is not None:
        with connect(settings) as conn:
            of_run = objects_of_run(conn, run)
        if not of_run:  # a fresh or recovered database: the run's manifest in storage
            try:
                from_manifest = manifest_objects(open_storage(settings=settings), run)
            except StorageError as exc:
                fail(str(exc), code=1)
            of_run = list(from_manifest)
        if not of_run:
            fail(f"run {run} archived no objects")
        wanted += of_run
    if not wanted:
        fail("name at least one KEY or --run ID")
    total = erased = 0
    for key in wanted:
        try:
            res = restore_object(
                key,
                into=into,
                settings=settings,
                verify=not no_verify,
                manifest_sha256=from_manifest.get(key) or None,
            )
        except FileNotFoundError:
            fail(f"no archived object {key} in {settings.storage_url}")
        except (ArchiveError, StorageError) as exc:
            fail(str(exc), code=1)
        total += res.rows_inserted
        erased += res.rows_of_erased_users
        print(
            f"{key}: {res.rows_read} rows read, {res.rows_inserted} inserted into {res.table}, "
            f"{res.rows_of_erased_users} of erased users skipped or anonymized"
        )
    with connect(settings) as conn:
        conn.execute(
            "INSERT INTO audit_logs (action, entity_type, entity_id, actor, details) "
            "VALUES ('archive_restore', 'archive', %s, %s, %s)",
            (
                f"run:{run}" if run is not None else f"{len(wanted)} object(s)",
                _by(by),
                json.dumps({"objects": wanted, "rows": total, "rows_of_erased_users": erased}),
            ),
        )
    print(
        f"restored {total} row(s) from {len(wanted)} object(s); "
        f"{erased} row(s) of erased users skipped or anonymized"
    )


@gdpr_app.command("erase")
@friendly_errors
def gdpr_erase(
    user_id: Annotated[str, typer.Argument(metavar="USER_ID", help="the user's UUID")],
    request: Annotated[
        bool,
        typer.Option("--request", help="soft-delete the user now; erasable after the grace"),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the erase plan, change nothing")
    ] = False,
    by: ByOpt = None,
) -> None:
    """Hard-delete a user soft-deleted longer ago than the grace period (30 days)."""
    from pipelines.lifecycle.gdpr import NotEligible, UserNotFound, erase, request_erasure

    settings = cli_settings()
    require_services(settings, broker=False, redis=not dry_run)
    try:
        # Both build their plan first; with --dry-run they return it, read on READ ONLY
        # sessions, so no branch here or there can write.
        if request:
            plan = request_erasure(user_id, settings=settings, by=_by(by), dry_run=dry_run)
            lines = plan.lines()
        else:
            result = erase(user_id, settings=settings, by=_by(by), dry_run=dry_run)
            lines = result.steps
    except (UserNotFound, NotEligible) as exc:
        fail(str(exc))
    if dry_run:
        print("dry run: nothing changed; the erase would:")
        for line in lines:
            print(f"  {line}")
        return
    if request:
        print(f"erasure requested; the user can be erased from {plan.erasable_at.isoformat()}")
        return
    print(
        f"erased ({result.reference}); {result.redis_keys} Redis key(s) removed, "
        f"{result.exports_deleted} export(s) deleted, {result.archives_rewritten} archived "
        "object(s) rewritten"
    )
    print(json.dumps(result.counts, indent=1, sort_keys=True))


@gdpr_app.command("export")
@friendly_errors
def gdpr_export(
    user_id: Annotated[str, typer.Argument(metavar="USER_ID", help="the user's UUID")],
    by: ByOpt = None,
) -> None:
    """Write the user's data as JSON to object storage; prints its key."""
    from core.storage import StorageError
    from pipelines.lifecycle.gdpr import UserNotFound, export

    settings = cli_settings()
    require_services(settings, broker=False, redis=False)
    try:
        result = export(user_id, settings=settings, by=_by(by))
    except UserNotFound as exc:
        fail(str(exc))
    except StorageError as exc:
        fail(str(exc), code=1)
    until = (
        f", downloadable until {result.expires_at:%Y-%m-%d %H:%M} UTC" if result.expires_at else ""
    )
    print(f"{result.key} ({result.size} bytes, sha256 {result.sha256}{until})")
