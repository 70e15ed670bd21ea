"""The CLI: every command has --help; bad settings and unreachable servers give one clear line."""

from __future__ import annotations

import os
import socket

import pytest

from core.proc import free_port
from tests.conftest import run_cli

COMMANDS = ["up", "worker", "scheduler", "relay", "web", "migrate"]


def test_top_level_help_lists_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def _assert_one_clear_line(result, *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("tidemill: error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["migrate", "worker", "relay", "scheduler", "web"])
def test_unreachable_database_names_the_host(command: str) -> None:
    # nothing listens on port 1 of the loopback address
    env = dict(os.environ, DATABASE_URL="postgresql://u:secret@127.0.0.1:1/db")
    result = run_cli(command, env=env)
    _assert_one_clear_line(result, "Postgres", "127.0.0.1:1")
    assert "secret" not in result.stderr


def test_unreachable_redis_names_the_host() -> None:
    env = dict(os.environ, REDIS_URL="redis://127.0.0.1:1/0")
    _assert_one_clear_line(run_cli("worker", env=env), "Redis", "127.0.0.1:1")


def test_unknown_broker_scheme_fails_at_start() -> None:
    env = dict(os.environ, BROKER_URL="kafka://127.0.0.1:9092")
    _assert_one_clear_line(run_cli("worker", env=env), "BROKER_URL", "kafka")


def test_bad_number_setting_fails_at_start() -> None:
    env = dict(os.environ, TIDEMILL_WORKER_PROCESSES="many")
    _assert_one_clear_line(run_cli("relay", env=env), "TIDEMILL_WORKER_PROCESSES")


def test_port_in_use_names_the_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, TIDEMILL_WEB_PORT=str(port))
        _assert_one_clear_line(run_cli("web", env=env), f"port {port}", "TIDEMILL_WEB_PORT")


def test_up_port_in_use_names_the_port(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(
            os.environ,
            TIDEMILL_PG_PORT=str(port),
            TIDEMILL_DATA_DIR=str(tmp_path),
            TIDEMILL_WEB_PORT=str(free_port()),
        )
        env.pop("DATABASE_URL")
        result = run_cli("up", env=env)
    _assert_one_clear_line(result, f"port {port}", "TIDEMILL_PG_PORT")


def test_migrate_reports_the_revision(db) -> None:
    from alembic.script import ScriptDirectory

    from db.migrate import MIGRATIONS, alembic_config

    head = ScriptDirectory.from_config(alembic_config(db)).get_current_head()
    result = run_cli("migrate")
    assert result.returncode == 0, result.stderr
    assert f"database at revision {head}" in result.stdout
    assert str(MIGRATIONS).endswith("migrations")


def test_help_shows_no_stray_type_labels() -> None:
    # Given commands with flags and text arguments
    for args in (("pipeline", "run", "--help"), ("dashboard", "add-user", "--help")):
        result = run_cli(*args)
        # Then --help names them without `<bool>` / `<str>` beside each one
        assert result.returncode == 0, result.stderr
        assert "--dry-run" in result.stdout or "--password-stdin" in result.stdout
        assert "<bool>" not in result.stdout and "<str>" not in result.stdout, result.stdout
