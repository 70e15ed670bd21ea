"""Queue pause: an operator pauses a queue from the dashboard; every worker, on every host,
stops running its messages until it is resumed.

The paused queues are a hash in the broker's Redis (``tidemill:paused_queues``: queue ->
who and when), so a pause holds across worker restarts and replicas: a worker that boots
while a queue is paused reads it before its first message.

Each worker process reads the hash at most once a second. A message of a paused queue that a
worker fetches is not run: it goes back to the queue's delayed set with the same message id
and retry count and comes back after ``recheck_ms`` (then again, while the pause lasts), and
the fetched copy is acknowledged. Nothing is lost and nothing runs. This middleware sits
before AgeLimit, so time spent paused is not held against a message by this middleware;
messages older than TIDEMILL's max age when the queue resumes are still dropped by AgeLimit.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from dramatiq.common import q_name
from dramatiq.middleware import AgeLimit, Middleware, SkipMessage

from core.log import get_logger

log = get_logger("workers.pause")

PAUSED_KEY = "tidemill:paused_queues"
REFRESH_S = 1.0
RECHECK_MS = 5_000


def paused_queues(client: Any) -> dict[str, dict[str, Any]]:
    """queue -> {"by": account, "at": epoch seconds} for every paused queue."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in (client.hgetall(PAUSED_KEY) or {}).items():
        name = k.decode() if isinstance(k, bytes) else str(k)
        try:
            out[name] = json.loads(v)
        except (TypeError, ValueError):
            out[name] = {}
    return out


def pause_queue(client: Any, queue: str, *, by: str, now: float | None = None) -> bool:
    """Pause `queue`; False if it was already paused (the first pause's record is kept)."""
    record = json.dumps({"by": by, "at": time.time() if now is None else now})
    return bool(client.hsetnx(PAUSED_KEY, q_name(queue), record))


def resume_queue(client: Any, queue: str) -> bool:
    """Resume `queue`; False if it was not paused."""
    return bool(client.hdel(PAUSED_KEY, q_name(queue)))


class QueuePause(Middleware):
    def __init__(self, *, recheck_ms: int = RECHECK_MS, refresh_s: float = REFRESH_S) -> None:
        self.recheck_ms = recheck_ms
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._paused: frozenset[str] = frozenset()
        self._read_at = float("-inf")

    def paused(self, broker: Any) -> frozenset[str]:
        now = time.monotonic()
        if now - self._read_at < self.refresh_s:
            return self._paused
        with self._lock:
            if now - self._read_at >= self.refresh_s:
                client = getattr(broker, "client", None)
                if client is not None:
                    try:
                        self._paused = frozenset(paused_queues(client))
                    except Exception as exc:
                        # Redis unreachable: keep the last known state (a paused queue stays
                        # paused); the broker itself is failing anyway
                        log.warning("queue_pause_read_failed", error=type(exc).__name__)
                self._read_at = now
        return self._paused

    def before_process_message(self, broker: Any, message: Any) -> None:
        queue = q_name(message.queue_name)
        if queue not in self.paused(broker):
            return
        # back to the delayed set, same message id and options; the fetched copy is acked
        broker.enqueue(message.copy(queue_name=queue), delay=self.recheck_ms)
        log.info("message_held_queue_paused", queue=queue, message_id=message.message_id)
        raise SkipMessage(f"queue {queue} is paused")


def install(broker: Any) -> QueuePause:
    """Add the middleware once (tests and processes that build their own broker)."""
    for mw in broker.middleware:
        if isinstance(mw, QueuePause):
            return mw
    pause = QueuePause()
    if any(isinstance(mw, AgeLimit) for mw in broker.middleware):
        broker.add_middleware(pause, before=AgeLimit)
    else:
        broker.add_middleware(pause)
    return pause
