"""tidemill's own tables move into the tidemill schema; tidemill.enqueue (issue 14)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 00:10:00
"""

from collections.abc import Sequence

from alembic import op

from db.schema import (
    ENQUEUE_FUNCTION,
    FUNCTION_PREFIX,
    RESET_ROLE_SEARCH_PATH,
    SCHEMA,
    TIDEMILL_TABLES,
    role_search_path_sql,
)

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The table list is read from db/schema.py on purpose (a frozen copy here would miss tables
# that other migrations add and the lead appends there): the move is by name, skips what does
# not exist, and is the same statement whatever the list.
MOVE = """
DO $$
DECLARE
  t text;
  f regprocedure;
BEGIN
  FOREACH t IN ARRAY %(tables)s LOOP
    IF to_regclass(format('public.%%I', t)) IS NOT NULL
       AND to_regclass(format('{schema}.%%I', t)) IS NULL THEN
      EXECUTE format('ALTER TABLE public.%%I SET SCHEMA {schema}', t);
    END IF;
  END LOOP;
  -- tidemill's trigger functions: triggers point at them by oid, so they keep working; their
  -- own search_path lets an app session (search_path public) reach tidemill.outbox.
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = 'public' AND p.proname LIKE '{prefix}%%' LOOP
    EXECUTE format('ALTER FUNCTION %%s SET SCHEMA {schema}', f);
  END LOOP;
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = '{schema}' AND p.proname LIKE '{prefix}%%' LOOP
    EXECUTE format('ALTER FUNCTION %%s SET search_path = {schema}, public', f);
  END LOOP;
END
$$;
"""

BACK = """
DO $$
DECLARE
  t text;
  f regprocedure;
BEGIN
  FOREACH t IN ARRAY %(tables)s LOOP
    IF to_regclass(format('{schema}.%%I', t)) IS NOT NULL THEN
      EXECUTE format('ALTER TABLE {schema}.%%I SET SCHEMA public', t);
    END IF;
  END LOOP;
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = '{schema}' AND p.proname LIKE '{prefix}%%' LOOP
    EXECUTE format('ALTER FUNCTION %%s RESET search_path', f);
    EXECUTE format('ALTER FUNCTION %%s SET SCHEMA public', f);
  END LOOP;
END
$$;
"""


def _array(names: Sequence[str]) -> str:
    return "ARRAY[" + ", ".join("'" + n.replace("'", "''") + "'" for n in names) + "]::text[]"


def upgrade() -> None:
    op.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    sql = MOVE.format(schema=SCHEMA, prefix=FUNCTION_PREFIX) % {"tables": _array(TIDEMILL_TABLES)}
    op.execute(sql)
    op.execute(ENQUEUE_FUNCTION)
    op.execute(role_search_path_sql("public"))


def downgrade() -> None:
    op.execute(RESET_ROLE_SEARCH_PATH)
    op.execute(f"DROP FUNCTION IF EXISTS {SCHEMA}.enqueue(text, jsonb, text)")
    sql = BACK.format(schema=SCHEMA, prefix=FUNCTION_PREFIX) % {"tables": _array(TIDEMILL_TABLES)}
    op.execute(sql)
    # the schema stays: it holds Alembic's version table
