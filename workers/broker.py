"""The dramatiq broker, built once per process from settings, and its middleware.

Importing this module sets the global broker, so every actor module imports it first.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Middleware,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from core.log import configure_logging
from core.settings import Settings, SettingsError, get_settings, redact_url
from workers.jobs import JobRecord
from workers.middleware import (
    FreezeImports,
    LogContext,
    PreloadJobModules,
    UnitOfWorkMiddleware,
)
from workers.pause import QueuePause
from workers.stats import Stats


def _prometheus(settings: Settings) -> Middleware:
    # dramatiq's Prometheus middleware reads its directory from the environment at import time;
    # all worker processes write there and the web server's /metrics reads it.
    prom_dir = settings.data_dir / "prometheus"
    prom_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("dramatiq_prom_db", str(prom_dir))
    from dramatiq.middleware.prometheus import Prometheus

    class TidemillPrometheus(Prometheus):
        """No exposition fork (the web server serves /metrics), and silent until the process
        has booted its registry (an in-process Worker in tests never emits process_boot)."""

        @property
        def forks(self) -> list[Any]:
            return []

        def _booted(self) -> bool:
            return hasattr(self, "total_messages")

        def after_nack(self, broker: Any, message: Any) -> None:
            if self._booted():
                super().after_nack(broker, message)

        def after_enqueue(self, broker: Any, message: Any, delay: Any) -> None:
            if self._booted():
                super().after_enqueue(broker, message, delay)

        def before_delay_message(self, broker: Any, message: Any) -> None:
            if self._booted():
                super().before_delay_message(broker, message)

        def before_process_message(self, broker: Any, message: Any) -> None:
            if self._booted():
                super().before_process_message(broker, message)

        def after_process_message(
            self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
        ) -> None:
            if self._booted():
                super().after_process_message(broker, message, result=result, exception=exception)

        after_skip_message = after_process_message

    return TidemillPrometheus()


def middleware(settings: Settings, *, metrics: bool = True) -> list[Middleware]:
    # Order matters: before_* hooks run top-down, after_* bottom-up, so LogContext binds first
    # and clears last, and the unit of work is closed before the retry decision is logged.
    stack: list[Middleware] = [
        LogContext(),
        QueuePause(),  # before AgeLimit: a message held by a pause is not aged out by it
        AgeLimit(max_age=settings.max_age_ms),
        TimeLimit(time_limit=settings.time_limit_ms),
        ShutdownNotifications(),
        CurrentMessage(),
        Callbacks(),
        Pipelines(),
        # Above Retries: its after_nack sees the final verdict; its after_enqueue sees the
        # delay Retries chose.
        JobRecord(settings),
        Retries(
            max_retries=settings.max_retries,
            min_backoff=settings.min_backoff_ms,
            max_backoff=settings.max_backoff_ms,
        ),
        UnitOfWorkMiddleware(),
        PreloadJobModules(),  # before FreezeImports: what it imports is frozen too
        FreezeImports(),
        Stats(),
    ]
    if metrics:
        stack.insert(1, _prometheus(settings))
    return stack


def build_broker(settings: Settings, *, metrics: bool = True) -> dramatiq.Broker:
    url = settings.effective_broker_url
    scheme = urlsplit(url).scheme
    mw = middleware(settings, metrics=metrics)
    if scheme in {"redis", "rediss", "unix"}:
        import redis

        return RedisBroker(
            # Timeouts: a broker that stops answering fails the call (the relay keeps its rows
            # and retries) instead of hanging a thread forever.
            client=redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30),
            middleware=mw,
            heartbeat_timeout=settings.heartbeat_timeout_ms,
            maintenance_chance=settings.redis_maintenance_chance,
        )
    # No RabbitMQ: settings refuse amqp:// (docs/scale-out.md says why).
    raise SettingsError(f"BROKER_URL={redact_url(url)!r}: unsupported scheme {scheme!r}")


_settings = get_settings()
configure_logging(env=_settings.env, level=_settings.log_level)
broker = build_broker(_settings)
dramatiq.set_broker(broker)
