"""tidemill's own dramatiq middleware: log context and the per-message unit of work."""

from __future__ import annotations

import gc
import importlib
import logging
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

import structlog
from dramatiq.middleware import Middleware

from core.log import get_logger
from db.engine import UnitOfWork, get_database

log = get_logger("workers")

_uow: ContextVar[UnitOfWork | None] = ContextVar("tidemill_uow", default=None)
_started: ContextVar[float] = ContextVar("tidemill_started", default=0.0)
_tokens: ContextVar[Mapping[str, Any]] = ContextVar("tidemill_log_tokens", default={})  # noqa: B039


class LogContext(Middleware):
    """Bind message_id, actor, queue and retries to every log line of the message, then clear
    them, so a worker thread never carries one message's context into the next.

    Resetting our own tokens (instead of structlog's clear_contextvars, which copies the whole
    context) keeps this to a few microseconds per message.
    """

    def before_process_message(self, broker: Any, message: Any) -> None:
        _tokens.set(
            structlog.contextvars.bind_contextvars(
                message_id=message.message_id,
                actor=message.actor_name,
                queue=message.queue_name,
                retries=message.options.get("retries", 0),
            )
        )
        _started.set(time.perf_counter())

    def after_process_message(
        self,
        broker: Any,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is not None:
            duration_ms = round((time.perf_counter() - _started.get()) * 1000, 2)
            log.warning(
                "message_failed",
                duration_ms=duration_ms,
                error=f"{type(exception).__name__}: {exception}",
            )
        elif _debug_enabled():
            # debug only: one line per message would cost more than the no-op work itself
            duration_ms = round((time.perf_counter() - _started.get()) * 1000, 2)
            log.debug("message_processed", duration_ms=duration_ms)
        self._clear()

    def after_skip_message(self, broker: Any, message: Any) -> None:
        log.info("message_skipped")
        self._clear()

    @staticmethod
    def _clear() -> None:
        tokens = _tokens.get()
        if tokens:
            structlog.contextvars.reset_contextvars(**tokens)
            _tokens.set({})


_stdlib_log = logging.getLogger("workers")


def _debug_enabled() -> bool:
    # isEnabledFor is cached per logger; getLogger() would take logging's global lock per message
    return _stdlib_log.isEnabledFor(logging.DEBUG)


# Modules the actors of a queue import inside the actor, when their first job runs, so that the
# relay and the web server (which import every actor to know it) stay small: ~10 MB for these.
PRELOAD_BY_QUEUE: dict[str, tuple[str, ...]] = {
    "pipelines": ("pipelines.lifecycle.engine", "pipelines.lifecycle.gdpr"),
    "backups": (
        "pipelines.backups.physical",
        "pipelines.backups.logical",
        "pipelines.backups.drill",
        "pipelines.backups.retention",
    ),
}


class PreloadJobModules(Middleware):
    """A worker process imports, at boot, what the jobs of its queues will import anyway.

    Otherwise a worker process's RSS steps up the first time it runs each kind of job, which
    for an hourly backup can be an hour after start (the issue-18 soak): a later step could
    not be told from a leak. Done before the pool's threads start and before FreezeImports,
    so the modules are frozen out of the collector's scans too. A worker limited to other
    queues (``--queue``) loads none of it."""

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        consumed = getattr(worker, "consumer_whitelist", None)  # None: every queue
        for queue_name, modules in PRELOAD_BY_QUEUE.items():
            if consumed is None or queue_name in consumed:
                for module in modules:
                    importlib.import_module(module)


class FreezeImports(Middleware):
    """After a worker process has booted, move everything imported so far out of the cyclic
    garbage collector's reach: the modules, classes and SQLAlchemy metadata live for the whole
    process, and re-scanning them on every full collection costs each message CPU time."""

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        gc.collect()
        gc.freeze()


class UnitOfWorkMiddleware(Middleware):
    """One session and one transaction per message.

    The session is created on first use (a message that never touches Postgres costs no
    session) and closed here, rolling back whatever was not committed. The commit itself
    happens inside the actor call (see ``workers.base.actor``): dramatiq logs and swallows
    exceptions raised in ``after_process_message``, so a commit failing there would ack a
    message whose work was lost.
    """

    def before_process_message(self, broker: Any, message: Any) -> None:
        _uow.set(None)

    def after_process_message(
        self,
        broker: Any,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        close_unit_of_work()

    def after_skip_message(self, broker: Any, message: Any) -> None:
        close_unit_of_work()


def open_unit_of_work() -> UnitOfWork:
    """The current message's unit of work, opened on first use."""
    uow = _uow.get()
    if uow is None:
        uow = UnitOfWork(get_database)
        _uow.set(uow)
    return uow


def close_unit_of_work() -> None:
    uow = _uow.get()
    if uow is not None:
        _uow.set(None)
        uow.close()
