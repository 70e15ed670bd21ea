"""tidemill's own schema: which tables are tidemill's, and how its sessions find them.

tidemill's tables (outbox, webhook events, runs, ticks, backups, ...) live in the ``tidemill``
schema, apart from the app's tables (``public`` or the app's own schema). Code keeps writing
unqualified SQL (``INSERT INTO outbox``): tidemill's sessions resolve names through
``search_path = <app schema>, tidemill, public``.

Why the app's schema comes first: an unqualified ``CREATE TABLE`` in a tidemill session (a
test, an operator's psql, a later migration) must land with the app's tables, where GDPR's
foreign-key walk and the retention checks look, not among tidemill's. The price is that an app
table named like one of tidemill's would shadow it: ``tidemill app check`` refuses such an app
(none of the five seeds has one).

Where the search_path comes from (decided, see docs/apps.md): a per-role, per-database default,
``ALTER ROLE <tidemill's role> IN DATABASE <db> SET search_path = ...``, installed by migration
0014 and by ``tidemill app attach``. The server applies it when a session starts, so it holds
for every connection tidemill opens (SQLAlchemy pool, raw psycopg, the relay's LISTEN session,
pg_dump) and for PgBouncer in transaction mode, which drops startup ``options`` and would hand
a session-level ``SET`` to whichever client gets the server connection next. The app's own
role keeps its search_path: an app table that happens to be called ``backups`` is never
shadowed for the app.

The trigger functions tidemill installs carry their own ``SET search_path`` so that an app
session (search_path ``public`` only) that inserts a user still reaches ``tidemill.outbox``.
"""

from __future__ import annotations

from typing import Any

SCHEMA = "tidemill"

# tidemill's tables, moved into the tidemill schema by migration 0014. Append a table here
# (and nowhere else) when a migration adds one of tidemill's own: the migration moves what is
# listed and exists, and `tidemill app attach` creates what is listed from the models.
TIDEMILL_TABLES: tuple[str, ...] = (
    "webhook_events",
    "ledger_entries",
    "outbox",
    "pipeline_runs",
    "schedule_ticks",
    "email_deliveries",
    "archive_objects",
    "schedule_state",
    "backups",
    "backup_drills",
    "job_counters",
    "user_balances",
    "erasures",
    "archive_subjects",
    "archive_superseded",
    "gdpr_exports",
    "queue_pauses",
)

# Tables the app may own (Lovendo's seed has ``audit_logs``); `attach` creates tidemill's own
# copy in the tidemill schema only when the app has none, so the dashboard and GDPR audit rows
# always have a home.
SHARED_TABLES: tuple[str, ...] = ("audit_logs",)

# Functions tidemill installed in ``public`` before 0014 (the outbox wake-up and the change
# triggers); 0014 moves every ``public.tidemill_*`` function, these are the ones known today.
FUNCTION_PREFIX = "tidemill_"


def search_path(app_schema: str = "public") -> str:
    """The search_path tidemill's sessions use for an app in `app_schema`."""
    schemas = [app_schema, SCHEMA] + ([] if app_schema == "public" else ["public"])
    return ", ".join(quote_ident(s) for s in schemas)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def role_search_path_sql(app_schema: str = "public") -> str:
    """A DO block that pins tidemill's search_path for the current role in the current
    database (dynamic: ALTER ROLE ... IN DATABASE takes no expressions)."""
    path = search_path(app_schema).replace("'", "''")
    return f"""
DO $$
BEGIN
  EXECUTE format('ALTER ROLE %I IN DATABASE %I SET search_path = {path}',
                 current_user, current_database());
END
$$;
"""


RESET_ROLE_SEARCH_PATH = """
DO $$
BEGIN
  EXECUTE format('ALTER ROLE %I IN DATABASE %I RESET search_path',
                 current_user, current_database());
END
$$;
"""

# The enqueue path for every language: the app calls it inside its own transaction, so the job
# exists exactly when the transaction commits (a rollback takes the outbox row with it). An
# array of arguments becomes the message's positional args, an object its keyword args.
ENQUEUE_FUNCTION = """
CREATE OR REPLACE FUNCTION tidemill.enqueue(actor text, args jsonb DEFAULT '[]'::jsonb,
                                            queue text DEFAULT 'default')
RETURNS bigint
LANGUAGE plpgsql
SET search_path = tidemill, pg_catalog
AS $$
DECLARE
  new_id bigint;
BEGIN
  IF actor IS NULL OR actor !~ '^[A-Za-z_][A-Za-z0-9_]{0,127}$' THEN
    RAISE EXCEPTION 'tidemill.enqueue: not an actor name: %', left(coalesce(actor, 'NULL'), 64)
      USING ERRCODE = '22023';
  END IF;
  IF queue IS NULL OR queue !~ '^[A-Za-z0-9_.-]{1,128}$' THEN
    RAISE EXCEPTION 'tidemill.enqueue: not a queue name: %', left(coalesce(queue, 'NULL'), 64)
      USING ERRCODE = '22023';
  END IF;
  args := coalesce(args, '[]'::jsonb);
  IF jsonb_typeof(args) = 'object' THEN
    INSERT INTO tidemill.outbox (actor, queue_name, args, kwargs)
    VALUES (actor, queue, '[]'::jsonb, args) RETURNING id INTO new_id;
  ELSIF jsonb_typeof(args) = 'array' THEN
    INSERT INTO tidemill.outbox (actor, queue_name, args)
    VALUES (actor, queue, args) RETURNING id INTO new_id;
  ELSE
    RAISE EXCEPTION 'tidemill.enqueue: args must be a JSON array or object, not %',
      jsonb_typeof(args) USING ERRCODE = '22023';
  END IF;
  RETURN new_id;
END;
$$;
"""


def qualify_models(metadata: Any) -> None:
    """Give tidemill's tables in the models their schema, so the ORM (and Alembic's drift check)
    names them ``tidemill.outbox``, without touching each model class (other changes keep
    declaring tidemill's tables unqualified and append the name to TIDEMILL_TABLES).

    String foreign keys (``ForeignKey("backups.id")``) are resolved against the unqualified
    keys first, then the tables are re-keyed under their schema-qualified names."""
    moving = [
        metadata.tables[name]
        for name in TIDEMILL_TABLES
        if name in metadata.tables and metadata.tables[name].schema != SCHEMA
    ]
    if not moving:
        return
    for table in metadata.tables.values():
        for fk in table.foreign_keys:
            fk.column  # noqa: B018  (resolve now, while the target's key is unqualified)
    for table in moving:
        metadata._remove_table(table.name, None)
        table.schema = SCHEMA
        table.fullname = f"{SCHEMA}.{table.name}"
        metadata._add_table(table.name, SCHEMA, table)
