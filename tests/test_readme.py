"""Every command the README shows runs as shown, against a real `tidemill up`.

The README's ```sh blocks are the newcomer's first contact: each line is either one of the two
make targets (which this suite itself is) or a `.venv/bin/tidemill …` command that must exit 0
against the running system. A command the README shows that this test cannot run fails it, so
the README cannot drift into commands that do not work."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core.proc import wait_until
from tests.conftest import ROOT, healthy, start_cli, up_env

pytestmark = pytest.mark.slow

FENCE = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)
MAKE_TARGETS = {"make up", "make test", "make docs", "make bench", "make bench-quick"}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in FENCE.findall(text):
        for raw in block.splitlines():
            line = raw.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_the_readme_shows_commands() -> None:
    commands = readme_commands()
    assert "make up" in commands and "make test" in commands
    assert any(c.startswith(".venv/bin/tidemill ") for c in commands)


def test_every_readme_command_runs_against_make_up(tmp_path: Path) -> None:
    env, web = up_env(tmp_path, TIDEMILL_WORKER_PROCESSES="1")
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        up = start_cli("up", env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert wait_until(lambda: healthy(web), timeout=120, interval=0.25), (
                log_path.read_text()[-3000:]
            )
            for command in readme_commands():
                if command in MAKE_TARGETS:
                    continue
                stdin = None
                if command.startswith("echo ") and " | " in command:
                    # `echo 'TEXT' | .venv/bin/tidemill …`: TEXT is the command's input
                    piped, command = command.split(" | ", 1)
                    stdin = shlex.split(piped)[1] + "\n"
                words = shlex.split(command)
                assert words[0] == ".venv/bin/tidemill", f"the README shows {command!r}"
                result = subprocess.run(
                    [sys.executable, "-m", "cli.main", *words[1:]],
                    input=stdin,
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=ROOT,
                    timeout=120,
                )
                assert result.returncode == 0, (
                    command,
                    result.stdout[-2000:],
                    result.stderr[-2000:],
                )
        finally:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=90)
            except subprocess.TimeoutExpired:
                up.kill()
