"""`tidemill app check | attach | detach`: a profile against a live app database.

- ``check`` names every table and column the profile relies on that the database lacks, and
  compiles (EXPLAIN, nothing runs) every piece of SQL the profile carries.
- ``attach`` installs the ``tidemill`` schema (tidemill's tables, the outbox wake-up, the cache
  function, ``tidemill.enqueue``), the profile's triggers, the search_path of tidemill's role
  and the profile's schedules. Idempotent: every statement is create-if-missing or replace.
- ``detach`` drops what attach installed (the triggers on the app's tables, then the schema
  with everything in it); the app's tables and rows are not touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pgsql
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

from apps.profile import Profile, Rule
from db.engine import libpq_url
from db.schema import (
    ENQUEUE_FUNCTION,
    RESET_ROLE_SEARCH_PATH,
    SCHEMA,
    SHARED_TABLES,
    TIDEMILL_TABLES,
    quote_ident,
    role_search_path_sql,
    search_path,
)

# Live copies of the functions migrations 0002 (as 0016 changed it) and 0004 installed for
# Lovendo (a migration is frozen; this is what attach installs today).
OUTBOX_WAKEUP = f"""
CREATE OR REPLACE FUNCTION {SCHEMA}.tidemill_outbox_wakeup() RETURNS trigger
LANGUAGE plpgsql SET search_path = {SCHEMA}, pg_catalog AS $$
DECLARE
  n integer;
  payload text;
BEGIN
  -- the statement's cache invalidations ride on the wake-up (migration 0016: the relay UNLINKs
  -- their keys on receipt); '' past 200 rows or 7,000 bytes (NOTIFY's limit is 8,000)
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
DROP TRIGGER IF EXISTS outbox_wakeup ON {SCHEMA}.outbox;
CREATE TRIGGER outbox_wakeup AFTER INSERT ON {SCHEMA}.outbox
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.tidemill_outbox_wakeup();
"""

CACHE_FUNCTION = f"""
CREATE OR REPLACE FUNCTION {SCHEMA}.tidemill_cache_outbox() RETURNS trigger
LANGUAGE plpgsql SET search_path = {SCHEMA}, public AS $$
DECLARE
  payload jsonb;
BEGIN
  IF TG_OP = 'INSERT' THEN
    SELECT jsonb_agg(DISTINCT r.picked) INTO payload FROM (
      SELECT (SELECT jsonb_object_agg(c, j -> c) FROM unnest(TG_ARGV) AS c) AS picked
      FROM (SELECT to_jsonb(n) AS j FROM new_rows n) AS s) AS r;
  ELSIF TG_OP = 'DELETE' THEN
    SELECT jsonb_agg(DISTINCT r.picked) INTO payload FROM (
      SELECT (SELECT jsonb_object_agg(c, j -> c) FROM unnest(TG_ARGV) AS c) AS picked
      FROM (SELECT to_jsonb(o) AS j FROM old_rows o) AS s) AS r;
  ELSE
    SELECT jsonb_agg(DISTINCT r.picked) INTO payload FROM (
      SELECT (SELECT jsonb_object_agg(c, j -> c) FROM unnest(TG_ARGV) AS c) AS picked
      FROM (SELECT to_jsonb(o) AS j FROM old_rows o
            UNION ALL SELECT to_jsonb(n) FROM new_rows n) AS s) AS r;
  END IF;
  IF payload IS NULL THEN
    RETURN NULL;
  END IF;
  INSERT INTO {SCHEMA}.outbox (actor, queue_name, kwargs)
  VALUES ('invalidate', 'cache', jsonb_build_object('table', TG_TABLE_NAME, 'rows', payload));
  RETURN NULL;
END;
$$;
"""


@dataclass
class CheckReport:
    app: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _columns(conn: psycopg.Connection[Any], schema: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for table, column in conn.execute(
        "SELECT c.table_name, c.column_name FROM information_schema.columns c "
        "JOIN information_schema.tables t USING (table_schema, table_name) "
        "WHERE c.table_schema = %s AND t.table_type = 'BASE TABLE'",
        (schema,),
    ):
        out.setdefault(table, set()).add(column)
    return out


def _rule_select(rule: Rule) -> str:
    """The rows a rule's trigger turns into jobs, as a plain query over the table (so check can
    compile it; the trigger runs the same expressions over its transition tables)."""
    args = ", ".join(rule.args) or "1"
    table = quote_ident(rule.table)
    if rule.on == "update":
        key = quote_ident(rule.key)
        return (
            f"SELECT {args} FROM {table} n JOIN {table} o ON o.{key} = n.{key} WHERE {rule.where}"
        )
    return f"SELECT {args} FROM {table} n WHERE {rule.where}"


def _explain(
    conn: psycopg.Connection[Any], query: str, params: dict[str, Any] | None, schema: str
) -> str | None:
    """Compile `query` (EXPLAIN: planned, never run); the first line of the error, if any."""
    try:
        with conn.transaction():
            conn.execute(f"SET LOCAL search_path = {search_path(schema)}")
            conn.execute(f"EXPLAIN {query}", params)
    except psycopg.Error as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None


def check(profile: Profile, conn: psycopg.Connection[Any]) -> CheckReport:
    """Every table and column the profile relies on, and every piece of its SQL, against the
    database on `conn` (catalog reads and EXPLAIN only)."""
    report = CheckReport(profile.name)
    have = _columns(conn, profile.schema)
    for table, cols in sorted(profile.required_columns().items()):
        if table not in have:
            report.problems.append(f"missing table {profile.schema}.{table}")
            continue
        for col in sorted(cols - have[table]):
            report.problems.append(f"missing column {profile.schema}.{table}.{col}")
    for name, table, age, extra in _policy_needs(profile):
        if table in TIDEMILL_TABLES or (table in SHARED_TABLES and table not in have):
            continue  # tidemill's own: attach creates it
        if table not in have:
            report.problems.append(f"policy {name}: missing table {profile.schema}.{table}")
            continue
        for col in [age or "", *extra]:
            if col and col not in have[table]:
                report.problems.append(
                    f"policy {name}: missing column {profile.schema}.{table}.{col}"
                )
    if not profile.migrated:
        for table in sorted(set(TIDEMILL_TABLES) & set(have)):
            report.problems.append(
                f"app table {profile.schema}.{table} would shadow tidemill's {SCHEMA}.{table}"
            )
    if report.problems:
        return report  # the SQL below would only repeat the missing names
    for mail in profile.mails:
        err = _explain(conn, mail.recipients, {"key": None}, profile.schema)
        if err:
            report.problems.append(f"mail {mail.kind}: {err}")
    for fan in profile.fan_outs:
        err = _explain(conn, fan.sql, {"key": None}, profile.schema)
        if err:
            report.problems.append(f"fan-out {fan.name}: {err}")
    for rule in profile.rules:
        err = _explain(conn, _rule_select(rule), None, profile.schema)
        if err:
            report.problems.append(f"rule {rule.name}: {err}")
    return report


def _policy_needs(profile: Profile) -> Iterable[tuple[str, str, str | None, list[str]]]:
    """(policy, table, age column or None, other columns) of the profile's policies."""
    from pipelines.lifecycle.policies import load_policy_file

    path = policy_path(profile)
    if path is None:
        return []
    out: list[tuple[str, str, str | None, list[str]]] = []
    for p in load_policy_file(str(path)):
        extra = [getattr(p, "key_column", None) or ""]
        age = p.age_column if p.action != "partitions" else None
        out.append((p.name, p.table, age, extra))
    return out


def policy_path(profile: Profile) -> Path | None:
    return profile.policy_file


# ---- attach / detach ---------------------------------------------------------------------------


def rule_ddl(rule: Rule) -> str:
    fn = f"{SCHEMA}.{quote_ident(rule.name)}"
    table = quote_ident(rule.table)
    args = ", ".join(rule.args)
    if rule.on == "update":
        key = quote_ident(rule.key)
        source = f"new_rows n JOIN old_rows o ON o.{key} = n.{key}"
        refs = "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
        event = "UPDATE"
    elif rule.on == "insert":
        source = "new_rows n"
        refs = "REFERENCING NEW TABLE AS new_rows"
        event = "INSERT"
    else:
        raise ValueError(f"rule {rule.name}: on must be insert or update, not {rule.on!r}")
    actor = rule.actor.replace("'", "''")
    queue = rule.queue.replace("'", "''")
    # Statement-level with transition tables: a bulk write costs one call, one INSERT.
    return f"""
CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger
LANGUAGE plpgsql SET search_path = {SCHEMA}, public AS $$
BEGIN
  INSERT INTO {SCHEMA}.outbox (actor, queue_name, args)
  SELECT '{actor}', '{queue}', jsonb_build_array({args}) FROM {source} WHERE {rule.where};
  RETURN NULL;
END;
$$;
DROP TRIGGER IF EXISTS {quote_ident("tidemill_" + rule.name)} ON {table};
CREATE TRIGGER {quote_ident("tidemill_" + rule.name)} AFTER {event} ON {table}
{refs}
FOR EACH STATEMENT EXECUTE FUNCTION {fn}();
"""


def _table_ddl(conn: psycopg.Connection[Any], app_tables: set[str]) -> list[str]:
    """CREATE TABLE IF NOT EXISTS for tidemill's tables (from the models), in the tidemill
    schema; foreign keys to the app's tables (Lovendo's users) are left out: another app's
    users table has another key."""
    from sqlalchemy import MetaData

    from db.models import Base

    dialect = postgresql.dialect()
    tables = [Base.metadata.tables[f"{SCHEMA}.{t}"] for t in TIDEMILL_TABLES]  # in FK order
    target = MetaData()
    for name in SHARED_TABLES:
        if name not in app_tables:
            tables.append(Base.metadata.tables[name].to_metadata(target, schema=SCHEMA))
    statements = []
    for t in tables:
        keep = [fk for fk in t.foreign_key_constraints if fk.referred_table.schema == SCHEMA]
        create = CreateTable(t, include_foreign_key_constraints=keep, if_not_exists=True)
        statements.append(str(create.compile(dialect=dialect)))
        for idx in t.indexes:
            statements.append(str(CreateIndex(idx, if_not_exists=True).compile(dialect=dialect)))
    return statements


def attach(profile: Profile, url: str) -> list[str]:
    """Install tidemill into the app database at `url`; returns what it did, one line each."""
    from schedules.schedule import load_schedules

    done: list[str] = []
    if profile.migrated:
        from db.migrate import upgrade

        upgrade(url)
        done.append("migrations applied (tidemill's migrations own this app's tables)")
    with psycopg.connect(libpq_url(url), autocommit=False) as conn:
        conn.execute("SELECT pg_advisory_lock(72731014)")  # one attach at a time
        report = check(profile, conn)
        if not report.ok:
            raise AttachRefused(report)
        app_tables = set(_columns(conn, profile.schema))
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        conn.execute(f"SET LOCAL search_path = {SCHEMA}, public")
        for stmt in _table_ddl(conn, app_tables):
            conn.execute(stmt)
        done.append(f"schema {SCHEMA}: {len(TIDEMILL_TABLES)} tables")
        # sessions opened from here on (the backup below, the workers) find tidemill's tables
        conn.execute(role_search_path_sql(profile.schema))
        done.append("search_path of this role in this database: app schema, tidemill, public")
        conn.execute(OUTBOX_WAKEUP)
        conn.execute(CACHE_FUNCTION)
        conn.execute(ENQUEUE_FUNCTION)
        done.append("functions: outbox wake-up, cache outbox, tidemill.enqueue")
        if profile.backups is not None and profile.backups.before_migrations:
            # Pomi: a backup before every change to the app's schema. tidemill's own schema
            # exists now (the backup is recorded in its catalogue); nothing of the app's has
            # changed yet. No backup, no triggers: the error ends the attach here.
            conn.commit()
            done.append(_backup_before(url, profile))
        for rule in profile.rules:
            conn.execute(rule_ddl(rule))
            done.append(f"trigger {rule.name} on {rule.table} ({rule.on}) -> {rule.actor}")
        from db.cache_keys import trigger_ddl

        for cached in profile.cache:
            for event in ("insert", "update", "delete"):
                conn.execute(
                    pgsql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                        pgsql.Identifier(f"{cached.table}_cache_{event}"),
                        pgsql.Identifier(profile.schema, cached.table),
                    )
                )
            conn.execute(trigger_ddl(cached.table, cached))
            done.append(f"cache triggers on {cached.table}: {', '.join(cached.keys)}")
        conn.execute(
            pgsql.SQL("COMMENT ON SCHEMA {} IS {}").format(
                pgsql.Identifier(SCHEMA), pgsql.Literal(f"tidemill app={profile.name}")
            )
        )
        from core.settings import Settings

        names = [s.name for s in load_schedules(Settings.from_env({"TIDEMILL_APP": profile.name}))]
        conn.execute(
            f"INSERT INTO {SCHEMA}.schedule_state (name, paused, changed_by, changed_at) "
            "SELECT unnest(%s::text[]), false, 'tidemill app attach', now() "
            "ON CONFLICT (name) DO NOTHING",
            (names,),
        )
        done.append(f"schedules: {len(names)} ({', '.join(names)})")
        conn.commit()
        conn.execute("SELECT pg_advisory_unlock(72731014)")
    return done


def _backup_before(url: str, profile: Profile) -> str:
    import os

    from core.settings import Settings
    from pipelines.backups.logical import run_full_backup

    settings = Settings.from_env({**os.environ, "DATABASE_URL": url, "TIDEMILL_APP": profile.name})
    result = run_full_backup(settings, reason=f"before tidemill app attach {profile.name}")
    return f"backup before changing the app's schema: {result.folder}"


def attached_app(conn: psycopg.Connection[Any]) -> str | None:
    row = conn.execute(
        "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = %s",
        (SCHEMA,),
    ).fetchone()
    if row is None or not row[0] or not str(row[0]).startswith("tidemill app="):
        return None
    return str(row[0]).removeprefix("tidemill app=")


def detach(profile: Profile, url: str) -> list[str]:
    """Drop the triggers on the app's tables and the tidemill schema; app rows stay."""
    done: list[str] = []
    with psycopg.connect(libpq_url(url), autocommit=False) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(72731014)")
        # Every trigger whose function lives in the tidemill schema (the profile's, the cache
        # triggers, Lovendo's migration triggers): the CASCADE below would drop them too, but
        # naming them makes the report say what went.
        rows = conn.execute(
            "SELECT t.tgname, c.relname, n.nspname FROM pg_trigger t "
            "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace "
            "WHERE pn.nspname = %s AND n.nspname <> %s AND NOT t.tgisinternal",
            (SCHEMA, SCHEMA),
        ).fetchall()
        for tgname, relname, nspname in rows:
            conn.execute(
                pgsql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                    pgsql.Identifier(tgname), pgsql.Identifier(nspname, relname)
                )
            )
            done.append(f"trigger {tgname} on {nspname}.{relname} dropped")
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        done.append(f"schema {SCHEMA} dropped (tidemill's tables, functions, version table)")
        conn.execute(RESET_ROLE_SEARCH_PATH)
        done.append("search_path of this role in this database reset")
        conn.commit()
    return done


class AttachRefused(RuntimeError):
    def __init__(self, report: CheckReport) -> None:
        super().__init__(
            f"app {report.app} does not match this database: " + "; ".join(report.problems)
        )
        self.report = report
