"""dashboard and audit (issue 8)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23 13:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The dashboard lists the newest events and runs whatever their status: keyset pages on
    # (time, id) stay a few index reads deep at a million rows.
    op.create_index("ix_webhook_events_received_at_id", "webhook_events", ["received_at", "id"])
    op.create_index("ix_pipeline_runs_started_at_id", "pipeline_runs", ["started_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_pipeline_runs_started_at_id", table_name="pipeline_runs")
    op.drop_index("ix_webhook_events_received_at_id", table_name="webhook_events")
