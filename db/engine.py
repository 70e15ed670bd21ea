"""Engine, sessions and the unit of work: one connection, one transaction, commit or roll back."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings, get_settings, redact_url


class ServiceUnreachable(RuntimeError):
    """A configured server cannot be reached; the message names host and port, no traceback."""


def sqlalchemy_url(url: str) -> str:
    """Any Postgres URL spelling -> the psycopg 3 dialect."""
    scheme, _, rest = url.partition("://")
    if scheme in {"postgres", "postgresql"}:
        return f"postgresql+psycopg://{rest}"
    return url


def libpq_url(url: str) -> str:
    """The URL psycopg and pg_dump understand (no SQLAlchemy dialect suffix)."""
    scheme, _, rest = url.partition("://")
    return f"postgresql://{rest}" if scheme.startswith("postgres") else url


def host_port(url: str, default_port: int) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or default_port}"


def check_postgres(url: str, *, timeout: int = 5) -> None:
    try:
        with psycopg.connect(libpq_url(url), connect_timeout=timeout) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ServiceUnreachable(
            f"cannot reach Postgres at {host_port(url, 5432)} ({redact_url(url)}): {reason}"
        ) from None


# A peer that vanished (host down, network cut) must not hold row locks for the kernel's
# default two hours: the client notices a dead server, and the server (through the per-session
# tcp_keepalives_* settings) a dead client, within about a minute, which ends its transaction
# and frees e.g. the outbox rows a vanished relay had claimed.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "options": "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3",
}


def _paired_direct_url(settings: Settings) -> str | None:
    """DATABASE_DIRECT_URL when it names the same database as DATABASE_URL. A settings copy
    pointed at another database (a restore drill's cluster, embedded servers) must never
    reach the old one through a leftover direct URL."""
    direct, url = settings.database_direct_url, settings.database_url
    if not direct or not url or direct == url:
        return None
    if urlsplit(direct).path.strip("/") != urlsplit(url).path.strip("/"):
        return None
    return direct


def direct_url(settings: Settings | None = None) -> str:
    """The URL for what needs a Postgres session of its own, which a transaction-mode pooler
    (PgBouncer) cannot give: LISTEN, session advisory locks, migrations, pg_dump and
    pg_basebackup, CREATE/DROP DATABASE. DATABASE_DIRECT_URL, else DATABASE_URL."""
    settings = settings or get_settings()
    url = _paired_direct_url(settings) or settings.database_url
    if url is None:
        raise ServiceUnreachable("DATABASE_URL is unset and no embedded Postgres is running")
    return url


def pooled(settings: Settings | None = None) -> bool:
    """DATABASE_URL goes through a transaction-mode pooler: DATABASE_DIRECT_URL says so."""
    return _paired_direct_url(settings or get_settings()) is not None


# psycopg prepares a statement on the server after its fifth run on one connection. Behind a
# transaction-mode pooler the next transaction may land on another server connection, where
# the statement does not exist (PgBouncer 1.18, Debian 12's, cannot track prepared statements;
# max_prepared_statements came in 1.21), so pooled connections never prepare.
POOLED: dict[str, Any] = {"prepare_threshold": None}


def connect_options(settings: Settings | None = None) -> dict[str, Any]:
    """Keyword arguments for a psycopg connection to DATABASE_URL (pooled or not)."""
    return dict(POOLED) if pooled(settings) else {}


def keepalive_options(settings: Settings | None = None) -> dict[str, Any]:
    """connect_options plus keepalives, for a long-lived raw psycopg connection to DATABASE_URL:
    both ways direct; behind a pooler only the client side (PgBouncer refuses the startup
    `options` that carry the server's keepalive settings)."""
    args = dict(KEEPALIVES)
    if pooled(settings):
        del args["options"]
    return args | connect_options(settings)


class Database:
    def __init__(self, url: str, *, pool_size: int = 20, pooled: bool = False) -> None:
        self.url = url
        # Behind PgBouncer: no server-side prepares, and no startup `options` (PgBouncer refuses
        # unknown startup parameters; its own server connections carry its keepalive settings).
        connect_args = dict(KEEPALIVES)
        if pooled:
            del connect_args["options"]
            connect_args.update(POOLED)
        # No pre-ping: it costs a round trip on every checkout. After a Postgres restart the
        # first statement on a stale connection fails, SQLAlchemy invalidates the pool, and the
        # message is retried (workers) or answered 503 (the webhook receiver), so nothing is
        # lost. The pool is sized for the web threadpool's usual concurrency: connections
        # opened beyond it are closed on return, and reconnecting per request doubles the cost.
        self.engine: Engine = create_engine(
            sqlalchemy_url(url),
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=False,
            pool_recycle=1800,
            connect_args=connect_args,
        )
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def dispose(self) -> None:
        self.engine.dispose()


_lock = threading.Lock()
_databases: dict[str, Database] = {}


def get_database(settings: Settings | None = None) -> Database:
    settings = settings or get_settings()
    if settings.database_url is None:
        raise ServiceUnreachable("DATABASE_URL is unset and no embedded Postgres is running")
    with _lock:
        db = _databases.get(settings.database_url)
        if db is None:
            db = _databases[settings.database_url] = Database(
                settings.database_url, pooled=pooled(settings)
            )
        return db


def dispose_all() -> None:
    """Close every pool (after fork, or when a test recreates its database)."""
    with _lock:
        for db in _databases.values():
            db.dispose()
        _databases.clear()


class UnitOfWork:
    """One connection inside one transaction. `commit()` ends it; anything else rolls it back.

    The connection is checked out of the pool on first use: a message that never touches
    Postgres pays nothing. It is a Core connection, not an ORM session: a session costs a
    message about 50 us of Python to open, begin, commit and close, and the hot paths run
    plain SQL (``sql``); ``session`` still gives one, joined to this same transaction.
    """

    def __init__(self, database: Callable[[], Database]) -> None:
        self._database = database
        self._connection: Connection | None = None
        self._session: Session | None = None
        self._driver: Any = None
        self.committed = False

    @property
    def opened(self) -> bool:
        """Whether anything has used the connection yet (a message that never touched Postgres)."""
        return self._connection is not None

    @property
    def connection(self) -> Connection:
        """The connection, in its transaction (begun again after a rollback)."""
        if self._connection is None:
            self._connection = self._database().engine.connect()
        if not self._connection.in_transaction():
            # Begun through SQLAlchemy, so that its commit() commits what `sql` wrote.
            self._connection.begin()
        return self._connection

    @property
    def session(self) -> Session:
        """An ORM session inside this unit's transaction (it never commits it on its own)."""
        if self._session is None:
            # joined to the connection's transaction: its commit() flushes, never commits
            self._session = Session(bind=self.connection, expire_on_commit=False)
        return self._session

    def commit(self) -> None:
        self._driver = None
        if self._session is not None:
            self._session.commit()  # flushes; the transaction is the connection's
        if self._connection is not None:
            self._connection.commit()
        self.committed = True

    def rollback(self) -> None:
        self._driver = None  # a later statement begins a new transaction
        self._close_session()
        if self._connection is not None:
            self._connection.rollback()

    def close(self) -> None:
        self._close_session()
        if self._connection is None:
            return
        self._connection.close()  # rolls back whatever was not committed; back to the pool
        self._connection = None

    def _close_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        if self._session is not None:  # pending ORM changes are flushed first
            return self._session.execute(*args, **kwargs)
        return self.connection.execute(*args, **kwargs)

    def sql(self, query: str, params: Mapping[str, Any] | None = None) -> psycopg.Cursor[Any]:
        """Run SQL (``%(name)s`` parameters) straight on this transaction's psycopg connection.

        For hot paths: it skips SQLAlchemy's statement layer (~60 us a statement here) while
        staying inside the same transaction as ``execute``. Rows are named tuples.
        """
        if self._driver is None:
            self._driver = self.connection.connection.driver_connection
        cursor = self._driver.cursor(row_factory=namedtuple_row)
        return cursor.execute(query, params)


@contextmanager
def unit_of_work(settings: Settings | None = None) -> Iterator[UnitOfWork]:
    """Commit when the block returns, roll back when it raises."""
    database = get_database(settings)
    uow = UnitOfWork(lambda: database)
    try:
        yield uow
        uow.commit()
    finally:
        uow.close()
