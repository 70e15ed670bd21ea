"""Cache invalidation actors: committed changes drop stale Redis keys."""

from __future__ import annotations

from core.log import get_logger
from db.engine import UnitOfWork
from db.redis import get_redis
from workers.base import actor

log = get_logger(__name__)


@actor(queue_name="cache", max_retries=5)
def invalidate(uow: UnitOfWork, keys: list[str]) -> None:
    """Delete the given keys; deleting a missing key is a no-op, so duplicates are harmless."""
    if not keys:
        return
    removed = int(get_redis().delete(*keys))
    log.info("cache_invalidated", keys=len(keys), removed=removed)
