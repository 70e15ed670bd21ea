"""Monthly RANGE partitions on ``created_at`` (notifications, messages; migration 0005).

Maintenance creates the coming months ahead of time; retention detaches and drops whole
expired months, which takes well under a second whatever their size, instead of deleting their
rows one by one. Partitions live in the ``partitions`` schema (storage detail, not a model).

A DEFAULT partition catches rows of months nobody prepared (an old ``created_at``). Creating a
month whose rows already sit in the default moves them out in the same transaction, because
Postgres refuses a new partition whose range the default already holds rows for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import psycopg
from psycopg import sql

from core.log import get_logger

log = get_logger(__name__)

SCHEMA = "partitions"


@dataclass(frozen=True)
class Partition:
    schema: str
    name: str
    lo: datetime | None  # None for the default partition
    hi: datetime | None
    is_default: bool = False

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def month_start(d: date | datetime) -> date:
    return date(d.year, d.month, 1)


def add_months(d: date, months: int) -> date:
    total = d.year * 12 + d.month - 1 + months
    return date(total // 12, total % 12 + 1, 1)


def _ts(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def is_partitioned(conn: Any, table: str) -> bool:
    row = conn.execute(
        "SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", (table,)
    ).fetchone()
    return row is not None and row[0] == "p"


def list_partitions(conn: Any, table: str) -> list[Partition]:
    """The table's partitions with their bounds, oldest first, the default last."""
    rows = conn.execute(
        r"""
        SELECT n.nspname, c.relname, b.bound = 'DEFAULT',
               (regexp_match(b.bound, 'FROM \(''([^'']+)''\)'))[1]::timestamptz,
               (regexp_match(b.bound, 'TO \(''([^'']+)''\)'))[1]::timestamptz
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) b
        WHERE i.inhparent = to_regclass(%s)
        """,
        (table,),
    ).fetchall()
    parts = [Partition(r[0], r[1], r[3], r[4], bool(r[2])) for r in rows]
    return sorted(parts, key=lambda p: (p.is_default, p.lo or datetime.min.replace(tzinfo=UTC)))


@dataclass(frozen=True)
class MaintenancePlan:
    table: str
    create: tuple[date, ...]  # first day of each month to create


def plan_maintenance(
    table: str, partitions: Sequence[Partition], *, now: datetime, months_ahead: int
) -> MaintenancePlan:
    """Months from this one to ``months_ahead`` ahead that have no partition yet (no I/O)."""
    have = {month_start(p.lo) for p in partitions if p.lo is not None}
    first = month_start(now)
    wanted = [add_months(first, i) for i in range(months_ahead + 1)]
    return MaintenancePlan(table, tuple(m for m in wanted if m not in have))


def plan_expired(partitions: Sequence[Partition], cutoff: datetime) -> list[Partition]:
    """Whole months older than ``cutoff``: every row in them has expired (no I/O)."""
    return [p for p in partitions if p.hi is not None and p.hi <= cutoff]


def partition_name(table: str, month: date) -> str:
    return f"{table}_p{month:%Y_%m}"


def create_month(conn: Any, table: str, month: date, *, lock_timeout_ms: int = 2000) -> int:
    """Create the partition for ``month``; returns how many rows it took over from the default.

    One transaction: rows of that month waiting in the default partition move into a new
    table which is then attached, so the month never has two homes.
    """
    lo, hi = _ts(month), _ts(add_months(month, 1))
    name = partition_name(table, month)
    ident = sql.Identifier(SCHEMA, name)
    parent = sql.Identifier(table)
    default = sql.Identifier(SCHEMA, f"{table}_default")
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout_ms)))
        has_default = any(p.is_default for p in list_partitions(conn, table))
        conn.execute(
            sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
                ident, parent
            )
        )
        moved = 0
        if has_default:
            cur = conn.execute(
                sql.SQL(
                    "WITH moved AS (DELETE FROM {} WHERE created_at >= %s AND created_at < %s "
                    "RETURNING *) INSERT INTO {} SELECT * FROM moved"
                ).format(default, ident),
                (lo, hi),
            )
            moved = cur.rowcount
        # ATTACH (SHARE UPDATE EXCLUSIVE on the parent) lets reads and writes go on.
        conn.execute(
            sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
                parent, ident, sql.Literal(lo.isoformat()), sql.Literal(hi.isoformat())
            )
        )
    log.info("partition_created", table=table, partition=name, moved_rows=moved)
    return moved


def drop_partition(
    conn: Any,
    table: str,
    part: Partition,
    *,
    lock_timeout_ms: int = 2000,
    require_empty: bool = False,
) -> bool:
    """Detach then drop a partition; returns whether it was dropped.

    Its rows go with it: callers drop only expired months. ``require_empty`` (the archive,
    whose rows must not leave Postgres unarchived) re-checks that the partition is empty after
    DETACH has taken its ACCESS EXCLUSIVE lock, in the same transaction: a row inserted since
    the caller's check keeps the partition (the detach is rolled back) and waits for the next
    run to archive it.
    """
    return bool(
        drop_partitions(
            conn, table, [part], lock_timeout_ms=lock_timeout_ms, require_empty=require_empty
        )
    )


def drop_partitions(
    conn: Any,
    table: str,
    months: Sequence[Partition],
    *,
    lock_timeout_ms: int = 2000,
    require_empty: bool = False,
) -> list[str]:
    """drop_partition for several months in one transaction (one commit); a month that is not
    empty under the DETACH's lock (``require_empty``) is kept, the others still go. Returns
    the names dropped."""
    dropped: list[str] = []
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout_ms)))
        for part in months:
            ident = sql.Identifier(part.schema, part.name)
            # Not CONCURRENTLY: Postgres refuses it when a default partition exists. The plain
            # DETACH holds the parent's lock only for a catalog update; lock_timeout bounds the
            # wait behind long transactions, and the run retries later if it expires.
            with conn.transaction():  # a savepoint: a month with rows rolls back alone
                conn.execute(
                    sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(
                        sql.Identifier(table), ident
                    )
                )
                if require_empty:
                    left = conn.execute(
                        sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(ident)
                    ).fetchone()
                    if left and left[0]:
                        log.warning(
                            "partition_drop_aborted",
                            table=table,
                            partition=part.name,
                            reason="rows arrived after the emptiness check",
                        )
                        raise psycopg.Rollback()
                conn.execute(sql.SQL("DROP TABLE {}").format(ident))
                dropped.append(part.name)
    for name in dropped:
        log.info("partition_dropped", table=table, partition=name)
    return dropped


def ensure_months(
    conn: Any, table: str, months: Sequence[date], *, lock_timeout_ms: int = 2000
) -> int:
    moved = 0
    for month in months:
        moved += create_month(conn, table, month, lock_timeout_ms=lock_timeout_ms)
    return moved
