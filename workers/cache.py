"""Cache invalidation: committed changes drop stale Redis keys.

Two paths remove a change's keys, and both always run (a key deleted twice is a no-op):

- the fast path (``FastPath``): the outbox wake-up's NOTIFY carries the change (migration
  0016), and the relay's listening thread UNLINKs its keys on receipt, before any claim
  (commit -> NOTIFY -> UNLINK; NOTIFY is delivered only after the commit). A drain that no
  payload announced (start-up, the poll, a plain wake-up) UNLINKs after enqueueing instead;
- the durable path: the ``invalidate`` actor, from the relay's message, deletes them again and
  its commit marks the outbox rows done; if the message is lost, the rescuer re-sends it.

The fast path only shortens the wait; nothing depends on it. It may fail (Redis away, a
timeout), the payload may be too big to carry (a plain wake-up), or the relay may die after
it: the outbox row and its message still remove the keys, and the row still ends done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from core.log import get_logger
from core.settings import Settings, get_settings
from db.cache_keys import CACHE_MAP, CachedTable, UnknownCachedTable, keys_for
from db.engine import UnitOfWork
from db.redis import get_redis
from workers.base import actor

log = get_logger(__name__)


def served_cache_map(settings: Settings | None = None) -> dict[str, CachedTable]:
    """The key map of the app this process serves (issue 14) over Lovendo's ``CACHE_MAP``."""
    from apps import active_profile

    return {**CACHE_MAP, **active_profile(settings).cache_map()}


def keys_of_changes(
    changes: Iterable[Mapping[str, Any]], cache_map: Mapping[str, CachedTable]
) -> tuple[set[str], set[str], set[str]]:
    """(keys, known tables, unknown tables) of a list of (keys, table, rows) changes."""
    wanted: set[str] = set()
    tables: set[str] = set()
    unknown: set[str] = set()
    for change in changes:
        wanted.update(change.get("keys") or ())
        name = change.get("table")
        if name is None:
            continue
        try:
            wanted |= keys_for(name, change.get("rows") or (), cache_map)
        except UnknownCachedTable:
            unknown.add(name)
            continue
        tables.add(name)
    return wanted, tables, unknown


def invalidate_keys(keys: list[str] | set[str], *, table: str | None = None) -> int:
    """Delete the keys; returns how many existed. Missing keys are no-ops, so duplicates and
    replays are harmless."""
    if not keys:
        return 0
    # UNLINK frees the values off Redis's main thread: a big cached list must not stall others.
    removed = int(get_redis().unlink(*sorted(keys)))
    log.info("cache_invalidated", table=table, keys=len(keys), removed=removed)
    return removed


@actor(queue_name="cache", max_retries=20)
def invalidate(
    uow: UnitOfWork,
    keys: list[str] | None = None,
    table: str | None = None,
    rows: list[dict[str, Any]] | None = None,
    changes: list[dict[str, Any]] | None = None,
) -> None:
    """Drop `keys`, and the keys that the changed `rows` of `table` feed (old and new versions,
    as written by the outbox triggers; see db/cache_keys.py). `changes` is a list of such
    (keys, table, rows) sets: the relay merges a batch of outbox rows into one message.

    Never touches Postgres. A Redis outage fails the message, which is retried with backoff
    (20 retries, reaching the maximum backoff), so the keys go once Redis is back.

    A change naming a table without a cache map entry is logged (``cache_unknown_table``) and
    skipped, after the other changes' keys are deleted: waiting will not add a map entry, and
    failing the merged message would leave every other change in it stale.
    """
    wanted, tables, unknown = keys_of_changes(
        [{"keys": keys, "table": table, "rows": rows}, *(changes or ())], served_cache_map()
    )
    invalidate_keys(wanted, table=",".join(sorted(tables)) or None)
    for name in sorted(unknown):
        log.error("cache_unknown_table", table=name)


class FastPath:
    """The relay's own UNLINK of the keys of changes it has been told of (a wake-up's payload,
    or the invalidations a drain has just enqueued).

    Bounded so it can never hold the relay up for long: its client waits at most
    ``timeout_s`` and never retries, and after a failure the fast path stays off for
    ``pause_s`` (the claimed rows of every batch in between go by the durable path alone, at
    its usual latency), so a Redis that hangs costs the relay one timeout per pause, not one
    per batch.
    """

    def __init__(self, *, timeout_s: float = 0.5, pause_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self.pause_s = pause_s
        self._paused_until = 0.0
        self._client: redis.Redis | None = None
        self._url: str | None = None
        self._lock = threading.Lock()

    def resume(self) -> None:
        """End a pause now (a test, or an operator who knows Redis is back)."""
        self._paused_until = 0.0

    def _redis(self, url: str) -> redis.Redis:
        with self._lock:
            if self._client is None or self._url != url:  # settings now name another Redis
                self._client = redis.Redis.from_url(
                    url,
                    socket_connect_timeout=self.timeout_s,
                    socket_timeout=self.timeout_s,
                    retry=Retry(NoBackoff(), 0),
                )
                self._url = url
            return self._client

    def invalidate(
        self, changes: list[dict[str, Any]], *, settings: Settings | None = None
    ) -> int | None:
        """UNLINK the keys of `changes`; how many existed, or None if the fast path did not
        run (off, paused, or failed: the durable path alone removes them)."""
        settings = settings or get_settings()
        if not settings.cache_fast_path or settings.redis_url is None:
            return None
        if time.monotonic() < self._paused_until:
            return None
        try:
            # Tables the map does not know are left to the actor, which logs them.
            keys, _, _ = keys_of_changes(changes, served_cache_map(settings))
            if not keys:
                return 0
            return int(self._redis(settings.redis_url).unlink(*sorted(keys)))
        except Exception as exc:  # never fail the relay's batch: its messages carry the work
            self._paused_until = time.monotonic() + self.pause_s
            log.warning(
                "cache_fast_path_failed",
                error=type(exc).__name__,
                changes=len(changes),
                paused_s=self.pause_s,
            )
            return None


fast_path = FastPath()
