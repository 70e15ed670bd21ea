"""Logical backups: ``pg_dump -Fc -Z0`` streamed through multi-threaded zstd into object storage.

Nothing full-size touches the local disk: pg_dump's stdout is read in 1 MiB chunks, compressed
by zstd's own worker threads, and written to ``Storage.writer`` (multipart on s3, a temp file
renamed into place on file://), which hashes the bytes on the way out. The manifest is written
last; a backup folder without ``manifest.json`` is incomplete: never listed as good, never
restored, never counted for retention.

Layout (one folder per backup, sortable by time)::

    backups/full/20261123T030000Z/dump.pgc.zst        pg_dump custom format, zstd
    backups/full/20261123T030000Z/manifest.json       written last
    backups/base/…/base.tar.zst, backup_manifest, manifest.json         (backups.physical)
    backups/incremental/…/base.tar.zst, backup_manifest, manifest.json  (backups.physical)
    wal/000000010000000000000003.zst                                     (backups.physical)

The ``backups`` table is a catalogue for the dashboard and ``backup list``; storage is the
truth (a point-in-time restore must work when the database is gone).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import queue
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import psycopg
import zstandard
from psycopg import sql

from core.log import get_logger
from core.settings import Settings, get_settings
from core.storage import Storage, open_storage
from db.embedded import postgres_bin
from db.engine import direct_url, libpq_url

log = get_logger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "tidemill-backup/1"
DUMP_NAME = "dump.pgc.zst"
GLOBALS_NAME = "globals.sql.zst"
KINDS = ("full", "base", "incremental")
CHUNK = 1024 * 1024


class BackupError(Exception):
    """A backup or restore cannot go on; the message says why (no secrets, no PII)."""


class ChecksumMismatch(BackupError):
    """A stored object does not hash to its manifest's sha256: it is refused, never restored."""


class IncompleteBackup(BackupError):
    """The backup has no manifest (crashed or still running): it cannot be restored."""


class BackupBusy(BackupError):
    """Another backup of the same kind holds the lock."""


# ------------------------------------------------------------------------------------ catalogue


@dataclass(frozen=True)
class CatalogEntry:
    """One backup folder in storage, complete when its manifest is there."""

    kind: str
    folder: str  # backups/<kind>/<stamp>
    objects: tuple[str, ...]
    size: int  # bytes of every object in the folder
    modified: datetime | None  # newest object's time
    manifest: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return self.manifest is not None

    @property
    def started_at(self) -> datetime:
        if self.manifest:
            return parse_time(self.manifest["started_at"])
        return folder_time(self.folder) or self.modified or datetime.min.replace(tzinfo=UTC)

    @property
    def data_at(self) -> datetime | None:
        """The moment the backed-up data reflects (dump snapshot, base backup end)."""
        return parse_time(self.manifest["data_at"]) if self.manifest else None


@dataclass
class BackupResult:
    kind: str
    folder: str
    key: str
    manifest_key: str
    size: int
    sha256: str
    duration_s: float
    backup_id: int | None
    manifest: dict[str, Any] = field(default_factory=dict)


def stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def folder_time(folder: str) -> datetime | None:
    try:
        return datetime.strptime(folder.rsplit("/", 1)[-1], "%Y%m%dT%H%M%S%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def parse_time(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def new_folder(kind: str, moment: datetime) -> str:
    return f"backups/{kind}/{stamp(moment)}"


def catalog(storage: Storage, *, kinds: tuple[str, ...] = KINDS) -> list[CatalogEntry]:
    """Every backup folder in storage, oldest first; manifests are read and parsed."""
    entries: list[CatalogEntry] = []
    for kind in kinds:
        folders: dict[str, list[Any]] = {}
        for info in storage.list(f"backups/{kind}/"):
            parts = info.key.split("/")
            if len(parts) < 4:
                continue
            folders.setdefault("/".join(parts[:3]), []).append(info)
        for folder, infos in sorted(folders.items()):
            keys = tuple(i.key for i in infos)
            manifest = None
            if f"{folder}/{MANIFEST}" in keys:
                try:
                    manifest = json.loads(storage.get_bytes(f"{folder}/{MANIFEST}"))
                except (FileNotFoundError, ValueError) as exc:
                    # A manifest that does not parse is as good as none: the backup is
                    # incomplete, not "probably fine".
                    log.error("backup_manifest_unreadable", folder=folder, error=str(exc))
            times = [i.modified for i in infos if i.modified is not None]
            entries.append(
                CatalogEntry(
                    kind=kind,
                    folder=folder,
                    objects=keys,
                    size=sum(i.size for i in infos),
                    modified=max(times) if times else None,
                    manifest=manifest,
                )
            )
    entries.sort(key=lambda e: (e.started_at, e.folder))
    return entries


def find_backup(storage: Storage, ref: str) -> CatalogEntry:
    """A backup by folder (backups/full/…), folder name (20261123T…) or catalogue id."""
    for entry in catalog(storage):
        manifest_id = str(entry.manifest.get("backup_id")) if entry.manifest else None
        if ref in (entry.folder, entry.folder.rsplit("/", 1)[-1], manifest_id):
            return entry
    raise BackupError(f"no backup {ref!r} in storage")


def verify(storage: Storage, manifest: dict[str, Any]) -> None:
    """Hash every object the manifest names (streamed) and refuse any that differs."""
    for obj in manifest["objects"]:
        try:
            actual = storage.sha256(obj["key"])
        except FileNotFoundError:
            raise IncompleteBackup(f"{obj['key']} is missing from storage") from None
        if actual != obj["sha256"]:
            log.error(
                "backup_checksum_mismatch", key=obj["key"], expected=obj["sha256"], actual=actual
            )
            raise ChecksumMismatch(
                f"{obj['key']}: sha256 {actual[:16]}… does not match the manifest's "
                f"{obj['sha256'][:16]}…; the object is corrupt and will not be restored"
            )


def verify_entry(
    storage: Storage, entry: CatalogEntry, *, settings: Settings | None = None
) -> None:
    """Verify a backup's objects; on success record `verified_at` in the catalogue."""
    if entry.manifest is None:
        raise IncompleteBackup(f"{entry.folder} has no manifest; it is not a usable backup")
    verify(storage, entry.manifest)
    backup_id = entry.manifest.get("backup_id")
    if settings is not None and settings.database_url and backup_id is not None:
        record_finish(settings.database_url, backup_id, verified_at=datetime.now(UTC))


# ------------------------------------------------------------------------------ catalogue table


def _catalogue_exists(conn: psycopg.Connection[Any]) -> bool:
    # `tidemill migrate` backs up before migrating: the table may not exist yet.
    row = conn.execute("SELECT to_regclass('backups') IS NOT NULL").fetchone()
    return bool(row and row[0])


def record_start(
    database_url: str, *, kind: str, key: str, storage_url: str, parent_id: int | None = None
) -> int | None:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        if not _catalogue_exists(conn):
            return None
        row = conn.execute(
            """INSERT INTO backups (kind, status, key, storage_url, parent_id)
               VALUES (%s, 'running', %s, %s, %s) RETURNING id""",
            (kind, key, storage_url, parent_id),
        ).fetchone()
        assert row is not None
        return int(row[0])


def record_finish(database_url: str, backup_id: int | None, **values: Any) -> None:
    if backup_id is None:
        return
    assignments = sql.SQL(", ").join(
        sql.SQL("{} = %s").format(sql.Identifier(name)) for name in values
    )
    try:
        with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
            conn.execute(
                sql.SQL("UPDATE backups SET {} WHERE id = %s").format(assignments),
                (*values.values(), backup_id),
            )
    except psycopg.Error as exc:  # the catalogue is secondary: storage holds the truth
        log.warning("backup_catalogue_update_failed", backup_id=backup_id, error=str(exc))


@contextlib.contextmanager
def catalogued(
    database_url: str,
    *,
    kind: str,
    key: str,
    storage_url: str,
    reason: str,
    parent_id: int | None = None,
) -> Iterator[int | None]:
    """A catalogue row for one backup: 'running' now, 'failed' with its error if the body raises.

    The body records success itself (with its size, checksum and manifest).
    """
    backup_id = record_start(
        database_url, kind=kind, key=key, storage_url=storage_url, parent_id=parent_id
    )
    log.info("backup_started", kind=kind, key=key, backup_id=backup_id, reason=reason)
    try:
        yield backup_id
    except BaseException as exc:
        record_finish(
            database_url,
            backup_id,
            status="failed",
            finished_at=datetime.now(UTC),
            error=str(exc)[:2000] or type(exc).__name__,
        )
        log.error("backup_failed", kind=kind, key=key, error=str(exc) or type(exc).__name__)
        raise


def record_complete(
    database_url: str,
    backup_id: int | None,
    result: BackupResult,
    *,
    kind: str,
    key: str,
    columns: dict[str, Any] | None = None,
    **log_fields: Any,
) -> None:
    """Mark the catalogue row complete (size, checksum, manifest, data time) and log it."""
    record_finish(
        database_url,
        backup_id,
        status="complete",
        finished_at=datetime.now(UTC),
        manifest_key=result.manifest_key,
        size_bytes=result.size,
        sha256=result.sha256,
        data_at=parse_time(result.manifest["data_at"]),
        **(columns or {}),
    )
    log.info(
        "backup_complete",
        kind=kind,
        key=key,
        backup_id=backup_id,
        size_bytes=result.size,
        duration_s=round(result.duration_s, 3),
        **log_fields,
    )


def catalogue_rows(database_url: str) -> dict[str, dict[str, Any]]:
    """Catalogue rows by object key (for `backup list`); empty when the table is absent."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        if not _catalogue_exists(conn):
            return {}
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        rows = cur.execute("SELECT * FROM backups ORDER BY id").fetchall()
    return {r["key"]: r for r in rows}


# ---------------------------------------------------------------------------------- streaming


class _CompressedSink:
    """zstd frames (with content checksums) into a storage writer; counts raw bytes."""

    def __init__(self, target: Any, *, level: int, threads: int) -> None:
        cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
        self._writer = cctx.stream_writer(target, closefd=False, write_return_read=True)
        self.raw_bytes = 0

    def write(self, data: bytes) -> None:
        self.raw_bytes += len(data)
        self._writer.write(data)

    def close(self) -> None:
        self._writer.close()  # ends the frame (and its checksum); the target stays open


def zstd_threads(settings: Settings) -> int:
    # zstandard: -1 = one per logical CPU; 0 would mean "no worker threads" (single-threaded).
    return -1 if settings.backup_zstd_threads == 0 else settings.backup_zstd_threads


@functools.cache
def tool_version(name: str) -> str:
    out = subprocess.run([postgres_bin(name), "--version"], capture_output=True, text=True)
    return out.stdout.strip() or out.stderr.strip()


def _drain(stream: IO[bytes], sink: list[bytes]) -> None:
    # stderr is read on its own thread: a chatty child must never block on a full pipe.
    for line in iter(lambda: stream.readline(), b""):
        sink.append(line)
        del sink[:-50]


@contextlib.contextmanager
def child(argv: list[str], **kwargs: Any) -> Iterator[tuple[subprocess.Popen[bytes], list[bytes]]]:
    """A subprocess whose stderr is collected (last 50 lines); killed if the block raises."""
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, **kwargs)
    errors: list[bytes] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=_drain, args=(proc.stderr, errors), daemon=True)
    reader.start()
    try:
        yield proc, errors
    except BaseException:
        proc.kill()
        raise
    finally:
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        proc.wait()
        reader.join(timeout=5)


F_SETPIPE_SZ = 1031  # Linux fcntl: resize a pipe's buffer


def pump(stream: IO[bytes], *, depth: int = 8) -> Iterator[bytes]:
    """Chunks from a child's stdout, read ahead on a thread.

    Without read-ahead the child stalls on a full 64 KiB pipe whenever we are busy
    compressing; with it, pg_dump and zstd run at the same time. The queue is bounded (depth x
    1 MiB) so memory stays flat whatever the database size.
    """
    fd = stream.fileno()
    with contextlib.suppress(OSError):
        import fcntl

        fcntl.fcntl(fd, F_SETPIPE_SZ, CHUNK)
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: bytes | BaseException | None) -> bool:
        # Never block for good: once the consumer has gone (an error downstream), stop.
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            while data := os.read(fd, CHUNK):
                if not offer(data):
                    return
            offer(None)
        except BaseException as exc:  # handed to the consumer, raised there
            offer(exc)

    reader = threading.Thread(target=read, name="pump", daemon=True)
    reader.start()
    try:
        while (item := chunks.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the reader gives up within 0.2 s; the child is killed by `child()`


def child_error(name: str, proc: subprocess.Popen[bytes], errors: list[bytes]) -> str:
    text = b"".join(errors).decode(errors="replace").strip()
    last = text.splitlines()[-1] if text else "(no output)"
    return f"{name} exited with {proc.returncode}: {last}"


# ---------------------------------------------------------------------------------- full backup


def _user_tables(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return [
        (r[0], r[1])
        for r in conn.execute(
            """SELECT n.nspname, c.relname FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                 AND n.nspname NOT LIKE 'pg\\_%%'
               ORDER BY 1, 2"""
        ).fetchall()
    ]


def count_rows(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Exact row count of every user table (leaf tables: partitions are counted each)."""
    counts: dict[str, int] = {}
    for schema, table in _user_tables(conn):
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM ONLY {}.{}").format(
                sql.Identifier(schema), sql.Identifier(table)
            )
        ).fetchone()
        counts[f"{schema}.{table}"] = int(row[0]) if row else 0
    return counts


# Row text must not depend on the session: the same settings at backup and at drill time.
_CANONICAL_TEXT = (
    "SET LOCAL DateStyle = 'ISO, YMD'",
    "SET LOCAL TimeZone = 'UTC'",
    "SET LOCAL IntervalStyle = 'postgres'",
    "SET LOCAL extra_float_digits = 3",
    "SET LOCAL bytea_output = 'hex'",
)


def _sample_columns(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], str]:
    """Each table's first primary-key column: the sample is chosen by its value, so the same
    rows are sampled in the backup and in any restored copy, whatever their physical order."""
    rows = conn.execute(
        """SELECT n.nspname, c.relname, a.attname
           FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0]
           WHERE i.indisprimary"""
    ).fetchall()
    return {(r[0], r[1]): r[2] for r in rows}


def table_checksums(conn: psycopg.Connection[Any], *, sample: int = 1) -> dict[str, dict[str, Any]]:
    """Per user table: the exact row count and an order-independent checksum of the rows' text
    (the sum of their 64-bit hashes: equal contents give equal sums whatever the physical
    order). ``sample`` = N > 1 checksums the rows whose primary key hashes to 0 mod N (about
    1 in N; tables without a primary key: every row), in the same single scan as the count:
    the row-to-text conversion is what costs, as much again as pg_dump's own. Runs in the
    caller's transaction (the dump's snapshot at backup time)."""
    for statement in _CANONICAL_TEXT:
        conn.execute(statement)
    keys = _sample_columns(conn) if sample > 1 else {}
    out: dict[str, dict[str, Any]] = {}
    for schema, table in _user_tables(conn):
        column = keys.get((schema, table))
        where = (
            sql.SQL(" FILTER (WHERE hashtextextended(t.{}::text, 0) % {} = 0)").format(
                sql.Identifier(column), sql.Literal(sample)
            )
            if column
            else sql.SQL("")
        )
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)){}, 0)::text "
                "FROM ONLY {}.{} AS t"
            ).format(where, sql.Identifier(schema), sql.Identifier(table))
        ).fetchone()
        assert row is not None
        out[f"{schema}.{table}"] = {"rows": int(row[0]), "sum": str(row[1])}
    return out


def _checksums_in_snapshot(
    url: str, snapshot: str, into: dict[str, Any], *, sample: int
) -> threading.Thread:
    """Checksum every table on a second connection that imports the dump's snapshot, while
    pg_dump streams: the scan overlaps the dump instead of following it."""

    def run() -> None:
        try:
            with psycopg.connect(url) as conn:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
                into["tables"] = table_checksums(conn, sample=sample)
        except BaseException as exc:  # raised by the caller after join()
            into["error"] = exc

    thread = threading.Thread(target=run, name="table-checksums", daemon=True)
    thread.start()
    return thread


def _into(box: dict[str, Any], fn: Any, *args: Any) -> None:
    try:
        box["value"] = fn(*args)
    except BaseException as exc:  # re-raised by the thread's joiner
        box["error"] = exc


def _dump_globals(url: str, level: int) -> bytes:
    """Roles and tablespaces (pg_dumpall --globals-only): a database restored elsewhere keeps
    its owners and grants only if their roles exist there."""
    argv = [postgres_bin("pg_dumpall"), "--globals-only", f"--dbname={url}"]
    out = subprocess.run(argv, capture_output=True)
    if out.returncode != 0 and b"permission denied" in out.stderr:
        # not a superuser: role passwords cannot be read, the roles still can
        out = subprocess.run([*argv, "--no-role-passwords"], capture_output=True)
    if out.returncode != 0:
        raise BackupError(
            f"pg_dumpall --globals-only exited with {out.returncode}: "
            f"{out.stderr.decode(errors='replace').strip()[-300:]}"
        )
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(out.stdout)


def run_full_backup(
    settings: Settings | None = None,
    *,
    storage: Storage | None = None,
    database_url: str | None = None,
    reason: str = "scheduled",
    storage_class: str | None = None,
) -> BackupResult:
    """Take a logical backup of the database; returns once its manifest is stored."""
    settings = settings or get_settings()
    storage = storage or open_storage(settings=settings)
    database_url = database_url or (settings.database_url and direct_url(settings))
    if not database_url:
        raise BackupError("DATABASE_URL is unset and no embedded Postgres is running")
    started = datetime.now(UTC)
    t0 = time.monotonic()
    folder = new_folder("full", started)
    key = f"{folder}/{DUMP_NAME}"
    with catalogued(
        database_url, kind="full", key=key, storage_url=storage.url, reason=reason
    ) as backup_id:
        result = _dump(
            settings,
            storage,
            database_url,
            folder=folder,
            key=key,
            started=started,
            t0=t0,
            backup_id=backup_id,
            reason=reason,
            storage_class=storage_class,
        )
    record_complete(
        database_url,
        backup_id,
        result,
        kind="full",
        key=key,
        columns={"storage_class": storage_class},
        raw_bytes=result.manifest["raw_bytes"],
    )
    return result


def _dump(
    settings: Settings,
    storage: Storage,
    database_url: str,
    *,
    folder: str,
    key: str,
    started: datetime,
    t0: float,
    backup_id: int | None,
    reason: str,
    storage_class: str | None,
) -> BackupResult:
    url = libpq_url(database_url)
    with psycopg.connect(url) as snap:
        # One snapshot for pg_dump and for the row counts: the manifest's counts are exactly
        # what the dump holds, whatever the application writes meanwhile.
        snap.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        got_lock = snap.execute(
            "SELECT pg_try_advisory_xact_lock(hashtext('tidemill_backup_full'))"
        ).fetchone()
        if not (got_lock and got_lock[0]):
            raise BackupBusy("another logical backup of this database is running")
        row = snap.execute(
            """SELECT pg_export_snapshot(), now(), current_database(),
                      pg_database_size(current_database()), current_setting('server_version'),
                      pg_get_userbyid(datdba)
               FROM pg_database WHERE datname = current_database()"""
        ).fetchone()
        assert row is not None
        snapshot, data_at, dbname, db_size, server_version, db_owner = row
        sums: dict[str, Any] = {}
        sample = settings.backup_checksum_sample
        summer = _checksums_in_snapshot(url, snapshot, sums, sample=sample)
        # roles are dumped meanwhile too: a process spawn and a round trip off the clock
        roles: dict[str, Any] = {}
        dumper = threading.Thread(
            target=_into,
            args=(roles, _dump_globals, url, settings.backup_zstd_level),
            name="globals",
            daemon=True,
        )
        dumper.start()
        argv = [
            postgres_bin("pg_dump"),
            "--format=custom",
            "--compress=0",  # zstd below is faster and multi-threaded
            f"--snapshot={snapshot}",
            "--no-sync",
            f"--dbname={url}",
        ]
        with (
            child(argv, stdout=subprocess.PIPE) as (proc, errors),
            storage.writer(key, storage_class=storage_class) as out,
        ):
            sink = _CompressedSink(
                out, level=settings.backup_zstd_level, threads=zstd_threads(settings)
            )
            assert proc.stdout is not None
            for chunk in pump(proc.stdout):
                sink.write(chunk)
            if proc.wait() != 0:
                raise BackupError(child_error("pg_dump", proc, errors))
            sink.close()
        summer.join()
        if "error" in sums:
            raise BackupError(f"table checksums failed: {sums['error']}")
    put = out.result
    assert put is not None
    checksums: dict[str, dict[str, Any]] = sums["tables"]
    tables = {name: c["rows"] for name, c in checksums.items()}
    dumper.join()
    if "error" in roles:
        raise roles["error"]
    # stored only now: a failed dump leaves no stray object in its folder
    globals_put = storage.put_bytes(f"{folder}/{GLOBALS_NAME}", roles["value"])
    finished = datetime.now(UTC)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "kind": "full",
        "backup_id": backup_id,
        "reason": reason,
        "database": dbname,
        "database_owner": db_owner,
        "database_size_bytes": int(db_size),
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "data_at": data_at.astimezone(UTC).isoformat(),
        "duration_s": round(time.monotonic() - t0, 3),
        "raw_bytes": sink.raw_bytes,
        "compression": {"codec": "zstd", "level": settings.backup_zstd_level},
        "objects": [
            {"key": put.key, "size": put.size, "sha256": put.sha256, "role": "dump"},
            {
                "key": globals_put.key,
                "size": globals_put.size,
                "sha256": globals_put.sha256,
                "role": "globals",
            },
        ],
        "tables": tables,
        "checksums": {name: c["sum"] for name, c in checksums.items()},
        "checksum_sample": sample,
        "encryption": _encryption_note(storage),
        "tools": {
            "server": server_version,
            "pg_dump": tool_version("pg_dump"),
            "zstandard": zstandard.__version__,
            "python": platform.python_version(),
            "host": platform.node(),
        },
    }
    manifest_key = write_manifest(storage, folder, manifest)
    return BackupResult(
        kind="full",
        folder=folder,
        key=put.key,
        manifest_key=manifest_key,
        size=put.size,
        sha256=put.sha256,
        duration_s=time.monotonic() - t0,
        backup_id=backup_id,
        manifest=manifest,
    )


def _encryption_note(storage: Storage) -> dict[str, str] | None:
    keyring = getattr(storage, "keyring", None)
    return {"key_id": keyring.current_id.hex(), "cipher": "AES-256-GCM"} if keyring else None


def write_manifest(storage: Storage, folder: str, manifest: dict[str, Any]) -> str:
    """Written last, in one small object: its presence is what makes a backup complete."""
    key = f"{folder}/{MANIFEST}"
    storage.put_bytes(key, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return key


# -------------------------------------------------------------------------------- logical restore


def restore_logical(
    storage: Storage,
    entry: CatalogEntry,
    target_url: str,
    *,
    verify_first: bool = True,
    jobs: int = 1,
    owners: bool = True,
    privileges: bool = True,
    roles: bool = True,
    scratch_dir: str | None = None,
) -> float:
    """Restore a complete logical backup into the (empty) database at ``target_url``.

    Every object is hashed first and refused if it differs from the manifest: a corrupted
    dump is never half-restored. ``roles``: the backup's roles (pg_dumpall --globals-only) are
    created on the target server first (existing ones are left as they are), so ``owners``
    and ``privileges`` (kept unless asked otherwise) can be restored. ``jobs`` > 1 restores
    tables and builds indexes in parallel like ``pg_restore -j``, which needs a seekable file:
    the dump is decompressed into ``scratch_dir`` first (and removed after). Returns seconds.
    """
    if entry.manifest is None:
        raise IncompleteBackup(f"{entry.folder} has no manifest; it cannot be restored")
    if entry.kind != "full":
        raise BackupError(f"{entry.folder} is a {entry.kind} backup; use `tidemill restore`")
    t0 = time.monotonic()
    if verify_first:
        verify(storage, entry.manifest)
    objects = {o.get("role", "dump"): o for o in entry.manifest["objects"]}
    if roles and "globals" in objects:
        restore_globals(storage, objects["globals"]["key"], target_url)
    key = objects["dump"]["key"]
    argv = [postgres_bin("pg_restore"), "--exit-on-error", f"--dbname={libpq_url(target_url)}"]
    if not owners:
        argv.append("--no-owner")
    if not privileges:
        argv.append("--no-privileges")
    if jobs > 1:
        with tempfile.TemporaryDirectory(prefix="tidemill-restore-", dir=scratch_dir) as tmp:
            path = os.path.join(tmp, "dump.pgc")
            with storage.open(key) as raw, open(path, "wb") as fh:
                _decompress(raw, fh.write, key)
            out = subprocess.run([*argv, f"--jobs={jobs}", path], capture_output=True)
            if out.returncode != 0:
                text = out.stderr.decode(errors="replace").strip()
                last = text.splitlines()[-1] if text else "(no output)"
                raise BackupError(f"pg_restore exited with {out.returncode}: {last}")
        return time.monotonic() - t0
    with (
        storage.open(key) as raw,
        child(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL) as (proc, errors),
    ):
        assert proc.stdin is not None
        try:
            _decompress(raw, proc.stdin.write, key)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # pg_restore stopped early: its exit status and stderr say why
        if proc.wait() != 0:
            raise BackupError(child_error("pg_restore", proc, errors))
    return time.monotonic() - t0


def _decompress(raw: IO[bytes], write: Any, key: str) -> None:
    from core.envelope import EnvelopeError

    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    try:
        while chunk := reader.read(CHUNK):
            write(chunk)
    except (zstandard.ZstdError, EnvelopeError) as exc:
        raise ChecksumMismatch(f"{key} is damaged: {exc}") from exc


def restore_globals(storage: Storage, key: str, target_url: str) -> None:
    """Create the backup's roles on the target server; roles that exist already are kept
    (their "already exists" errors are expected), any other error fails the restore."""
    from core.envelope import EnvelopeError

    try:
        with storage.open(key) as raw:
            text = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True).read()
    except (zstandard.ZstdError, EnvelopeError) as exc:
        raise ChecksumMismatch(f"{key} is damaged: {exc}") from exc
    out = subprocess.run(
        [postgres_bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=0", "-d", libpq_url(target_url)],
        input=text,
        capture_output=True,
    )
    errors = [
        line
        for line in out.stderr.decode(errors="replace").splitlines()
        if "ERROR:" in line and "already exists" not in line
    ]
    if out.returncode != 0 or errors:
        raise BackupError(f"restoring roles failed: {(errors or ['psql failed'])[0].strip()}")
