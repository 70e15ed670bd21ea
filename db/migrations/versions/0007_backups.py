"""backups catalogue and restore drills (issue 7)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 13:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "backups",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), server_default="running", nullable=False),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("manifest_key", sa.Text(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.Text(), nullable=True),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("storage_url", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("parent_id", sa.BigInteger(), nullable=True),
        sa.Column("storage_class", sa.Text(), nullable=True),
        sa.Column("data_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("wal_start", sa.Text(), nullable=True),
        sa.CheckConstraint("kind IN ('full', 'base', 'incremental')", name=op.f("ck_backups_kind")),
        sa.CheckConstraint(
            "status IN ('running', 'complete', 'failed', 'expired')",
            name=op.f("ck_backups_status"),
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["backups.id"],
            name=op.f("fk_backups_parent_id_backups"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backups")),
    )
    op.create_index("ix_backups_kind_started_at", "backups", ["kind", "started_at"], unique=False)
    op.create_table(
        "backup_drills",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("backup_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.Text(), server_default="running", nullable=False),
        sa.Column("restore_seconds", sa.Double(), nullable=True),
        sa.Column("data_age_seconds", sa.Double(), nullable=True),
        sa.Column("tables_checked", sa.Integer(), nullable=True),
        sa.Column("mismatches", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'passed', 'failed')", name=op.f("ck_backup_drills_status")
        ),
        sa.ForeignKeyConstraint(
            ["backup_id"],
            ["backups.id"],
            name=op.f("fk_backup_drills_backup_id_backups"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backup_drills")),
    )
    op.create_index(
        op.f("ix_backup_drills_backup_id"), "backup_drills", ["backup_id"], unique=False
    )
    op.create_index("ix_backup_drills_started_at", "backup_drills", ["started_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_backup_drills_started_at", table_name="backup_drills")
    op.drop_index(op.f("ix_backup_drills_backup_id"), table_name="backup_drills")
    op.drop_table("backup_drills")
    op.drop_index("ix_backups_kind_started_at", table_name="backups")
    op.drop_table("backups")
