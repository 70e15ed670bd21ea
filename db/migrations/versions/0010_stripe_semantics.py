"""stripe semantics (issue 13): money per currency with three-decimal amounts, waiting events

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 00:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MONEY = sa.Numeric(precision=15, scale=3)
_OLD_MONEY_10 = sa.Numeric(precision=10, scale=2)
_OLD_MONEY_12 = sa.Numeric(precision=12, scale=2)


def upgrade() -> None:
    # Three-decimal currencies (KWD 5.120) need a third digit; 12 integer digits hold any
    # amount Stripe accepts in any currency. Widening keeps every stored value exactly.
    op.alter_column("ledger_entries", "amount", type_=_MONEY, existing_nullable=False)
    op.alter_column("transactions", "amount", type_=_MONEY, existing_nullable=False)
    op.alter_column(
        "users", "balance", type_=_MONEY, existing_nullable=False, existing_server_default="0"
    )
    # One balance per user and currency: amounts in different currencies are never summed.
    op.create_table(
        "user_balances",
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("amount", sa.Numeric(precision=20, scale=3), server_default="0", nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_user_balances_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", "currency", name=op.f("pk_user_balances")),
    )
    # Existing entries: their balances, per currency, so the invariant holds from the start.
    op.execute(
        """INSERT INTO user_balances (user_id, currency, amount)
           SELECT user_id, upper(currency), sum(amount) FROM ledger_entries
           WHERE user_id IS NOT NULL GROUP BY user_id, upper(currency)"""
    )
    # 'waiting': a refund or dispute whose payment has not arrived yet (a visible, bounded wait).
    op.drop_constraint(op.f("ck_webhook_events_status"), "webhook_events", type_="check")
    op.create_check_constraint(
        op.f("ck_webhook_events_status"),
        "webhook_events",
        "status IN ('received', 'waiting', 'processed', 'ignored', 'failed')",
    )


def downgrade() -> None:
    op.execute("UPDATE webhook_events SET status = 'received' WHERE status = 'waiting'")
    op.drop_constraint(op.f("ck_webhook_events_status"), "webhook_events", type_="check")
    op.create_check_constraint(
        op.f("ck_webhook_events_status"),
        "webhook_events",
        "status IN ('received', 'processed', 'ignored', 'failed')",
    )
    op.drop_table("user_balances")
    op.alter_column(
        "users",
        "balance",
        type_=_OLD_MONEY_10,
        existing_nullable=False,
        existing_server_default="0",
    )
    op.alter_column("transactions", "amount", type_=_OLD_MONEY_10, existing_nullable=False)
    op.alter_column("ledger_entries", "amount", type_=_OLD_MONEY_12, existing_nullable=False)
