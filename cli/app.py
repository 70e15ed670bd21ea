"""`tidemill app …`: the seed apps' profiles against a live database (issue 14).

tidemill app list            every profile, and which one TIDEMILL_APP serves
tidemill app check NAME      name every table/column the profile needs that is missing (exit 2)
tidemill app attach NAME     install the tidemill schema, triggers and schedules (idempotent)
tidemill app detach NAME     remove them; the app's tables and rows stay
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from apps.profile import Profile

from cli.common import cli_settings, fail, friendly_errors, require_services

app = typer.Typer(help="App profiles: list, check, attach, detach.", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="app profile (see `list`)")]


def _profile(name: str) -> Profile:
    from apps import UnknownApp, get_profile

    try:
        return get_profile(name)
    except UnknownApp as exc:
        fail(str(exc))


def _url() -> str:
    settings = cli_settings()
    require_services(settings, broker=False, redis=False)
    assert settings.database_url
    return settings.database_url


@app.command("list")
@friendly_errors
def list_command() -> None:
    """Every app profile: its seed, mails, triggers, cache tables, policies and backups."""
    from apps import all_profiles

    served = cli_settings().app
    for p in all_profiles():
        mark = "*" if p.name == served else " "
        backups = (
            f"{len(p.backups.plan)} scheduled, kept {p.backups.keep_days} d"
            + (", PITR" if p.backups.pitr else "")
            + (", before migrations" if p.backups.before_migrations else "")
            if p.backups
            else "-"
        )
        print(
            f"{mark} {p.name:<14} {p.title:<14} mails={len(p.mails)} rules={len(p.rules)} "
            f"fan-outs={len(p.fan_outs)} cache={','.join(c.table for c in p.cache) or '-'} "
            f"policies={p.policies or '-'} backups={backups}"
        )


@app.command("check")
@friendly_errors
def check_command(name: NameArg) -> None:
    """Validate the profile against the database: every missing table or column, exit 2."""
    import psycopg

    from apps.install import check
    from db.engine import libpq_url

    profile = _profile(name)
    with psycopg.connect(libpq_url(_url())) as conn:
        report = check(profile, conn)
    if not report.ok:
        for problem in report.problems:
            print(f"{name}: {problem}")
        fail(f"app {name}: {len(report.problems)} problem(s) with this database")
    print(f"{name}: ok")


@app.command("attach")
@friendly_errors
def attach_command(name: NameArg) -> None:
    """Install the tidemill schema, the profile's triggers and schedules into the database."""
    from apps.install import AttachRefused, attach

    profile = _profile(name)
    try:
        done = attach(profile, _url())
    except AttachRefused as exc:
        for problem in exc.report.problems:
            print(f"{name}: {problem}")
        fail(f"app {name} not attached: {len(exc.report.problems)} problem(s)")
    for line in done:
        print(f"{name}: {line}")


@app.command("detach")
@friendly_errors
def detach_command(name: NameArg) -> None:
    """Remove tidemill's schema and triggers; the app's tables and rows are not touched."""
    from apps.install import detach

    profile = _profile(name)
    for line in detach(profile, _url()):
        print(f"{name}: {line}")
