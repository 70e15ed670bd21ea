"""dashboard operator pages (issue 17)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 00:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A schedule's tick history joins each tick to the pipeline run that carries it: without
    # this index each of a page's 50 ticks scanned every run of the pipeline (4.6x slower with
    # 10,000 runs, and growing).
    op.create_index("ix_pipeline_runs_pipeline_tick", "pipeline_runs", ["pipeline", "tick"])
    # The pipelines page filtered by status: newest first within a status (a rare status, such
    # as failed, no longer walks every run).
    op.create_index("ix_pipeline_runs_status_id", "pipeline_runs", ["status", "id"])
    # The audit page filtered by who, or by action (a prefix range: the database is C-collated):
    # a keyset page within those rows.
    op.create_index(
        "ix_audit_logs_actor_performed_at_id", "audit_logs", ["actor", "performed_at", "id"]
    )
    op.create_index(
        "ix_audit_logs_action_performed_at_id", "audit_logs", ["action", "performed_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_audit_logs_action_performed_at_id", table_name="audit_logs")
    op.drop_index("ix_audit_logs_actor_performed_at_id", table_name="audit_logs")
    op.drop_index("ix_pipeline_runs_status_id", table_name="pipeline_runs")
    op.drop_index("ix_pipeline_runs_pipeline_tick", table_name="pipeline_runs")
