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


def _quiet_help_types() -> None:
    """Typer (0.29 and later) prints a type beside every parameter in `--help`: `<bool>` beside
    a flag and `<str>` beside a name say nothing the option or metavar does not, so drop those
    two and keep the informative ones (`<int range>`, `<path>`, choices)."""
    from typer import core

    for cls in (core.TyperOption, core.TyperArgument):
        original = getattr(cls, "display_type_rich", None)
        if original is None:  # an older Typer prints no types
            continue

        def display(self: Any, ctx: Any, _original: Any = original) -> str | None:
            label = _original(self, ctx)
            return None if label in ("<bool>", "<str>") else label

        cls.display_type_rich = display  # type: ignore[method-assign]


_quiet_help_types()


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
