"""outbox wake-up: NOTIFY the relay when outbox rows are written

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Statement-level: a bulk insert of 10,000 outbox rows sends one wake-up, not 10,000.
# NOTIFY is delivered at commit, so the relay never wakes for a row it cannot yet see.
UP = """
CREATE FUNCTION tidemill_outbox_wakeup() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('tidemill_outbox', '');
  RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_wakeup
AFTER INSERT ON outbox
FOR EACH STATEMENT EXECUTE FUNCTION tidemill_outbox_wakeup();
"""

DOWN = """
DROP TRIGGER IF EXISTS outbox_wakeup ON outbox;
DROP FUNCTION IF EXISTS tidemill_outbox_wakeup();
"""


def upgrade() -> None:
    op.execute(UP)


def downgrade() -> None:
    op.execute(DOWN)
