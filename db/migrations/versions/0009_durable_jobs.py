"""durable jobs: an outbox row is the job's record until the actor marks it done (issue 12)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 00:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # done_at: set by the actor in the commit that holds its effects. dead_at: retries
    # exhausted (the dead letter's record). redeliver_at: when the rescuer re-sends a job
    # dispatched but not done; a retry held back on purpose moves it. retries: the retry count
    # a re-sent message carries on. rescues: how often the rescuer re-sent it.
    op.add_column("outbox", sa.Column("done_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("outbox", sa.Column("dead_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("outbox", sa.Column("redeliver_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("outbox", sa.Column("retries", sa.Integer(), server_default="0", nullable=False))
    op.add_column("outbox", sa.Column("rescues", sa.Integer(), server_default="0", nullable=False))
    # Rows dispatched before this migration had no done-marking: count them as done (what the
    # system assumed of them so far), so the rescuer does not re-send history.
    op.execute("UPDATE outbox SET done_at = dispatched_at WHERE dispatched_at IS NOT NULL")
    # The rescuer's and /metrics' working set: jobs in flight. Stays small (done rows leave it).
    op.create_index(
        "ix_outbox_in_flight",
        "outbox",
        ["redeliver_at"],
        postgresql_where=sa.text(
            "dispatched_at IS NOT NULL AND done_at IS NULL AND dead_at IS NULL"
        ),
    )
    # Dead jobs (retries exhausted): few, kept for an operator, counted by /metrics.
    op.create_index(
        "ix_outbox_dead", "outbox", ["id"], postgresql_where=sa.text("dead_at IS NOT NULL")
    )
    # Counters that must outlive pruned rows and process restarts (jobs rescued, in total).
    op.create_table(
        "job_counters",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("value", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_job_counters")),
    )


def downgrade() -> None:
    op.drop_table("job_counters")
    op.drop_index("ix_outbox_dead", table_name="outbox")
    op.drop_index("ix_outbox_in_flight", table_name="outbox")
    for column in ("rescues", "retries", "redeliver_at", "dead_at", "done_at"):
        op.drop_column("outbox", column)
