"""structlog, configured once per process: JSON in production, console otherwise.

Every event is a stable snake_case name with key-value fields. E-mail addresses are masked in
every string field before rendering, so a careless ``log.info("x", user=user.email)`` still
leaks no personal data.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import structlog

_configured = False
# The level below which production lines are dropped (see `info_lines`).
_min_level = logging.INFO

# Masking runs on every log line, over text an attacker may control (a request path, a
# header): it must cost linear time. No regular expression here scans a run of characters
# more than once: the scan starts only at an '@' and looks at most 64 characters left
# (an address's local part is at most 64) and 255 right (a domain is at most 255).
_LOCAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")
_MAX_LOCAL = 64
_MAX_DOMAIN = 255
# Labels cannot contain '.', so this pattern never backtracks across one.
_DOMAIN = re.compile(r"[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,8}")
# A log field longer than this is cut (with a note) before it is masked or rendered.
MAX_FIELD_CHARS = 8 * 1024
_MAX_NESTING = 8


def _domain_at(text: str, start: int) -> int:
    """End of the domain starting at `start` (a dotted name ending in a 2+ letter label), or
    `start` if there is none."""
    match = _DOMAIN.match(text, start, min(len(text), start + _MAX_DOMAIN))
    if match is None:
        return start
    labels = match.group().split(".")
    while len(labels) >= 2:
        last = labels[-1]
        if len(last) >= 2 and last.isascii() and last.isalpha():
            return start + len(".".join(labels))
        labels.pop()
    return start


def mask_email(text: str) -> str:
    """``alice@example.com`` -> ``a***@example.com``; other text is returned unchanged."""
    at = text.find("@")
    if at < 0:
        return text
    out: list[str] = []
    copied = 0  # text[:copied] is already in `out`
    while at >= 0:
        left = at
        floor = max(copied, at - _MAX_LOCAL)
        while left > floor and text[left - 1] in _LOCAL:
            left -= 1
        end = _domain_at(text, at + 1) if left < at else at + 1
        if left < at and end > at + 1:
            out.append(text[copied : left + 1])
            out.append("***@")
            out.append(text[at + 1 : end])
            copied = end
        at = text.find("@", max(end, at + 1))
    out.append(text[copied:])
    return "".join(out)


# Expo push tokens address one person's device: ``ExponentPushToken[xxxx]`` (and the newer
# ``ExpoPushToken[xxxx]``). The bracket's content is bounded, so each match scans at most 256.
_PUSH_TOKEN = re.compile(r"\b(Expo(?:nent)?PushToken)\[[^\]]{0,256}\]")


def mask_push_token(text: str) -> str:
    """``ExponentPushToken[abc…]`` -> ``ExponentPushToken[***]``."""
    if "PushToken[" not in text:
        return text
    return _PUSH_TOKEN.sub(r"\1[***]", text)


def mask_personal(text: str) -> str:
    """Every masker: e-mail addresses and push tokens."""
    return mask_push_token(mask_email(text))


def bound(text: str) -> str:
    """`text` cut to MAX_FIELD_CHARS, saying how much was cut."""
    if len(text) <= MAX_FIELD_CHARS:
        return text
    return f"{text[:MAX_FIELD_CHARS]}…[{len(text) - MAX_FIELD_CHARS} more characters]"


def _mask_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        if len(value) <= MAX_FIELD_CHARS and "@" not in value and "PushToken[" not in value:
            return value  # nothing to cut and nothing any masker would change: most fields
        return mask_personal(bound(value))
    if depth >= _MAX_NESTING:
        return "…[nested too deeply]" if isinstance(value, dict | list | tuple) else value
    if isinstance(value, dict):
        return {k: _mask_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_mask_value(v, depth + 1) for v in value)
    return value


def mask_personal_data(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        event_dict[key] = _mask_value(value)
    return event_dict


# structlog's JSONRenderer calls json.dumps(event_dict, default=…): a keyword argument makes
# json.dumps build a new encoder for every line. One encoder, built once, writes the same text.
_ENCODER = json.JSONEncoder(default=repr)


def _dumps(event_dict: Any, **_kw: Any) -> str:
    return _ENCODER.encode(event_dict)


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's line writer (a lock per file, write and flush per line) with the name
    `add_logger_name` reads, as a stdlib logger has."""

    def __init__(self, name: str) -> None:
        super().__init__(sys.stderr)
        self.name = name


class _StderrLoggerFactory:
    def __call__(self, *args: Any) -> _NamedWriteLogger:
        # get_logger(name) passes the name (every module names its logger)
        return _NamedWriteLogger(args[0] if args and isinstance(args[0], str) else "root")


def configure_logging(
    *, env: str = "development", level: str = "info", force: bool = False
) -> None:
    """Configure structlog and the stdlib root logger; later calls are no-ops unless forced."""
    global _configured, _min_level
    if _configured and not force:
        return
    numeric = logging.getLevelName(level.upper())
    _min_level = numeric
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        mask_personal_data,
    ]
    renderer: Any
    if env == "production":
        renderer = structlog.processors.JSONRenderer(_dumps)
        shared.append(structlog.processors.format_exc_info)
        # Our own lines skip the stdlib: rendered by structlog and written straight to stderr,
        # through the same processors (context, level, logger name, time, masking) and the
        # same renderer as the library lines below. The stdlib round trip (two LogRecords,
        # the caller's frame, the formatter) cost ~2/3 of a line's ~30 us, paid per webhook.
        structlog.configure(
            processors=[*shared, renderer],
            logger_factory=_StderrLoggerFactory(),
            # a line below LOG_LEVEL is a no-op method: no processor runs
            wrapper_class=structlog.make_filtering_bound_logger(numeric),
            cache_logger_on_first_use=True,
        )
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        structlog.configure(
            # filter_by_level first: a debug line below LOG_LEVEL costs a level check, not the
            # timestamp, masking and rendering it would otherwise pay before being dropped.
            processors=[
                structlog.stdlib.filter_by_level,
                *shared,
                structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
            ],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
            cache_logger_on_first_use=True,
        )
    # Library logs (dramatiq, apscheduler, uvicorn, alembic) go through the same renderer,
    # so a production process writes nothing but JSON lines.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "pika"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    _configured = True


def get_logger(name: str | None = None) -> Any:
    return structlog.stdlib.get_logger(name)


def info_lines(name: str, event: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """``get_logger(name).info(event, **row)`` for each row, the lines written together.

    In production each line goes through the configured processors (context, level, logger
    name, time, masking) and the JSON renderer like any other, and all of them go out in one
    write: a hot path logging a line per item of a batch pays one system call, not one per
    line (the webhook receiver: ~50 us per request on the 2-core bench machine). Anywhere
    else (the console renderer, or structlog routed through the stdlib as tests route it)
    the calls are made one by one.
    """
    if not rows:
        return
    config = structlog.get_config()
    factory = config["logger_factory"]
    if not isinstance(factory, _StderrLoggerFactory):
        logger = get_logger(name)
        for row in rows:
            logger.info(event, **row)
        return
    if _min_level > logging.INFO:
        return
    out = factory(name)
    processors = config["processors"]
    lines = []
    for row in rows:
        line: Any = {**row, "event": event}  # the order structlog's own call builds
        for processor in processors:
            line = processor(out, "info", line)
        lines.append(line)
    out.msg("\n".join(lines))
