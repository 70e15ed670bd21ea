"""lifecycle pipelines, partitions (issue 5)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 13:40:00

`notifications` and `messages` become monthly RANGE-partitioned tables on `created_at`, so a
retention run drops a whole expired month instead of deleting millions of rows. The new
parent copies whatever columns, defaults, checks, indexes, foreign keys and triggers the old
table had at this point (read from the catalog, not a hand-written list), so columns and
indexes added by earlier migrations survive. The primary key becomes `(id, created_at)`:
Postgres requires the partition key in every unique index of a partitioned table.

Partitions live in the `partitions` schema: they are storage details, not models, and keeping
them out of `public` keeps `alembic check` from reporting them as tables to drop. A DEFAULT
partition takes rows outside the prepared months (an old `created_at`), so an insert never
fails for want of a partition; `tidemill pipeline run partitions` moves them out later.

`archive_objects` records every archived batch in the same transaction as its DELETE, so a run
killed between upload and commit leaves an object with no row: the next run knows it is an
orphan and removes it before archiving those rows again (nothing lost, nothing twice).
"""

from collections.abc import Sequence
from datetime import UTC, date, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PARTITIONED = ("notifications", "messages")
SCHEMA = "partitions"
MONTHS_AHEAD = 3


def _month_add(d: date, months: int) -> date:
    total = d.year * 12 + d.month - 1 + months
    return date(total // 12, total % 12 + 1, 1)


def _table_parts(table: str) -> dict[str, list[tuple[str, str]]]:
    """Indexes, foreign keys, checks and triggers of `table`, as (name, SQL) to replay."""
    bind = op.get_bind()
    q = sa.text
    refs = bind.execute(
        q(
            "SELECT conname, conrelid::regclass::text FROM pg_constraint "
            "WHERE contype = 'f' AND confrelid = CAST(:t AS regclass)"
        ),
        {"t": table},
    ).all()
    if refs:
        raise RuntimeError(
            f"cannot partition {table}: referenced by foreign keys {refs}; "
            "a partitioned table can only be referenced through its full primary key"
        )
    pk = bind.execute(
        q(
            "SELECT conname FROM pg_constraint "
            "WHERE contype = 'p' AND conrelid = CAST(:t AS regclass)"
        ),
        {"t": table},
    ).scalar()
    indexes = [
        (str(name), str(sql))
        for name, sql in bind.execute(
            q(
                "SELECT indexname, indexdef FROM pg_indexes "
                "WHERE schemaname = 'public' AND tablename = :t"
            ),
            {"t": table},
        ).all()
        if name != pk
    ]
    for name, sql in indexes:
        if sql.startswith("CREATE UNIQUE") and "created_at" not in sql:
            raise RuntimeError(
                f"cannot partition {table}: unique index {name} lacks created_at, the "
                f"partition key ({sql})"
            )
    fks = bind.execute(
        q(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE contype IN ('f', 'u', 'x') AND conrelid = CAST(:t AS regclass)"
        ),
        {"t": table},
    ).all()
    triggers = bind.execute(
        q(
            "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger "
            "WHERE tgrelid = CAST(:t AS regclass) AND NOT tgisinternal"
        ),
        {"t": table},
    ).all()
    # Unique constraints (not bare indexes) come back as constraints, not as indexes to replay.
    constraint_names = {name for name, _ in fks}
    return {
        "indexes": [(n, s) for n, s in indexes if n not in constraint_names],
        "constraints": [(str(n), str(s)) for n, s in fks],
        "triggers": [(str(n), str(s)) for n, s in triggers],
        "pk": [(pk or f"pk_{table}", "")],
    }


def _months_for(table: str) -> list[date]:
    bind = op.get_bind()
    oldest = bind.execute(sa.text(f"SELECT min(created_at) FROM {table}_unpartitioned")).scalar()
    now = datetime.now(UTC).date()
    start = date(now.year, now.month, 1)
    if oldest is not None:
        start = min(start, date(oldest.year, oldest.month, 1))
    end = _month_add(date(now.year, now.month, 1), MONTHS_AHEAD)
    months, cur = [], start
    while cur <= end:
        months.append(cur)
        cur = _month_add(cur, 1)
    return months


def _rebuild(table: str, *, partitioned: bool) -> None:
    parts = _table_parts(table)
    pk_name = parts["pk"][0][0]
    old = f"{table}_unpartitioned"
    op.execute(f"ALTER TABLE {table} RENAME TO {old}")
    like = (
        f"CREATE TABLE {table} (LIKE {old} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
        "INCLUDING IDENTITY INCLUDING GENERATED INCLUDING STORAGE INCLUDING COMMENTS "
        "INCLUDING STATISTICS)"
    )
    if partitioned:
        op.execute(f"{like} PARTITION BY RANGE (created_at)")
        op.execute(f"CREATE TABLE {SCHEMA}.{table}_default PARTITION OF {table} DEFAULT")
        for month in _months_for(table):
            nxt = _month_add(month, 1)
            op.execute(
                f"CREATE TABLE {SCHEMA}.{table}_p{month:%Y_%m} PARTITION OF {table} "
                f"FOR VALUES FROM ('{month:%Y-%m-%d} 00:00:00+00') "
                f"TO ('{nxt:%Y-%m-%d} 00:00:00+00')"
            )
    else:
        op.execute(like)
    op.execute(f"INSERT INTO {table} SELECT * FROM {old}")
    # Triggers go with the old table; they are replayed on the new one below.
    op.execute(f"DROP TABLE {old}")
    key = "id, created_at" if partitioned else "id"
    op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {pk_name} PRIMARY KEY ({key})")
    for _name, sql in parts["indexes"]:
        op.execute(sql)
    for name, sql in parts["constraints"]:
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {sql}")
    for _name, sql in parts["triggers"]:
        op.execute(sql)


def upgrade() -> None:
    op.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    for table in PARTITIONED:
        _rebuild(table, partitioned=True)
    op.create_table(
        "archive_objects",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=True),
        sa.Column("pipeline", sa.Text(), nullable=False),
        sa.Column("table_name", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("format", sa.Text(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.Text(), nullable=False),
        sa.Column("first_key", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("last_key", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("storage_url", sa.Text(), nullable=False),
        sa.Column("schema_version", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["pipeline_runs.id"],
            name=op.f("fk_archive_objects_run_id_pipeline_runs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_archive_objects")),
        sa.UniqueConstraint("storage_url", "key", name=op.f("uq_archive_objects_storage_url_key")),
    )
    op.create_index(op.f("ix_archive_objects_run_id"), "archive_objects", ["run_id"], unique=False)
    op.create_index(
        "ix_archive_objects_table_name_created_at",
        "archive_objects",
        ["table_name", "created_at"],
        unique=False,
    )
    op.add_column("pipeline_runs", sa.Column("manifest_key", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("pipeline_runs", "manifest_key")
    op.drop_index("ix_archive_objects_table_name_created_at", table_name="archive_objects")
    op.drop_index(op.f("ix_archive_objects_run_id"), table_name="archive_objects")
    op.drop_table("archive_objects")
    for table in PARTITIONED:
        _rebuild(table, partitioned=False)
    op.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
