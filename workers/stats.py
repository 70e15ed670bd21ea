"""Per-minute throughput and failure counts for the dashboard's chart, and the error of each
dead letter.

dramatiq's Prometheus counters are totals per process; the dashboard wants a per-minute history
that survives worker restarts and needs no Prometheus server, so this middleware keeps small
hashes in the broker's Redis: ``tidemill:stats:<epoch minute>`` with fields
``processed:<queue>``, ``failed:<queue>`` and ``dead:<queue>``, kept two hours.

Counts are buffered in memory and flushed at most once a second per process (and when the
minute changes or the worker stops): one Redis round trip per message would cost more than a
no-op message itself.

Worker processes (only they: dramatiq's own broker heartbeats are written by any process that
enqueues, the web server included) are in the sorted set ``tidemill:workers``: member
``hostname:pid``, score the time of its last heartbeat, written at boot and by the flusher
thread every few seconds, and pruned of members silent for more than a minute.

The dead-letter set keeps the message as it was last enqueued, whose ``traceback`` option is
the previous attempt's (or absent after a single attempt), so the final error is stored here by
the id the message has in the dead-letter set, in one hash per queue and day of death:
``tidemill:dead_errors:<queue>:<epoch day>``. Each day's hash expires 8 days after it was
started (dramatiq drops dead letters after 7), so errors never outlive their letters for long
and the hashes never grow without bound, however steadily messages die.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import threading
import time
import traceback
from collections import Counter
from typing import Any

from dramatiq.common import q_name
from dramatiq.middleware import Middleware

from core.log import get_logger, mask_personal

log = get_logger("workers.stats")

STATS_PREFIX = "tidemill:stats:"
DEAD_ERRORS_PREFIX = "tidemill:dead_errors:"
STATS_TTL_S = 2 * 3600
# dramatiq keeps dead letters 7 days; the errors a day longer, so none is missing at the edge.
DEAD_ERRORS_TTL_S = 8 * 24 * 3600
FLUSH_INTERVAL_S = 1.0
ERROR_MAX_CHARS = 500
WORKERS_KEY = "tidemill:workers"
WORKER_HEARTBEAT_S = 5.0
# a worker silent this long is gone (killed, host lost): pruned, and not counted as live
WORKER_MAX_AGE_S = 60.0


WORKER_PREFIX = "tidemill:worker:"
ATTEMPTS_PREFIX = "tidemill:attempts:"
ATTEMPTS_KEPT = 20
TRACEBACK_MAX_CHARS = 4000
# hourly rollups of the per-minute counts (``tidemill:stats:h:<epoch hour>``, fields
# ``processed:<queue>:<actor>`` …), kept 30 days: the charts' history past two hours
HOURLY_PREFIX = "tidemill:stats:h:"
HOURLY_TTL_S = 30 * 86400


def hourly_key(hour: int) -> str:
    return f"{HOURLY_PREFIX}{hour}"


def attempts_key(message_id: str) -> str:
    return f"{ATTEMPTS_PREFIX}{message_id}"


def worker_key(member: str) -> str:
    return f"{WORKER_PREFIX}{member}"


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def stats_key(minute: int) -> str:
    return f"{STATS_PREFIX}{minute}"


DAY_MS = 86_400_000


def death_day(ms: float) -> int:
    return int(ms // DAY_MS)


def dead_errors_key(queue: str, day: int) -> str:
    return f"{DEAD_ERRORS_PREFIX}{q_name(queue)}:{day}"


def dead_errors_keys(queue: str, died_ms: float) -> tuple[str, str]:
    """Where the error of a letter that died at `died_ms` (its dead-letter score) can be: the
    error is written just after the death, which may already be the next day."""
    day = death_day(died_ms)
    return dead_errors_key(queue, day), dead_errors_key(queue, day + 1)


def describe_error(exc: BaseException) -> str:
    """``Type: message``, e-mails masked and cut short: it is shown on the dashboard."""
    return mask_personal(f"{type(exc).__name__}: {exc}")[:ERROR_MAX_CHARS]


def _redis_of(broker: Any) -> Any:
    return getattr(broker, "client", None)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def write_worker_heartbeat(client: Any, member: str, *, now: float | None = None) -> None:
    """Mark `member` alive now and prune the workers silent for over WORKER_MAX_AGE_S."""
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    pipe.zadd(WORKERS_KEY, {member: now})
    pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - WORKER_MAX_AGE_S)
    pipe.expire(WORKERS_KEY, int(WORKER_MAX_AGE_S) * 2)  # every worker gone: the key goes too
    pipe.execute()


def live_workers(client: Any, *, now: float | None = None) -> list[tuple[str, float]]:
    """(hostname:pid, seconds since its heartbeat) of the workers heard within the max age."""
    now = time.time() if now is None else now
    rows = client.zrangebyscore(WORKERS_KEY, now - WORKER_MAX_AGE_S, "+inf", withscores=True)
    return [
        (m.decode() if isinstance(m, bytes) else str(m), max(now - float(sc), 0.0))
        for m, sc in rows
    ]


class Stats(Middleware):
    """Counts processed / failed / dead-lettered messages per queue and minute."""

    def __init__(self, *, flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.flush_interval_s = flush_interval_s
        self._lock = threading.Lock()
        self._pending: Counter[tuple[int, str]] = Counter()
        self._last_flush = time.monotonic()
        self._flusher: threading.Thread | None = None
        # workers booted in this process and not yet shut down (tests run several in turn)
        self._workers = 0
        self._threads = 0
        self._booted_at = time.time()
        self._last_heartbeat = 0.0
        self._current: dict[int, dict[str, Any]] = {}

    def _count(self, broker: Any, field: str, queue: str, actor: str = "") -> None:
        minute = int(time.time() // 60)
        with self._lock:
            self._pending[(minute, f"{field}:{q_name(queue)}")] += 1
            if actor:  # per actor too (the queue total stays as it was for old readers)
                self._pending[(minute, f"{field}:{q_name(queue)}:{actor}")] += 1
            due = time.monotonic() - self._last_flush >= self.flush_interval_s or any(
                m != minute for m, _ in self._pending
            )
            if self._flusher is None:
                self._start_flusher(broker)
        if due:
            self.flush(broker)

    def _start_flusher(self, broker: Any) -> None:
        # A queue that goes quiet would otherwise keep its last counts in memory until the
        # next message: a daemon thread flushes whatever is pending every interval.
        def run() -> None:
            while True:
                time.sleep(self.flush_interval_s)
                if time.monotonic() - self._last_flush >= self.flush_interval_s:
                    self.flush(broker)
                if time.monotonic() - self._last_heartbeat >= WORKER_HEARTBEAT_S:
                    self.heartbeat(broker)

        self._flusher = threading.Thread(target=run, name="tidemill-stats-flush", daemon=True)
        self._flusher.start()

    def flush(self, broker: Any) -> None:
        with self._lock:
            pending, self._pending = self._pending, Counter()
            self._last_flush = time.monotonic()
        client = _redis_of(broker)
        if not pending or client is None:
            return
        try:
            pipe = client.pipeline(transaction=False)
            for (minute, field), n in pending.items():
                pipe.hincrby(stats_key(minute), field, n)
                pipe.expire(stats_key(minute), STATS_TTL_S)
                hour = minute // 60
                pipe.hincrby(hourly_key(hour), field, n)
                pipe.expire(hourly_key(hour), HOURLY_TTL_S)
            pipe.execute()
        except Exception as exc:  # counts are a nicety: never fail a message over them
            log.warning("stats_flush_failed", error=type(exc).__name__)

    def before_process_message(self, broker: Any, message: Any) -> None:
        # what each worker thread is running now, for the workers page
        self._current[threading.get_ident()] = {
            "message_id": message.message_id,
            "actor": message.actor_name,
            "queue": q_name(message.queue_name),
            "since": time.time(),
        }

    def after_skip_message(self, broker: Any, message: Any) -> None:
        self._current.pop(threading.get_ident(), None)

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        self._current.pop(threading.get_ident(), None)
        if exception is not None:
            self._record_attempt(broker, message, exception)
        self._count(
            broker,
            "failed" if exception is not None else "processed",
            message.queue_name,
            message.actor_name,
        )

    def _record_attempt(self, broker: Any, message: Any, exc: BaseException) -> None:
        """Each failed attempt, with its traceback (masked), by message id: the dashboard's
        message page lists them (dramatiq keeps only the last traceback in the message)."""
        client = _redis_of(broker)
        if client is None:
            return
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        attempt = {
            "at": time.time(),
            "retries": int(message.options.get("retries", 0) or 0),
            "error": describe_error(exc),
            "traceback": mask_personal(tb[-TRACEBACK_MAX_CHARS:]),
            "worker": worker_id(),
        }
        key = attempts_key(message.message_id)
        try:
            pipe = client.pipeline(transaction=False)
            pipe.rpush(key, json.dumps(attempt))
            pipe.ltrim(key, -ATTEMPTS_KEPT, -1)
            pipe.expire(key, DEAD_ERRORS_TTL_S)  # as long as a dead letter can live, and a day
            pipe.execute()
        except Exception as err:
            log.warning("attempt_record_failed", error=type(err).__name__)

    def after_nack(self, broker: Any, message: Any) -> None:
        client = _redis_of(broker)
        exc = getattr(message, "_exception", None)
        redis_id = message.options.get("redis_message_id")
        if client is not None and redis_id and exc is not None:
            key = dead_errors_key(message.queue_name, death_day(time.time() * 1000))
            try:
                pipe = client.pipeline(transaction=False)
                pipe.hset(key, redis_id, describe_error(exc))
                pipe.expire(key, DEAD_ERRORS_TTL_S, nx=True)  # from the day's first death on
                pipe.execute()
            except Exception as err:
                log.warning("dead_error_record_failed", error=type(err).__name__)
        self._count(broker, "dead", message.queue_name, message.actor_name)

    def heartbeat(self, broker: Any) -> None:
        """Only while a worker runs in this process: enqueue-only processes never appear."""
        self._last_heartbeat = time.monotonic()
        client = _redis_of(broker)
        if self._workers <= 0 or client is None:
            return
        try:
            write_worker_heartbeat(client, worker_id())
            self._write_details(client)
        except Exception as exc:  # a nicety like the counts: never fail the worker over it
            log.warning("worker_heartbeat_failed", error=type(exc).__name__)

    def _write_details(self, client: Any) -> None:
        """host, pid, threads, memory and the messages running now (``tidemill:worker:<id>``),
        gone a little after the worker stops heartbeating."""
        now = time.time()
        current = sorted(self._current.values(), key=lambda c: c["since"])[:50]
        client.set(
            worker_key(worker_id()),
            json.dumps(
                {
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "threads": self._threads,
                    "rss_bytes": _rss_bytes(),
                    "booted_at": self._booted_at,
                    "heartbeat_at": now,
                    "current": current,
                }
            ),
            ex=int(WORKER_MAX_AGE_S) * 2,
        )

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        with self._lock:
            self._threads += int(getattr(worker, "worker_threads", 0) or 0)
            self._workers += 1
            if self._flusher is None:
                self._start_flusher(broker)
        self.heartbeat(broker)

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self.flush(broker)
        with self._lock:
            self._workers -= 1
            self._threads -= int(getattr(worker, "worker_threads", 0) or 0)
            last = self._workers <= 0
        client = _redis_of(broker)
        if last and client is not None:
            try:
                client.zrem(WORKERS_KEY, worker_id())
                client.delete(worker_key(worker_id()))
            except Exception as exc:
                log.warning("worker_heartbeat_failed", error=type(exc).__name__)


def install(broker: Any) -> Stats:
    """Add the middleware to `broker` once (tests and processes that build their own broker)."""
    for mw in broker.middleware:
        if isinstance(mw, Stats):
            return mw
    stats = Stats()
    broker.add_middleware(stats)
    return stats
