"""A seed app's database for end-to-end tests: the seed's schema loaded into a fresh database,
tidemill pointed at it (DATABASE_URL, TIDEMILL_APP), then `tidemill app attach NAME`."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from core.settings import reset_settings_cache

SCHEMAS = Path(__file__).resolve().parent.parent / "apps"


def schema_sql(app: str, conn: psycopg.Connection[Any]) -> str:
    """tests/apps/<app>/schema.sql; without PostGIS on the server, SaltBitter's one GEOGRAPHY
    column loads as TEXT (see the file's ADDED note)."""
    text = (SCHEMAS / app / "schema.sql").read_text()
    has_postgis = conn.execute(
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'postgis'"
    ).fetchone()
    if "postgis" in text and not (has_postgis and has_postgis[0]):
        text = text.replace("CREATE EXTENSION IF NOT EXISTS postgis;", "")
        text = text.replace("GEOGRAPHY(POINT, 4326)", "TEXT")
        text = "\n".join(line for line in text.splitlines() if "USING GIST" not in line)
    return text


def create_app_database(admin_url: str, url: str, name: str, app: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(schema_sql(app, conn))


@contextmanager
def serving(app: str, url: str) -> Iterator[None]:
    """This process (its in-process worker and relay) serves `app` on `url`."""
    from db.engine import dispose_all

    saved = {k: os.environ.get(k) for k in ("DATABASE_URL", "TIDEMILL_APP")}
    os.environ.update({"DATABASE_URL": url, "TIDEMILL_APP": app})
    reset_settings_cache()
    dispose_all()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_settings_cache()
        dispose_all()


def pump(sql: Any, worker: Any, *, timeout: float = 60) -> None:
    """Relay the outbox and let the worker finish, until nothing is pending (follow-up jobs
    written by the jobs themselves included)."""
    from workers.broker import broker
    from workers.outbox import drain

    deadline = time.monotonic() + timeout
    while True:
        drain(broker, batch=100)
        for queue in list(broker.get_declared_queues()):
            broker.join(queue, timeout=int(timeout * 1000))
        worker.join()
        pending = sql.execute(
            "SELECT count(*) FROM tidemill.outbox "
            "WHERE dispatched_at IS NULL AND last_error IS NULL"
        ).fetchone()[0]
        if pending == 0:
            return
        assert time.monotonic() < deadline, f"{pending} outbox rows still pending"
