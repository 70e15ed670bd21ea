"""Cache invalidation actors: committed changes drop stale Redis keys."""

from __future__ import annotations

from typing import Any

from core.log import get_logger
from db.cache_keys import CACHE_MAP, UnknownCachedTable, keys_for
from db.engine import UnitOfWork
from db.redis import get_redis
from workers.base import actor

log = get_logger(__name__)


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
    from apps import active_profile  # the served app's key map (issue 14)

    cache_map = {**CACHE_MAP, **active_profile().cache_map()}
    wanted: set[str] = set()
    tables: set[str] = set()
    unknown: set[str] = set()
    for change in [{"keys": keys, "table": table, "rows": rows}, *(changes or ())]:
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
    invalidate_keys(wanted, table=",".join(sorted(tables)) or None)
    for name in sorted(unknown):
        log.error("cache_unknown_table", table=name)
