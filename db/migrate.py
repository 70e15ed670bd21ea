"""Apply and check Alembic migrations programmatically (used by the CLI and the suite)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def check(url: str) -> None:
    """Raise if the models and the migrations disagree (alembic check)."""
    cfg = alembic_config(url)
    cfg.attributes["tidemill_compare"] = True  # env.py: reflect with search_path public only
    command.check(cfg)


def current(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, pool

    from db.engine import sqlalchemy_url
    from db.schema import SCHEMA

    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    with engine.connect() as conn:
        for schema in (SCHEMA, "public"):  # public: a database not yet at 0014
            exists = conn.exec_driver_sql(
                f"SELECT to_regclass('{schema}.alembic_version') IS NOT NULL"
            ).scalar()
            if exists:
                ctx = MigrationContext.configure(conn, opts={"version_table_schema": schema})
                return ctx.get_current_revision()
        return None
