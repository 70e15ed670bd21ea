"""The `tidemill` command."""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from core.log import configure_logging, get_logger
from core.settings import Settings, SettingsError, get_settings

app = typer.Typer(
    help="tidemill: Stripe webhooks, notifications, e-mail, cache invalidation, retention "
    "pipelines and backups for the Lovendo family of apps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = get_logger("tidemill")

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int = 2) -> None:
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
            _fail(str(exc))

    return wrapper  # type: ignore[return-value]


def _settings() -> Settings:
    settings = get_settings()
    configure_logging(env=settings.env, level=settings.log_level)
    return settings


def _require_services(settings: Settings, *, broker: bool = True) -> None:
    from db.engine import ServiceUnreachable, check_postgres
    from db.redis import check_redis

    if settings.database_url is None:
        raise ServiceUnreachable(
            "DATABASE_URL is not set (or run `tidemill up` for embedded servers)"
        )
    if settings.redis_url is None:
        raise ServiceUnreachable("REDIS_URL is not set (or run `tidemill up` for embedded servers)")
    check_postgres(settings.database_url)
    check_redis(settings.redis_url)
    if broker and settings.broker_url and settings.broker_url.startswith("redis"):
        check_redis(settings.broker_url, what="broker")


def _stop_event() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


@app.command()
@friendly_errors
def up(
    workers: Annotated[
        int | None, typer.Option(help="worker processes (TIDEMILL_WORKER_PROCESSES)")
    ] = None,
) -> None:
    """Run the whole system in the foreground: embedded Postgres and Valkey unless DATABASE_URL /
    REDIS_URL are set, migrations, then relay, workers, scheduler and web."""
    import dataclasses
    import os

    from core.supervisor import Supervisor

    if workers is not None:
        os.environ["TIDEMILL_WORKER_PROCESSES"] = str(workers)
    settings = _settings()
    if workers is not None:
        settings = dataclasses.replace(settings, worker_processes=workers)
    raise typer.Exit(Supervisor(settings).run())


@app.command()
@friendly_errors
def worker(
    modules: Annotated[
        list[str] | None, typer.Argument(help="extra modules declaring actors")
    ] = None,
    processes: Annotated[
        int | None, typer.Option(help="processes (TIDEMILL_WORKER_PROCESSES)")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="threads per process (TIDEMILL_WORKER_THREADS)")
    ] = None,
    queues: Annotated[
        list[str] | None, typer.Option("--queue", "-Q", help="only these queues")
    ] = None,
) -> None:
    """Run dramatiq worker processes for every actor family."""
    from dramatiq.cli import main as dramatiq_main
    from dramatiq.cli import make_argument_parser

    settings = _settings()
    _require_services(settings)
    argv = [
        "workers.actors",
        *(modules or []),
        "--processes",
        str(processes or settings.worker_processes),
        "--threads",
        str(threads or settings.worker_threads),
    ]
    if queues:
        argv += ["--queues", *queues]
    log.info("worker_starting", argv=argv)
    raise typer.Exit(dramatiq_main(make_argument_parser().parse_args(argv)))


@app.command()
@friendly_errors
def relay() -> None:
    """Run the outbox relay: outbox rows -> dramatiq messages (LISTEN + poll, SKIP LOCKED)."""
    settings = _settings()
    _require_services(settings)
    import workers.actors  # noqa: F401  (the relay must know every actor)
    from workers.broker import broker
    from workers.outbox import Relay

    relay = Relay(settings, broker)
    stop = _stop_event()

    def stop_on_signal() -> None:
        stop.wait()
        relay.stop()

    threading.Thread(target=stop_on_signal, daemon=True).start()
    relay.run()


@app.command()
@friendly_errors
def scheduler() -> None:
    """Run the scheduler: cron ticks -> schedule_ticks rows + outbox messages."""
    from schedules.scheduler import run_scheduler

    settings = _settings()
    _require_services(settings, broker=False)
    run_scheduler(settings, _stop_event())


@app.command()
@friendly_errors
def web(
    host: Annotated[str | None, typer.Option(help="bind address (TIDEMILL_WEB_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (TIDEMILL_WEB_PORT)")] = None,
) -> None:
    """Run the HTTP server: /healthz, /metrics, /dashboard."""
    import uvicorn

    from core.proc import ensure_port_free
    from web.app import create_app

    settings = _settings()
    _require_services(settings)
    host = host or settings.web_host
    port = port or settings.web_port
    ensure_port_free(port, "TIDEMILL_WEB_PORT", host)
    log.info("web_starting", url=f"http://{host}:{port}")
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


@app.command()
@friendly_errors
def migrate(
    revision: Annotated[str, typer.Argument(help="target revision")] = "head",
) -> None:
    """Apply database migrations (alembic upgrade)."""
    from db.migrate import current, upgrade

    settings = _settings()
    _require_services(settings, broker=False)
    assert settings.database_url
    upgrade(settings.database_url, revision)
    print(f"database at revision {current(settings.database_url)}")


def main() -> None:
    app(prog_name="tidemill")


if __name__ == "__main__":
    main()
