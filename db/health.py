"""Start-up checks: are the servers this process needs reachable? One clear line if not."""

from __future__ import annotations

from core.settings import Settings
from db.engine import ServiceUnreachable, check_postgres
from db.redis import check_redis


def require_services(settings: Settings, *, broker: bool = True, redis: bool = True) -> None:
    """Raise ServiceUnreachable (naming host and port) unless Postgres, and when asked Redis
    and (if it is a Redis one) the broker, answer."""
    if settings.database_url is None:
        raise ServiceUnreachable(
            "DATABASE_URL is not set (or run `tidemill up` for embedded servers)"
        )
    check_postgres(settings.database_url)
    if not redis:
        return
    if settings.redis_url is None:
        raise ServiceUnreachable("REDIS_URL is not set (or run `tidemill up` for embedded servers)")
    check_redis(settings.redis_url)
    if broker and settings.broker_url and settings.broker_url.startswith("redis"):
        check_redis(settings.broker_url, what="broker")
