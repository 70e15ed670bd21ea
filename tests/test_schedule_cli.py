"""`tidemill schedule list|trigger|pause|resume` as real subprocesses against the real Postgres."""

from __future__ import annotations

import os

import pytest

from tests.conftest import run_cli
from tests.support.scheduler import extra_json, make_schedule, tick_rows

# A registered actor: `schedule list` and `tidemill scheduler` refuse unknown ones.
HOURLY = make_schedule("cli-hourly", cron="0 * * * *", actor="prune_outbox")


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "TIDEMILL_SCHEDULES_EXTRA": extra_json(HOURLY), **extra}


def one_error_line(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("tidemill: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["list", "trigger", "pause", "resume"])
def test_each_schedule_command_has_help(command: str) -> None:
    result = run_cli("schedule", command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_pause_list_trigger_resume(db, sql) -> None:
    result = run_cli("schedule", "list", env=env())
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "cli-hourly" in line)
    assert "active" in line and "0 * * * *" in line
    assert "outbox-relayed-prune" in result.stdout  # a policy's schedule is listed too

    # When an operator pauses it
    result = run_cli("schedule", "pause", "cli-hourly", "--by", "ops:dee", env=env())
    assert result.returncode == 0, result.stderr
    assert "cli-hourly: paused" in result.stdout
    assert sql.execute(
        "SELECT paused, changed_by FROM schedule_state WHERE name = 'cli-hourly'"
    ).fetchone() == (True, "ops:dee")
    listed = run_cli("schedule", "list", env=env()).stdout
    assert "paused by ops:dee" in next(line for line in listed.splitlines() if "cli-hourly" in line)

    # and triggers it by hand (allowed while paused)
    result = run_cli("schedule", "trigger", "cli-hourly", env=env())
    assert result.returncode == 0, result.stderr
    assert "manual tick" in result.stdout
    ((tick, kind, covers, fired_by),) = tick_rows(sql, "cli-hourly")
    assert (kind, covers) == ("manual", 1)
    assert fired_by.startswith("cli:")
    assert tick.isoformat() in result.stdout
    listed = run_cli("schedule", "list", env=env()).stdout
    line = next(line for line in listed.splitlines() if "cli-hourly" in line)
    assert "(manual)" in line and "pending" in line

    # Then resume brings it back
    result = run_cli("schedule", "resume", "cli-hourly", env=env())
    assert result.returncode == 0, result.stderr
    assert "cli-hourly: resumed" in result.stdout
    assert run_cli("schedule", "resume", "cli-hourly", env=env()).stdout.strip() == (
        "cli-hourly: was not paused"
    )
    assert sql.execute("SELECT paused FROM schedule_state").fetchone() == (False,)


@pytest.mark.parametrize("command", ["trigger", "pause", "resume"])
def test_unknown_name_is_one_clear_line(db, sql, command: str) -> None:
    line = one_error_line(run_cli("schedule", command, "no-such", env=env()))
    assert "no schedule named 'no-such'" in line and "cli-hourly" in line
    assert sql.execute("SELECT count(*) FROM schedule_state").fetchone() == (0,)


def test_bad_extra_schedules_fail_every_command_with_the_variable_named(db) -> None:
    bad = env(TIDEMILL_SCHEDULES_EXTRA='[{"name": "x", "cron": "99 * * * *", "actor": "a"}]')
    for args in (("schedule", "list"), ("scheduler",)):
        line = one_error_line(run_cli(*args, env=bad))
        assert "'x'" in line and "bad cron" in line
    line = one_error_line(run_cli("schedule", "list", env=env(TIDEMILL_SCHEDULES_EXTRA="[")))
    assert "TIDEMILL_SCHEDULES_EXTRA" in line


def test_a_misspelt_actor_stops_the_scheduler_and_list_with_one_line(db, sql) -> None:
    typo = make_schedule("nightly", cron="0 3 * * *", actor="bakup_full")
    bad = env(TIDEMILL_SCHEDULES_EXTRA=extra_json(HOURLY, typo))
    for args in (("scheduler",), ("schedule", "list")):
        line = one_error_line(run_cli(*args, env=bad))
        assert "'nightly'" in line and "unknown actor 'bakup_full'" in line
        assert "did you mean 'backup_full'" in line
    # the scheduler stopped before it fired or took the lock
    assert sql.execute("SELECT count(*) FROM schedule_ticks").fetchone() == (0,)
