"""Alembic environment: the URL comes from tidemill's settings (or the caller's config)."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import create_engine, pool

from db.engine import sqlalchemy_url
from db.models import Base
from db.schema import SCHEMA, TIDEMILL_TABLES

# Alembic's version table lives with tidemill's other tables: an app that has its own Alembic
# (SaltBitter) keeps its `public.alembic_version` to itself.
VERSION_TABLE_SCHEMA = SCHEMA

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from core.settings import get_settings

        url = get_settings().database_url
    if not url:
        raise RuntimeError("no database URL: set DATABASE_URL or use `tidemill migrate`")
    return sqlalchemy_url(url)


def _include_name(name: str | None, type_: str, parent_names: object) -> bool:
    # Compare the app's schema (the default) and tidemill's; never the partitions' schema or
    # another app's.
    if type_ == "schema":
        return name in (None, SCHEMA)
    return True


def _include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    if type_ == "table" and name == "alembic_version":
        return False
    # Foreign keys of tidemill's tables: reflection names their targets unqualified whenever
    # the target's schema is on the search_path, the models qualified; the columns, indexes
    # and constraints are still compared.
    if type_ == "foreign_key_constraint":
        table = getattr(obj, "table", None)
        if getattr(table, "name", None) in TIDEMILL_TABLES:
            return False
    return True


OPTIONS: dict[str, Any] = {
    "include_object": _include_object,
    "compare_type": True,
    "version_table_schema": VERSION_TABLE_SCHEMA,
    "include_schemas": True,
    "include_name": _include_name,
}


def _prepare(connection: object) -> None:
    """tidemill schema first (it holds the version table); a database migrated before 0014
    has its version table in public and keeps its revision by moving it."""
    run = connection.exec_driver_sql  # type: ignore[attr-defined]
    run(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    moved = run(
        "SELECT to_regclass('public.alembic_version') IS NOT NULL "
        f"AND to_regclass('{SCHEMA}.alembic_version') IS NULL"
    ).scalar()
    if moved:
        run(f"ALTER TABLE public.alembic_version SET SCHEMA {SCHEMA}")
    # Migrations create the app's tables unqualified (public) and name tidemill's tables
    # unqualified too: public first, tidemill for what has moved. The drift check reflects the
    # default schema as "every table visible on the search_path" (SQLAlchemy's PostgreSQL
    # inspector), so it runs with public alone and compares tidemill's schema by name.
    if config.attributes.get("tidemill_compare"):
        run("SET search_path TO public")
    else:
        run(f"SET search_path TO public, {SCHEMA}")


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = create_engine(_url(), poolclass=pool.NullPool)
    with connectable.connect() as connection:
        # Serialize concurrent `migrate` runs (several containers starting at once).
        connection.exec_driver_sql("SELECT pg_advisory_lock(72731001)")
        try:
            _prepare(connection)
            connection.commit()
            context.configure(connection=connection, target_metadata=target_metadata, **OPTIONS)
            with context.begin_transaction():
                context.run_migrations()
        finally:
            connection.exec_driver_sql("SELECT pg_advisory_unlock(72731001)")
            connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
