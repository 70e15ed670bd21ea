"""Welcome e-mail: rendered per language, sent over real SMTP (aiosmtpd), once per user."""

from __future__ import annotations

import email
import email.policy
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

import workers.actors  # noqa: F401  (the relay must know every actor the triggers name)
from core.mail import MailConfigurationError, TemporaryMailError, open_mail
from core.proc import free_port, wait_until
from core.settings import reset_settings_cache
from db.engine import unit_of_work
from tests.support import s3 as _s3
from tests.support import smtp as _smtp
from tests.support.s3 import AWS_ENV
from tests.support.smtp import SmtpServer
from workers import emails
from workers.base import PermanentError
from workers.broker import broker
from workers.emails import Recipient, deliver_welcome, render, template_language
from workers.outbox import drain

# fixtures from tests/support, registered by assignment (an import would be shadowed by the
# test functions' parameters)
smtp_server = _smtp.smtp_server
smtps_server = _smtp.smtps_server
starttls_server = _smtp.starttls_server
tls_files = _smtp.tls_files
moto_server = _s3.moto_server


@pytest.fixture
def mail_url(smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("MAIL_URL", smtp_server.url)
    monkeypatch.setenv("MAIL_FROM", "Lovendo <hello@lovendo.test>")
    reset_settings_cache()
    yield smtp_server.url
    reset_settings_cache()


def add_user(sql: Any, email_addr: str, **cols: Any) -> str:
    names = ["email", *cols]
    row = sql.execute(
        f"INSERT INTO users ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))}) "
        "RETURNING id",
        [email_addr, *cols.values()],
    ).fetchone()
    return str(row[0])


def deliveries(sql: Any) -> list[tuple[str, str | None]]:
    return [
        (r[0], r[1])
        for r in sql.execute(
            "SELECT status, error FROM email_deliveries WHERE kind = 'welcome' ORDER BY id"
        ).fetchall()
    ]


def parts(message: email.message.EmailMessage) -> dict[str, str]:
    return {
        p.get_content_type(): p.get_content()
        for p in message.walk()
        if p.get_content_maintype() == "text"
    }


# --- rendering ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("language", "expected"),
    [("tr", "tr"), ("tr-TR", "tr"), ("TR_tr", "tr"), ("en", "en"), ("de", "en"), (None, "en")],
)
def test_language_falls_back_to_english(language: str | None, expected: str) -> None:
    assert template_language("welcome", language) == expected


def test_html_escapes_the_name_and_text_keeps_it() -> None:
    r = Recipient(uuid.uuid4(), "x@example.com", "<b>Zeynep</b>", "tr")
    message = render("welcome", r)
    body = parts(message)
    assert "Lovendo'ya hoş geldin" in str(message["Subject"])
    assert "&lt;b&gt;Zeynep&lt;/b&gt;" in body["text/html"]
    assert "Merhaba <b>Zeynep</b>," in body["text/plain"]


# --- end to end: trigger -> outbox -> relay -> worker -> SMTP ---------------------------------


def test_new_user_gets_one_welcome_email_in_their_language(
    mail_url, smtp_server, inproc_worker, sql
) -> None:
    # Given a Turkish user inserted by the app
    uid = add_user(sql, "zeynep@example.com", full_name="Zeynep Kaya", language="tr")
    # When the relay moves the trigger's outbox row and a worker runs it, twice over
    drain(broker, batch=100)
    emails.send_welcome_email.send(uid)  # a duplicate message (e.g. a relay re-send)
    broker.join("emails", timeout=30_000)
    inproc_worker.join()
    # Then exactly one e-mail arrived, multipart text + HTML, in Turkish
    assert wait_until(lambda: deliveries(sql) == [("sent", None)], timeout=10)
    [message] = smtp_server.to("zeynep@example.com")
    assert message["Subject"] == "Lovendo'ya hoş geldin, Zeynep Kaya!"
    assert message["To"].addresses[0].addr_spec == "zeynep@example.com"
    assert message["From"].addresses[0].addr_spec == "hello@lovendo.test"
    assert message.get_content_type() == "multipart/alternative"
    body = parts(message)
    assert "Merhaba Zeynep Kaya," in body["text/plain"]
    assert '<html lang="tr">' in body["text/html"]
    row = sql.execute(
        "SELECT provider_message_id, sent_at FROM email_deliveries WHERE user_id = %s", (uid,)
    ).fetchone()
    assert row[0] == message["Message-ID"] and row[1] is not None


def test_line_breaks_in_the_name_cannot_break_or_add_headers(
    mail_url, smtp_server, inproc_worker, sql
) -> None:
    # Given a user whose name tries to smuggle a Bcc header
    add_user(sql, "ali@example.com", full_name="Ali\r\nBcc: x@y")
    # When the welcome e-mail goes out
    drain(broker, batch=100)
    broker.join("emails", timeout=30_000)
    inproc_worker.join()
    # Then one e-mail is sent, to the user only, with the name on one line
    assert deliveries(sql) == [("sent", None)]
    [message] = smtp_server.messages
    assert smtp_server.envelopes[0][1] == ["ali@example.com"]
    assert message["Bcc"] is None
    [address] = message["To"].addresses
    assert (address.display_name, address.addr_spec) == ("Ali Bcc: x@y", "ali@example.com")
    assert "Ali Bcc: x@y" in parts(message)["text/plain"]


def test_permanent_smtp_error_is_recorded_and_not_retried(
    mail_url, smtp_server, inproc_worker, sql
) -> None:
    smtp_server.refuse["bounce@example.com"] = (550, "5.1.1 No such user", None)
    add_user(sql, "bounce@example.com")
    drain(broker, batch=100)
    broker.join("emails", timeout=30_000)
    inproc_worker.join()
    [(status, error)] = deliveries(sql)
    assert status == "failed" and error is not None and "550" in error
    assert smtp_server.rcpt_attempts["bounce@example.com"] == 1
    assert smtp_server.to("bounce@example.com") == []


def test_temporary_smtp_errors_are_retried_with_backoff_until_sent(
    mail_url, smtp_server, inproc_worker, sql
) -> None:
    smtp_server.refuse["busy@example.com"] = (451, "4.3.0 Try again later", 2)
    add_user(sql, "busy@example.com")
    drain(broker, batch=100)
    assert wait_until(lambda: deliveries(sql) == [("sent", None)], timeout=30)
    assert smtp_server.rcpt_attempts["busy@example.com"] == 3
    assert len(smtp_server.to("busy@example.com")) == 1


def test_connection_refused_is_temporary_and_leaves_no_claim(db, sql) -> None:
    uid = add_user(sql, "later@example.com")
    transport = open_mail(f"smtp://127.0.0.1:{free_port()}")
    with pytest.raises(TemporaryMailError), unit_of_work() as uow:
        deliver_welcome(uow, uid, transport=transport)
    assert deliveries(sql) == []  # the retry will claim again


def test_wrong_smtp_password_is_a_temporary_configuration_error(db, sql, smtp_server) -> None:
    uid = add_user(sql, "x@example.com")
    transport = open_mail(f"smtp://mailer:wrong@127.0.0.1:{smtp_server.port}")
    # When the server answers 535 to our login
    with (
        structlog.testing.capture_logs() as logs,
        pytest.raises(MailConfigurationError, match="535"),
        unit_of_work() as uow,
    ):
        deliver_welcome(uow, uid, transport=transport)
    # Then it is not the user's failure: no record, so a retry after the fix sends it
    assert isinstance(MailConfigurationError("x"), TemporaryMailError)
    assert deliveries(sql) == []
    [event] = [e for e in logs if e["event"] == "mail_transport_misconfigured"]
    assert event["log_level"] == "error"
    # and once the password is right, the same user is welcomed
    with unit_of_work() as uow:
        assert deliver_welcome(uow, uid, transport=open_mail(smtp_server.url)) == "sent"
    assert len(smtp_server.to("x@example.com")) == 1


def test_misconfigured_transport_is_retried_by_the_worker(
    smtp_server, inproc_worker, sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the worker configured with a wrong SMTP password
    monkeypatch.setenv("MAIL_URL", f"smtp://mailer:wrong@127.0.0.1:{smtp_server.port}")
    reset_settings_cache()
    try:
        add_user(sql, "retry@example.com")
        drain(broker, batch=100)
        # Then the message is retried with backoff (it waits in the delay queue), not recorded
        # as a failure
        assert wait_until(lambda: _delayed("emails") > 0, timeout=20)
        assert deliveries(sql) == []
    finally:
        reset_settings_cache()


def _delayed(queue: str) -> int:
    from dramatiq.brokers.redis import RedisBroker

    assert isinstance(broker, RedisBroker)
    return int(broker.client.hlen(f"dramatiq:{queue}.DQ.msgs"))


def test_soft_deleted_user_and_user_without_email_get_nothing(
    mail_url, smtp_server, db, sql
) -> None:
    gone = add_user(sql, "gone@example.com")
    sql.execute("UPDATE users SET deleted_at = now() WHERE id = %s", (gone,))
    blank = add_user(sql, " ")
    with unit_of_work() as uow:
        assert deliver_welcome(uow, gone) == "skipped"
    with unit_of_work() as uow:
        assert deliver_welcome(uow, blank) == "skipped"
    with unit_of_work() as uow:  # and a second message for them sends nothing either
        assert deliver_welcome(uow, gone) == "duplicate"
    assert smtp_server.messages == []
    assert sorted(deliveries(sql)) == [("skipped", "deleted"), ("skipped", "no_email")]


def test_bad_and_missing_user_ids(db) -> None:
    with pytest.raises(PermanentError), unit_of_work() as uow:
        deliver_welcome(uow, "not-a-uuid")
    with unit_of_work() as uow:
        assert deliver_welcome(uow, str(uuid.uuid4())) == "missing"


def test_file_transport_writes_a_parseable_eml(db, sql, tmp_path: Path) -> None:
    uid = add_user(sql, "dev@example.com", full_name="Dev")
    with unit_of_work() as uow:
        assert deliver_welcome(uow, uid, transport=open_mail(f"file://{tmp_path}")) == "sent"
    [path] = list(tmp_path.glob("*.eml"))
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert message["Subject"] == "Welcome to Lovendo, Dev!"
    assert list(tmp_path.glob(".*")) == []  # no temp file left behind


def test_ses_transport_sends_and_maps_rejections(
    db, sql, moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MAIL_FROM", "Lovendo <hello@lovendo.test>")
    reset_settings_cache()
    try:
        transport = open_mail(f"ses://us-east-1?endpoint={moto_server}")
        uid = add_user(sql, "ses@example.com")
        # SES refuses a sender it has not verified: permanent, recorded, not retried
        with unit_of_work() as uow:
            assert deliver_welcome(uow, uid, transport=transport) == "failed"
        assert "MessageRejected" in (deliveries(sql)[0][1] or "")
        sql.execute("DELETE FROM email_deliveries")
        ses = boto3.client("ses", region_name="us-east-1", endpoint_url=moto_server)
        ses.verify_email_identity(EmailAddress="hello@lovendo.test")
        with unit_of_work() as uow:
            assert deliver_welcome(uow, uid, transport=transport) == "sent"
        stats = ses.get_send_quota()
        assert stats["SentLast24Hours"] >= 1
    finally:
        reset_settings_cache()


def test_unreachable_ses_endpoint_is_temporary(db, sql, monkeypatch) -> None:
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    transport = open_mail(f"ses://us-east-1?endpoint=http://127.0.0.1:{free_port()}")
    uid = add_user(sql, "ses2@example.com")
    with pytest.raises(TemporaryMailError), unit_of_work() as uow:
        deliver_welcome(uow, uid, transport=transport)


def test_bad_mail_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import SettingsError

    with pytest.raises(SettingsError, match="names no host"):
        open_mail("smtp://")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    with pytest.raises(SettingsError, match="needs a region"):
        open_mail("ses://")
    with pytest.raises(SettingsError, match="unsupported scheme"):
        open_mail("pigeon://coop")


@pytest.mark.parametrize("kind", ["smtps", "starttls"])
def test_tls_transports_send_with_auth(
    db, sql, request: pytest.FixtureRequest, tls_files, monkeypatch, kind: str
) -> None:
    # the test certificate is trusted the way a private CA would be
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.cert))
    server: SmtpServer = request.getfixturevalue(f"{kind}_server")
    scheme = "smtps" if kind == "smtps" else "smtp"
    transport = open_mail(f"{scheme}://{_smtp.USER}:s3cret%20pass@localhost:{server.port}")
    uid = add_user(sql, f"{kind}@example.com")
    with unit_of_work() as uow:
        assert deliver_welcome(uow, uid, transport=transport) == "sent"
    assert len(server.to(f"{kind}@example.com")) == 1


def test_starttls_server_refuses_a_client_that_will_not_upgrade(
    db, sql, starttls_server: SmtpServer
) -> None:
    transport = open_mail(f"smtp://127.0.0.1:{starttls_server.port}?starttls=off")
    uid = add_user(sql, "plain@example.com")
    # 530 "Must issue a STARTTLS command first": our configuration, retried, not recorded
    with pytest.raises(MailConfigurationError, match="530"), unit_of_work() as uow:
        deliver_welcome(uow, uid, transport=transport)
    assert deliveries(sql) == []
