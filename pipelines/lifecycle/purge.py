"""Delete / expire: old rows go in keyset batches; whole expired partitions are dropped.

A batch is the next ``batch_size`` rows in ``(age_column, key_column)`` order below the cutoff:
two index probes find its first and last key, then one ranged DELETE removes it, all in one
short transaction. The cursor moves past each batch, so later batches never walk the index
entries of rows already deleted. On a partitioned table, months entirely older than the cutoff
are detached and dropped first; only the boundary month (and the default partition) is deleted
row by row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql

from core.log import get_logger
from pipelines.lifecycle import partitions as parts
from pipelines.lifecycle.context import RunContext
from pipelines.lifecycle.policies import Policy

log = get_logger(__name__)

Key = tuple[Any, Any]  # (age value, key value)


def _where(policy: Policy, *, after: bool) -> sql.Composable:
    a, k = sql.Identifier(policy.age_column), sql.Identifier(policy.key_column)
    clauses: list[sql.Composable] = [sql.SQL("{} < %(cutoff)s").format(a)]
    if policy.filter:
        # %% escapes a literal % in the filter: the statement is sent with parameters.
        clauses.append(sql.SQL("(" + policy.filter.replace("%", "%%") + ")"))
    if after:
        # The plain column bound is redundant with the row comparison but the planner can
        # estimate it; it cannot estimate `(a, k) > (…)` and may then prefer a sequential scan.
        clauses.append(sql.SQL("{} >= %(after_a)s").format(a))
        clauses.append(sql.SQL("({}, {}) > (%(after_a)s, %(after_k)s)").format(a, k))
    return sql.SQL(" AND ").join(clauses)


def next_bounds(
    conn: Any, policy: Policy, cutoff: datetime, after: Key | None
) -> tuple[Key, Key] | None:
    """First and last key of the next batch, or None when no row is left."""
    a, k = sql.Identifier(policy.age_column), sql.Identifier(policy.key_column)
    t = sql.Identifier(policy.table)  # via the search_path: the app's schema, then tidemill's
    params = {"cutoff": cutoff, "after_a": None, "after_k": None, "off": 0}
    if after is not None:
        params["after_a"], params["after_k"] = after
    where = _where(policy, after=after is not None)
    probe = sql.SQL("SELECT {a}, {k} FROM {t} WHERE {w} ORDER BY {a}, {k} LIMIT 1 OFFSET %(off)s")
    q = probe.format(a=a, k=k, t=t, w=where)
    lo = conn.execute(q, params).fetchone()
    if lo is None:
        return None
    hi = conn.execute(q, {**params, "off": policy.batch_size - 1}).fetchone()
    if hi is None:
        last = sql.SQL(
            "SELECT {a}, {k} FROM {t} WHERE {w} ORDER BY {a} DESC, {k} DESC LIMIT 1"
        ).format(a=a, k=k, t=t, w=where)
        hi = conn.execute(last, params).fetchone()
    return (lo[0], lo[1]), (hi[0], hi[1])


def range_where(policy: Policy) -> sql.Composable:
    """Rows of one batch: below the cutoff, matching the filter, between its keys."""
    a, k = sql.Identifier(policy.age_column), sql.Identifier(policy.key_column)
    return sql.SQL(" AND ").join(
        [
            _where(policy, after=False),
            # Redundant with the row comparisons, but estimable (see _where): without it the
            # planner misjudged batches as a quarter of a 5 M-row table and scanned it whole.
            sql.SQL("{} BETWEEN %(lo_a)s AND %(hi_a)s").format(a),
            sql.SQL("({}, {}) >= (%(lo_a)s, %(lo_k)s)").format(a, k),
            sql.SQL("({}, {}) <= (%(hi_a)s, %(hi_k)s)").format(a, k),
        ]
    )


def range_params(cutoff: datetime, lo: Key, hi: Key) -> dict[str, Any]:
    return {"cutoff": cutoff, "lo_a": lo[0], "lo_k": lo[1], "hi_a": hi[0], "hi_k": hi[1]}


@dataclass(frozen=True)
class TableState:
    table: str
    eligible_rows: int
    partitions: tuple[parts.Partition, ...]
    partition_rows: dict[str, int]  # rows per partition that would be dropped whole


@dataclass(frozen=True)
class PurgePlan:
    pipeline: str
    action: str
    table: str
    cutoff: datetime
    eligible_rows: int
    drop_partitions: tuple[str, ...]
    rows_in_dropped_partitions: int
    rows_by_batch: int
    batch_size: int
    batches: int

    def lines(self) -> list[str]:
        out = [
            f"{self.action} rows of {self.table} older than {self.cutoff.isoformat()} "
            f"({self.eligible_rows} rows)",
        ]
        for name in self.drop_partitions:
            out.append(f"  detach and drop partition {name}")
        out.append(
            f"  delete {self.rows_by_batch} rows in {self.batches} batches of "
            f"at most {self.batch_size}"
        )
        return out


def scan_state(
    conn: Any,
    policy: Policy,
    cutoff: datetime,
    *,
    exact: bool = True,
    count_partitions: bool = True,
) -> TableState:
    """Read what the plan needs (counts, partitions). The only I/O before planning.

    ``exact=False`` (a real run) takes the planner's row estimate instead of counting: a
    count of millions of expiring rows would cost a good part of deleting them, and the
    figure only feeds the progress bar; the run records the rows it actually removed.
    ``count_partitions=False`` skips counting the expired months (an archive run counts each
    under its lock anyway).
    """
    t = sql.Identifier(policy.table)  # via the search_path: the app's schema, then tidemill's
    where = _where(policy, after=False)
    if exact:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {t} WHERE {w}").format(t=t, w=where),
            {"cutoff": cutoff},
        ).fetchone()
        eligible = int(row[0])
    else:
        plan = conn.execute(
            sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM {t} WHERE {w}").format(t=t, w=where),
            {"cutoff": cutoff},
        ).fetchone()
        eligible = int(plan[0][0]["Plan"]["Plan Rows"])
    partitions: tuple[parts.Partition, ...] = ()
    partition_rows: dict[str, int] = {}
    if parts.is_partitioned(conn, policy.table) and policy.age_column == "created_at":
        partitions = tuple(parts.list_partitions(conn, policy.table))
        for p in parts.plan_expired(partitions, cutoff) if count_partitions else ():
            n = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(p.schema, p.name))
            ).fetchone()
            partition_rows[p.name] = int(n[0]) if n else 0
    return TableState(policy.table, eligible, partitions, partition_rows)


def plan_purge(policy: Policy, state: TableState, cutoff: datetime) -> PurgePlan:
    """What a delete/expire run will do (no I/O). A filtered policy never drops partitions:
    a partition holds rows the filter keeps."""
    drop = () if policy.filter else tuple(parts.plan_expired(state.partitions, cutoff))
    in_dropped = sum(state.partition_rows.get(p.name, 0) for p in drop)
    by_batch = max(state.eligible_rows - in_dropped, 0)
    return PurgePlan(
        pipeline=policy.name,
        action=policy.action,
        table=policy.table,
        cutoff=cutoff,
        eligible_rows=state.eligible_rows,
        drop_partitions=tuple(p.qualified for p in drop),
        rows_in_dropped_partitions=in_dropped,
        rows_by_batch=by_batch,
        batch_size=policy.batch_size,
        batches=-(-by_batch // policy.batch_size),
    )


def run(ctx: RunContext) -> PurgePlan:
    policy: Policy = ctx.policy
    cutoff = ctx.cutoff
    state = scan_state(ctx.work, policy, cutoff, exact=ctx.dry_run)
    plan = plan_purge(policy, state, cutoff)
    ctx.expected = plan.eligible_rows
    if ctx.dry_run:
        return plan
    drop_names = set(plan.drop_partitions)
    for p in state.partitions:
        if p.qualified in drop_names:
            n = state.partition_rows.get(p.name, 0)
            parts.drop_partition(
                ctx.work, policy.table, p, lock_timeout_ms=ctx.settings.pipeline_lock_timeout_ms
            )
            ctx.advance(scanned=n, affected=n)
    delete_batches(ctx, policy, cutoff)
    return plan


def delete_batches(ctx: RunContext, policy: Policy, cutoff: datetime) -> None:
    t = sql.Identifier(policy.table)  # via the search_path: the app's schema, then tidemill's
    delete = sql.SQL("DELETE FROM {t} WHERE {w}").format(t=t, w=range_where(policy))
    after: Key | None = None
    while True:
        with ctx.batch(durable=False) as conn:
            bounds = next_bounds(conn, policy, cutoff, after)
            if bounds is None:
                break
            lo, hi = bounds
            n = conn.execute(delete, range_params(cutoff, lo, hi)).rowcount
        after = hi
        ctx.advance(scanned=n, affected=n, cursor={"a": str(hi[0]), "k": str(hi[1])})


@dataclass(frozen=True)
class MaintenanceRun:
    table: str
    created: tuple[str, ...]

    def lines(self) -> list[str]:
        if not self.created:
            return [f"{self.table}: every partition up to the horizon exists"]
        return [f"{self.table}: create partition {name}" for name in self.created]


def run_partition_maintenance(ctx: RunContext) -> MaintenanceRun:
    policy: Policy = ctx.policy
    existing = parts.list_partitions(ctx.work, policy.table)
    plan = parts.plan_maintenance(
        policy.table, existing, now=ctx.now, months_ahead=policy.months_ahead
    )
    names = tuple(parts.partition_name(policy.table, m) for m in plan.create)
    ctx.expected = len(plan.create)
    if not ctx.dry_run:
        for month in plan.create:
            moved = parts.create_month(
                ctx.work,
                policy.table,
                month,
                lock_timeout_ms=ctx.settings.pipeline_lock_timeout_ms,
            )
            ctx.advance(scanned=moved, affected=moved, objects=0)
    return MaintenanceRun(policy.table, names)
