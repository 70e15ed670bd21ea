"""Dashboard access: accounts from settings, scrypt password hashes, server-side sessions in
Redis, CSRF tokens, sign-in limits, the client address behind trusted proxies, and the audit
trail.

Roles: ``viewer`` sees every page; ``operator`` may also act (retry, delete, pause, trigger,
replay). A session is a Redis record named by a random cookie, so signing out ends it on every
web replica at once, and a copied cookie is worthless after sign-out.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
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
    # the Redis key's id (a hash of the cookie), so flashes and sign-out can find the record
    sid: str = ""

    @property
    def can_act(self) -> bool:
        return self.role == "operator"


SESSION_PREFIX = "tidemill:dash:session:"
USER_SESSIONS_PREFIX = "tidemill:dash:user_sessions:"
FLASH_MAX_CHARS = 300


def _sid(cookie: str) -> str:
    # Redis holds a hash of the cookie, never the cookie: a read of Redis (a backup, MONITOR)
    # does not hand out live sessions.
    return hashlib.sha256(b"tidemill-session:" + cookie.encode()).hexdigest()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SessionStore:
    """Server-side sessions: the cookie is a random 256-bit token; the record lives in Redis
    (``tidemill:dash:session:<sha256>``: user, role at sign-in, CSRF token, expiry, flash), and
    each account's live sessions are listed in ``tidemill:dash:user_sessions:<name>``.

    Signing out deletes the record, so a copied cookie is worth nothing afterwards; "sign out
    everywhere" deletes every record of the account. Every web replica shares the Redis, so a
    session ended on one is ended on all.
    """

    def __init__(self, client: Any, *, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s

    def create(
        self, account: Account, *, address: str, now: float | None = None
    ) -> tuple[Session, str]:
        """A new session (a new id every sign-in: a planted cookie is never promoted)."""
        now = time.time() if now is None else now
        cookie = secrets.token_urlsafe(32)
        sid = _sid(cookie)
        session = Session(
            account.name, account.role, secrets.token_urlsafe(24), now + self.ttl_s, sid
        )
        key = SESSION_PREFIX + sid
        index = USER_SESSIONS_PREFIX + account.name
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "user": session.user,
                "role": session.role,
                "csrf": session.csrf,
                "expires": repr(session.expires),
                "created": repr(now),
                "address": address,
            },
        )
        pipe.expire(key, self.ttl_s)
        pipe.sadd(index, sid)
        pipe.expire(index, self.ttl_s)  # renewed by each sign-in; outlives every member
        pipe.execute()
        return session, cookie

    def load(self, cookie: str | None, *, now: float | None = None) -> Session | None:
        if not cookie or len(cookie) > 100:
            return None
        sid = _sid(cookie)
        raw = self.client.hgetall(SESSION_PREFIX + sid)
        if not raw:
            return None
        record = {_text(k): _text(v) for k, v in raw.items()}
        try:
            session = Session(
                record["user"], record["role"], record["csrf"], float(record["expires"]), sid
            )
        except (KeyError, ValueError):
            return None
        if session.expires < (time.time() if now is None else now):
            self.end(session)
            return None
        return session

    def end(self, session: Session) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(SESSION_PREFIX + session.sid)
        pipe.srem(USER_SESSIONS_PREFIX + session.user, session.sid)
        pipe.execute()

    def end_all(self, user: str) -> int:
        """End every session of `user` (sign out everywhere; a removed or changed account)."""
        index = USER_SESSIONS_PREFIX + user
        sids = [_text(s) for s in self.client.smembers(index)]
        pipe = self.client.pipeline(transaction=True)
        for sid in sids:
            pipe.delete(SESSION_PREFIX + sid)
        pipe.delete(index)
        results = pipe.execute()
        return sum(int(r) for r in results[: len(sids)])

    def flash(self, session: Session, message: str) -> None:
        """A message shown once, on the next page this session loads."""
        key = SESSION_PREFIX + session.sid
        # only onto a live record: HSET on a deleted key would resurrect it without a TTL
        if self.client.exists(key):
            self.client.hset(key, "flash", message[:FLASH_MAX_CHARS])

    def pop_flash(self, session: Session) -> str | None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hget(SESSION_PREFIX + session.sid, "flash")
        pipe.hdel(SESSION_PREFIX + session.sid, "flash")
        value, _ = pipe.execute()
        return _text(value) if value else None


def csrf_ok(expected: str | None, given: str | None) -> bool:
    if not expected or not given:
        return False
    # bytes: compare_digest raises TypeError on non-ASCII str
    return hmac.compare_digest(str(expected).encode(), str(given).encode())


# --- client address -------------------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_proxies(value: str | None) -> tuple[Network, ...]:
    """TIDEMILL_TRUSTED_PROXIES: comma-separated addresses or CIDR blocks."""
    nets: list[Network] = []
    for entry in (value or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise SettingsError(
                f"TIDEMILL_TRUSTED_PROXIES: {entry!r} is not an address or CIDR block"
            ) from None
    return tuple(nets)


def _trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_address(peer: str | None, forwarded_for: list[str], proxies: tuple[Network, ...]) -> str:
    """The address a request came from. X-Forwarded-For is believed only as far as the hops
    we trust: from the right, skip our own proxies; the first hop that is not one of them is
    the client (anything left of it is the client's to write, so it is never read)."""
    address = peer or "unknown"
    if not proxies or not _trusted(address, proxies):
        return address
    hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
    for hop in reversed(hops[-20:]):  # bounded: a header of 10^4 hops costs no more
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return address  # garbage in a header our proxy wrote: stop at the last good hop
        address = hop
        if not _trusted(hop, proxies):
            return hop
    return address


# --- sign-in limits -------------------------------------------------------------------------

# KEYS: pair failures, address failures, account failures, pair's next-allowed time
# ARGV: now, window_s, free failures per pair, address cap, account soft limit, max delay s,
#       first delay s
_ATTEMPT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local free = tonumber(ARGV[3])
local pair = tonumber(redis.call('GET', KEYS[1]) or '0')
local addr = tonumber(redis.call('GET', KEYS[2]) or '0')
local acct = tonumber(redis.call('GET', KEYS[3]) or '0')
local nxt = tonumber(redis.call('GET', KEYS[4]) or '0')
if now < nxt then return {'delay', tostring(math.ceil(nxt - now))} end
if addr >= tonumber(ARGV[4]) then
  return {'address', tostring(redis.call('TTL', KEYS[2]))}
end
if pair > 0 and acct >= tonumber(ARGV[5]) then
  return {'account', tostring(redis.call('TTL', KEYS[3]))}
end
for i = 1, 3 do
  redis.call('INCR', KEYS[i])
  if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], window) end
end
local failures = pair + 1
if failures >= free then
  local delay = math.min(tonumber(ARGV[7]) * 2 ^ (failures - free), tonumber(ARGV[6]))
  redis.call('SET', KEYS[4], tostring(now + delay), 'EX', math.ceil(delay) + 1)
end
return {'ok', '0'}
"""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str  # ok | delay | address | account
    retry_after_s: int


class LoginLimiter:
    """Sign-in limits that slow a guesser without locking the operator out.

    - per (account, address): every attempt counts (before the slow password check, so
      concurrent guesses cannot all slip through); from the `free`-th failure on, the pair
      waits 1, 2, 4, ... seconds (at most `max_delay_s`) before its next attempt;
    - per address: at most `address_cap` failures within the window, whatever the account;
    - per account: past `account_soft` failures, only addresses that have failed for the
      account are held; an address with no failure still gets its password checked, so an
      attacker elsewhere never locks the operator out.

    A success forgets the pair's failures. Counters live in Redis (shared by every replica)
    and expire a window after their first failure. ``tidemill dashboard unlock NAME`` clears
    an account's counters."""

    def __init__(
        self,
        client: Any,
        *,
        free: int,
        window_s: int,
        address_cap: int = 50,
        account_soft: int = 20,
        max_delay_s: int = 300,
        first_delay_s: float = 1.0,
    ) -> None:
        self.client = client
        self.free = free
        self.window_s = window_s
        self.address_cap = address_cap
        self.account_soft = account_soft
        self.max_delay_s = max_delay_s
        self.first_delay_s = first_delay_s

    @staticmethod
    def account_digest(user: str) -> str:
        return hashlib.sha256(user.lower().encode()).hexdigest()[:16]

    def _keys(self, user: str, address: str) -> list[str]:
        a = self.account_digest(user)
        return [
            f"tidemill:login:pair:{a}:{address}",
            f"tidemill:login:addr:{address}",
            f"tidemill:login:acct:{a}",
            f"tidemill:login:next:{a}:{address}",
        ]

    def attempt(self, user: str, address: str, *, now: float | None = None) -> Verdict:
        """Say whether this attempt may have its password checked, and count it if so."""
        now = time.time() if now is None else now
        reason, wait = self.client.eval(
            _ATTEMPT,
            4,
            *self._keys(user, address),
            repr(now),
            self.window_s,
            self.free,
            self.address_cap,
            self.account_soft,
            self.max_delay_s,
            self.first_delay_s,
        )
        reason = _text(reason)
        if reason == "ok":
            return Verdict(True, reason, 0)
        return Verdict(False, reason, max(int(float(_text(wait))), 1))

    def succeeded(self, user: str, address: str) -> None:
        """The attempt was no failure: forget the pair, uncount it from address and account."""
        pair, addr, acct, nxt = self._keys(user, address)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(pair, nxt)
        pipe.decr(addr)
        pipe.decr(acct)
        pipe.execute()

    def unlock(self, user: str) -> int:
        """Forget every failure counted against `user` (all addresses); the number of keys."""
        a = self.account_digest(user)
        keys: list[Any] = [f"tidemill:login:acct:{a}"]
        for pattern in (f"tidemill:login:pair:{a}:*", f"tidemill:login:next:{a}:*"):
            keys.extend(self.client.scan_iter(match=pattern, count=1000))
        return int(self.client.delete(*keys))

    def unlock_address(self, address: str) -> int:
        return int(self.client.delete(f"tidemill:login:addr:{address}"))


def limiter_for(settings: Settings, client: Any) -> LoginLimiter:
    return LoginLimiter(
        client,
        free=settings.login_max_failures,
        window_s=settings.login_window_s,
        address_cap=settings.login_address_cap,
        account_soft=settings.login_account_soft_limit,
        max_delay_s=settings.login_max_delay_s,
    )


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
