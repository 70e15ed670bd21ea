"""Physical backups: ``pg_basebackup`` streamed into storage, incrementals, WAL push and fetch.

A base backup is ``pg_basebackup --format=tar --pgdata=-`` (the whole cluster as one tar on
stdout, WAL needed for consistency included) compressed by zstd on the fly into
``backups/base/<stamp>/base.tar.zst``. PostgreSQL's own ``backup_manifest`` rides inside the
tar; it is picked out of the stream as it passes and stored beside it, because the next
incremental backup needs it (``pg_basebackup --incremental=…``). Our ``manifest.json`` is
written last, as for logical backups.

Incrementals (PostgreSQL 17+, ``summarize_wal=on``) are taken against the latest full base
backup, not against the previous incremental: a restore then combines exactly two backups
(``pg_combinebackup base incremental``), and losing one hourly incremental costs nothing but
that hour's shortcut (WAL still covers it).

WAL: ``tidemill wal push %p %f`` is the archive_command. A segment is stored once as
``wal/<name>.zst`` (zstd with its content checksum); pushing the same name again with the same
bytes succeeds (PostgreSQL retries after a crash between copy and acknowledgement), with
different bytes it fails loudly: two clusters writing into one archive, or a corrupt file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

import psycopg
import zstandard

from core.log import get_logger
from core.settings import Settings, get_settings
from core.storage import FileStorage, Storage, open_storage
from db.embedded import postgres_bin
from db.engine import direct_url, libpq_url
from pipelines.backup import (
    CHUNK,
    MANIFEST_FORMAT,
    BackupError,
    BackupResult,
    CatalogEntry,
    ChecksumMismatch,
    catalog,
    catalogued,
    child,
    child_error,
    new_folder,
    pump,
    record_complete,
    tool_version,
    write_manifest,
    zstd_threads,
)

log = get_logger(__name__)

WAL_PREFIX = "wal/"
BASE_NAME = "base.tar.zst"
PG_MANIFEST = "backup_manifest"
_WAL_NAME = re.compile(
    r"^(?:[0-9A-F]{24}(?:\.partial|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history)$"
)


class WalConflict(BackupError):
    """The archive already holds this WAL file name with different content."""


class IncrementalUnavailable(BackupError):
    """This server cannot take incrementals: PostgreSQL before 17, or summarize_wal off."""


class NoParentBase(IncrementalUnavailable):
    """No complete full base backup to take an incremental against (yet)."""


class WalCorrupt(BackupError):
    """An archived WAL file fails its zstd checksum."""


# ------------------------------------------------------------------------------------------ WAL


def wal_key(name: str) -> str:
    if not _WAL_NAME.match(name):
        raise BackupError(f"{name!r} is not a WAL file name (e.g. 000000010000000000000001)")
    return f"{WAL_PREFIX}{name}.zst"


def wal_position(name: str) -> str | None:
    """The segment part of a WAL file name (log + segment, timeline dropped), for ordering."""
    base = name.rsplit("/", 1)[-1].removesuffix(".zst")
    if re.match(r"^[0-9A-F]{24}", base):
        return base[8:24]
    return None  # .history files: never pruned


def lsn_to_segment(lsn: str, timeline: int, segment_size: int) -> str:
    high, low = (int(part, 16) for part in lsn.split("/"))
    segno = ((high << 32) | low) // segment_size
    per_log = 0x100000000 // segment_size
    return f"{timeline:08X}{segno // per_log:08X}{segno % per_log:08X}"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stored_wal_sha256(storage: Storage, key: str) -> str:
    digest = hashlib.sha256()
    with storage.open(key) as raw:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        try:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
        except zstandard.ZstdError as exc:
            raise WalCorrupt(f"{key} is corrupt: {exc}") from exc
    return digest.hexdigest()


def push_wal(storage: Storage, path: Path, name: str, *, level: int = 1) -> str:
    """Archive one WAL file; returns "stored" or "identical" (already archived, same bytes).

    The no-overwrite rule is enforced by the publish itself (``exclusive=True``: a hard link on
    file://, a conditional ``If-None-Match: *`` put on s3), not by the existence check, which
    is only a shortcut for PostgreSQL's retries: a second archiver writing the same name
    between our check and our publish cannot be overwritten.
    """
    key = wal_key(name)
    if not path.is_file():
        raise BackupError(f"{path} does not exist or is not a file")
    if storage.exists(key):
        return _same_or_conflict(storage, path, name, key)
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
    try:
        with open(path, "rb") as fh, storage.writer(key, exclusive=True) as out:
            cctx.copy_stream(fh, cast(IO[bytes], out), read_size=CHUNK, write_size=CHUNK)
    except FileExistsError:  # archived by someone else after our check
        log.warning("wal_archived_concurrently", wal=name)
        return _same_or_conflict(storage, path, name, key)
    log.info("wal_archived", wal=name, key=key)
    return "stored"


def _same_or_conflict(storage: Storage, path: Path, name: str, key: str) -> str:
    local = _file_sha256(path)
    stored = _stored_wal_sha256(storage, key)
    if stored == local:
        log.info("wal_already_archived", wal=name)
        return "identical"
    log.error("wal_segment_conflict", wal=name, key=key)
    raise WalConflict(
        f"{key} is already archived with different content; refusing to overwrite it "
        "(is another cluster archiving into the same storage?)"
    )


def fetch_wal(storage: Storage, name: str, dest: Path) -> bool:
    """Restore one WAL file to ``dest``; False only when the archive does not have it.

    Anything else (storage unreachable or denied, an unreadable object, a local write error)
    raises: ``tidemill wal fetch`` turns that into an exit code that makes recovery abort,
    because "not archived" is how PostgreSQL learns that it has reached the end of the archive.
    """
    key = wal_key(name)
    tmp = dest.with_name(f".{dest.name}.tidemill-tmp")
    with contextlib.ExitStack() as stack:
        try:
            raw = stack.enter_context(storage.open(key))
        except FileNotFoundError:
            if isinstance(storage, FileStorage) and not storage.root.is_dir():
                # the whole archive is missing (unmounted volume, wrong path): not its end
                raise BackupError(f"WAL archive {storage.root} does not exist") from None
            return False
        try:
            with open(tmp, "wb") as fh:
                reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
                while chunk := reader.read(CHUNK):
                    fh.write(chunk)
            os.replace(tmp, dest)
        except zstandard.ZstdError as exc:
            tmp.unlink(missing_ok=True)
            log.error("wal_corrupt", wal=name, key=key, error=str(exc))
            raise WalCorrupt(f"{key} is corrupt: {exc}") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return True


# ----------------------------------------------------------------------------------- base backup


class TarMemberCatcher:
    """Copies one member out of a tar stream as it flows past (ustar headers, 512-byte blocks).

    pg_basebackup's own tar writer emits plain ustar (names over 99 bytes use the prefix
    field); that is all this needs to understand.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.found: bytes | None = None
        self._header = bytearray()
        self._remaining = 0
        self._pad = 0
        self._capture: bytearray | None = None

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        i, n = 0, len(data)
        while i < n:
            if self._remaining:
                take = min(self._remaining, n - i)
                if self._capture is not None:
                    self._capture += view[i : i + take]
                i += take
                self._remaining -= take
                if not self._remaining and self._capture is not None:
                    self.found, self._capture = bytes(self._capture), None
                continue
            if self._pad:
                take = min(self._pad, n - i)
                i += take
                self._pad -= take
                continue
            take = min(512 - len(self._header), n - i)
            self._header += view[i : i + take]
            i += take
            if len(self._header) == 512:
                self._on_header(bytes(self._header))
                self._header.clear()

    def _on_header(self, header: bytes) -> None:
        if not header.strip(b"\0"):
            return  # end-of-archive blocks
        name = header[0:100].split(b"\0", 1)[0].decode(errors="replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode(errors="replace")
        if prefix:
            name = f"{prefix}/{name}"
        size = _tar_size(header[124:136])
        self._remaining, self._pad = size, (-size) % 512
        regular = header[156:157] in (b"0", b"\0")
        if regular and name.lstrip("./") == self.name:
            self._capture = bytearray()
            if size == 0:
                self.found, self._capture = b"", None


def _tar_size(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text or b"0", 8)


def server_facts(database_url: str) -> dict[str, Any]:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        row = conn.execute(
            """SELECT current_setting('server_version_num')::int,
                      current_setting('server_version'),
                      current_setting('summarize_wal', true),
                      pg_size_bytes(current_setting('wal_segment_size')),
                      (SELECT sum(pg_database_size(oid)) FROM pg_database)"""
        ).fetchone()
    assert row is not None
    return {
        "version_num": int(row[0]),
        "version": row[1],
        "summarize_wal": row[2] == "on",
        "wal_segment_size": int(row[3]),
        "cluster_size_bytes": int(row[4] or 0),
    }


def run_base_backup(
    settings: Settings | None = None,
    *,
    storage: Storage | None = None,
    database_url: str | None = None,
    incremental: bool = False,
    reason: str = "scheduled",
) -> BackupResult:
    """Take a full (or, on PostgreSQL 17+, incremental) base backup of the cluster."""
    settings = settings or get_settings()
    storage = storage or open_storage(settings=settings)
    database_url = database_url or (settings.database_url and direct_url(settings))
    if not database_url:
        raise BackupError("DATABASE_URL is unset and no embedded Postgres is running")
    facts = server_facts(database_url)
    parent: CatalogEntry | None = None
    if incremental:
        if facts["version_num"] < 170000:
            raise IncrementalUnavailable(
                f"incremental base backups need PostgreSQL 17 or later (server is "
                f"{facts['version']}); take a full one with `tidemill backup base`"
            )
        if not facts["summarize_wal"]:
            raise IncrementalUnavailable(
                "incremental base backups need summarize_wal = on on the server"
            )
        bases = [e for e in catalog(storage, kinds=("base",)) if e.complete]
        if not bases:
            raise NoParentBase(
                "no full base backup to take an incremental against; run "
                "`tidemill backup base` first"
            )
        parent = bases[-1]
    kind = "incremental" if incremental else "base"
    started = datetime.now(UTC)
    t0 = time.monotonic()
    folder = new_folder(kind, started)
    key = f"{folder}/{BASE_NAME}"
    parent_id = parent.manifest.get("backup_id") if parent and parent.manifest else None
    with catalogued(
        database_url,
        kind=kind,
        key=key,
        storage_url=storage.url,
        reason=reason,
        parent_id=parent_id,
    ) as backup_id:
        result = _basebackup(
            settings,
            storage,
            database_url,
            kind=kind,
            folder=folder,
            key=key,
            started=started,
            t0=t0,
            parent=parent,
            facts=facts,
            backup_id=backup_id,
            reason=reason,
        )
    record_complete(
        database_url,
        backup_id,
        result,
        kind=kind,
        key=key,
        columns={"wal_start": result.manifest["wal_start"]},
    )
    return result


def _basebackup(
    settings: Settings,
    storage: Storage,
    database_url: str,
    *,
    kind: str,
    folder: str,
    key: str,
    started: datetime,
    t0: float,
    parent: CatalogEntry | None,
    facts: dict[str, Any],
    backup_id: int | None,
    reason: str,
) -> BackupResult:
    argv = [
        postgres_bin("pg_basebackup"),
        f"--dbname={libpq_url(database_url)}",
        "--pgdata=-",
        "--format=tar",
        "--wal-method=fetch",  # the WAL for consistency goes into the tar: self-contained
        "--checkpoint=fast",
        f"--label=tidemill {folder}",
    ]
    with tempfile.TemporaryDirectory(prefix="tidemill-basebackup-") as tmp:
        if parent is not None:
            assert parent.manifest is not None
            pg_manifest = _object(parent.manifest, "pg_manifest")
            data = storage.get_bytes(pg_manifest["key"])
            if hashlib.sha256(data).hexdigest() != pg_manifest["sha256"]:
                raise ChecksumMismatch(f"{pg_manifest['key']} does not match its manifest")
            reference = Path(tmp) / PG_MANIFEST
            reference.write_bytes(data)
            argv.append(f"--incremental={reference}")
        catcher = TarMemberCatcher(PG_MANIFEST)
        with (
            child(argv, stdout=subprocess.PIPE) as (proc, errors),
            storage.writer(key) as out,
        ):
            cctx = zstandard.ZstdCompressor(
                level=settings.backup_zstd_level,
                threads=zstd_threads(settings),
                write_checksum=True,
            )
            sink = cctx.stream_writer(cast(IO[bytes], out), closefd=False)
            raw_bytes = 0
            assert proc.stdout is not None
            for chunk in pump(proc.stdout):
                raw_bytes += len(chunk)
                catcher.feed(chunk)
                sink.write(chunk)
            if proc.wait() != 0:
                raise BackupError(child_error("pg_basebackup", proc, errors))
            if catcher.found is None:
                raise BackupError("pg_basebackup's stream had no backup_manifest")
            sink.close()
    put = out.result
    assert put is not None
    finished = datetime.now(UTC)
    pg_manifest_put = storage.put_bytes(f"{folder}/{PG_MANIFEST}", catcher.found)
    ranges = json.loads(catcher.found)["WAL-Ranges"]
    timeline = int(ranges[-1]["Timeline"])
    wal_start = lsn_to_segment(
        ranges[0]["Start-LSN"], int(ranges[0]["Timeline"]), facts["wal_segment_size"]
    )
    wal_end = lsn_to_segment(ranges[-1]["End-LSN"], timeline, facts["wal_segment_size"])
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "backup_id": backup_id,
        "reason": reason,
        "parent": parent.folder if parent else None,
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        # Consistent once the end LSN is replayed, which happened before pg_basebackup exited.
        "data_at": finished.isoformat(),
        "duration_s": round(time.monotonic() - t0, 3),
        "raw_bytes": raw_bytes,
        "cluster_size_bytes": facts["cluster_size_bytes"],
        "timeline": timeline,
        "start_lsn": ranges[0]["Start-LSN"],
        "end_lsn": ranges[-1]["End-LSN"],
        "wal_start": wal_start,
        "wal_end": wal_end,
        "wal_segment_size": facts["wal_segment_size"],
        "compression": {"codec": "zstd", "level": settings.backup_zstd_level},
        "objects": [
            {"key": put.key, "size": put.size, "sha256": put.sha256, "role": "base"},
            {
                "key": pg_manifest_put.key,
                "size": pg_manifest_put.size,
                "sha256": pg_manifest_put.sha256,
                "role": "pg_manifest",
            },
        ],
        "tools": {
            "server": facts["version"],
            "pg_basebackup": tool_version("pg_basebackup"),
            "zstandard": zstandard.__version__,
        },
    }
    manifest_key = write_manifest(storage, folder, manifest)
    return BackupResult(
        kind=kind,
        folder=folder,
        key=put.key,
        manifest_key=manifest_key,
        size=put.size,
        sha256=put.sha256,
        duration_s=time.monotonic() - t0,
        backup_id=backup_id,
        manifest=manifest,
    )


def _object(manifest: dict[str, Any], role: str) -> dict[str, Any]:
    for obj in manifest["objects"]:
        if obj.get("role") == role:
            return dict(obj)
    raise BackupError(f"manifest has no {role} object")
