"""outbox wake-up carries the cache invalidations it announces (issue 18, fast path)

Revision ID: 0016
Revises: 0015
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Still one NOTIFY per statement, delivered only after commit; its payload is now the kwargs of
# the statement's coalesced `invalidate` rows as a JSON array, so the relay UNLINKs their keys
# on receipt (commit -> NOTIFY -> UNLINK) without claiming anything first. '' (a plain wake-up)
# when there are none, more than 200 of them, or more than 7,000 bytes (NOTIFY's limit is
# 8,000): the relay then drains as before and the worker's job removes the keys.
UP = """
CREATE OR REPLACE FUNCTION tidemill.tidemill_outbox_wakeup() RETURNS trigger
LANGUAGE plpgsql SET search_path = tidemill, pg_catalog AS $$
DECLARE
  n integer;
  payload text;
BEGIN
  SELECT count(*), '[' || string_agg(s.kwargs::text, ',') || ']' INTO n, payload
  FROM (SELECT r.kwargs FROM new_rows r
        WHERE r.actor = 'invalidate' AND (r.args IS NULL OR r.args = '[]'::jsonb)
        LIMIT 201) AS s;
  IF n = 0 OR n > 200 OR octet_length(payload) > 7000 THEN
    payload := '';
  END IF;
  PERFORM pg_notify('tidemill_outbox', payload);
  RETURN NULL;
END;
$$;
DROP TRIGGER IF EXISTS outbox_wakeup ON tidemill.outbox;
CREATE TRIGGER outbox_wakeup AFTER INSERT ON tidemill.outbox
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION tidemill.tidemill_outbox_wakeup();
"""

DOWN = """
CREATE OR REPLACE FUNCTION tidemill.tidemill_outbox_wakeup() RETURNS trigger
LANGUAGE plpgsql SET search_path = tidemill, pg_catalog AS $$
BEGIN
  PERFORM pg_notify('tidemill_outbox', '');
  RETURN NULL;
END;
$$;
DROP TRIGGER IF EXISTS outbox_wakeup ON tidemill.outbox;
CREATE TRIGGER outbox_wakeup AFTER INSERT ON tidemill.outbox
FOR EACH STATEMENT EXECUTE FUNCTION tidemill.tidemill_outbox_wakeup();
"""


def upgrade() -> None:
    op.execute(UP)


def downgrade() -> None:
    op.execute(DOWN)
