"""Every command that has --dry-run changes nothing: the database (every row of every table,
every sequence), Redis and object storage are fingerprinted before and after.

The commands are discovered from the Typer app, so a command added later with a --dry-run is
walked too (the test fails if it does not know how to fill in the command's arguments).
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import typer

from core.storage import open_storage
from pipelines.lifecycle.gdpr import export
from pipelines.lifecycle.policies import load_policies
from tests.support import lifecycle as _lifecycle
from tests.support.lifecycle import (
    add_messages,
    add_notifications,
    db_fingerprint,
    make_conversation,
    make_user,
)

file_storage = _lifecycle.file_storage

NOW = datetime.now(UTC)


def dry_run_commands() -> list[tuple[tuple[str, ...], Any]]:
    """(path, command) of every command of the `tidemill` app with a --dry-run option."""
    from cli.main import app

    found: list[tuple[tuple[str, ...], Any]] = []

    def walk(cmd: Any, path: tuple[str, ...]) -> None:
        if hasattr(cmd, "commands"):  # a group (typer's own click types: duck-typed)
            for name, sub in cmd.commands.items():
                walk(sub, (*path, name))
        elif any("--dry-run" in getattr(p, "opts", ()) for p in cmd.params):
            found.append((path, cmd))

    walk(typer.main.get_command(app), ())
    return found


def _invocations(
    path: tuple[str, ...], cmd: Any, values: dict[str, list[list[str]]]
) -> list[list[str]]:
    """Argument lists for the command: one per value of its one required argument, and the
    extra flag combinations declared for it."""
    required = [p for p in cmd.params if p.param_type_name == "argument" and p.required]
    assert len(required) <= 1, f"{' '.join(path)}: teach this test its arguments"
    if not required:
        return [[*path, "--dry-run"]]
    name = required[0].name or ""
    assert name in values, f"{' '.join(path)}: no test values for argument {name!r}"
    return [[*path, *args, "--dry-run"] for args in values[name]]


def _redis_dump(client: Any) -> dict[str, Any]:
    return {k: (client.type(k), client.dump(k)) for k in sorted(client.scan_iter(count=1000))}


def _storage_dump(url: str) -> dict[str, str]:
    storage = open_storage(url)
    return {i.key: hashlib.sha256(storage.get_bytes(i.key)).hexdigest() for i in storage.list("")}


@pytest.mark.slow
def test_every_dry_run_changes_nothing(sql, redis_client, file_storage) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    # Given data every pipeline would act on: old notifications and messages, a user past the
    # erase grace with an export, expired tokens, Redis keys, a stored object
    erasable = make_user(
        sql, full_name="Dry Runner", deleted_at=NOW - timedelta(days=40), username="dry_runner"
    )
    other = make_user(sql)
    conv = make_conversation(sql, [erasable, other])
    add_messages(sql, conversation=conv, sender=other, n=20, start=NOW - timedelta(days=900))
    add_notifications(sql, user=other, n=20, start=NOW - timedelta(days=200))
    sql.execute(
        "INSERT INTO refresh_tokens (user_id, token_hash, expires_at, created_at) "
        "VALUES (%s, 'h', now(), now() - interval '30 days')",
        (other,),
    )
    export(erasable, by="test")
    sql.execute("UPDATE gdpr_exports SET expires_at = now() - interval '1 day'")
    requestable = make_user(sql, full_name="Not Yet Deleted")
    redis_client.set(f"user:{erasable}", "cached")
    policies = [p.name for p in load_policies()]
    values = {
        "name": [[name] for name in policies],
        "user_id": [[str(erasable)], [str(requestable), "--request"], [str(erasable), "--request"]],
    }
    commands = dry_run_commands()
    paths = {" ".join(path) for path, _ in commands}
    assert {"pipeline run", "gdpr erase"} <= paths, paths
    before = (db_fingerprint(sql), _redis_dump(redis_client), _storage_dump(file_storage))
    runner = CliRunner()
    ran = 0
    for path, cmd in commands:
        for args in _invocations(path, cmd, values):
            # When each dry run runs
            out = runner.invoke(app, [*args, "--by", "test"] if _has_by(cmd) else args)
            # Then it succeeds, says what it would do, and nothing changed anywhere
            assert out.exit_code == 0, (args, out.output, out.exception)
            assert "nothing changed" in out.output or "dry run" in out.output, (args, out.output)
            after = (db_fingerprint(sql), _redis_dump(redis_client), _storage_dump(file_storage))
            changed = [k for k in before[0] if before[0][k] != after[0].get(k)]
            assert not changed, (args, changed)
            assert after[1] == before[1], args
            assert after[2] == before[2], args
            ran += 1
    assert ran >= len(policies) + 3
    # and the same commands without --dry-run do change things (the fingerprint can see it)
    real = runner.invoke(app, ["gdpr", "erase", str(requestable), "--request", "--by", "t"])
    assert real.exit_code == 0, real.output
    assert db_fingerprint(sql) != before[0]


@pytest.fixture(autouse=True)
def _log_to_the_process_stderr() -> Any:
    """Logging configured before the in-process CLI runs (its own configure_logging is then a
    no-op) on the process's stderr: not on the runner's stream, which is closed after."""
    import logging
    import sys

    from core.log import configure_logging

    configure_logging(force=True)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.__stderr__)
    return None


def _has_by(cmd: Any) -> bool:
    return any("--by" in getattr(p, "opts", ()) for p in cmd.params)


def test_a_dry_run_session_refuses_writes(db, file_storage) -> None:
    """The guard behind it: a dry run's connection is a READ ONLY session, so a write that
    a code path forgot to skip fails instead of happening."""
    import psycopg

    from core.settings import get_settings
    from pipelines.lifecycle.context import connect

    with connect(get_settings(), read_only=True) as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO users (email) VALUES (%s)", (f"{uuid.uuid4()}@x.org",))
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), conn.transaction():
            conn.execute("DELETE FROM users")
