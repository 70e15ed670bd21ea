"""`tidemill schedule …`: list, trigger, pause and resume schedules (issue #6)."""

from __future__ import annotations

import getpass
import sys
from datetime import datetime
from typing import Annotated, Any

import typer

from cli.common import cli_settings, fail, friendly_errors, require_services

app = typer.Typer(help="Cron schedules: list, trigger, pause, resume.", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="schedule name (see `list`)")]
ByOpt = Annotated[str | None, typer.Option("--by", help="who is acting (default: cli:<os user>)")]


def _by(by: str | None) -> str:
    return by or f"cli:{getpass.getuser()}"


def _when(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S%z}" if moment else "-"


@app.command("list")
@friendly_errors
def list_command() -> None:
    """Every schedule: cron and timezone, state, next fire, last tick, last run's status."""
    from rich.console import Console
    from rich.table import Table

    from schedules.control import list_schedules
    from schedules.schedule import check_actors, load_schedules

    settings = cli_settings()
    require_services(settings, broker=False)
    check_actors(load_schedules(settings))
    rows = list_schedules(settings)
    table = Table()
    for column in ("name", "cron", "tz", "actor", "state", "next fire", "last tick"):
        table.add_column(column, no_wrap=True)
    table.add_column("last run", no_wrap=True)
    table.add_column("misfire", no_wrap=True)
    for r in rows:
        state = f"paused by {r.changed_by}" if r.paused else "active"
        last = _when(r.last_tick) + (f" ({r.last_tick_kind})" if r.last_tick_kind else "")
        misfire = f"{r.misfire} {r.misfire_grace_s}s"
        if r.missed_ticks:
            misfire += f", missed {r.missed_ticks} skipped {r.skipped_ticks}"
        table.add_row(
            r.name,
            r.cron,
            r.timezone,
            f"{r.actor} @{r.queue_name}",
            state,
            _when(r.next_fire),
            last,
            r.last_run_status or "-",
            misfire,
        )
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    print(f"{len(rows)} schedule(s)")


def _control(action: str, name: str, by: str | None) -> Any:
    """Run schedules.control.<action> for NAME; an unknown name is one error line, exit 2."""
    from schedules import control

    settings = cli_settings()
    require_services(settings, broker=False)
    try:
        return getattr(control, action)(name, by=_by(by), settings=settings)
    except control.UnknownSchedule as exc:
        fail(str(exc))


@app.command("trigger")
@friendly_errors
def trigger_command(name: NameArg, by: ByOpt = None) -> None:
    """Fire NAME now (recorded as a manual tick; works while paused)."""
    tick = _control("trigger", name, by)
    print(f"{name}: manual tick {tick.isoformat()} enqueued")


@app.command("pause")
@friendly_errors
def pause_command(name: NameArg, by: ByOpt = None) -> None:
    """Stop NAME firing on every scheduler replica (persisted; ticks while paused are skipped)."""
    changed = _control("pause", name, by)
    print(f"{name}: paused" if changed else f"{name}: already paused")


@app.command("resume")
@friendly_errors
def resume_command(name: NameArg, by: ByOpt = None) -> None:
    """Let NAME fire again from its next tick (missed ticks while paused are not caught up)."""
    changed = _control("resume", name, by)
    print(f"{name}: resumed" if changed else f"{name}: was not paused")
