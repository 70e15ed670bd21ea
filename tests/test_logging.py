"""Logging: JSON in production, console otherwise; e-mail addresses masked everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from core.log import mask_email
from tests.conftest import ROOT

SNIPPET = """
import structlog
from core.log import configure_logging, get_logger
configure_logging(env="{env}", level="info")
structlog.contextvars.bind_contextvars(message_id="m-1")
get_logger("t").info("user_registered", email="alice.smith@example.com",
                     note="contact bob@example.org now", nested={{"to": ["carol@example.net"]}})
import logging; logging.getLogger("lib").warning("library says hi to dave@example.com")
"""


def run(env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", SNIPPET.format(env=env)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
        check=True,
    )
    return result.stderr


def test_mask_email() -> None:
    assert mask_email("write to alice@example.com") == "write to a***@example.com"
    assert mask_email("no address here") == "no address here"


def test_production_logs_are_json_lines_with_context_and_no_addresses() -> None:
    lines = [json.loads(line) for line in run("production").splitlines() if line.strip()]
    event = next(e for e in lines if e["event"] == "user_registered")
    assert event["message_id"] == "m-1" and event["level"] == "info"
    assert event["email"] == "a***@example.com"
    assert event["note"] == "contact b***@example.org now"
    assert event["nested"] == {"to": ["c***@example.net"]}
    library = next(e for e in lines if "library says hi" in e["event"])
    assert "dave@" not in library["event"]


def test_development_logs_are_console_lines() -> None:
    out = run("development")
    assert "user_registered" in out and "a***@example.com" in out
    assert "alice.smith@" not in out
    assert not out.lstrip().startswith("{")
