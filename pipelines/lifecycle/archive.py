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

Whole months first. On a table partitioned by month on the policy's age column (``messages``,
``notifications``) and an unfiltered policy, each partition lying wholly before the cutoff is
archived without a DELETE, in ONE transaction (``_archive_partition``):

1. ``LOCK TABLE <month> IN SHARE MODE``: writes to that month wait (reads do not);
2. its rows are counted, cut into heap-block ranges of ``batch_size`` to ~2x rows (TID range
   scans: no sort, no index pass) and every object key
   (``<table>/<yyyy>/<mm>/<partition>.<nnnn>.<fmt>.zst``) is recorded as pending at once;
3. per range: its subjects are read, ``COPY (SELECT * … WHERE ctid …) TO STDOUT`` streams it
   through zstd into storage, the sha256 is read back, an ``archive_objects`` row (first/last
   key: the month's bounds, the partition and its blocks) and its ``archive_subjects`` go in;
4. the rows archived must add up to the month's count, then ``TRUNCATE`` and commit;
5. after every whole month, the emptied months are detached and dropped in one transaction
   (re-checked empty under the DETACH's lock).

A crash before the commit leaves the month whole and its objects pending (removed by the next
run, as above); after it, an empty month that the next run drops. Rows of the month holding
the cutoff and of the DEFAULT partition then go through the batches. ``TRUNCATE`` fires no
DELETE triggers (nor does a purge's partition drop); the run row's ``progress.paths`` records
rows, objects and seconds per path.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import IO, Any

import psycopg
import zstandard
from psycopg import sql

from core.log import get_logger
from core.settings import Settings, get_settings
from pipelines.lifecycle import partitions as parts
from pipelines.lifecycle import scrub
from pipelines.lifecycle.context import RunContext, connect
from pipelines.lifecycle.policies import Policy
from pipelines.lifecycle.purge import (
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
# zstd compresses in a worker thread of its own (C, no GIL) while this one reads the COPY:
# the client's per-row loop is the bottleneck, so the compression runs on the idle core.
ZSTD_THREADS = 1
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
    whole_months: tuple[str, ...] = ()  # partitions wholly before the cutoff: COPY + TRUNCATE
    rows_in_whole_months: int = 0  # counted in a dry run only (a run counts each under lock)

    def lines(self) -> list[str]:
        out = [
            f"archive rows of {self.table} older than {self.cutoff.isoformat()} "
            f"({self.eligible_rows} rows) to {self.storage_url}",
        ]
        if self.whole_months:
            out.append(
                f"  {len(self.whole_months)} months whole ({self.rows_in_whole_months} rows: "
                f"COPY + TRUNCATE, then detach + drop): {', '.join(self.whole_months)}"
            )
        out += [
            f"  {self.batches} batches of at most {self.batch_size} rows, "
            f"{self.format} + zstd, storage class {self.storage_class or 'default'}",
            f"  first object: {self.first_key or '(none)'}",
            "  then drop partitions left empty below the cutoff; write a run manifest",
        ]
        return out


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
    whole = whole_months(policy, state, cutoff)
    in_whole = sum(state.partition_rows.get(p.name, 0) for p in whole)
    by_batch = max(state.eligible_rows - in_whole, 0)
    return ArchivePlan(
        pipeline=policy.name,
        table=policy.table,
        cutoff=cutoff,
        eligible_rows=state.eligible_rows,
        batch_size=policy.batch_size,
        batches=-(-by_batch // policy.batch_size),
        storage_url=storage_url,
        storage_class=policy.storage_class,
        format=policy.format,
        first_key=(
            partition_object_key(policy, whole[0], 0)
            if whole
            else object_key(policy.table, first[0], first[1], policy.format)
            if first
            else None
        ),
        whole_months=tuple(p.qualified for p in whole),
        rows_in_whole_months=in_whole,
    )


def partition_object_key(policy: Policy, part: parts.Partition, index: int) -> str:
    """``table/yyyy/mm/<partition>.<nnnn>.<fmt>.zst``: the ``index``-th object of a month
    archived whole (yyyy/mm: the month's)."""
    month = part.lo.astimezone(UTC) if part.lo else datetime.now(UTC)
    return f"{policy.table}/{month:%Y/%m}/{part.name}.{index:04d}.{policy.format}.zst"


def whole_months(policy: Policy, state: TableState, cutoff: datetime) -> list[parts.Partition]:
    """Monthly partitions lying wholly before the cutoff: archived whole, without a DELETE.
    Never for a filtered policy (a month holds rows the filter keeps); ``state`` lists
    partitions only when the table is partitioned on the policy's age column."""
    if policy.filter:
        return []
    return parts.plan_expired(state.partitions, cutoff)


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
            (table,),
        ).fetchall()
    ]


def _copy_out(policy: Policy, rows: sql.Composable) -> sql.Composable:
    """``COPY`` of the rows a query returns, in the policy's format. For JSON lines the server
    renders each row as JSON and joins them into chunks of JSONL_CHUNK lines: the client
    handles one COPY row per chunk instead of one per table row, which is most of the
    client's cost at millions of rows."""
    if policy.format == "jsonl":
        return sql.SQL(
            "COPY (WITH gone AS ({q}), "
            "lines AS (SELECT row_to_json(gone)::text AS line, row_number() OVER () AS n "
            "FROM gone) "
            "SELECT string_agg(line || E'\\n', '') FROM lines GROUP BY (n - 1) / {c}) "
            "TO STDOUT"
        ).format(q=rows, c=sql.Literal(JSONL_CHUNK))
    return sql.SQL("COPY ({q}) TO STDOUT (FORMAT csv, HEADER true)").format(q=rows)


def _copy_statement(policy: Policy) -> sql.Composable:
    """A batch: its rows deleted and copied out in one statement."""
    t = sql.Identifier(policy.table)
    return _copy_out(
        policy,
        sql.SQL("DELETE FROM {t} WHERE {w} RETURNING *").format(t=t, w=range_where(policy)),
    )


def run(ctx: RunContext) -> ArchivePlan:
    policy: Policy = ctx.policy
    cutoff = ctx.cutoff
    state = scan_state(ctx.work, policy, cutoff, exact=ctx.dry_run, count_partitions=ctx.dry_run)
    first = next_bounds(ctx.work, policy, cutoff, None)
    plan = plan_archive(policy, state, cutoff, storage_url=ctx.storage.url, first=first)
    ctx.expected = plan.eligible_rows
    if ctx.dry_run:
        return plan
    version = schema_version(ctx.work)
    exprs = subject_expressions(ctx.work, policy.table)
    paths = {"partitions": _PathFigures(), "batches": _PathFigures()}
    whole = whole_months(policy, state, cutoff)
    if whole:
        started = time.monotonic()
        for part in whole:
            _archive_partition(ctx, part, version, exprs, paths["partitions"])
        # The emptied months go in one short transaction (a catalog change and one commit).
        # DETACH and DROP need brief strong locks on the parent and on the tables its foreign
        # keys reference (users, ...): behind a long transaction the drop gives up after
        # lock_timeout and the empty months wait for the next run; their rows are archived.
        _drop_months(ctx, policy, whole)
        paths["partitions"].seconds = time.monotonic() - started
        first = next_bounds(ctx.work, policy, cutoff, None)  # what is left: the batched path
    started = time.monotonic()
    statement = _copy_statement(policy)
    after: Key | None = None
    bounds = first  # the plan's probes found the first batch already
    while True:
        with ctx.batch() as conn:
            if after is not None:
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
            subjects = _subjects_of_batch(conn, policy, range_params(cutoff, lo, hi), exprs)
            ctx.note_pending(key)
            rows, put = _stream_batch(ctx, conn, statement, range_params(cutoff, lo, hi), key)
            if policy.storage_class:
                ctx.storage.set_storage_class(key, policy.storage_class)
            _catalogue(ctx, conn, key, rows, put, lo, hi, version, subjects)
        after = hi
        paths["batches"].add(rows, 1)
        log.info("archive_batch_committed", table=policy.table, key=key, rows=rows)
        ctx.advance(
            scanned=rows,
            affected=rows,
            bytes_written=put.size,
            objects=1,
            cursor={"a": str(hi[0]), "k": str(hi[1])},
        )
    paths["batches"].seconds = time.monotonic() - started
    _drop_empty_partitions(ctx, policy, cutoff)
    # Which path moved how many rows in how long: the run row's record for operators (and
    # bench/lifecycle.py, which reports each path against COPY).
    ctx.meta.execute(
        "UPDATE pipeline_runs SET progress = coalesce(progress, '{}'::jsonb) || "
        "jsonb_build_object('paths', %s::jsonb) WHERE id = %s",
        (json.dumps({k: v.as_dict() for k, v in paths.items()}), ctx.run_id),
    )
    return plan


@dataclass
class _PathFigures:
    rows: int = 0
    objects: int = 0
    seconds: float = 0.0

    def add(self, rows: int, objects: int) -> None:
        self.rows += rows
        self.objects += objects

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "objects": self.objects, "seconds": round(self.seconds, 4)}


# ------------------------------------------------------------------- whole-partition archive


SAMPLE_BLOCKS = 8  # heap blocks read to estimate a month's rows per block


def _slices(conn: Any, part: parts.Partition, batch_size: int) -> list[_Slice]:
    """Block ranges of the partition holding about ``batch_size`` to twice that many rows
    each (``rows // batch_size`` ranges of equal size, the rows estimated from the first
    SAMPLE_BLOCKS blocks: no small tail object, which S3 charges like a full one, 40 KB of
    overhead each in GLACIER): a TID range scan reads one as cheaply as a sequential scan,
    with no sort and no index pass to find where each object starts. The partition is
    locked, so the ranges cover every row exactly once (the last one runs to the end of the
    table); the estimate only sizes the objects."""
    rel = sql.Identifier(part.schema, part.name)
    row = conn.execute(
        sql.SQL(
            "SELECT pg_relation_size({r}) / current_setting('block_size')::bigint, "
            "(SELECT count(*) FROM {rel} WHERE ctid < {end}::tid)"
        ).format(
            r=sql.Literal(rel.as_string(conn)),
            rel=rel,
            end=sql.Literal(f"({SAMPLE_BLOCKS},0)"),
        )
    ).fetchone()
    blocks = max(int(row[0]) if row else 1, 1)
    sampled = int(row[1]) if row else 0
    rows = sampled * blocks // min(blocks, SAMPLE_BLOCKS)
    step = max(-(-blocks // max(rows // batch_size, 1)), 1)
    out = [_Slice(lo, lo + step) for lo in range(0, blocks, step)]
    return [*out[:-1], _Slice(out[-1].lo, None)]


@dataclass(frozen=True)
class _Slice:
    lo: int  # first heap block
    hi: int | None  # first block after it; None: to the end

    def where(self) -> sql.Composable:
        lo = sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({self.lo},0)"))
        if self.hi is None:
            return lo
        return sql.SQL("{} AND ctid < {}::tid").format(lo, sql.Literal(f"({self.hi},0)"))


def _archive_partition(
    ctx: RunContext,
    part: parts.Partition,
    version: str | None,
    exprs: list[str],
    figures: _PathFigures,
) -> None:
    """Archive a month wholly before the cutoff in ONE transaction; the caller then drops it.

    ``LOCK … IN SHARE MODE`` holds writes to this month (not reads, not other months) until
    the commit, so what is copied is what is emptied. Slices of ``batch_size`` to ~2x rows go
    out with ``COPY (SELECT …)`` (no DELETE: no dead tuples, no per-row WAL), each an object
    written, read back and catalogued as a batch's is; the rows copied must add up to the
    month's count; then ``TRUNCATE`` empties the month and the transaction commits: the
    catalogue rows and the emptying are one commit. A crash before it leaves the month whole
    and its objects pending (the next run removes them first); after it, an empty month that
    ``run`` detaches and drops (``partitions.drop_partitions``), now or in the next run.
    """
    policy = ctx.policy
    rel = sql.Identifier(part.schema, part.name)
    with ctx.batch() as conn:
        conn.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(rel))
        found = conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(rel)).fetchone()
        if not (found and found[0]):
            return  # empty already: the caller drops it
        slices = _slices(conn, part, policy.batch_size)
        suffix = f".{policy.format}.zst"
        keys = [partition_object_key(policy, part, i) for i in range(len(slices))]
        taken = {
            r[0]
            for r in conn.execute(
                "SELECT key FROM archive_objects WHERE storage_url = %s AND key = ANY(%s)",
                (ctx.storage.url, keys),
            )
        }
        # rows restored into an archived month, archived again: never overwrite
        keys = [k.replace(suffix, f".r{ctx.run_id}{suffix}") if k in taken else k for k in keys]
        ctx.note_pending_keys(keys)
        total = 0
        size = 0

        # The month's row count and the subjects of every range are read on the run's other
        # connection while this one streams: the month is locked against writes, so both see
        # the same rows, and the server's second backend works while the client is busy with
        # the COPY (a count first, on this connection, was a full scan the COPY waited for).
        def alongside() -> tuple[int, list[list[str]]]:
            counted = ctx.meta.execute(sql.SQL("SELECT count(*) FROM {}").format(rel)).fetchone()
            names = [
                _subjects_of_batch(ctx.meta, policy, {}, exprs, relation=rel, where=s.where())
                for s in slices
            ]
            return (int(counted[0]) if counted else 0), names

        with ThreadPoolExecutor(1, thread_name_prefix="archive-subjects") as pool:
            pending = pool.submit(alongside)
            written = []
            for piece, key in zip(slices, keys, strict=True):
                statement = _select_statement(policy, rel, piece.where())
                written.append(_stream_batch(ctx, conn, statement, {}, key))  # read back too
            count, subjects = pending.result()
        for piece, key, (rows, put), names in zip(slices, keys, written, subjects, strict=True):
            if policy.storage_class:
                ctx.storage.set_storage_class(key, policy.storage_class)
            bounds = _month_bounds(policy, part, piece)
            _catalogue(ctx, conn, key, rows, put, *bounds, version, names)
            total += rows
            size += put.size
        if total != count:  # nothing can write to the month: a slice missed rows
            raise ArchiveError(
                f"{part.name} holds {count} rows but {total} were archived: nothing deleted"
            )
        conn.execute(sql.SQL("TRUNCATE {}").format(rel))
    # The keys stay noted: a committed key is never removed as an orphan (remove_orphan
    # checks the catalogue), and the next partition's note replaces them.
    figures.add(total, len(keys))
    log.info(
        "archive_partition_committed",
        table=policy.table,
        partition=part.name,
        rows=total,
        objects=len(keys),
    )
    ctx.advance(scanned=total, affected=total, bytes_written=size, objects=len(keys))


def _month_bounds(
    policy: Policy, part: parts.Partition, piece: _Slice
) -> tuple[dict[str, Any], dict[str, Any]]:
    """first_key / last_key of a partition's object: the month's bounds (its rows lie in
    between, in heap order) and the blocks it was read from."""
    base = {"partition": part.name, "blocks": [piece.lo, piece.hi]}
    return (
        {policy.age_column: str(part.lo), **base},
        {policy.age_column: str(part.hi), **base},
    )


def _select_statement(policy: Policy, rel: sql.Composable, where: sql.Composable) -> sql.Composable:
    """A slice of a locked partition: the batch statement with SELECT in place of DELETE."""
    return _copy_out(policy, sql.SQL("SELECT * FROM {r} WHERE {w}").format(r=rel, w=where))


def _catalogue(
    ctx: RunContext,
    conn: Any,
    key: str,
    rows: int,
    put: Any,
    lo: Key | dict[str, Any],
    hi: Key | dict[str, Any],
    version: str | None,
    subjects: list[str],
) -> None:
    """The object's ``archive_objects`` row and its subjects (for a GDPR erase)."""
    policy = ctx.policy
    object_row = conn.execute(
        "INSERT INTO archive_objects (run_id, pipeline, table_name, key, format, rows, "
        "size_bytes, sha256, first_key, last_key, storage_url, schema_version) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (
            ctx.run_id,
            policy.name,
            policy.table,
            key,
            policy.format,
            rows,
            put.size,
            put.sha256,
            json.dumps(lo if isinstance(lo, dict) else _key_json(policy, lo)),
            json.dumps(hi if isinstance(hi, dict) else _key_json(policy, hi)),
            ctx.storage.url,
            version,
        ),
    ).fetchone()
    assert object_row is not None
    if subjects:
        # one statement for the batch's subjects, however many (distinct already)
        conn.execute(
            "INSERT INTO archive_subjects (subject, object_id) "
            "SELECT unnest(%s::text[]), %s ON CONFLICT DO NOTHING",
            (subjects, object_row[0]),
        )


# Subjects (Stripe customer ids) found in tables that reference users without a foreign key.
SUBJECT_EXPRESSIONS: dict[str, tuple[str, ...]] = {
    "webhook_events": (
        "payload #>> '{data,object,customer}'",
        "CASE WHEN payload #>> '{data,object,object}' = 'customer' "
        "THEN payload #>> '{data,object,id}' END",
    ),
    "audit_logs": ("entity_id", "actor"),
}


def subject_expressions(conn: Any, table: str) -> list[str]:
    """SQL expressions over ``table``'s rows that name a subject an erase looks for: every
    column referencing ``users`` (found in the catalog, in its own type), plus
    SUBJECT_EXPRESSIONS; _subjects_of_batch turns their values into text."""
    cols = scrub.user_columns(scrub.foreign_keys(conn), table)
    return [f'"{c}"' for c in cols] + list(SUBJECT_EXPRESSIONS.get(table, ()))


def _subjects_of_batch(
    conn: Any,
    policy: Policy,
    params: dict[str, Any],
    exprs: list[str],
    *,
    relation: sql.Composable | None = None,
    where: sql.Composable | None = None,
) -> list[str]:
    """The subjects of the batch's rows, read before the DELETE, for the archive_subjects
    index: an erase later rewrites exactly the objects that hold its user."""
    if not exprs:
        return []
    # Each expression's values are made distinct as they are (a uuid hashes and compares
    # cheaper than its 36-character text: half the query's cost), then turned into text.
    branches = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT s::text FROM (SELECT DISTINCT ({e}) AS s FROM {t} WHERE {w}) b").format(
            e=sql.SQL(e),
            t=relation or sql.Identifier(policy.table),
            w=where or range_where(policy),
        )
        for e in exprs
    )
    rows = conn.execute(
        sql.SQL("SELECT DISTINCT s FROM ({u}) x WHERE s IS NOT NULL").format(u=branches), params
    ).fetchall()
    return [str(r[0]) for r in rows]


def _key_json(policy: Policy, key: Key) -> dict[str, str]:
    return {policy.age_column: str(key[0]), policy.key_column: str(key[1])}


def _stream_batch(
    ctx: RunContext, conn: Any, statement: sql.Composable, params: dict[str, Any], key: str
) -> tuple[int, Any]:
    """COPY the statement's rows through zstd into a new object, then read the stored object
    back and compare its sha256 with what was sent. Returns the row count and the put."""
    # Written in the default class and moved to the policy's class only after verification:
    # a GLACIER object cannot be read back to check it.
    with ctx.storage.writer(key) as writer:
        compressor = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, write_checksum=True, threads=ZSTD_THREADS
        ).stream_writer(
            writer,  # type: ignore[arg-type]
            closefd=False,
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
    stored = ctx.storage.sha256(key)
    if stored != put.sha256:
        raise ArchiveError(
            f"object {key} reads back with sha256 {stored}, not {put.sha256}: nothing deleted"
        )
    return rows, put


def _drop_months(ctx: RunContext, policy: Policy, months: list[parts.Partition]) -> None:
    """Detach and drop archived months in one transaction, each re-checked empty under the
    DETACH's lock (a row that arrived since keeps its month for the next run). Behind a long
    transaction the drop gives up at lock_timeout: the months are empty and catalogued, so
    the next run drops them."""
    try:
        parts.drop_partitions(
            ctx.work,
            policy.table,
            months,
            lock_timeout_ms=ctx.settings.pipeline_lock_timeout_ms,
            require_empty=True,
        )
    except psycopg.errors.LockNotAvailable:
        log.warning(
            "archive_partition_drop_deferred",
            table=policy.table,
            partitions=[p.name for p in months],
            reason="lock_timeout",
        )


def _drop_empty_partitions(ctx: RunContext, policy: Policy, cutoff: datetime) -> None:
    """Months entirely below the cutoff are empty once archived: drop them."""
    if policy.filter or policy.age_column != "created_at":
        return
    if not parts.is_partitioned(ctx.work, policy.table):
        return
    for p in parts.plan_expired(parts.list_partitions(ctx.work, policy.table), cutoff):
        _drop_if_empty(ctx, policy, p)


def _drop_if_empty(ctx: RunContext, policy: Policy, p: parts.Partition) -> None:
    left = ctx.work.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(p.schema, p.name))
    ).fetchone()
    if left and not left[0]:
        # Rows may arrive between this check and the drop: _drop_months checks again under
        # the DETACH's lock and keeps the partition if any did.
        _drop_months(ctx, policy, [p])


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
    rows_of_erased_users: int = 0  # deleted, detached or anonymized as the erase left them


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
        found = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
        if not found or not found[0]:
            log.warning("archive_restore_rejected", reason="no such table", table=table)
            raise ArchiveError(f"table {table!r} does not exist")
        target = sql.Identifier(table)
        with conn.transaction():
            read, digest, cols = load_object(
                conn, storage, key, fmt, table, "restore_rows", expected=expected
            )
            if expected is not None and digest != expected:
                log.error("archive_restore_checksum_mismatch", key=key, source=source)
                raise ArchiveError(
                    f"{key}: sha256 {digest} differs from the recorded "
                    f"{expected} ({source}); nothing restored"
                )
            # Rows of users erased since the archive was written come back as the erase left
            # the live tables: deleted, detached (legal hold) or anonymized.
            erased = erase_erased_users(conn, sql.Identifier("restore_rows"), table)
            _detach_from_deleted_parents(conn, sql.Identifier("restore_rows"), table)
            col_ids = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
            inserted = conn.execute(
                sql.SQL(
                    "INSERT INTO {t} ({c}) SELECT {c} FROM restore_rows ON CONFLICT DO NOTHING"
                ).format(t=target, c=col_ids)
            ).rowcount
    log.info(
        "archive_restored",
        key=key,
        table=table,
        rows_read=read,
        rows_inserted=inserted,
        rows_of_erased_users=erased,
        verified=source if expected is not None else "no",
    )
    return RestoreResult(key, table, read, inserted, erased)


def load_object(
    conn: Any,
    storage: Any,
    key: str,
    fmt: str,
    table: str,
    temp: str,
    *,
    expected: str | None = None,
) -> tuple[int, str, list[str]]:
    """Load an archived object's rows into a new temp table ``temp`` shaped like the live
    ``table`` (dropped at commit). Returns (rows read, sha256 of the stored bytes, the
    object's columns). The whole object is read, so the digest covers all of it.

    A damaged object may fail to decompress or to parse before its digest can be compared:
    then the rest is read to finish the digest, and a digest that differs from ``expected``
    raises ArchiveError (damaged) rather than the parse error it caused."""
    target = sql.Identifier(table)
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP").format(
            sql.Identifier(temp), target
        )
    )
    stored_digest: str | None = None
    if getattr(storage, "keyring", None) is not None:
        # Encrypted at rest: the stream below is plaintext, the recorded digest is of the
        # stored (sealed) bytes, so check those before anything is parsed.
        stored_digest = storage.sha256(key)
        if expected is not None and stored_digest != expected:
            raise ArchiveError(
                f"{key}: sha256 {stored_digest} differs from the recorded {expected}; the "
                "object is damaged, nothing read"
            )
    with storage.open(key) as raw:
        hashed = _Verify(raw)
        try:
            read, cols = _copy_in(conn, hashed, fmt, table, temp)
        except (psycopg.Error, zstandard.ZstdError, UnicodeDecodeError, ValueError) as exc:
            while hashed.read(1 << 20):
                pass
            digest = stored_digest or hashed.hash.hexdigest()
            if expected is not None and digest != expected:
                raise ArchiveError(
                    f"{key}: sha256 {digest} differs from the recorded {expected}; the object "
                    f"is damaged ({type(exc).__name__} while reading it)"
                ) from None
            raise
        while hashed.read(1 << 20):  # to the end, so the hash covers the whole object
            pass
    return read, stored_digest or hashed.hash.hexdigest(), cols


def _copy_in(conn: Any, hashed: _Verify, fmt: str, table: str, temp: str) -> tuple[int, list[str]]:
    target = sql.Identifier(table)
    data = _decompressed(hashed)  # type: ignore[arg-type]
    cur = conn.cursor()
    if fmt == "csv":
        header = data.readline()
        cols = next(iter(_csv_rows(header)))
        col_ids = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
        with cur.copy(
            sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(sql.Identifier(temp), col_ids)
        ) as copy:
            for chunk in _chunks(data):
                copy.write(chunk)
        return cur.rowcount, cols
    docs = sql.Identifier(f"{temp}_docs")
    conn.execute(sql.SQL("CREATE TEMP TABLE {} (doc jsonb) ON COMMIT DROP").format(docs))
    with cur.copy(
        sql.SQL("COPY {} (doc) FROM STDIN ({})").format(docs, sql.SQL(_JSONL_COPY))
    ) as copy:
        for chunk in _chunks(data):
            copy.write(chunk)
    read = cur.rowcount
    conn.execute(
        sql.SQL(
            "INSERT INTO {tmp} SELECT r.* FROM {d}, jsonb_populate_record(NULL::{t}, {d}.doc) r"
        ).format(tmp=sql.Identifier(temp), d=docs, t=target)
    )
    return read, [c["name"] for c in columns(conn, table)]


def _detach_from_deleted_parents(conn: Any, relation: sql.Composable, table: str) -> int:
    """References whose parent row is gone, on ``ON DELETE SET NULL`` foreign keys: NULL, as
    the live row got when the parent was deleted (an erased user's moment, say)."""
    total = 0
    for fk in scrub.foreign_keys(conn):
        if fk.child != table or fk.on_delete not in ("n", "d") or len(fk.child_cols) != 1:
            continue
        col, pcol = sql.Identifier(fk.child_cols[0]), sql.Identifier(fk.parent_cols[0])
        total += conn.execute(
            sql.SQL(
                "UPDATE {r} SET {c} = NULL WHERE {c} IS NOT NULL AND NOT EXISTS "
                "(SELECT 1 FROM {p} WHERE {p}.{pc} = {r}.{c})"
            ).format(r=relation, c=col, p=sql.Identifier(fk.parent), pc=pcol)
        ).rowcount
    return total


def erase_erased_users(conn: Any, relation: sql.Composable, table: str) -> int:
    """Apply recorded erasures (``erasures``) to rows in ``relation`` that reference an erased
    user through a foreign key; returns how many rows were deleted, detached or anonymized."""
    fks = scrub.foreign_keys(conn)
    cols = scrub.user_columns(fks, table)
    if not cols:
        return 0
    if table == "messages":
        scrub.ensure_tombstone(conn)  # rewritten archives sign anonymized messages with it
    found = sql.SQL(" UNION ").join(
        sql.SQL("SELECT DISTINCT {c} AS uid FROM {r} WHERE {c} IS NOT NULL").format(
            c=sql.Identifier(c), r=relation
        )
        for c in cols
    )
    erased = conn.execute(
        sql.SQL(
            "SELECT uid FROM ({f}) x WHERE "
            + scrub.SUBJECT_HASH_SQL.format("uid")
            + " IN (SELECT subject_hash FROM erasures)"
        ).format(f=found)
    ).fetchall()
    if not erased:
        return 0
    scrub.ensure_tombstone(conn)  # anonymized messages are signed by it
    scrub_cols = scrub.scrub_columns(conn)
    total = 0
    for (uid,) in erased:
        counts = scrub.erase_rows(
            conn, relation, table, user={"id": uid}, fks=fks, scrub_cols=scrub_cols
        )
        total += sum(counts.values())
    return total


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


# ------------------------------------------------------------------------ erase in archives


@dataclass(frozen=True)
class Rewritten:
    table: str
    old_key: str
    new_key: str
    rows_before: int
    rows_after: int
    changed: dict[str, int]


def objects_holding(conn: Any, storage_url: str, subjects: list[str]) -> list[tuple[Any, ...]]:
    """Catalogue rows (id, key, table, format, sha256, run_id, pipeline) of the objects the
    archive_subjects index says hold rows of ``subjects``."""
    return list(
        conn.execute(
            "SELECT o.id, o.key, o.table_name, o.format, o.sha256, o.run_id, o.pipeline "
            "FROM archive_objects o WHERE o.storage_url = %s AND o.id IN "
            "(SELECT object_id FROM archive_subjects WHERE subject = ANY(%s)) ORDER BY o.id",
            (storage_url, subjects),
        ).fetchall()
    )


def rewrite_for_erasure(
    conn: Any,
    storage: Any,
    user: dict[str, Any],
    *,
    subjects: list[str],
    settings: Settings,
    tag: str,
) -> list[Rewritten]:
    """Rewrite every archived object that holds rows of ``user`` without them (or with the
    personal fields cleared, for legal-hold rows), exactly as the live erase treats the rows.

    Per object: load it into a temp table (its sha256 checked against the catalogue), apply
    the erase to the copy, write a new object, read it back (sha256) and scan it decompressed
    for the user's identifiers; then, in one transaction, point the catalogue at the new
    object and queue the old one in ``archive_superseded``; then update the run manifest and
    delete the old object. A crash at any point leaves either the old object catalogued (the
    next erase redoes it) or the old one queued for deletion (``sweep_superseded``)."""
    done = []
    fks = scrub.foreign_keys(conn)
    scrub_cols = scrub.scrub_columns(conn)
    needles = scrub.identifiers(user)
    for object_id, key, table, fmt, sha, run_id, pipeline in objects_holding(
        conn, storage.url, subjects
    ):
        new_key = _erased_key(key, fmt, tag)
        with conn.transaction():
            read, digest, cols = load_object(
                conn, storage, key, fmt, table, "erase_rows", expected=sha
            )
            if digest != sha:
                raise ArchiveError(
                    f"{key}: sha256 {digest} differs from the catalogue's {sha}; the object "
                    "is damaged and was not rewritten"
                )
            temp = sql.Identifier("erase_rows")
            changed = scrub.erase_rows(conn, temp, table, user=user, fks=fks, scrub_cols=scrub_cols)
            changed["other_mentions"] = _clear_mentions(conn, "erase_rows", needles)
            if any(changed.values()):
                scrub.ensure_tombstone(conn)
            rows, put = _write_rows(conn, storage, "erase_rows", cols, fmt, new_key)
            stored = storage.sha256(new_key)
            if stored != put.sha256:
                storage.delete(new_key)
                raise ArchiveError(f"{new_key} reads back as {stored}, not {put.sha256}")
            left = scrub.contains_any(_read_decompressed(storage, new_key), needles)
            if left:
                storage.delete(new_key)
                raise ArchiveError(
                    f"{new_key}: {len(left)} identifier(s) of the user are still in the "
                    "rewritten object; the old object is kept"
                )
            storage_class = _policy_storage_class(pipeline, settings)
            if storage_class:
                storage.set_storage_class(new_key, storage_class)
            conn.execute(
                "UPDATE archive_objects SET key = %s, sha256 = %s, size_bytes = %s, rows = %s "
                "WHERE id = %s",
                (new_key, put.sha256, put.size, rows, object_id),
            )
            conn.execute(
                "INSERT INTO archive_superseded (storage_url, key) VALUES (%s, %s) "
                "ON CONFLICT DO NOTHING",
                (storage.url, key),
            )
            conn.execute(
                "DELETE FROM archive_subjects WHERE object_id = %s AND subject = ANY(%s)",
                (object_id, subjects),
            )
        _update_manifest(conn, storage, table, run_id, key, new_key, put, rows)
        sweep_superseded(conn, storage)
        log.info(
            "archive_object_rewritten_for_erasure",
            table=table,
            old_key=key,
            new_key=new_key,
            rows_before=read,
            rows_after=rows,
        )
        done.append(Rewritten(table, key, new_key, read, rows, changed))
    return done


def _erased_key(key: str, fmt: str, tag: str) -> str:
    suffix = f".{fmt}.zst"
    base = key[: -len(suffix)] if key.endswith(suffix) else key
    base = base.split(".e-", 1)[0]  # a rewritten object rewritten again: one tag, the newest
    return f"{base}.e-{tag}{suffix}"


def _clear_mentions(conn: Any, temp: str, needles: list[str]) -> int:
    """Other rows that still mention the user (free text naming them): the mentioning
    column is cleared (NULL, or '[redacted]' where NULL is not allowed)."""
    pats = [scrub.like(n) for n in needles]
    cols = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
        (f"pg_temp.{temp}",),
    ).fetchall()
    total = 0
    for name, kind, notnull in cols:
        if kind not in ("text", "character varying", "jsonb", "json", "text[]"):
            continue
        if notnull and kind != "text":
            continue
        value = sql.SQL("'[redacted]'") if notnull else sql.SQL("NULL")
        total += conn.execute(
            sql.SQL("UPDATE {t} SET {c} = {v} WHERE {c}::text ILIKE ANY(%s)").format(
                t=sql.Identifier(temp), c=sql.Identifier(name), v=value
            ),
            (pats,),
        ).rowcount
    return total


def _write_rows(
    conn: Any, storage: Any, temp: str, cols: list[str], fmt: str, key: str
) -> tuple[int, Any]:
    """The temp table's rows as an archive object (the format the archive wrote)."""
    t = sql.Identifier(temp)
    col_ids = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
    with storage.writer(key) as writer:
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).stream_writer(
            writer, closefd=False
        )
        cur = conn.cursor()
        rows = 0
        if fmt == "jsonl":
            with cur.copy(
                sql.SQL(
                    "COPY (SELECT row_to_json(x)::text FROM (SELECT {c} FROM {t}) x) TO STDOUT"
                ).format(c=col_ids, t=t)
            ) as copy:
                copy.set_types(["text"])
                for (text,) in copy.rows():
                    compressor.write(text.encode() + b"\n")
                    rows += 1
        else:
            with cur.copy(
                sql.SQL("COPY (SELECT {c} FROM {t}) TO STDOUT (FORMAT csv, HEADER true)").format(
                    c=col_ids, t=t
                )
            ) as copy:
                for chunk in copy:
                    compressor.write(chunk)
            rows = cur.rowcount
        compressor.flush(zstandard.FLUSH_FRAME)
        compressor.close()
    put = writer.result
    if put is None:
        raise ArchiveError(f"storage returned no result for {key}")
    return rows, put


def _read_decompressed(storage: Any, key: str) -> bytes:
    with storage.open(key) as raw:
        return bytes(_decompressed(raw).read())


def _policy_storage_class(pipeline: str, settings: Settings) -> str | None:
    from pipelines.lifecycle.policies import PolicyError, UnknownPipeline, get_policy

    try:
        return get_policy(pipeline, settings).storage_class
    except (UnknownPipeline, PolicyError):
        return None


def _update_manifest(
    conn: Any,
    storage: Any,
    table: str,
    run_id: int | None,
    old_key: str,
    new_key: str,
    put: Any,
    rows: int,
) -> None:
    """The run manifest lists the rewritten object in place of the old one."""
    mkey = None
    if run_id is not None:
        row = conn.execute(
            "SELECT manifest_key FROM pipeline_runs WHERE id = %s", (run_id,)
        ).fetchone()
        mkey = row[0] if row else None
    candidates = (
        [mkey]
        if mkey
        else [i.key for i in storage.list(f"manifests/{table}/") if i.key.endswith(".json")]
    )
    for candidate in candidates:
        try:
            doc = json.loads(storage.get_bytes(candidate))
        except (ValueError, OSError, FileNotFoundError):
            continue
        objects = doc.get("objects") or []
        hit = [o for o in objects if o.get("key") == old_key]
        if not hit:
            continue
        for o in hit:
            o.update(key=new_key, sha256=put.sha256, size=put.size, rows=rows)
        doc["rows"] = sum(int(o.get("rows") or 0) for o in objects)
        doc["bytes"] = sum(int(o.get("size") or 0) for o in objects)
        doc["rewritten_at"] = datetime.now(UTC).isoformat()
        storage.put_bytes(candidate, json.dumps(doc, indent=1).encode())
        return


def sweep_superseded(conn: Any, storage: Any) -> int:
    """Delete old objects that rewritten ones replaced (left by a crash or just queued)."""
    keys = [
        r[0]
        for r in conn.execute(
            "SELECT key FROM archive_superseded WHERE storage_url = %s", (storage.url,)
        ).fetchall()
    ]
    for key in keys:
        storage.delete(key)
        conn.execute(
            "DELETE FROM archive_superseded WHERE storage_url = %s AND key = %s",
            (storage.url, key),
        )
    return len(keys)
