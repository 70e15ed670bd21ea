"""E-mail actors: the welcome e-mail, sent once per user.

Claim, send, record, in one transaction: the ``email_deliveries`` row (unique on kind, user)
is inserted and locked before the send and marked after it, so a duplicate message waits on
the lock and then finds the delivery recorded. The window left: the mail server accepted the
message but the commit did not happen (worker killed, Postgres gone); the retry sends it once
more.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formataddr
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from core.log import get_logger
from core.mail import (
    MailConfigurationError,
    MailTransport,
    PermanentMailError,
    TemporaryMailError,
    open_mail,
)
from core.settings import Settings, get_settings
from db.engine import UnitOfWork
from workers.base import PermanentError, actor

log = get_logger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates" / "emails"
DEFAULT_LANGUAGE = "en"
WELCOME = "welcome"


@dataclass(frozen=True)
class Recipient:
    user_id: uuid.UUID
    email: str
    name: str
    language: str | None


_WHITESPACE = re.compile(r"\s+")


def clean_name(raw: str | None) -> str:
    """A display name fit for a header: control and format characters (CR, LF, NUL, bidi
    overrides) become spaces, whitespace runs collapse to one space. A user-typed name with a
    line break would otherwise make the header raise (or, worse, add one)."""
    chars = (" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in raw or "")
    return _WHITESPACE.sub(" ", "".join(chars)).strip()


@cache
def _environment(autoescape: bool, templates: Path = TEMPLATES) -> jinja2.Environment:
    # An app's own templates (apps/<app>/templates) first, tidemill's shared ones after.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([templates, TEMPLATES]),
        autoescape=autoescape,  # HTML bodies escape user-controlled names; text bodies must not
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def template_language(kind: str, language: str | None, templates: Path = TEMPLATES) -> str:
    """The user's language if there are templates for it ('tr-TR', 'tr_TR' -> 'tr'), else en."""
    if language:
        base = language.strip().replace("_", "-").split("-")[0].lower()
        if base and base.isalpha():
            for root in (templates, TEMPLATES):
                if (root / kind / base).is_dir():
                    return base
    return DEFAULT_LANGUAGE


def render(
    kind: str,
    recipient: Recipient,
    *,
    settings: Settings | None = None,
    templates: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> EmailMessage:
    """A multipart/alternative message (text + HTML) in the recipient's language; `templates`
    is the app's own template folder (looked up before tidemill's), `extra` more variables."""
    settings = settings or get_settings()
    root = templates or TEMPLATES
    lang = template_language(kind, recipient.language, root)
    context = {**(extra or {}), "name": clean_name(recipient.name), "email": recipient.email}
    text_env, html_env = _environment(False, root), _environment(True, root)
    subject = text_env.get_template(f"{kind}/{lang}/subject.txt").render(context).strip()
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = settings.mail_from
    message["To"] = formataddr((clean_name(recipient.name), recipient.email))
    message["Content-Language"] = lang
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies, please
    message.set_content(text_env.get_template(f"{kind}/{lang}/body.txt").render(context))
    message.add_alternative(
        html_env.get_template(f"{kind}/{lang}/body.html").render(context), subtype="html"
    )
    return message


def deliver_welcome(
    uow: UnitOfWork,
    user_id: str,
    *,
    transport: MailTransport | None = None,
    settings: Settings | None = None,
) -> str:
    """Send the welcome e-mail unless it was already sent; returns the outcome
    (sent, duplicate, skipped, failed, missing). Raises TemporaryMailError to be retried."""
    try:
        uid = uuid.UUID(str(user_id))
    except ValueError:
        log.error("welcome_email_bad_user_id", user_id=str(user_id)[:64])
        raise PermanentError(f"not a user id: {str(user_id)[:64]!r}") from None
    user = uow.sql(_user_query(), {"id": uid}).fetchone()
    if user is None:
        # erased before we got here (or never committed): nobody to welcome
        log.info("welcome_email_skipped", user_id=str(uid), reason="missing_user")
        return "missing"
    # The claim: a duplicate message blocks on this row (the insert, then FOR UPDATE) until the
    # first one commits, then sees its final status.
    uow.sql(
        "INSERT INTO email_deliveries (kind, user_id) VALUES (%(kind)s, %(id)s) "
        "ON CONFLICT (kind, user_id) DO NOTHING",
        {"kind": WELCOME, "id": uid},
    )
    claim: Any = uow.sql(
        "SELECT status FROM email_deliveries WHERE kind = %(kind)s AND user_id = %(id)s FOR UPDATE",
        {"kind": WELCOME, "id": uid},
    ).fetchone()
    status = claim[0]
    if status != "claimed":
        log.info("welcome_email_duplicate", user_id=str(uid), status=status)
        return "duplicate"
    if user.deleted or not (user.email or "").strip():
        reason = "deleted" if user.deleted else "no_email"
        _record(uow, uid, "skipped", error=reason)
        log.info("welcome_email_skipped", user_id=str(uid), reason=reason)
        return "skipped"
    recipient = Recipient(
        user_id=uid,
        email=user.email.strip(),
        name=next((clean_name(n) for n in user.names if clean_name(n)), "")
        or user.email.strip().split("@")[0],
        language=user.language,
    )
    message = render(WELCOME, recipient, settings=settings, templates=_app_templates())
    transport = transport or open_mail(settings=settings)
    try:
        provider_id = transport.send(message)
    except PermanentMailError as exc:
        # 5xx / rejected: retrying would bounce again. Recorded, so it is visible and final.
        _record(uow, uid, "failed", error=str(exc)[:500])
        log.error("welcome_email_failed", user_id=str(uid), error=str(exc)[:200])
        return "failed"
    except MailConfigurationError as exc:
        # Our credentials or TLS settings, not this user's address: an operator must act, and
        # the retries (with backoff) send the mail once they have. The claim rolls back.
        log.error("mail_transport_misconfigured", user_id=str(uid), error=str(exc)[:200])
        raise
    except TemporaryMailError as exc:
        # the claim rolls back with the transaction; the retry (with backoff) claims again
        log.warning("welcome_email_deferred", user_id=str(uid), error=str(exc)[:200])
        raise
    _record(uow, uid, "sent", provider_id=provider_id)
    log.info("welcome_email_sent", user_id=str(uid), language=message["Content-Language"])
    return "sent"


def _user_query() -> str:
    """The served app's user row (apps/<app>/ ``Users``): id, email, the candidate display
    names in order, language, soft-deleted."""
    from apps import active_profile

    u = active_profile().users
    names = ", ".join(u.names) or "NULL::text"
    return (
        f"SELECT {u.id} AS id, {u.email} AS email, ARRAY[{names}]::text[] AS names, "
        f"{u.language or 'NULL::text'} AS language, "
        f"coalesce({u.deleted or 'false'}, false) AS deleted "
        f"FROM {u.table} WHERE {u.id} = %(id)s"
    )


def _app_templates() -> Path:
    from apps import active_profile

    return active_profile().templates


def _record(
    uow: UnitOfWork,
    uid: uuid.UUID,
    status: str,
    *,
    provider_id: str | None = None,
    error: str | None = None,
    kind: str = WELCOME,
) -> None:
    uow.sql(
        "UPDATE email_deliveries SET status = %(status)s, provider_message_id = %(pid)s, "
        "error = %(error)s, sent_at = CASE WHEN %(status)s = 'sent' THEN now() END "
        "WHERE kind = %(kind)s AND user_id = %(id)s",
        {"status": status, "pid": provider_id, "error": error, "kind": kind, "id": uid},
    )


def deliver_app_mail(
    uow: UnitOfWork,
    kind: str,
    key: str,
    *,
    transport: MailTransport | None = None,
    settings: Settings | None = None,
) -> dict[str, int]:
    """Send the served app's mail `kind` (apps/<app>/ ``Mail``) about `key` to each recipient
    its SQL names, once per (kind:key, recipient): the same claim-send-record as the welcome
    mail. Returns outcome counts."""
    from apps import active_profile

    profile = active_profile(settings)
    try:
        mail = profile.mail(kind)
    except LookupError as exc:
        raise PermanentError(str(exc)) from None
    delivery = f"{kind}:{key}"[:200]
    outcomes: dict[str, int] = {}
    try:
        recipients = uow.sql(mail.recipients, {"key": key}).fetchall()
    except Exception as exc:
        import psycopg

        if isinstance(exc, psycopg.errors.DataError):
            raise PermanentError(f"{kind}: bad key {key[:64]!r}") from None
        raise
    for row in recipients:
        fields = row._asdict()
        uid = uuid.UUID(str(fields.pop("user_id")))
        address = (fields.pop("email") or "").strip()
        name, language = fields.pop("name"), fields.pop("language")
        uow.sql(
            "INSERT INTO email_deliveries (kind, user_id) VALUES (%(kind)s, %(id)s) "
            "ON CONFLICT (kind, user_id) DO NOTHING",
            {"kind": delivery, "id": uid},
        )
        claim: Any = uow.sql(
            "SELECT status FROM email_deliveries WHERE kind = %(kind)s AND user_id = %(id)s "
            "FOR UPDATE",
            {"kind": delivery, "id": uid},
        ).fetchone()
        if claim[0] != "claimed":
            outcomes["duplicate"] = outcomes.get("duplicate", 0) + 1
            continue
        if not address:
            _record(uow, uid, "skipped", error="no_email", kind=delivery)
            outcomes["skipped"] = outcomes.get("skipped", 0) + 1
            continue
        recipient = Recipient(uid, address, clean_name(name) or address.split("@")[0], language)
        message = render(
            kind, recipient, settings=settings, templates=profile.templates, extra=fields
        )
        transport = transport or open_mail(settings=settings)
        try:
            provider_id = transport.send(message)
        except PermanentMailError as exc:
            _record(uow, uid, "failed", error=str(exc)[:500], kind=delivery)
            outcomes["failed"] = outcomes.get("failed", 0) + 1
            continue
        _record(uow, uid, "sent", provider_id=provider_id, kind=delivery)
        outcomes["sent"] = outcomes.get("sent", 0) + 1
    log.info("app_mail_done", app=profile.name, kind=kind, **outcomes)
    return outcomes


@actor(queue_name="emails", max_retries=12)
def send_app_mail(uow: UnitOfWork, kind: str, key: str) -> None:
    """An app's mail (ticket confirmation, event notice, ...), enqueued by the profile's
    triggers or by ``tidemill.enqueue('send_app_mail', '["kind", "key"]', 'emails')``."""
    deliver_app_mail(uow, kind, key)


@actor(queue_name="emails", max_retries=12)
def send_welcome_email(uow: UnitOfWork, user_id: str) -> None:
    """Welcome a new user (enqueued by the users insert trigger through the outbox)."""
    deliver_welcome(uow, user_id)
