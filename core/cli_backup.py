"""`tidemill backup|wal|restore …`: backups, WAL archiving, point-in-time restore (issue #7)."""

from __future__ import annotations

import typer

from core.cli_common import fail

app = typer.Typer(help="Logical and physical backups.", no_args_is_help=True)
wal_app = typer.Typer(help="WAL archiving (archive_command).", no_args_is_help=True)


def restore_command() -> None:
    """Restore a backup (not built yet)."""
    fail("restore is not built yet")
