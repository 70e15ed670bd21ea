"""Archive: rows leave Postgres only in the transaction whose upload is stored and verified.

One batch, one transaction:

1. two index probes find the batch's first and last ``(age, key)``; they name the object
   deterministically: ``<table>/<yyyy>/<mm>/<first>--<last>.<csv|jsonl>.zst``;
2. the key is recorded as pending on the run row (committed on its own connection);
3. ``COPY (DELETE … RETURNING *) TO STDOUT`` streams the deleted rows through zstd into the
   storage writer (S3 multipart / temp file + rename): nothing is buffered whole in memory;
4. the stored object's sha256 is read back and compared with what was sent;
5. an ``archive_objects`` row is inserted, then the transaction commits.

Any failure before the commit rolls the DELETE back: the rows stay, and the object (if it got
written) is an orphan the next run removes before archiving the same rows again. At the end a
manifest (row counts, key ranges, checksums, schema version) is written for the run.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import IO, Any

import zstandard
from psycopg import sql

from core.log import get_logger
from core.settings import Settings, get_settings
from pipelines import partitions as parts
from pipelines.policies import Policy
from pipelines.purge import (
    Key,
    TableState,
    next_bounds,
    range_params,
    range_where,
    scan_state,
)

log = get_logger(__name__)

ZSTD_LEVEL = 1  # cheap: the pipeline shares the CPU with Postgres; CSV rows compress well anyway
COMPRESS_CHUNK = 1 << 20
JSONL_CHUNK = 2000  # JSON lines per COPY row
# JSON lines through COPY's CSV mode with a delimiter and quote that JSON text never contains
# raw (control characters are escaped as \u00XX in JSON), so each line is the JSON untouched.
_JSONL_COPY = "FORMAT csv, DELIMITER E'\\x02', QUOTE E'\\x01'"


class ArchiveError(Exception):
    """The archive could not be written or verified; nothing was deleted."""


@dataclass(frozen=True)
class ArchivePlan:
    pipeline: str
    table: str
    cutoff: datetime
    eligible_rows: int
    batch_size: int
    batches: int
    storage_url: str
    storage_class: str | None
    format: str
    first_key: str | None

    def lines(self) -> list[str]:
        return [
            f"archive rows of {self.table} older than {self.cutoff.isoformat()} "
            f"({self.eligible_rows} rows) to {self.storage_url}",
            f"  {self.batches} batches of at most {self.batch_size} rows, "
            f"{self.format} + zstd, storage class {self.storage_class or 'default'}",
            f"  first object: {self.first_key or '(none)'}",
            "  then drop partitions left empty below the cutoff; write a run manifest",
        ]


def _stamp(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return str(value)


def object_key(table: str, lo: Key, hi: Key, fmt: str) -> str:
    """``table/yyyy/mm/<first>--<last>.<fmt>.zst``: the same rows always get the same key.

    yyyy/mm are those of the batch's first age value, a timestamp (in UTC) or a ``date``."""
    first = lo[0]
    if isinstance(first, datetime):
        month = first.astimezone(UTC).strftime("%Y/%m")
    elif isinstance(first, date):
        month = first.strftime("%Y/%m")
    else:  # policies only allow time types (policies._TIME_TYPES); never seen
        month = datetime.now(UTC).strftime("%Y/%m")
    return f"{table}/{month}/{_stamp(lo[0])}_{lo[1]}--{_stamp(hi[0])}_{hi[1]}.{fmt}.zst"


def plan_archive(
    policy: Policy,
    state: TableState,
    cutoff: datetime,
    *,
    storage_url: str,
    first: tuple[Key, Key] | None,
) -> ArchivePlan:
    """What an archive run will do (no I/O)."""
    return ArchivePlan(
        pipeline=policy.name,
        table=policy.table,
        cutoff=cutoff,
        eligible_rows=state.eligible_rows,
        batch_size=policy.batch_size,
        batches=-(-state.eligible_rows // policy.batch_size),
        storage_url=storage_url,
        storage_class=policy.storage_class,
        format=policy.format,
        first_key=object_key(policy.table, first[0], first[1], policy.format) if first else None,
    )


def schema_version(conn: Any) -> str | None:
    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return str(row[0]) if row else None


def columns(conn: Any, table: str) -> list[dict[str, str]]:
    return [
        {"name": r[0], "type": r[1]}
        for r in conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped "
            "ORDER BY attnum",
            (f"public.{table}",),
        ).fetchall()
    ]


def _copy_statement(policy: Policy) -> sql.Composable:
    t = sql.Identifier("public", policy.table)
    delete = sql.SQL("DELETE FROM {t} WHERE {w} RETURNING *").format(t=t, w=range_where(policy))
    if policy.format == "jsonl":
        # The server renders each row as JSON and joins them into chunks of JSONL_CHUNK
        # lines: the client handles one COPY row per chunk instead of one per table row,
        # which is most of the client's cost at millions of rows.
        return sql.SQL(
            "COPY (WITH gone AS ({d}), "
            "lines AS (SELECT row_to_json(gone)::text AS line, row_number() OVER () AS n "
            "FROM gone) "
            "SELECT string_agg(line || E'\\n', '') FROM lines GROUP BY (n - 1) / {c}) "
            "TO STDOUT"
        ).format(d=delete, c=sql.Literal(JSONL_CHUNK))
    return sql.SQL("COPY ({d}) TO STDOUT (FORMAT csv, HEADER true)").format(d=delete)


def run(ctx: Any) -> ArchivePlan:
    policy: Policy = ctx.policy
    cutoff = ctx.cutoff
    state = scan_state(ctx.work, policy, cutoff, exact=ctx.dry_run)
    first = next_bounds(ctx.work, policy, cutoff, None)
    plan = plan_archive(policy, state, cutoff, storage_url=ctx.storage.url, first=first)
    ctx.expected = plan.eligible_rows
    if ctx.dry_run:
        return plan
    version = schema_version(ctx.work)
    statement = _copy_statement(policy)
    after: Key | None = None
    while True:
        with ctx.batch() as conn:
            bounds = next_bounds(conn, policy, cutoff, after)
            if bounds is None:
                break
            lo, hi = bounds
            key = object_key(policy.table, lo, hi, policy.format)
            if conn.execute(
                "SELECT 1 FROM archive_objects WHERE storage_url = %s AND key = %s",
                (ctx.storage.url, key),
            ).fetchone():
                # Rows later inserted into an already archived range: never overwrite.
                key = key.replace(f".{policy.format}.zst", f".r{ctx.run_id}.{policy.format}.zst")
            ctx.note_pending(key)
            rows, put = _stream_batch(ctx, conn, statement, range_params(cutoff, lo, hi), key)
            stored = ctx.storage.sha256(key)
            if stored != put.sha256:
                raise ArchiveError(
                    f"object {key} reads back with sha256 {stored}, not {put.sha256}: "
                    "nothing deleted"
                )
            if policy.storage_class:
                ctx.storage.set_storage_class(key, policy.storage_class)
            conn.execute(
                "INSERT INTO archive_objects (run_id, pipeline, table_name, key, format, rows, "
                "size_bytes, sha256, first_key, last_key, storage_url, schema_version) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    ctx.run_id,
                    policy.name,
                    policy.table,
                    key,
                    policy.format,
                    rows,
                    put.size,
                    put.sha256,
                    json.dumps(_key_json(policy, lo)),
                    json.dumps(_key_json(policy, hi)),
                    ctx.storage.url,
                    version,
                ),
            )
        after = hi
        log.info("archive_batch_committed", table=policy.table, key=key, rows=rows)
        ctx.advance(
            scanned=rows,
            affected=rows,
            bytes_written=put.size,
            objects=1,
            cursor={"a": str(hi[0]), "k": str(hi[1])},
        )
    _drop_empty_partitions(ctx, policy, cutoff)
    return plan


def _key_json(policy: Policy, key: Key) -> dict[str, str]:
    return {policy.age_column: str(key[0]), policy.key_column: str(key[1])}


def _stream_batch(
    ctx: Any, conn: Any, statement: sql.Composable, params: dict[str, Any], key: str
) -> tuple[int, Any]:
    # Written in the default class and moved to the policy's class only after verification:
    # a GLACIER object cannot be read back to check it.
    with ctx.storage.writer(key) as writer:
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).stream_writer(
            writer, closefd=False
        )
        cur = conn.cursor()
        if ctx.policy.format == "jsonl":
            rows = 0
            with cur.copy(statement, params) as copy:
                copy.set_types(["text"])
                for (text,) in copy.rows():
                    data = text.encode()
                    rows += data.count(b"\n")  # JSON text has no raw newline: one per row
                    compressor.write(data)
        else:
            # COPY sends one message per row: gather them into ~1 MiB before compressing,
            # so the per-row cost is one bytearray append rather than a call into zstd.
            buffer = bytearray()
            with cur.copy(statement, params) as copy:
                for chunk in copy:
                    buffer += chunk
                    if len(buffer) >= COMPRESS_CHUNK:
                        compressor.write(buffer)
                        buffer.clear()
            compressor.write(buffer)
            rows = cur.rowcount
        compressor.flush(zstandard.FLUSH_FRAME)
        compressor.close()
    put = writer.result
    if put is None:
        raise ArchiveError(f"storage returned no result for {key}")
    return rows, put


def _drop_empty_partitions(ctx: Any, policy: Policy, cutoff: datetime) -> None:
    """Months entirely below the cutoff are empty once archived: drop them."""
    if policy.filter or policy.age_column != "created_at":
        return
    if not parts.is_partitioned(ctx.work, policy.table):
        return
    for p in parts.plan_expired(parts.list_partitions(ctx.work, policy.table), cutoff):
        left = ctx.work.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(p.schema, p.name))
        ).fetchone()
        if left and not left[0]:
            # Rows may arrive between this check and the drop: drop_partition checks again
            # under the DETACH's lock and keeps the partition if any did.
            parts.drop_partition(
                ctx.work,
                policy.table,
                p,
                lock_timeout_ms=ctx.settings.pipeline_lock_timeout_ms,
                require_empty=True,
            )


# --------------------------------------------------------------------------- crash recovery


def remove_orphan(meta: Any, settings: Settings, key: str, *, pipeline: str, run_id: int) -> bool:
    """An object uploaded by a run that died before its DELETE committed: its rows are still
    in Postgres and will be archived again, so the object must go (or they would be twice)."""
    from core.storage import open_storage

    storage = open_storage(settings=settings)
    committed = meta.execute(
        "SELECT 1 FROM archive_objects WHERE storage_url = %s AND key = %s", (storage.url, key)
    ).fetchone()
    if committed:
        return False
    storage.delete(key)
    log.warning("archive_orphan_removed", pipeline=pipeline, run_id=run_id, key=key)
    return True


def write_manifest(meta: Any, settings: Settings, policy: Policy, run_id: int) -> str | None:
    """The run's manifest: what it archived, where, with which checksums. Written last."""
    from core.storage import open_storage

    rows = meta.execute(
        "SELECT key, rows, size_bytes, sha256, first_key, last_key, format, storage_url, "
        "schema_version FROM archive_objects WHERE run_id = %s ORDER BY id",
        (run_id,),
    ).fetchall()
    if not rows:
        return None
    storage = open_storage(settings=settings)
    manifest = {
        "kind": "tidemill.archive.manifest",
        "version": 1,
        "pipeline": policy.name,
        "run_id": run_id,
        "table": policy.table,
        "format": rows[0][6],
        "compression": "zstd",
        "schema_version": rows[0][8],
        "columns": columns(meta, policy.table),
        "storage_url": rows[0][7],
        "rows": sum(r[1] for r in rows),
        "bytes": sum(r[2] for r in rows),
        "objects": [
            {
                "key": r[0],
                "rows": r[1],
                "size": r[2],
                "sha256": r[3],
                "first": r[4],
                "last": r[5],
            }
            for r in rows
        ],
        "written_at": datetime.now(UTC).isoformat(),
    }
    key = f"manifests/{policy.table}/{policy.name}/run-{run_id:08d}.json"
    storage.put_bytes(key, json.dumps(manifest, indent=1).encode())
    meta.execute("UPDATE pipeline_runs SET manifest_key = %s WHERE id = %s", (key, run_id))
    log.info("archive_manifest_written", pipeline=policy.name, run_id=run_id, key=key)
    return key


# --------------------------------------------------------------------------------- restore


@dataclass(frozen=True)
class RestoreResult:
    key: str
    table: str
    rows_read: int
    rows_inserted: int


def _decompressed(raw: IO[bytes]) -> IO[bytes]:
    reader = zstandard.ZstdDecompressor().stream_reader(raw)
    return io.BufferedReader(reader, buffer_size=1 << 20)


class _Verify:
    """Hashes the compressed bytes as they are read, to compare with the recorded sha256."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        return data

    def readable(self) -> bool:
        return True


def _manifests(storage: Any, table: str | None = None) -> Iterator[dict[str, Any]]:
    """The run manifests in storage (of ``table``'s runs if given), newest run first."""
    prefix = f"manifests/{table}/" if table else "manifests/"
    keys = [i.key for i in storage.list(prefix) if i.key.endswith(".json")]
    for mkey in sorted(keys, key=lambda k: k.rsplit("/", 1)[-1], reverse=True):
        try:
            doc = json.loads(storage.get_bytes(mkey))
        except (ValueError, OSError) as exc:
            log.warning("archive_manifest_unreadable", key=mkey, error=str(exc))
            continue
        if isinstance(doc, dict) and doc.get("kind") == "tidemill.archive.manifest":
            yield doc


def manifest_checksum(storage: Any, key: str) -> tuple[str, str] | None:
    """``(sha256, manifest table)`` of ``key`` as a run manifest in storage records it: the
    checksum to verify against when the ``archive_objects`` catalogue has no row (a fresh or
    recovered database). None if no manifest lists it."""
    for doc in _manifests(storage, key.split("/", 1)[0]):
        for obj in doc.get("objects", []):
            if obj.get("key") == key and obj.get("sha256"):
                return str(obj["sha256"]), str(doc.get("table") or "")
    return None


def manifest_objects(storage: Any, run_id: int) -> dict[str, str]:
    """Key -> sha256 of the objects the manifest of run ``run_id`` lists, in its order (empty
    if there is none)."""
    for doc in _manifests(storage):
        if doc.get("run_id") == run_id:
            return {str(o["key"]): str(o.get("sha256") or "") for o in doc.get("objects", [])}
    return {}


def restore_object(
    key: str,
    *,
    into: str | None = None,
    settings: Settings | None = None,
    verify: bool = True,
    manifest_sha256: str | None = None,
) -> RestoreResult:
    """Load one archived object back into ``into`` (default: its own table). Rows already
    there are skipped (``ON CONFLICT DO NOTHING``), so restoring twice inserts nothing more.

    The object's sha256 is checked against the ``archive_objects`` catalogue or, when the
    catalogue has no row for it (a fresh or recovered database), against its run manifest in
    storage (``manifest_sha256`` when the caller already read it). With neither, the restore
    is refused unless ``verify=False``."""
    from core.storage import open_storage
    from pipelines.engine import connect

    settings = settings or get_settings()
    storage = open_storage(settings=settings)
    fmt = "jsonl" if key.endswith(".jsonl.zst") else "csv" if key.endswith(".csv.zst") else None
    if fmt is None:
        log.warning("archive_restore_rejected", reason="not an archive object")
        raise ArchiveError(f"{key} is not an archive object (.csv.zst or .jsonl.zst)")
    with connect(settings) as conn:
        recorded = conn.execute(
            "SELECT table_name, sha256 FROM archive_objects WHERE storage_url = %s AND key = %s",
            (storage.url, key),
        ).fetchone()
        expected: str | None = None
        source = "archive_objects"
        manifest_table = None
        if recorded and verify:
            expected = recorded[1]
        elif verify:
            found_in = (manifest_sha256, "") if manifest_sha256 else manifest_checksum(storage, key)
            if found_in is not None:
                expected, manifest_table = found_in
                source = "run manifest"
            else:
                log.warning("archive_restore_rejected", reason="no checksum", key=key)
                raise ArchiveError(
                    f"{key}: no sha256 for it in archive_objects nor in any run manifest under "
                    f"manifests/{key.split('/', 1)[0]}/ in {storage.url}; refusing to restore "
                    "unverified rows (pass --no-verify to restore it anyway)"
                )
        table = into or (recorded[0] if recorded else manifest_table or key.split("/", 1)[0])
        found = conn.execute("SELECT to_regclass(%s)", (f"public.{table}",)).fetchone()
        if not found or not found[0]:
            log.warning("archive_restore_rejected", reason="no such table", table=table)
            raise ArchiveError(f"table {table!r} does not exist")
        target = sql.Identifier("public", table)
        if expected is not None and (stored := storage.sha256(key)) != expected:
            # Checksum before parsing (of the stored bytes: ciphertext when encrypted): a
            # damaged object is one clear line, not a parse error from its garbage.
            log.error("archive_restore_checksum_mismatch", key=key, source=source)
            raise ArchiveError(
                f"{key}: sha256 {stored[:16]}… differs from the recorded {expected[:16]}… "
                f"({source}); the object is damaged, nothing restored"
            )
        with storage.open(key) as raw, conn.transaction():
            hashed = _Verify(raw)
            data = _decompressed(hashed)  # type: ignore[arg-type]
            if fmt == "csv":
                header = data.readline()
                cols = next(iter(_csv_rows(header)))
                conn.execute(
                    sql.SQL(
                        "CREATE TEMP TABLE restore_rows (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP"
                    ).format(target)
                )
                col_ids = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
                cur = conn.cursor()
                with cur.copy(
                    sql.SQL("COPY restore_rows ({}) FROM STDIN (FORMAT csv)").format(col_ids)
                ) as copy:
                    for chunk in _chunks(data):
                        copy.write(chunk)
                read = cur.rowcount
                inserted = conn.execute(
                    sql.SQL(
                        "INSERT INTO {t} ({c}) SELECT {c} FROM restore_rows ON CONFLICT DO NOTHING"
                    ).format(t=target, c=col_ids)
                ).rowcount
            else:
                conn.execute("CREATE TEMP TABLE restore_rows (doc jsonb) ON COMMIT DROP")
                cur = conn.cursor()
                with cur.copy(
                    sql.SQL("COPY restore_rows (doc) FROM STDIN ({})").format(sql.SQL(_JSONL_COPY))
                ) as copy:
                    for chunk in _chunks(data):
                        copy.write(chunk)
                read = cur.rowcount
                inserted = conn.execute(
                    sql.SQL(
                        "INSERT INTO {t} SELECT r.* FROM restore_rows, "
                        "jsonb_populate_record(NULL::{t}, restore_rows.doc) r "
                        "ON CONFLICT DO NOTHING"
                    ).format(t=target)
                ).rowcount
            # Read to the end so the hash covers the whole object before we commit.
            while hashed.read(1 << 20):
                pass
            # (an encrypted object was checked above; here the hash is of the plaintext)
            if (
                expected is not None
                and storage.keyring is None
                and hashed.hash.hexdigest() != expected
            ):
                log.error("archive_restore_checksum_mismatch", key=key, source=source)
                raise ArchiveError(
                    f"{key}: sha256 {hashed.hash.hexdigest()} differs from the recorded "
                    f"{expected} ({source}); nothing restored"
                )
    log.info(
        "archive_restored",
        key=key,
        table=table,
        rows_read=read,
        rows_inserted=inserted,
        verified=source if expected is not None else "no",
    )
    return RestoreResult(key, table, read, inserted)


def _csv_rows(line: bytes) -> Iterator[list[str]]:
    import csv

    yield from csv.reader([line.decode()])


def _chunks(data: IO[bytes]) -> Iterator[bytes]:
    while chunk := data.read(1 << 20):
        yield chunk


def objects_of_run(conn: Any, run_id: int) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT key FROM archive_objects WHERE run_id = %s ORDER BY id", (run_id,)
        ).fetchall()
    ]
