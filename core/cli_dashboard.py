"""`tidemill dashboard …`: dashboard users and passwords (issue #8)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Operator dashboard accounts.", no_args_is_help=True)
