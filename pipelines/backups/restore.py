"""Point-in-time restore: base backup (+ incremental) and archived WAL into a new data directory.

Storage is the only input (the database being restored may be gone): the newest complete base
backup whose data is not newer than the target is chosen, every object is hashed against its
manifest before a byte is extracted (a corrupt backup is refused, never half-restored), the
tar is streamed out of storage through zstd into the directory (two backups are joined by
``pg_combinebackup``), then ``recovery.signal`` and the recovery settings are written and the
server is started with ``pg_ctl``. It replays archived WAL (`tidemill wal fetch`) up to the
target time and promotes itself.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg
import zstandard

from core.log import get_logger
from core.proc import wait_until
from core.settings import Settings, get_settings
from core.storage import ObjectInfo, Storage, open_storage
from db.embedded import (
    DATABASE_NAME,
    _make_traversable,
    make_runnable_by_pg_user,
    pg_system_user,
    postgres_bin,
    tidemill_command,
)
from pipelines.backups.logical import BackupError, CatalogEntry, catalog, verify
from pipelines.backups.physical import WAL_PREFIX, read_head, wal_position

log = get_logger(__name__)


@dataclass
class RestoreResult:
    data_dir: Path
    port: int
    chain: list[CatalogEntry]
    target: datetime | None
    started: bool
    seconds: float

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE_NAME}"

    def describe(self) -> list[str]:
        lines = [f"restored {' + '.join(e.folder for e in self.chain)} into {self.data_dir}"]
        lines.append(f"recovered to {self.target.isoformat() if self.target else 'end of WAL'}")
        if self.started:
            lines.append(f"running at {self.url} ({self.seconds:.1f}s)")
            lines.append(f"stop it with: {stop_instruction(self.data_dir)}")
        return lines


def stop_instruction(data_dir: Path) -> str:
    """The command that stops a restored server, runnable as whoever ran the restore: under
    root the server runs as the Postgres system user, and pg_ctl refuses to run as root."""
    command = f"{shlex.quote(postgres_bin('pg_ctl'))} -D {shlex.quote(str(data_dir))} stop"
    user = pg_system_user()
    if user is None:
        return command
    import pwd

    name = pwd.getpwuid(user[0]).pw_name
    return f"su -s /bin/sh {shlex.quote(name)} -c {shlex.quote(command)}"


def _check_port(port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise BackupError(f"port {port} is already in use; pick another with --port") from None


def plan_restore(entries: list[CatalogEntry], target: datetime | None) -> list[CatalogEntry]:
    """The backups to restore for ``target``: [base] or [base, incremental]. No I/O."""
    complete = {e.folder: e for e in entries if e.complete and e.kind in ("base", "incremental")}
    candidates = [
        e
        for e in complete.values()
        if target is None or (e.data_at is not None and e.data_at <= target)
    ]
    for entry in sorted(candidates, key=lambda e: e.started_at, reverse=True):
        if entry.kind == "base":
            return [entry]
        assert entry.manifest is not None
        parent = complete.get(entry.manifest.get("parent") or "")
        if parent is not None:
            return [parent, entry]
        log.warning("restore_incremental_without_parent", folder=entry.folder)
    when = target.isoformat() if target else "now"
    raise BackupError(f"no complete base backup with data from before {when} in storage")


def _segno(position: str, per_log: int) -> int:
    return int(position[:8], 16) * per_log + int(position[8:16], 16)


def check_wal_coverage(
    chain: list[CatalogEntry],
    wal: Sequence[ObjectInfo],
    target: datetime | None,
    head: dict[str, dict[str, str]] | None = None,
) -> None:
    """Refuse, before anything is extracted, a restore whose archived WAL has a hole.

    The base backup carries the WAL it needs to be consistent (``wal_start``…``wal_end``);
    replaying further needs every segment after ``wal_end`` up to the one holding ``target``
    (the first segment archived at or after it; without a target, the newest archived one).
    Retention prunes WAL older than 7 days, so an older base can point into a pruned stretch:
    without this check PostgreSQL would only say so with a FATAL after the whole extraction.
    No I/O: ``wal`` is the storage listing under ``wal/``.
    """
    last = chain[-1]
    assert last.manifest is not None
    end = last.manifest.get("wal_end")
    if not end:
        return  # an old manifest without the range: PostgreSQL will have to tell
    per_log = 0x100000000 // int(last.manifest.get("wal_segment_size") or 16 * 1024 * 1024)
    end_no = _segno(end[8:24], per_log)
    archived: dict[int, ObjectInfo] = {}
    for info in wal:
        position = wal_position(info.key)
        if position is None or not info.key.removesuffix(".zst").endswith(position):
            continue  # .history, .backup and .partial files are not segments of the stream
        no = _segno(position, per_log)
        if no > end_no:
            archived.setdefault(no, info)
    # The archive head records the newest segment ever pushed: a missing last segment is a
    # gap, not the end of the archive.
    pushed = (head or {}).get(end[:8], {}).get("last")
    pushed_no = _segno(pushed[8:24], per_log) if pushed else None
    if not archived and (pushed_no is None or pushed_no <= end_no):
        return  # nothing archived after the base: it restores to its own end
    newest = max([*archived, *([pushed_no] if pushed_no is not None else [])])
    need_to = newest
    if target is not None:
        after = [
            no for no, i in archived.items() if i.modified is not None and i.modified >= target
        ]
        need_to = min(after) if after else newest
    missing = [no for no in range(end_no + 1, need_to + 1) if no not in archived]
    if missing:

        def name(no: int) -> str:
            return f"{no // per_log:08X}{no % per_log:08X}"

        when = target.isoformat() if target else "the end of the archive"
        log.error(
            "restore_wal_gap",
            base=last.folder,
            first_missing=name(missing[0]),
            missing=len(missing),
        )
        raise BackupError(
            f"cannot restore {last.folder} to {when}: {len(missing)} WAL segment(s) after the "
            f"backup are missing from the archive (first missing: log/segment "
            f"{name(missing[0])}, needed through {name(need_to)}); WAL retention pruned them, "
            "or they were lost (see `tidemill backup verify`). Pick a newer base backup or a "
            "--to within the kept WAL."
        )


def _extract(storage: Storage, entry: CatalogEntry, dest: Path) -> None:
    assert entry.manifest is not None
    key = next(o["key"] for o in entry.manifest["objects"] if o["role"] == "base")
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    with storage.open(key) as raw:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        # Streaming mode ("r|"): the archive is never on disk whole; the "tar" filter refuses
        # absolute paths and paths leaving dest, keeps modes.
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            tar.extractall(dest, filter="tar")


def _conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _chown_tree(path: Path, user: tuple[int, int]) -> None:
    os.chown(path, *user)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), *user, follow_symlinks=False)


def restore_to_time(
    settings: Settings | None = None,
    *,
    target: datetime | None,
    data_dir: Path,
    port: int,
    start: bool = True,
    storage: Storage | None = None,
    timeout: float = 3600,
    immediate: bool = False,
) -> RestoreResult:
    """``immediate``: stop at the base backup's own end (the first consistent point) instead
    of replaying the archive to ``target`` or its end; what the physical restore drill does."""
    settings = settings or get_settings()
    storage = storage or open_storage(settings=settings)
    t0 = time.monotonic()
    data_dir = data_dir.resolve()
    if data_dir.exists() and any(data_dir.iterdir()):
        raise BackupError(f"{data_dir} is not empty; restore into a new data directory")
    if start:
        _check_port(port)  # before minutes of extraction, not after
    chain = plan_restore(catalog(storage, kinds=("base", "incremental")), target)
    if immediate:
        target = None
    else:
        check_wal_coverage(chain, list(storage.list(WAL_PREFIX)), target, read_head(storage))
    log.info(
        "restore_started",
        chain=[e.folder for e in chain],
        target=target.isoformat() if target else None,
        data_dir=str(data_dir),
    )
    for entry in chain:
        assert entry.manifest is not None
        verify(storage, entry.manifest)
    try:
        if len(chain) == 1:
            _extract(storage, chain[0], data_dir)
        else:
            work = [data_dir.parent / f".{data_dir.name}-{i}" for i in range(len(chain))]
            try:
                for entry, path in zip(chain, work, strict=True):
                    _extract(storage, entry, path)
                out = subprocess.run(
                    [postgres_bin("pg_combinebackup"), *map(str, work), "-o", str(data_dir)],
                    capture_output=True,
                    text=True,
                )
                if out.returncode != 0:
                    raise BackupError(f"pg_combinebackup failed: {out.stderr.strip()[-500:]}")
            finally:
                for path in work:
                    shutil.rmtree(path, ignore_errors=True)
        _check_version(data_dir)
        _write_recovery(settings, storage, data_dir, target=target, port=port, immediate=immediate)
    except BaseException as exc:
        log.error("restore_failed", data_dir=str(data_dir), error=str(exc))
        # Half a data directory is worse than none: nobody should try to start it.
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    data_dir.chmod(0o700)
    user = pg_system_user()
    if user is not None:
        _chown_tree(data_dir, user)
        _make_traversable(data_dir.parent)
        make_runnable_by_pg_user()
    result = RestoreResult(data_dir, port, chain, target, False, 0.0)
    if start:
        try:
            start_restored(result, timeout=timeout)
        except BaseException as exc:
            # A server that could not finish recovery (a damaged or missing WAL segment, a
            # port taken meanwhile) leaves a half-recovered directory: stop it, remove it.
            log.error("restore_failed", data_dir=str(data_dir), error=str(exc))
            if (data_dir / "postmaster.pid").exists():
                stop_restored(data_dir)
            shutil.rmtree(data_dir, ignore_errors=True)
            raise
        result.started = True
        # GDPR (#15): erasures recorded since the base backup began are applied again before
        # anyone gets the restored database (erasing an already erased user finds nobody).
        from pipelines.lifecycle.gdpr import reapply_erasures

        reapply_erasures(result.url, since=chain[0].started_at, settings=settings, storage=storage)
    result.seconds = time.monotonic() - t0
    log.info("restore_complete", data_dir=str(data_dir), port=port, seconds=result.seconds)
    return result


def _write_recovery(
    settings: Settings,
    storage: Storage,
    data_dir: Path,
    *,
    target: datetime | None,
    port: int,
    immediate: bool = False,
) -> None:
    fetch = " ".join([*tidemill_command(), "wal", "fetch", '"%f"', '"%p"'])
    fetch += f" --storage {shlex.quote(storage.url)}"
    lines = [
        "",
        "# tidemill restore: point-in-time recovery from the WAL archive",
        f"restore_command = {_conf_quote(fetch)}",
        "recovery_target_action = 'promote'",
        "recovery_target_timeline = 'latest'",
        # A restored copy must never push into the archive it was restored from.
        "archive_mode = 'off'",
        f"port = {port}",
        "listen_addresses = '127.0.0.1'",
        "unix_socket_directories = ''",
    ]
    if immediate:
        lines.append("recovery_target = 'immediate'")
    elif target is not None:
        lines.append(f"recovery_target_time = {_conf_quote(target.isoformat())}")
    # Recovery refuses to run with lower limits than the primary had; the primary may have set
    # them on its command line (the embedded server does), which no backup carries.
    # pg_control records them.
    lines += [f"{name} = {value}" for name, value in _control_limits(data_dir).items()]
    with open(data_dir / "postgresql.auto.conf", "a") as fh:
        fh.write("\n".join(lines) + "\n")
    (data_dir / "recovery.signal").touch()
    for stale in ("postmaster.pid", "standby.signal"):
        (data_dir / stale).unlink(missing_ok=True)


def _check_version(data_dir: Path) -> None:
    """A data directory only starts under its own major version's server."""
    backup_major = (data_dir / "PG_VERSION").read_text().strip()
    out = subprocess.run([postgres_bin("postgres"), "--version"], capture_output=True, text=True)
    ours = out.stdout.split()[-1].split(".")[0] if out.stdout.strip() else "?"
    if backup_major != ours:
        raise BackupError(
            f"the base backup is PostgreSQL {backup_major} but this restore runs PostgreSQL "
            f"{ours} binaries; restore with matching binaries"
        )


_CONTROL_LIMITS = {
    "max_connections setting": "max_connections",
    "max_worker_processes setting": "max_worker_processes",
    "max_wal_senders setting": "max_wal_senders",
    "max_prepared_xacts setting": "max_prepared_transactions",
    "max_locks_per_xact setting": "max_locks_per_transaction",
}


def _control_limits(data_dir: Path) -> dict[str, str]:
    out = subprocess.run(
        [postgres_bin("pg_controldata"), "-D", str(data_dir)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise BackupError(f"pg_controldata failed on the restored data: {out.stderr.strip()}")
    limits = {}
    for line in out.stdout.splitlines():
        label, _, value = line.partition(":")
        if label.strip() in _CONTROL_LIMITS and value.strip().isdigit():
            limits[_CONTROL_LIMITS[label.strip()]] = value.strip()
    return limits


def _as_pg(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    user = pg_system_user()
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        user=user[0] if user else None,
        group=user[1] if user else None,
        extra_groups=[] if user else None,
        **kwargs,  # type: ignore[call-overload]
    )


def start_restored(result: RestoreResult, *, timeout: float = 3600) -> None:
    """Start the restored server (detached: it outlives this command) and wait until it has
    replayed to the target and promoted."""
    logfile = result.data_dir / "restore.log"
    out = _as_pg(
        [
            postgres_bin("pg_ctl"),
            "-D",
            str(result.data_dir),
            "-l",
            str(logfile),
            "-w",
            "-t",
            str(int(timeout)),
            "start",
        ]
    )
    if out.returncode != 0:
        raise BackupError(f"restored server did not start: {_log_tail(logfile)}")

    def promoted() -> bool:
        try:
            with psycopg.connect(result.url, connect_timeout=2) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                return bool(row is not None and not row[0])
        except psycopg.OperationalError:
            return False

    def alive() -> bool:
        return (result.data_dir / "postmaster.pid").exists()

    if not wait_until(promoted, timeout=timeout, interval=0.2, alive=alive):
        raise BackupError(f"restored server did not finish recovery: {_log_tail(logfile)}")


def stop_restored(data_dir: Path) -> None:
    _as_pg([postgres_bin("pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "stop"])


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    important = [line for line in lines if "FATAL" in line or "ERROR" in line]
    return " | ".join((important or lines)[-3:])


# ---------------------------------------------------------------------------- logical restore


@dataclass
class LogicalRestoreResult:
    backup: str
    database: str
    replaced: bool
    seconds: float

    def describe(self) -> list[str]:
        verb = "replaced" if self.replaced else "created"
        return [
            f"restored {self.backup} into database {self.database} ({verb}, {self.seconds:.1f}s)"
        ]


def _server_url(database_url: str, name: str) -> str:
    from urllib.parse import urlsplit

    from db.engine import libpq_url

    return urlsplit(libpq_url(database_url))._replace(path=f"/{name}").geturl()


def restore_database(
    settings: Settings | None = None,
    *,
    database: str,
    ref: str | None = None,
    replace: bool = False,
    jobs: int = 1,
    owners: bool = True,
    privileges: bool = True,
    roles: bool = True,
    storage: Storage | None = None,
    server_url: str | None = None,
) -> LogicalRestoreResult:
    """Restore a logical backup (``ref``, default the newest complete one) as ``database`` on
    the server of ``server_url`` (default DATABASE_URL).

    A new database is created; an existing one is refused unless ``replace``. Replacing
    restores into a fresh database first and swaps names only once that succeeded: a failed
    restore never costs the database it meant to replace.
    """
    from psycopg import sql

    from db.engine import libpq_url
    from pipelines.backups.logical import find_backup, restore_logical

    settings = settings or get_settings()
    storage = storage or open_storage(settings=settings)
    server_url = server_url or settings.database_url
    if not server_url:
        raise BackupError("DATABASE_URL is unset: name the server to restore into")
    if not database or len(database) > 50 or "\0" in database:
        raise BackupError(f"{database!r} is not a usable database name")
    if ref is not None:
        entry = find_backup(storage, ref)
    else:
        fulls = [e for e in catalog(storage, kinds=("full",)) if e.complete]
        if not fulls:
            raise BackupError("no complete logical backup in storage")
        entry = fulls[-1]
    if entry.kind != "full" or not entry.complete:
        raise BackupError(f"{entry.folder} is not a complete logical backup")
    assert entry.manifest is not None
    admin = libpq_url(server_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
    if exists and not replace:
        raise BackupError(f"database {database} exists; pass --replace to replace it")
    work = f"{database}_restoring_{int(time.time())}" if exists else database
    owner = entry.manifest.get("database_owner")
    t0 = time.monotonic()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(work)))
    log.info("logical_restore_started", backup=entry.folder, database=database, jobs=jobs)
    try:
        restore_logical(
            storage,
            entry,
            _server_url(server_url, work),
            jobs=jobs,
            owners=owners,
            privileges=privileges,
            roles=roles,
            scratch_dir=str(settings.data_dir) if settings.data_dir.is_dir() else None,
        )
        restored_url = _server_url(server_url, work)
        # A role's per-database search_path (db/schema.py) lives outside the dump: pin it
        # again, then re-apply the erasures recorded since the backup (GDPR, #15) before the
        # database is handed over under its name.
        from db.schema import role_search_path_sql
        from pipelines.lifecycle.gdpr import reapply_erasures

        with psycopg.connect(libpq_url(restored_url), autocommit=True) as conn:
            conn.execute(role_search_path_sql())
        reapply_erasures(restored_url, since=entry.started_at, settings=settings, storage=storage)
        with psycopg.connect(admin, autocommit=True) as conn:
            if owners and owner:
                role = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (owner,))
                if role.fetchone():
                    conn.execute(
                        sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                            sql.Identifier(work), sql.Identifier(owner)
                        )
                    )
            if exists:
                conn.execute(
                    sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(database))
                )
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(work), sql.Identifier(database)
                    )
                )
    except BaseException as exc:
        log.error("logical_restore_failed", backup=entry.folder, database=database, error=str(exc))
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(work))
            )
        raise
    seconds = time.monotonic() - t0
    log.info("logical_restore_complete", backup=entry.folder, database=database, seconds=seconds)
    return LogicalRestoreResult(entry.folder, database, bool(exists), seconds)
