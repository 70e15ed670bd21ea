"""`tidemill schedule …`: list, trigger, pause and resume schedules (issue #6)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Cron schedules: list, trigger, pause, resume.", no_args_is_help=True)
