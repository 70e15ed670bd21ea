"""The shared Redis client (cache keys, locks, counters)."""

from __future__ import annotations

import functools

import redis

from core.settings import Settings, get_settings, redact_url
from db.engine import ServiceUnreachable, host_port


def check_redis(url: str, *, what: str = "Redis", timeout: float = 5.0) -> None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping()
    except redis.RedisError as exc:
        raise ServiceUnreachable(
            f"cannot reach {what} at {host_port(url, 6379)} ({redact_url(url)}): {exc}"
        ) from None


@functools.cache
def _client(url: str) -> redis.Redis:
    # A Redis that stops answering must fail the call (retried later), not hang a worker thread
    # or the relay with its claimed rows.
    return redis.Redis.from_url(
        url, health_check_interval=30, socket_connect_timeout=5, socket_timeout=30
    )


def get_redis(settings: Settings | None = None) -> redis.Redis:
    settings = settings or get_settings()
    if settings.redis_url is None:
        raise ServiceUnreachable("REDIS_URL is unset and no embedded Valkey is running")
    return _client(settings.redis_url)
