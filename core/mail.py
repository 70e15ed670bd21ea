"""Mail transports behind one small interface, built from ``MAIL_URL``.

- ``smtp://user:pass@host:port`` (STARTTLS when the server offers it; ``?starttls=off`` to
  never upgrade), ``smtps://…`` (TLS from the first byte);
- ``ses://REGION`` (Amazon SES through boto3; ``?endpoint=http://…`` for a local endpoint);
- ``file://PATH`` (development: one ``.eml`` file per message).

Vendor errors are sorted at this boundary into ``PermanentMailError`` (retrying cannot help:
SMTP 5xx, SES ``MessageRejected``) and ``TemporaryMailError`` (SMTP 4xx, connection refused,
time-outs, SES throttling), so callers decide retries without knowing the vendor. Our own
configuration being wrong (SMTP 530/534/535/538: authentication or TLS required or refused; an
extension we rely on not offered) is ``MailConfigurationError``, a temporary error: the
address is fine, and the mail should go once an operator fixes the settings.
"""

from __future__ import annotations

import os
import smtplib
import ssl
import tempfile
import time
from email.message import EmailMessage
from email.utils import make_msgid, parseaddr
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from core.settings import Settings, SettingsError, get_settings, redact_url


class MailError(Exception):
    """A message could not be sent."""


class PermanentMailError(MailError):
    """Retrying cannot help (the server said 5xx, SES rejected the message)."""


class TemporaryMailError(MailError):
    """Try again later (4xx, connection refused or lost, time-out, throttling)."""


class MailConfigurationError(TemporaryMailError):
    """Our side is misconfigured (credentials, TLS, AUTH not offered): not the recipient's
    fault, so not a permanent per-user failure; retried with backoff until it is fixed."""


# 530 authentication/STARTTLS required, 534 mechanism too weak, 535 credentials invalid,
# 538 encryption required for the mechanism (RFC 4954, RFC 3207)
_CONFIGURATION_CODES = frozenset({530, 534, 535, 538})


class MailTransport(Protocol):
    def send(self, message: EmailMessage) -> str:
        """Send one message; returns the provider's message id (or our Message-ID)."""
        ...


def _ensure_message_id(message: EmailMessage) -> str:
    if message["Message-ID"] is None:
        domain = parseaddr(str(message["From"] or ""))[1].rpartition("@")[2] or "tidemill.local"
        message["Message-ID"] = make_msgid(domain=domain)
    return str(message["Message-ID"])


class SmtpTransport:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        implicit_tls: bool,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = True,
        timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.implicit_tls = implicit_tls
        self.username = username
        self.password = password
        self.starttls = starttls
        self.timeout = timeout

    def send(self, message: EmailMessage) -> str:
        message_id = _ensure_message_id(message)
        try:
            with self._connect() as client:
                client.ehlo()
                if not self.implicit_tls and self.starttls and client.has_extn("starttls"):
                    client.starttls(context=ssl.create_default_context())
                    client.ehlo()
                if self.username:
                    client.login(self.username, self.password or "")
                client.send_message(message)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            detail = "; ".join(f"{c} {m!r}" for c, m in exc.recipients.values())
            if all(code >= 500 for code in codes):
                raise PermanentMailError(f"recipient refused: {detail}") from None
            raise TemporaryMailError(f"recipient deferred: {detail}") from None
        except smtplib.SMTPResponseException as exc:
            text = _reply_text(exc.smtp_error)
            if exc.smtp_code in _CONFIGURATION_CODES:
                raise MailConfigurationError(f"SMTP {exc.smtp_code} {text}") from None
            if 500 <= exc.smtp_code < 600:
                raise PermanentMailError(f"SMTP {exc.smtp_code} {text}") from None
            raise TemporaryMailError(f"SMTP {exc.smtp_code} {text}") from None
        except smtplib.SMTPNotSupportedError as exc:
            # e.g. AUTH configured but not offered: a configuration error, not a bad address
            raise MailConfigurationError(f"SMTP server does not support it: {exc}") from None
        except (smtplib.SMTPException, OSError) as exc:
            # disconnected, refused, unreachable, timed out: the next attempt may work
            raise TemporaryMailError(
                f"SMTP {self.host}:{self.port}: {type(exc).__name__}: {exc}"
            ) from None
        return message_id

    def _connect(self) -> smtplib.SMTP:
        if self.implicit_tls:
            return smtplib.SMTP_SSL(
                self.host, self.port, timeout=self.timeout, context=ssl.create_default_context()
            )
        return smtplib.SMTP(self.host, self.port, timeout=self.timeout)


def _reply_text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


_SES_TEMPORARY = {
    "Throttling",
    "ThrottlingException",
    "ServiceUnavailable",
    "InternalFailure",
    "RequestTimeout",
    "TooManyRequestsException",
}


class SesTransport:
    def __init__(self, region: str, *, endpoint_url: str | None = None, timeout: float = 30.0):
        import boto3
        from botocore.config import Config

        self.client: Any = boto3.client(
            "ses",
            region_name=region,
            endpoint_url=endpoint_url,
            config=Config(
                connect_timeout=timeout, read_timeout=timeout, retries={"mode": "standard"}
            ),
        )

    def send(self, message: EmailMessage) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        _ensure_message_id(message)
        try:
            response = self.client.send_raw_email(
                Source=str(message["From"]),
                Destinations=[str(a) for a in message.get_all("To", [])],
                RawMessage={"Data": message.as_bytes()},
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            text = exc.response.get("Error", {}).get("Message", "")
            if code in _SES_TEMPORARY:
                raise TemporaryMailError(f"SES {code}: {text}") from None
            raise PermanentMailError(f"SES {code}: {text}") from None
        except BotoCoreError as exc:  # endpoint unreachable, read time-out, …
            raise TemporaryMailError(f"SES: {exc}") from None
        return str(response["MessageId"])


class FileTransport:
    """Development: each message becomes ``<dir>/<time>-<id>.eml`` (open it in a mail client)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def send(self, message: EmailMessage) -> str:
        message_id = _ensure_message_id(message)
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = f"{time.strftime('%Y%m%dT%H%M%S')}-{message_id.strip('<>').partition('@')[0]}"
        # temp file + rename: a reader never sees half a message
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(message.as_bytes())
            os.replace(tmp, self.directory / f"{stem}.eml")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return message_id


def open_mail(url: str | None = None, *, settings: Settings | None = None) -> MailTransport:
    """The transport `url` (default ``MAIL_URL``) names."""
    settings = settings or get_settings()
    url = url or settings.mail_url
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    timeout = settings.mail_timeout_s
    if parts.scheme in {"smtp", "smtps"}:
        if not parts.hostname:
            raise SettingsError(f"MAIL_URL={redact_url(url)!r} names no host")
        implicit = parts.scheme == "smtps"
        return SmtpTransport(
            parts.hostname,
            parts.port or (465 if implicit else 587),
            implicit_tls=implicit,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            starttls=query.get("starttls", ["on"])[0].lower() not in {"off", "0", "false", "no"},
            timeout=timeout,
        )
    if parts.scheme == "ses":
        region = parts.hostname or os.environ.get("AWS_DEFAULT_REGION")
        if not region:
            raise SettingsError(f"MAIL_URL={url!r}: ses:// needs a region (ses://eu-west-1)")
        return SesTransport(region, endpoint_url=query.get("endpoint", [None])[0], timeout=timeout)
    if parts.scheme == "file":
        return FileTransport(Path(unquote(parts.netloc + parts.path)))
    raise SettingsError(
        f"MAIL_URL={redact_url(url)!r}: unsupported scheme {parts.scheme!r} "
        "(smtp://, smtps://, ses://, file://)"
    )
