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

import hashlib
import io
import json
import os
import re
import struct
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
from core.storage import Storage, open_storage
from db.embedded import postgres_bin
from db.engine import direct_url, libpq_url
from pipelines.backups.logical import (
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


# A zstd skippable frame closes every archived WAL object: the sha256 and size of the
# uncompressed file, recorded at push. Decompressors skip it; fetch and verify check the
# content against it, so a truncated object (even one cut exactly at a frame's end, which zstd
# alone does not notice) or a flipped byte is refused before PostgreSQL sees a byte.
_TRAILER_MAGIC = struct.pack("<I", 0x184D2A5E)
_TRAILER_TAG = b"TMWAL1"
_TRAILER_LEN = 4 + 4 + len(_TRAILER_TAG) + 32 + 8
HEAD_KEY = f"{WAL_PREFIX}head.json"


def wal_trailer(sha256_hex: str, size: int) -> bytes:
    payload = _TRAILER_TAG + bytes.fromhex(sha256_hex) + struct.pack("<Q", size)
    return _TRAILER_MAGIC + struct.pack("<I", len(payload)) + payload


def split_trailer(blob: bytes, key: str) -> tuple[bytes, str, int]:
    """(zstd frames, sha256, size) of an archived WAL object; WalCorrupt when the trailer is
    missing (the object is cut off, or was not written by `tidemill wal push`)."""
    tail = blob[-_TRAILER_LEN:]
    if (
        len(blob) < _TRAILER_LEN
        or not tail.startswith(_TRAILER_MAGIC)
        or tail[8 : 8 + len(_TRAILER_TAG)] != _TRAILER_TAG
    ):
        raise WalCorrupt(f"{key} is truncated or damaged: its checksum trailer is missing")
    digest = tail[8 + len(_TRAILER_TAG) : 8 + len(_TRAILER_TAG) + 32].hex()
    (size,) = struct.unpack("<Q", tail[-8:])
    return blob[:-_TRAILER_LEN], digest, size


def read_wal_object(storage: Storage, key: str) -> bytes:
    """The uncompressed content of an archived WAL object, checked against its trailer (and,
    when encrypted, every chunk's GCM tag). WalCorrupt on any damage."""
    from core.envelope import EnvelopeError

    try:
        with storage.open(key) as raw:
            blob = raw.read()
    except EnvelopeError as exc:
        raise WalCorrupt(str(exc)) from exc
    frames, want_sha, want_size = split_trailer(blob, key)
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(frames), read_across_frames=True
        )
        data = reader.read()
    except zstandard.ZstdError as exc:
        raise WalCorrupt(f"{key} is corrupt: {exc}") from exc
    if len(data) != want_size or hashlib.sha256(data).hexdigest() != want_sha:
        raise WalCorrupt(
            f"{key} is corrupt: {len(data)} bytes with another sha256 than the {want_size} "
            "recorded when it was archived"
        )
    return data


def _stored_wal_sha256(storage: Storage, key: str) -> str | None:
    """The archived object's content checksum; None when it is unreadable or damaged."""
    try:
        return hashlib.sha256(read_wal_object(storage, key)).hexdigest()
    except WalCorrupt:
        return None


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
    data = path.read_bytes()  # one segment (16 MiB by default): hashed and compressed whole
    digest = hashlib.sha256(data).hexdigest()
    body = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)
    try:
        with storage.writer(key, exclusive=True) as out:
            out.write(body)
            out.write(wal_trailer(digest, len(data)))
    except FileExistsError:  # archived by someone else after our check
        log.warning("wal_archived_concurrently", wal=name)
        return _same_or_conflict(storage, path, name, key)
    log.info("wal_archived", wal=name, key=key)
    if _SEGMENT.match(name):
        _advance_head(storage, name)
    return "stored"


_SEGMENT = re.compile(r"^[0-9A-F]{24}$")


def read_head(storage: Storage) -> dict[str, dict[str, str]]:
    """Per timeline, the first and the newest segment ever pushed: the archive's own record
    of what it must hold, so a missing last segment is noticed, not taken for the end."""
    try:
        head = json.loads(storage.get_bytes(HEAD_KEY))
    except FileNotFoundError:
        return {}
    except Exception as exc:  # damaged: fetch must not trust it, verify reports it
        raise WalCorrupt(f"{HEAD_KEY} is unreadable: {exc}") from exc
    return {str(k): dict(v) for k, v in head.get("timelines", {}).items()}


def _advance_head(storage: Storage, name: str) -> None:
    # One archiver per cluster pushes in order, so read-modify-write is enough; a lost update
    # only leaves the head behind (less checking, never a false alarm).
    try:
        head = read_head(storage)
    except WalCorrupt:
        head = {}
    timeline = head.get(name[:8])
    if timeline is None:
        head[name[:8]] = {"first": name, "last": name}
    elif name[8:] < timeline["first"][8:]:
        timeline["first"] = name
    elif name[8:] > timeline["last"][8:]:
        timeline["last"] = name
    else:
        return
    storage.put_bytes(HEAD_KEY, json.dumps({"timelines": head}, sort_keys=True).encode())


def expected_in_archive(head: dict[str, dict[str, str]], name: str) -> bool:
    """True when the head says ``name`` was pushed (so its absence is damage, not the end)."""
    if not _SEGMENT.match(name):
        return False
    timeline = head.get(name[:8])
    return bool(timeline and timeline["first"][8:] <= name[8:] <= timeline["last"][8:])


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
    """Restore one WAL file to ``dest``; False only when the archive does not have it and
    never had it (past the newest pushed segment).

    Anything else (storage unreachable or denied, a damaged or truncated object, a segment
    missing below the archive's head, a local write error) raises: ``tidemill wal fetch``
    turns that into an exit code that makes recovery abort, because "not archived" is how
    PostgreSQL learns that it has reached the end of the archive.
    """
    key = wal_key(name)
    try:
        data = read_wal_object(storage, key)
    except FileNotFoundError:
        root = getattr(storage, "root", None)
        if isinstance(root, Path) and not root.is_dir():
            # the whole archive is missing (unmounted volume, wrong path): not its end
            raise BackupError(f"WAL archive {root} does not exist") from None
        if expected_in_archive(read_head(storage), name):
            log.error("wal_missing", wal=name, key=key)
            raise WalCorrupt(
                f"{key} is missing, but the archive recorded newer segments: the WAL chain "
                "has a gap; recovery stops here instead of ending early"
            ) from None
        return False
    except WalCorrupt as exc:
        log.error("wal_corrupt", wal=name, key=key, error=str(exc))
        raise
    tmp = dest.with_name(f".{dest.name}.tidemill-tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
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
