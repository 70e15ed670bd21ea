"""One leader among any number of scheduler replicas: a Postgres advisory lock on a dedicated
connection, and every fire committed on that same connection.

The lock is session-level (``pg_try_advisory_lock``): it lives exactly as long as the
connection's backend. When the leader dies the server ends its backend and the lock goes with
it: at once for a killed process (the kernel closes the socket), within about 11 s for a
vanished host (server-side TCP keepalives set on the session below). Standbys retry every
``TIDEMILL_SCHEDULER_LEADER_RETRY_S``.

The fence is the session itself. A fire (and a catch-up) runs as a transaction on the lock's
own connection (``Fence.transaction``): its COMMIT can only succeed while that backend lives,
and while the backend lives the lock is held. A check followed by a commit on another
connection would leave a window between the two; this has none. A leader frozen inside a fire
transaction (SIGSTOP, a stalled VM) is idle in transaction to the server, which ends the
session after ``idle_in_transaction_session_timeout``: the fire rolls back and the lock is freed
in the same instant, so a standby never takes the lock while the frozen transaction still holds
row locks it would queue behind. Thawed, the old leader finds its connection gone; its fire
is refused (``NotLeader``) and it steps down at once.

A leader frozen between fires is idle to the server, which ends it after
``idle_session_timeout``. Both timeouts are set on the session (5 times the retry interval, at
least 5 s), overriding whatever the server's defaults are; the leader's checks (every retry
interval) keep its session busy well inside them. ``lock_timeout`` bounds any wait on a row
lock, so nothing the leader runs can queue for long behind another session.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import namedtuple_row

from core.log import get_logger
from db.engine import libpq_url

log = get_logger(__name__)

# "tdmlschd": one lock per database for every scheduler replica. Positive, so the halves read
# back from pg_locks (classid = high 32 bits, objid = low 32 bits) match without sign games.
LOCK_KEY = int.from_bytes(b"tdmlschd", "big")

# Client side: notice a dead server or network within ~11 s instead of the kernel's 2 hours.
_CLIENT_KEEPALIVE: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 11_000,  # ms: unacknowledged writes fail as fast as idle probes
}
# Server side: the backend holding the lock notices a vanished client host the same way, so
# the lock is freed for a standby (ignored on Unix sockets, where death is seen at once).
_SERVER_KEEPALIVE = (
    "SET tcp_keepalives_idle = 5",
    "SET tcp_keepalives_interval = 2",
    "SET tcp_keepalives_count = 3",
    "SET statement_timeout = '5s'",
)


class NotLeader(Exception):
    """This replica no longer holds the leader lock (released, or its connection is gone)."""


class LockSessionUnit:
    """The part of ``UnitOfWork`` a fire uses (``sql``, ``rollback``), on the lock's session."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self.finished = False

    def sql(self, query: str, params: Mapping[str, Any] | None = None) -> psycopg.Cursor[Any]:
        cursor = self._conn.cursor(row_factory=namedtuple_row)
        return cursor.execute(query, params)

    def rollback(self) -> None:
        if not self.finished:
            self._conn.execute("ROLLBACK")
            self.finished = True


@dataclass(frozen=True)
class Fence:
    """Proof of leadership: the lock's session. ``transaction()`` runs work on it, so the
    work commits only while this replica still holds the lock."""

    pid: int
    backend_start: datetime
    key: int = LOCK_KEY
    lock: LeaderLock | None = field(default=None, compare=False, repr=False)
    conn: psycopg.Connection[Any] | None = field(default=None, compare=False, repr=False)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[LockSessionUnit]:
        """BEGIN on the lock's connection, COMMIT when the block returns, ROLLBACK when it
        raises. ``NotLeader`` when the lock was released or its connection is lost, before
        or during the block (a lost connection took the lock and the transaction with it)."""
        lock, conn = self.lock, self.conn
        if lock is None or conn is None:
            raise NotLeader("a fence without its lock session")
        with lock.mutex:
            if lock.fence is not self or conn.closed:
                raise NotLeader("the leader lock was given up")
            unit = LockSessionUnit(conn)
            try:
                conn.execute("BEGIN")
                yield unit
                if not unit.finished:
                    unit.finished = True
                    conn.execute("COMMIT")
            except psycopg.Error as exc:
                if conn.closed or conn.broken:
                    lock.lost(exc)
                    raise NotLeader(_reason(exc)) from exc
                with contextlib.suppress(psycopg.Error):
                    unit.rollback()
                raise
            except BaseException:
                with contextlib.suppress(psycopg.Error):
                    unit.rollback()
                raise

    # True only while the lock is granted to the leader's own backend, in this database.
    sql = """
        SELECT 1
        FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid = %(classid)s AND l.objid = %(objid)s AND l.objsubid = 1
          AND l.pid = %(pid)s AND a.backend_start = %(backend_start)s
    """

    def params(self) -> dict[str, Any]:
        return {
            "classid": (self.key >> 32) & 0xFFFFFFFF,
            "objid": self.key & 0xFFFFFFFF,
            "pid": self.pid,
            "backend_start": self.backend_start,
        }


class LeaderLock:
    """``try_acquire()`` until it returns True, then ``check()`` periodically; not thread-safe
    (one leader thread drives it; other threads only read ``fence``)."""

    def __init__(
        self,
        database_url: str,
        *,
        key: int = LOCK_KEY,
        identity: str = "",
        connect_timeout: int = 5,
        idle_timeout_s: float = 10.0,
    ) -> None:
        self._url = libpq_url(database_url)
        self._key = key
        self._identity = identity
        self._connect_timeout = connect_timeout
        self._idle_timeout_ms = max(1000, int(idle_timeout_s * 1000))
        self.lock_timeout_ms = max(500, self._idle_timeout_ms // 2)
        self._conn: psycopg.Connection[Any] | None = None
        self._fence: Fence | None = None
        # One connection, several threads (the leader loop checks, APScheduler jobs fire).
        self.mutex = threading.RLock()

    @property
    def fence(self) -> Fence | None:
        """The current proof of leadership, None when standing by."""
        return self._fence

    @property
    def is_leader(self) -> bool:
        return self._fence is not None

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(
                self._url,
                autocommit=True,
                connect_timeout=self._connect_timeout,
                application_name=f"tidemill-scheduler {self._identity}"[:63],
                **_CLIENT_KEEPALIVE,
            )
            for statement in _SERVER_KEEPALIVE:
                conn.execute(statement)
            # A leader that is alive to TCP but frozen (SIGSTOP, a stuck VM, a wedged process)
            # stops checking its lock; the server then ends its session, idle or idle inside a
            # fire transaction, which frees the lock for a standby and rolls the fire back.
            # Checks run every retry interval, well inside this timeout.
            timeout = sql.Literal(f"{self._idle_timeout_ms}ms")
            conn.execute(sql.SQL("SET idle_session_timeout = {}").format(timeout))
            conn.execute(sql.SQL("SET idle_in_transaction_session_timeout = {}").format(timeout))
            # Fires and catch-ups wait at most this long for a row lock (a pause, another
            # catch-up); a longer wait fails the step, which is retried as the leader.
            conn.execute(
                sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{self.lock_timeout_ms}ms"))
            )
            self._conn = conn
        return self._conn

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False (never raises) when another replica holds it or
        Postgres is unreachable."""
        with self.mutex:
            if self._fence is not None:
                return True
            try:
                conn = self._connect()
                row = conn.execute(
                    "SELECT pg_try_advisory_lock(%s), pg_backend_pid(), "
                    "(SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid())",
                    (self._key,),
                ).fetchone()
            except psycopg.Error as exc:
                log.warning("leader_connect_failed", error=_reason(exc))
                self._drop()
                return False
            assert row is not None
            if not row[0]:
                return False
            self._fence = Fence(
                pid=row[1], backend_start=row[2], key=self._key, lock=self, conn=conn
            )
            return True

    def check(self) -> bool:
        """Is the lock still ours? A failed check steps down (and closes the connection, so a
        half-dead session cannot keep the lock from a standby)."""
        with self.mutex:
            if self._fence is None or self._conn is None:
                return False
            try:
                held = self._conn.execute(Fence.sql, self._fence.params()).fetchone() is not None
            except psycopg.Error as exc:
                log.warning("leader_check_failed", error=_reason(exc))
                held = False
            if not held:
                self._drop()
            return held

    def lost(self, exc: BaseException) -> None:
        """The lock's connection failed under a fire: step down at once."""
        with self.mutex:
            if self._fence is not None:
                log.warning("leader_connection_lost", error=_reason(exc))
            self._drop()

    def release(self) -> None:
        """Unlock and close (a clean shutdown hands over at once, without waiting for a retry)."""
        with self.mutex:
            if self._conn is not None and not self._conn.closed and self._fence is not None:
                # A failure does not matter: closing the connection below frees the lock.
                with contextlib.suppress(psycopg.Error):
                    self._conn.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
            self._drop()

    def _drop(self) -> None:
        self._fence = None
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()


def _reason(exc: BaseException) -> str:
    """The driver's message on one line (libpq spreads it over several, hint last)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__
