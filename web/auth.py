"""Dashboard access: accounts from settings, scrypt password hashes, signed session cookies,
CSRF tokens, a Redis sign-in rate limit, and the audit trail.

Roles: ``viewer`` sees every page; ``operator`` may also act (retry, delete, pause, trigger,
replay). Sessions are stateless signed cookies (HMAC-SHA256 over the JSON payload), so any web
replica with the same ``TIDEMILL_SESSION_SECRET`` accepts them.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from core.log import get_logger
from core.settings import Settings, SettingsError

log = get_logger("web.auth")

ROLES = ("viewer", "operator")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SESSION_COOKIE = "tidemill_session"
LOGIN_CSRF_COOKIE = "tidemill_login_csrf"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64url): the HASH part of TIDEMILL_DASHBOARD_USERS."""
    if not password:
        raise ValueError("the password is empty")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    scheme, n, r, p, salt, digest = encoded.split("$")
    if scheme != "scrypt":
        raise ValueError(f"unknown hash scheme {scheme!r}")
    return int(n), int(r), int(p), _unb64(salt), _unb64(digest)


def verify_password(password: str, encoded: str) -> bool:
    try:
        n, r, p, salt, expected = _parse_hash(encoded)
    except (ValueError, TypeError):
        return False
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(expected), maxmem=2**26
    )
    return hmac.compare_digest(digest, expected)


@functools.cache
def dummy_hash() -> str:
    """Verified when the account is unknown, so that a wrong name costs as long as a wrong
    password (the response time does not tell which accounts exist)."""
    return hash_password(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    password_hash: str

    @property
    def can_act(self) -> bool:
        return self.role == "operator"


def load_accounts(settings: Settings) -> dict[str, Account]:
    """Parse TIDEMILL_DASHBOARD_USERS; a malformed entry stops start-up naming the variable
    and the account (never the hash)."""
    accounts: dict[str, Account] = {}
    for entry in (settings.dashboard_users or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        parts = entry.split(":", 2)
        if len(parts) != 3 or not parts[0]:
            raise SettingsError(
                f"TIDEMILL_DASHBOARD_USERS: entry #{len(accounts) + 1} is not NAME:ROLE:HASH"
            )
        name, role, encoded = parts
        if role not in ROLES:
            raise SettingsError(
                f"TIDEMILL_DASHBOARD_USERS: {name!r} has role {role!r}; expected viewer or operator"
            )
        try:
            _parse_hash(encoded)
        except (ValueError, TypeError):
            raise SettingsError(
                f"TIDEMILL_DASHBOARD_USERS: {name!r} has no valid hash "
                "(make one with `tidemill dashboard hash-password`)"
            ) from None
        if name in accounts:
            raise SettingsError(f"TIDEMILL_DASHBOARD_USERS: {name!r} is listed twice")
        accounts[name] = Account(name, role, encoded)
    return accounts


@dataclass(frozen=True)
class Session:
    user: str
    role: str
    csrf: str
    expires: float

    @property
    def can_act(self) -> bool:
        return self.role == "operator"


class SessionSigner:
    """Signs and checks session cookies: ``base64(json).base64(hmac)``."""

    def __init__(self, secret: str | None, *, ttl_s: int) -> None:
        if not secret:
            log.warning("dashboard_session_secret_random")
            secret = secrets.token_urlsafe(32)
        self._key = hashlib.sha256(b"tidemill-session:" + secret.encode()).digest()
        self.ttl_s = ttl_s

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def issue(self, account: Account, *, now: float | None = None) -> tuple[Session, str]:
        now = time.time() if now is None else now
        session = Session(account.name, account.role, secrets.token_urlsafe(24), now + self.ttl_s)
        body = {"u": session.user, "r": session.role, "c": session.csrf, "e": session.expires}
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return session, f"{payload}.{self._mac(payload)}"

    def load(self, cookie: str | None, *, now: float | None = None) -> Session | None:
        if not cookie or "." not in cookie:
            return None
        payload, mac = cookie.rsplit(".", 1)
        # bytes: compare_digest raises TypeError on non-ASCII str (a forged cookie would 500)
        if not hmac.compare_digest(mac.encode(), self._mac(payload).encode()):
            return None
        try:
            body = json.loads(_unb64(payload))
            session = Session(str(body["u"]), str(body["r"]), str(body["c"]), float(body["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        if session.expires < (time.time() if now is None else now):
            return None
        return session


def csrf_ok(expected: str | None, given: str | None) -> bool:
    if not expected or not given:
        return False
    # bytes: compare_digest raises TypeError on non-ASCII str
    return hmac.compare_digest(str(expected).encode(), str(given).encode())


class LoginLimiter:
    """At most `max_failures` sign-in attempts per account and per client address within the
    window (fixed windows in Redis: INCR + EXPIRE, shared by every web replica). A success
    clears both counters, so only failures accumulate."""

    def __init__(self, client: Any, *, max_failures: int, window_s: int) -> None:
        self.client = client
        self.max_failures = max_failures
        self.window_s = window_s

    @staticmethod
    def _keys(user: str, address: str) -> tuple[str, str]:
        digest = hashlib.sha256(user.lower().encode()).hexdigest()[:16]
        return f"tidemill:login_failures:user:{digest}", f"tidemill:login_failures:ip:{address}"

    def attempt(self, user: str, address: str) -> bool:
        """Count this attempt *before* the slow password check and say whether it may go on.
        Checking first and counting after the check let concurrent POSTs all read the same
        old count and all get their password checked (the limit was bypassed)."""
        # MULTI/EXEC: INCR and EXPIRE land together, so a key never lives without a TTL
        pipe = self.client.pipeline(transaction=True)
        for key in self._keys(user, address):
            pipe.incr(key)
            pipe.expire(key, self.window_s, nx=True)
        results = pipe.execute()
        counts = results[0::2]
        return all(int(c) <= self.max_failures for c in counts)

    def blocked(self, user: str, address: str) -> bool:
        """Read-only: would the next attempt be refused?"""
        counts = self.client.mget(list(self._keys(user, address)))
        return any(int(c or 0) >= self.max_failures for c in counts)

    def succeeded(self, user: str, address: str) -> None:
        self.client.delete(*self._keys(user, address))


def audit(
    settings: Settings,
    *,
    actor: str,
    action: str,
    entity_type: str,
    entity_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """One audit_logs row: who did what to which thing (ids and counts, no personal data)."""
    from db.engine import unit_of_work

    with unit_of_work(settings) as uow:
        uow.execute(
            text(
                "INSERT INTO audit_logs (action, entity_type, entity_id, actor, details) "
                "VALUES (:action, :entity_type, :entity_id, :actor, CAST(:details AS jsonb))"
            ),
            {
                "action": action,
                "entity_type": entity_type,
                "entity_id": entity_id,
                "actor": actor,
                "details": json.dumps(details or {}, default=str),
            },
        )
