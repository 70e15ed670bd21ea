"""`tidemill dashboard …`: dashboard users and passwords (issue #8)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from cli.common import fail

app = typer.Typer(help="Operator dashboard accounts.", no_args_is_help=True)


def _read_password(stdin: bool) -> str:
    if stdin:
        # one line from a pipe or secret manager; the newline is not part of the password
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < 8:
        fail("the password must be at least 8 characters")
    return password


@app.command("hash-password")
def hash_password(
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from standard input")
    ] = False,
) -> None:
    """Print a scrypt hash for TIDEMILL_DASHBOARD_USERS (NAME:ROLE:HASH)."""
    from web.auth import hash_password as make_hash

    print(make_hash(_read_password(password_stdin)))


@app.command("add-user")
def add_user(
    name: Annotated[str, typer.Argument(help="account name (no ':' or ',')")],
    role: Annotated[str, typer.Option(help="viewer (read-only) or operator")] = "viewer",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from standard input")
    ] = False,
) -> None:
    """Print one NAME:ROLE:HASH entry to append (comma-separated) to TIDEMILL_DASHBOARD_USERS."""
    from web.auth import ROLES
    from web.auth import hash_password as make_hash

    if not name or any(c in name for c in ":, "):
        fail(f"account name {name!r} must be non-empty without ':', ',' or spaces")
    if role not in ROLES:
        fail(f"role {role!r} must be one of: {', '.join(ROLES)}")
    print(f"{name}:{role}:{make_hash(_read_password(password_stdin))}")


@app.command("unlock")
def unlock(
    name: Annotated[str, typer.Argument(help="account whose failed sign-ins are forgotten")],
    address: Annotated[
        list[str] | None,
        typer.Option("--address", help="also forget this client address's failures (repeatable)"),
    ] = None,
) -> None:
    """Forget the failed sign-ins counted against NAME (every address), so its next sign-in is
    checked at once; with --address, also the per-address counter of that address."""
    from core.settings import get_settings
    from db.redis import get_redis
    from web.auth import audit, limiter_for

    settings = get_settings()
    limiter = limiter_for(settings, get_redis(settings))
    keys = limiter.unlock(name)
    for addr in address or []:
        keys += limiter.unlock_address(addr)
    audit(
        settings,
        actor="cli",
        action="dashboard.unlock",
        entity_type="dashboard_account",
        entity_id=name,
        details={"keys": keys, "addresses": list(address or [])},
    )
    print(f"unlocked {name}: {keys} counter(s) cleared")
