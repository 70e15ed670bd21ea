"""backup integrity: drill checksums and verify results (issue 16)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 00:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The drill compares contents, not only counts: per-table checksums of the restored copy
    # (and the ones that differed in `mismatches`), and what `backup verify` found.
    op.add_column("backup_drills", sa.Column("checksums", postgresql.JSONB(), nullable=True))
    op.add_column("backup_drills", sa.Column("verify_problems", postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("backup_drills", "verify_problems")
    op.drop_column("backup_drills", "checksums")
