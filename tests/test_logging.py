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


def python(code: str) -> subprocess.CompletedProcess[str]:
    """`code` run by a fresh interpreter (logging is configured once per process)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
        check=True,
    )


def run(env: str) -> str:
    return python(SNIPPET.format(env=env)).stderr


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


LINES_SNIPPET = """
import io, json, sys

class Counting(io.StringIO):
    writes = 0

    def write(self, text):
        Counting.writes += 1
        return super().write(text)

sink = sys.stderr = Counting()
import structlog
from core.log import configure_logging, get_logger, info_lines
configure_logging(env="production", level="{level}")
structlog.contextvars.bind_contextvars(request_id="r-1")
rows = [dict(event_id="evt_1", type="t", duplicate=False),
        dict(event_id="evt_2", type="mail erin@example.com", duplicate=True),
        dict(event_id="evt_3", type="ExponentPushToken[abc]", duplicate=False)]
for row in rows:
    get_logger("web.webhooks").info("webhook_received", **row)
one_by_one = Counting.writes
info_lines("web.webhooks", "webhook_received", rows)
print(json.dumps(dict(one_by_one=one_by_one, together=Counting.writes - one_by_one,
                      text=sink.getvalue())))
"""


def run_lines(level: str) -> dict[str, object]:
    return json.loads(python(LINES_SNIPPET.format(level=level)).stdout)


def test_info_lines_writes_the_lines_log_info_would_in_one_write() -> None:
    out = run_lines("info")
    lines = [json.loads(line) for line in str(out["text"]).splitlines()]
    assert len(lines) == 6
    for line in lines:
        assert line.pop("timestamp").endswith("Z")
    # the same fields, in the same order, through the same processors (context, masking)
    assert [list(line.items()) for line in lines[3:]] == [list(line.items()) for line in lines[:3]]
    assert lines[3]["request_id"] == "r-1" and lines[3]["logger"] == "web.webhooks"
    assert lines[4]["type"] == "mail e***@example.com"
    assert lines[5]["type"] == "ExponentPushToken[***]"
    assert out["one_by_one"] == 3 and out["together"] == 1


def test_info_lines_below_the_level_writes_nothing() -> None:
    out = run_lines("warning")
    assert out["text"] == "" and out["together"] == 0
