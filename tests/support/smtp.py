"""A real SMTP server (aiosmtpd) for the tests: it receives over TCP, requires AUTH, and can
be told to answer chosen recipients with a permanent (5xx) or temporary (4xx) error."""

from __future__ import annotations

import contextlib
import email
import email.policy
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from core.proc import free_port

USER = "mailer"
PASSWORD = "s3cret pass"


@dataclass
class SmtpServer:
    port: int
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    # recipient -> (code, text) to answer RCPT TO with, and how many times (None: always)
    refuse: dict[str, tuple[int, str, int | None]] = field(default_factory=dict)
    rcpt_attempts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"smtp://{USER}:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{self.port}"

    def to(self, address: str) -> list[EmailMessage]:
        with self.lock:
            pairs = zip(self.messages, self.envelopes, strict=True)
            return [m for m, (_, rcpts) in pairs if address in rcpts]


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_RCPT(
        self, srv: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        with self.server.lock:
            self.server.rcpt_attempts[address] = self.server.rcpt_attempts.get(address, 0) + 1
            rule = self.server.refuse.get(address)
            if rule is not None:
                code, text, times = rule
                if times is None or times > 0:
                    if times is not None:
                        self.server.refuse[address] = (code, text, times - 1)
                    return f"{code} {text}"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, srv: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self.server.lock:
            self.server.messages.append(message)
            self.server.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 Message accepted"


def _authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any):
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == USER.encode()
        and auth_data.password == PASSWORD.encode()
    )
    # handled=False: aiosmtpd answers 535 itself (True would leave the client waiting)
    return AuthResult(success=ok, handled=False)


@contextlib.contextmanager
def _serving(**options: Any) -> Iterator[SmtpServer]:
    server = SmtpServer(port=free_port())
    controller = Controller(
        _Handler(server),
        hostname="127.0.0.1",
        port=server.port,
        authenticator=_authenticator,
        auth_required=True,
        **options,
    )
    controller.start()
    try:
        yield server
    finally:
        controller.stop()


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """Plain SMTP with AUTH over an unencrypted connection (production uses TLS)."""
    with _serving(auth_require_tls=False) as server:
        yield server


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A self-signed certificate for localhost / 127.0.0.1 (clients trust it through
    SSL_CERT_FILE, as they would a private CA)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    files = TlsFiles(cert=directory / "cert.pem", key=directory / "key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def _server_context(files: TlsFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert, files.key)
    return context


@pytest.fixture
def smtps_server(tls_files: TlsFiles) -> Iterator[SmtpServer]:
    """SMTP over TLS from the first byte (smtps://, port 465 style)."""
    # aiosmtpd counts only STARTTLS as TLS for AUTH; here the whole connection is TLS
    with _serving(ssl_context=_server_context(tls_files), auth_require_tls=False) as server:
        yield server


@pytest.fixture
def starttls_server(tls_files: TlsFiles) -> Iterator[SmtpServer]:
    """Submission style: plain connect, STARTTLS required before MAIL and before AUTH."""
    with _serving(
        tls_context=_server_context(tls_files), require_starttls=True, auth_require_tls=True
    ) as server:
        yield server
