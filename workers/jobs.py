"""The job record: which outbox rows a message stands for, when it is due again, done and dead.

An outbox row is the record of its job from the transaction that wrote it until the actor's
own commit marks it done (``mark_done``, called by ``workers.base.actor``). The broker only
delivers: if a message is lost (a wiped broker, a fetch whose reply never came, a killed
worker) the row stays dispatched-not-done and the rescuer (``workers.rescuer``) re-sends it
with the same message id once its ``redeliver_at`` passes.

This module imports no actor module, so the broker can install ``JobRecord`` before any actor
is declared.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import dramatiq
import psycopg
from dramatiq.middleware import Middleware

from core.log import get_logger
from core.settings import Settings, get_settings
from db.engine import UnitOfWork, keepalive_options, libpq_url, unit_of_work

log = get_logger("workers.jobs")

# Actors whose outbox rows the relay merges into one message (see workers.outbox). Their
# kwargs (key columns: e-mail addresses, usernames) are kept until the job is done, so the
# rescuer can rebuild the message, and emptied in the commit that marks them done.
COALESCED_ACTORS = frozenset({"invalidate"})

# Margin beyond an actor's time limit before its job counts as lost: TimeLimit interrupts a
# message at its limit; a message still unacked well after that was not delivered or its
# worker died.
DEADLINE_MARGIN_S = 60.0

_MARK_DONE = """
    UPDATE outbox SET done_at = now(), dead_at = NULL,
           kwargs = CASE WHEN actor = ANY(%(scrub)s) THEN '{}'::jsonb ELSE kwargs END
    WHERE id = ANY(%(ids)s) AND done_at IS NULL
"""
# A retry held back on purpose (backoff, dramatiq.Retry(delay=...), AwaitingPayment): the job
# is not lost while it waits, so its deadline moves past the retry's due time.
_POSTPONE = """
    UPDATE outbox SET redeliver_at = now() + make_interval(secs => %(after)s),
           retries = %(retries)s
    WHERE id = ANY(%(ids)s) AND done_at IS NULL
"""
_MARK_DEAD = """
    UPDATE outbox SET dead_at = now(), retries = %(retries)s, last_error = %(error)s
    WHERE id = ANY(%(ids)s) AND done_at IS NULL AND dead_at IS NULL
"""


def outbox_ids(message: Any) -> list[int]:
    """The outbox rows a message stands for ([] for a message not born of the outbox)."""
    options = message.options
    ids = options.get("outbox_ids")
    if ids:
        return [int(i) for i in ids]
    single = options.get("outbox_id")
    return [int(single)] if single is not None else []


def default_redeliver_after_s(settings: Settings) -> float:
    if settings.redeliver_after_s is not None:
        return settings.redeliver_after_s
    return settings.time_limit_ms / 1000 + DEADLINE_MARGIN_S


def redeliver_after_s(actor: dramatiq.Actor[Any, Any] | None, settings: Settings) -> float:
    """How long a dispatched job of ``actor`` may stay not done before it is re-sent.

    An actor option ``redeliver_after_s`` wins; an actor with its own (longer) ``time_limit``
    gets that limit plus the margin, so a long backup is never re-sent while it runs.
    """
    default = default_redeliver_after_s(settings)
    if actor is None:
        return default
    explicit = actor.options.get("redeliver_after_s")
    if explicit is not None:
        return float(explicit)
    limit_ms = actor.options.get("time_limit")
    if limit_ms is not None and limit_ms > settings.time_limit_ms:
        return max(default, limit_ms / 1000 + DEADLINE_MARGIN_S)
    return default


def mark_done(uow: UnitOfWork, ids: Sequence[int]) -> bool:
    """Mark the jobs done in the actor's own transaction; False if every one already was.

    The UPDATE takes the rows' locks: a duplicate delivery running at the same time waits for
    the first to commit, then finds the rows done, and its caller rolls its effects back.
    """
    marked = uow.sql(_MARK_DONE, {"ids": list(ids), "scrub": sorted(COALESCED_ACTORS)}).rowcount
    return bool(marked)


class DoneMarker:
    """Marks done, in batches, the jobs whose actor wrote nothing to Postgres (a cache delete).

    Such a job has no Postgres effect to share a commit with, and opening a transaction per
    message just to mark it would cost more than the work (the queue round-trip bench measures
    it). The ids are flushed every ``interval_s`` (250 ms) in one UPDATE. A worker killed
    before a flush leaves those rows not done: the rescuer sends them again, and the actor,
    which has no Postgres effect by definition, simply runs again (a cache delete is
    idempotent).
    """

    def __init__(self, *, interval_s: float = 0.25, max_pending: int = 100_000) -> None:
        self.interval_s = interval_s
        self.max_pending = max_pending
        self._pending: list[int] = []
        # Its own connection, kept open: a pooled session per flush costs more CPU than the
        # hundreds of messages it marks.
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._url: str | None = None

    def add(self, ids: Sequence[int]) -> None:
        with self._lock:
            if len(self._pending) < self.max_pending:  # beyond: left to the rescuer
                self._pending.extend(ids)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="done-marker", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> int:
        with self._flushing:  # the marker thread and a worker shutdown share the connection
            return self._flush()

    def _flush(self) -> int:
        with self._lock:
            ids, self._pending = self._pending, []
        if not ids:
            return 0
        for attempt in (1, 2):  # a second try on a fresh connection: the old one went stale
            try:
                url = get_settings().database_url
                assert url is not None
                if self._conn is not None and (self._conn.closed or self._url != url):
                    self._conn.close()  # settings now name another database: follow them
                    self._conn = None
                if self._conn is None:
                    self._conn = psycopg.connect(
                        libpq_url(url), autocommit=True, **keepalive_options()
                    )
                    self._url = url
                self._conn.execute(_MARK_DONE, {"ids": ids, "scrub": sorted(COALESCED_ACTORS)})
                return len(ids)
            except Exception as exc:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                if attempt == 2:
                    # Postgres away: the rows stay not done and the rescuer sends them again
                    # (their actor wrote nothing to Postgres: running it again is a retry).
                    log.warning("job_done_flush_failed", jobs=len(ids), error=type(exc).__name__)
        return 0


done_marker = DoneMarker()


def _last_line(text: str | None) -> str | None:
    if not text:
        return None
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else None


class JobRecord(Middleware):
    """Keeps the outbox row in step with what dramatiq does to its message outside the actor:
    a retry scheduled with a delay moves the row's deadline; a message that failed for good
    (retries exhausted, a permanent error, too old) marks the row dead, so neither a broker
    wipe nor the rescuer brings it back, and it stays listed for an operator.

    Both writes are their own short transactions: the actor's transaction has rolled back by
    then. A failed write only costs an early re-send, which the done-marking makes harmless.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings

    @property
    def settings(self) -> Settings:
        return self._settings or get_settings()

    @property
    def actor_options(self) -> set[str]:
        return {"redeliver_after_s"}

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        done_marker.flush()

    def after_enqueue(self, broker: Any, message: Any, delay: int | None) -> None:
        if delay is None:
            return  # the relay's and rescuer's own sends: they write the deadline themselves
        ids = outbox_ids(message)
        if not ids:
            return
        try:
            actor = broker.get_actor(message.actor_name)
        except dramatiq.errors.ActorNotFound:
            actor = None
        after = delay / 1000 + redeliver_after_s(actor, self.settings)
        try:
            with unit_of_work() as uow:
                uow.sql(
                    _POSTPONE,
                    {"ids": ids, "after": after, "retries": message.options.get("retries", 0)},
                )
        except Exception as exc:  # never fail the retry itself over its bookkeeping
            log.warning("job_postpone_failed", outbox_ids=ids[:10], error=type(exc).__name__)

    def after_nack(self, broker: Any, message: Any) -> None:
        ids = outbox_ids(message)
        if not ids:
            return
        exception = getattr(message, "_exception", None)  # the worker stuffs it on failure
        error = (
            f"{type(exception).__name__}: {exception}"[:500]
            if exception is not None
            else _last_line(message.options.get("traceback")) or "failed"
        )
        try:
            with unit_of_work() as uow:
                uow.sql(
                    _MARK_DEAD,
                    {"ids": ids, "retries": message.options.get("retries", 0), "error": error},
                )
        except Exception as exc:
            log.warning("job_mark_dead_failed", outbox_ids=ids[:10], error=type(exc).__name__)
            return
        log.warning("job_dead", outbox_ids=ids[:10], jobs=len(ids))
