"""schedule state: pause, misfires (issue 6)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 13:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "schedule_ticks",
        sa.Column("kind", sa.Text(), server_default="scheduled", nullable=False),
    )
    op.add_column(
        "schedule_ticks",
        sa.Column("covers", sa.Integer(), server_default="1", nullable=False),
    )
    op.add_column("schedule_ticks", sa.Column("outbox_id", sa.BigInteger(), nullable=True))
    # Existing manual ticks keep their meaning under the new column.
    op.execute("UPDATE schedule_ticks SET kind = 'manual' WHERE manual")
    op.create_check_constraint(
        op.f("ck_schedule_ticks_kind"),
        "schedule_ticks",
        "kind IN ('scheduled', 'manual', 'catch-up')",
    )
    op.create_table(
        "schedule_state",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("paused", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("changed_by", sa.Text(), nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("caught_up_to", sa.DateTime(timezone=True), nullable=True),
        sa.Column("missed_ticks", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("skipped_ticks", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("last_misfire_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_schedule_state")),
    )


def downgrade() -> None:
    op.drop_table("schedule_state")
    op.drop_constraint(op.f("ck_schedule_ticks_kind"), "schedule_ticks", type_="check")
    op.drop_column("schedule_ticks", "outbox_id")
    op.drop_column("schedule_ticks", "covers")
    op.drop_column("schedule_ticks", "kind")
