"""`tidemill pipeline|archive|gdpr …`: data-lifecycle commands (issue #5)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Data-lifecycle pipelines: list, run, history.", no_args_is_help=True)
archive_app = typer.Typer(help="Archived rows in object storage.", no_args_is_help=True)
gdpr_app = typer.Typer(help="GDPR erase and export.", no_args_is_help=True)
