"""What every `tidemill` sub-command shares: settings, friendly errors, service checks, signals.

Sub-command groups live in their own modules (`cli/*.py`) and import from here, so the
groups never import each other or `cli.main`.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer

from core.log import configure_logging
from core.settings import Settings, SettingsError, get_settings

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"tidemill: error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def friendly_errors(fn: F) -> F:
    """Known failures (unreachable server, bad setting, port taken) -> one line, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from core.proc import PortInUse
        from db.embedded import EmbeddedServerError
        from db.engine import ServiceUnreachable

        try:
            return fn(*args, **kwargs)
        except (ServiceUnreachable, SettingsError, PortInUse, EmbeddedServerError) as exc:
            fail(str(exc))

    return wrapper  # type: ignore[return-value]


def cli_settings(*, adopt_running: bool = True) -> Settings:
    settings = get_settings()
    if adopt_running:
        from cli.supervisor import load_run_env
        from core.settings import reset_settings_cache

        if load_run_env(settings):  # a `tidemill up` is running: use its embedded servers
            reset_settings_cache()
            settings = get_settings()
    configure_logging(env=settings.env, level=settings.log_level)
    return settings


def require_services(settings: Settings, *, broker: bool = True, redis: bool = True) -> None:
    from db.health import require_services as check

    check(settings, broker=broker, redis=redis)


def stop_event() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
