"""Queue pauses live in Postgres (a wiped broker no longer resumes a paused queue)

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 03:40:00

A pause was a hash in the broker's Redis: a FLUSHALL, an eviction or a failover to an empty
replica silently resumed every paused queue. The pause is now a row; workers read the table.
Pauses in the old hash are not carried over (the broker's Redis is not reachable from a
migration); an operator re-pauses after the upgrade.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from db.schema import SCHEMA

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "queue_pauses",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("paused_by", sa.Text(), nullable=False),
        sa.Column(
            "paused_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.PrimaryKeyConstraint("queue", name=op.f("pk_queue_pauses")),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("queue_pauses", schema=SCHEMA)
