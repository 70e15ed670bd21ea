"""GDPR lifecycle (issue 15): erasure records, archive subject index, export catalogue

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 00:30:00

- ``erasures``: one row per completed erasure, kept for good, so that a restore re-applies the
  erasures recorded after its backup. No personal data: the subject is a salted sha256 of the
  user id, which finds the user in a restored copy but names nobody on its own.
- ``archive_subjects``: which archive object holds rows of which subject (a user id or a
  Stripe customer id), written with the object, so an erase rewrites exactly those objects.
- ``archive_superseded``: old objects an erase replaced, until they are deleted.
- ``gdpr_exports``: exports in storage with their download window; the gdpr-exports-expire
  pipeline (or the user's erase) deletes object and row.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "erasures",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("reference", sa.Text(), nullable=False),
        sa.Column("subject_hash", sa.Text(), nullable=False),
        sa.Column(
            "erased_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("erased_by", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_erasures")),
        sa.UniqueConstraint("reference", name=op.f("uq_erasures_reference")),
    )
    op.create_index(op.f("ix_erasures_erased_at"), "erasures", ["erased_at"], unique=False)
    op.create_table(
        "archive_subjects",
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("object_id", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["object_id"],
            ["archive_objects.id"],
            name=op.f("fk_archive_subjects_object_id_archive_objects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("subject", "object_id", name=op.f("pk_archive_subjects")),
    )
    op.create_index(
        op.f("ix_archive_subjects_object_id"), "archive_subjects", ["object_id"], unique=False
    )
    # Old objects an erase replaced: deleted once the catalogue points at the rewritten one; a
    # crash in between leaves the key here and the next erase (or archive run) deletes it.
    op.create_table(
        "archive_superseded",
        sa.Column("storage_url", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column(
            "since", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.PrimaryKeyConstraint("storage_url", "key", name=op.f("pk_archive_superseded")),
    )
    op.create_table(
        "gdpr_exports",
        sa.Column("export_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("user_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("storage_url", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requested_by", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("export_id", name=op.f("pk_gdpr_exports")),
    )
    op.create_index(op.f("ix_gdpr_exports_user_id"), "gdpr_exports", ["user_id"], unique=False)
    op.create_index(
        op.f("ix_gdpr_exports_expires_at"), "gdpr_exports", ["expires_at"], unique=False
    )

    # issue #20: the outbox prune policy walks done rows in (done_at, id) order.
    op.create_index(
        "ix_outbox_done_at_id",
        "outbox",
        ["done_at", "id"],
        unique=False,
        postgresql_where=sa.text("done_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_done_at_id", table_name="outbox")
    op.drop_table("gdpr_exports")
    op.drop_table("archive_superseded")
    op.drop_table("archive_subjects")
    op.drop_table("erasures")
