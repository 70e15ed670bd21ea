"""structlog, configured once per process: JSON in production, console otherwise.

Every event is a stable snake_case name with key-value fields. E-mail addresses are masked in
every string field before rendering, so a careless ``log.info("x", user=user.email)`` still
leaks no personal data.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_EMAIL = re.compile(r"([A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]*@([A-Za-z0-9.\-]+\.[A-Za-z]{2,})")
_configured = False


def mask_email(text: str) -> str:
    """``alice@example.com`` -> ``a***@example.com``; other text is returned unchanged."""
    return _EMAIL.sub(r"\1***@\2", text)


# Expo push tokens address one person's device: ``ExponentPushToken[xxxx]`` (and the newer
# ``ExpoPushToken[xxxx]``)
_PUSH_TOKEN = re.compile(r"\b(Expo(?:nent)?PushToken)\[[^\]]*\]")


def mask_push_token(text: str) -> str:
    """``ExponentPushToken[abc…]`` -> ``ExponentPushToken[***]``."""
    return _PUSH_TOKEN.sub(r"\1[***]", text)


def mask_personal(text: str) -> str:
    """Every masker: e-mail addresses and push tokens."""
    return mask_push_token(mask_email(text))


def _mask_value(value: Any) -> Any:
    if isinstance(value, str):
        return mask_email(value)
    if isinstance(value, dict):
        return {k: _mask_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_mask_value(v) for v in value)
    return value


def mask_personal_data(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        event_dict[key] = _mask_value(value)
    return event_dict


def configure_logging(
    *, env: str = "development", level: str = "info", force: bool = False
) -> None:
    """Configure structlog and the stdlib root logger; later calls are no-ops unless forced."""
    global _configured
    if _configured and not force:
        return
    numeric = logging.getLevelName(level.upper())
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
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
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
