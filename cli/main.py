"""The `tidemill` command."""

from __future__ import annotations

import sys
import threading
from typing import Annotated

import typer

from cli.app import app as apps_app
from cli.backup import app as backup_app
from cli.backup import restore_command, wal_app
from cli.common import (
    cli_settings,
    fail,
    friendly_errors,
    require_services,
    stop_event,
)
from cli.dashboard import app as dashboard_app
from cli.pipeline import app as pipeline_app
from cli.pipeline import archive_app, gdpr_app
from cli.schedule import app as schedule_app
from core.log import get_logger

app = typer.Typer(
    help="tidemill: Stripe webhooks, notifications, e-mail, cache invalidation, retention "
    "pipelines and backups for the Lovendo family of apps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = get_logger("tidemill")
app.add_typer(schedule_app, name="schedule")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(archive_app, name="archive")
app.add_typer(gdpr_app, name="gdpr")
app.add_typer(backup_app, name="backup")
app.add_typer(wal_app, name="wal")
app.command("restore")(restore_command)
app.add_typer(dashboard_app, name="dashboard")
app.add_typer(apps_app, name="app")


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

    from cli.supervisor import Supervisor

    if workers is not None:
        os.environ["TIDEMILL_WORKER_PROCESSES"] = str(workers)
    settings = cli_settings(adopt_running=False)
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
    import os

    settings = cli_settings()
    # dramatiq reads its idle poll ceiling from the environment when first imported.
    os.environ.setdefault("dramatiq_worker_timeout", str(settings.worker_poll_ms))
    from dramatiq.cli import main as dramatiq_main
    from dramatiq.cli import make_argument_parser

    require_services(settings)
    from core.malloc import tune_worker_malloc

    # Before dramatiq forks the children and they start their threads (core/malloc.py: why).
    malloc = tune_worker_malloc(
        arena_max=settings.worker_malloc_arena_max,
        mmap_threshold=settings.worker_mmap_threshold,
    )
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
    log.info("worker_starting", argv=argv, malloc=malloc)
    raise typer.Exit(dramatiq_main(make_argument_parser().parse_args(argv)))


@app.command()
@friendly_errors
def relay(
    modules: Annotated[
        list[str] | None, typer.Argument(help="extra modules declaring actors")
    ] = None,
) -> None:
    """Run the outbox relay (outbox rows -> dramatiq messages, LISTEN + poll, SKIP LOCKED) and
    the rescuer (jobs dispatched but not done within their deadline are sent again)."""
    import importlib

    settings = cli_settings()
    require_services(settings)
    import workers.actors  # noqa: F401  (the relay must know every actor)

    for module in modules or []:
        importlib.import_module(module)
    from workers.broker import broker
    from workers.outbox import Relay
    from workers.rescuer import start_rescuer_thread

    relay = Relay(settings, broker)
    # Every relay replica runs a rescuer; an advisory lock lets one pass run at a time.
    rescuer = start_rescuer_thread(settings, broker)
    stop = stop_event()

    def stop_on_signal() -> None:
        stop.wait()
        rescuer.stop()
        relay.stop()

    threading.Thread(target=stop_on_signal, daemon=True).start()
    relay.run()


@app.command()
@friendly_errors
def scheduler() -> None:
    """Run the scheduler: cron ticks -> schedule_ticks rows + outbox messages."""
    from schedules.scheduler import run_scheduler

    settings = cli_settings()
    require_services(settings, broker=False)
    run_scheduler(settings, stop_event())


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

    settings = cli_settings()
    require_services(settings)
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

    settings = cli_settings()
    from apps import get_profile

    if not get_profile(settings.app).migrated:
        # tidemill's migrations create Lovendo's tables: another app's database gets tidemill
        # through `tidemill app attach` (issue 14).
        fail(f"TIDEMILL_APP={settings.app}: use `tidemill app attach {settings.app}`, not migrate")
    require_services(settings, broker=False)
    from db.engine import direct_url

    url = direct_url(settings)  # alembic's transactional DDL and lock: a session, not a pool
    if settings.backup_before_migrate and current(url) is not None:
        # Bilten / Pomi: a backup before every migration. No backup, no migration. (An empty
        # database, revision None, has nothing to lose.)
        from cli.backup import backup_before_migrate

        backup_before_migrate(settings, revision)
    upgrade(url, revision)
    print(f"database at revision {current(url)}")


webhooks_app = typer.Typer(help="Stored Stripe webhook events.", no_args_is_help=True)
stripe_app = typer.Typer(help="Try the payment flow without Stripe.", no_args_is_help=True)
app.add_typer(webhooks_app, name="webhooks")
app.add_typer(stripe_app, name="stripe")


WEBHOOK_STATUSES = ("received", "waiting", "processed", "ignored", "failed")
DISPUTE_OUTCOMES = ("won", "lost", "warning_closed")


@webhooks_app.command("list")
@friendly_errors
def webhooks_list(
    status: Annotated[str | None, typer.Option(help=", ".join(WEBHOOK_STATUSES))] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="newest N events")] = 50,
) -> None:
    """Show stored events, newest first."""
    if status is not None and status not in WEBHOOK_STATUSES:
        fail(f"unknown status {status!r}; one of: {', '.join(WEBHOOK_STATUSES)}")
    from rich.console import Console
    from rich.table import Table
    from sqlalchemy import text

    from db.engine import unit_of_work

    settings = cli_settings()
    require_services(settings, broker=False)
    with unit_of_work(settings) as uow:
        rows = uow.execute(
            text("""SELECT id, type, status, attempts, received_at, last_error FROM webhook_events
                    WHERE CAST(:status AS text) IS NULL OR status = :status
                    ORDER BY received_at DESC, id DESC LIMIT :limit"""),
            {"status": status, "limit": limit},
        ).all()
    table = Table()
    for column in ("id", "type", "status", "attempts", "received"):
        table.add_column(column, no_wrap=True)  # ids are copied into `replay`: never wrapped
    table.add_column("last error", overflow="fold")
    for r in rows:
        table.add_row(
            r.id,
            r.type,
            r.status,
            str(r.attempts),
            f"{r.received_at:%Y-%m-%d %H:%M:%S}",
            (r.last_error or "")[:60],
        )
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    print(f"{len(rows)} event(s)")


@webhooks_app.command("replay")
@friendly_errors
def webhooks_replay(event_id: Annotated[str, typer.Argument(help="evt_…")]) -> None:
    """Apply an event again now. Processed and ignored events are left alone; an event still
    being retried (received, waiting) keeps its status and its retries if this run fails."""
    settings = cli_settings()
    require_services(settings)
    from workers.payments import EventNotFound, replay

    try:
        outcome = replay(event_id)
    except EventNotFound as exc:
        fail(str(exc))
    except Exception as exc:
        fail(f"{event_id} failed again: {type(exc).__name__}: {exc}", code=1)
    print(f"{event_id}: {outcome}")


@stripe_app.command("send")
@friendly_errors
def stripe_send(
    type_: Annotated[str, typer.Argument(metavar="TYPE", help="e.g. payment_intent.succeeded")],
    amount: Annotated[
        int, typer.Option(min=0, max=10**12 - 1, help="minor units (2500 = 25.00)")
    ] = 2500,
    currency: Annotated[str, typer.Option(help="ISO 4217 code, e.g. try, usd, jpy, kwd")] = "try",
    user: Annotated[str | None, typer.Option(help="user id; default: a demo user")] = None,
    ref: Annotated[str | None, typer.Option(help="pi_… or sub_… to continue a story")] = None,
    refunded: Annotated[int | None, typer.Option(help="charge.refunded: cumulative refund")] = None,
    outcome: Annotated[
        str, typer.Option(help="charge.dispute.closed: won, lost or warning_closed (an inquiry)")
    ] = "won",
    tier: Annotated[str, typer.Option(help="subscription tier")] = "premium",
    url: Annotated[str | None, typer.Option(help="receiver URL; default: this host's web")] = None,
    wait: Annotated[float, typer.Option(help="seconds to wait for the event to be applied")] = 10,
) -> None:
    """Build a realistic event, sign it with the configured secret, post it to the receiver."""
    import json
    import time
    import urllib.error
    import urllib.request

    import stripe
    from sqlalchemy import text

    from core.currency import UnknownCurrency, exponent
    from core.stripe_samples import SAMPLE_TYPES, sample
    from db.engine import unit_of_work

    if type_ not in SAMPLE_TYPES:
        fail(f"unknown type {type_!r}; known: {', '.join(SAMPLE_TYPES)}")
    if outcome not in DISPUTE_OUTCOMES:
        fail(f"unknown outcome {outcome!r}; one of: {', '.join(DISPUTE_OUTCOMES)}")
    try:
        exponent(currency)
    except UnknownCurrency as exc:
        fail(str(exc))
    settings = cli_settings()
    require_services(settings, broker=False)
    with unit_of_work(settings) as uow:
        if user is None:
            user = str(
                uow.execute(
                    text("""
                INSERT INTO users (email, full_name) VALUES ('demo@tidemill.local', 'Demo User')
                ON CONFLICT (email) DO UPDATE SET email = EXCLUDED.email RETURNING id""")
                ).scalar_one()
            )
        elif (
            uow.execute(
                text("SELECT 1 FROM users WHERE id = CAST(:u AS uuid)"), {"u": user}
            ).first()
            is None
        ):
            fail(f"no user {user}")
    event = sample(
        type_,
        user_id=user,
        amount=amount,
        currency=currency,
        ref=ref,
        refunded=refunded,
        outcome=outcome,
        tier=tier,
    )
    body = json.dumps(event)
    header = stripe.WebhookSignature.generate_signature_header(
        body, settings.stripe_webhook_secrets[0]
    )
    target = url or f"http://{settings.web_host}:{settings.web_port}/webhooks/stripe"
    request = urllib.request.Request(
        target,
        data=body.encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Stripe-Signature": header},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            answer = resp.read().decode()
            print(f"POST {target} -> {resp.status} {answer}")
    except urllib.error.HTTPError as exc:
        fail(f"POST {target} -> {exc.code} {exc.read().decode()}", code=1)
    except OSError as exc:
        fail(f"cannot reach the receiver at {target}: {exc} (is `tidemill up` running?)")
    obj = event["data"]["object"]
    print(f"event {event['id']} ({type_}) for user {user}, object {obj['id']}")
    deadline = time.monotonic() + wait
    status = "received"
    while time.monotonic() < deadline:
        with unit_of_work(settings) as uow:
            status = uow.execute(
                text("SELECT status FROM webhook_events WHERE id = :id"), {"id": event["id"]}
            ).scalar_one()
            balance, tier_now = uow.execute(
                text("SELECT balance, subscription_tier FROM users WHERE id = CAST(:u AS uuid)"),
                {"u": user},
            ).one()
        if status != "received":
            break
        time.sleep(0.2)
    print(f"status {status}; user balance {balance}, subscription tier {tier_now}")


def main() -> None:
    app(prog_name="tidemill")


if __name__ == "__main__":
    main()
