"""What an app profile declares: which of the app's tables and columns stand for tidemill's flows.

A profile is data (frozen dataclasses); the few flows that differ in shape between apps (what
a Stripe event does) are a named function in the app's package. Everything a profile names is
checked against the live database by ``tidemill app check`` (``apps.install.check``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db.cache_keys import CachedTable
from pipelines.backups.plan import PlannedBackup

if TYPE_CHECKING:
    from db.engine import UnitOfWork

APPS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Users:
    """The table that holds the app's users and the columns tidemill reads from it."""

    table: str = "users"
    id: str = "id"
    email: str = "email"
    # SQL expressions over the row, tried in order for the display name (first non-empty wins,
    # then the e-mail's local part)
    names: tuple[str, ...] = ()
    language: str | None = None  # SQL expression, or None: the default language
    deleted: str | None = None  # SQL predicate over the row: soft-deleted (no mail)


@dataclass(frozen=True)
class Mail:
    """A mail the app needs, sent by the ``send_app_mail(kind, key)`` actor.

    ``recipients`` is SQL with one parameter, ``%(key)s`` (the id the trigger or
    ``tidemill.enqueue`` passed), that returns one row per recipient with the columns
    ``user_id, email, name, language`` plus any template variables. Each (kind:key, recipient)
    is delivered at most once (``tidemill.email_deliveries``). Templates live in
    ``apps/<app>/templates/<kind>/<lang>/{subject.txt,body.txt,body.html}``.
    """

    kind: str
    recipients: str


@dataclass(frozen=True)
class Rule:
    """A trigger `attach` installs: rows changed on `table` become outbox jobs in the same
    transaction. ``args`` are SQL expressions over the new row ``n`` (and ``o``, the old row,
    for updates, matched on ``key``); ``where`` filters, over the same rows."""

    name: str
    table: str
    on: str  # "insert" or "update"
    actor: str
    queue: str
    args: tuple[str, ...]
    where: str = "true"
    key: str = "id"


@dataclass(frozen=True)
class FanOut:
    """Who hears about what: SQL (one parameter, ``%(key)s``) that inserts the app's
    notification rows for a change, run by the ``app_fan_out(name, key)`` actor. It must be
    idempotent itself (NOT EXISTS / ON CONFLICT): a retried message runs it again."""

    name: str
    sql: str


@dataclass(frozen=True)
class Backups:
    """The seed's backup plan: the scheduled backups, how long fulls are kept, PITR, and a
    backup before every migration."""

    plan: tuple[PlannedBackup, ...]
    keep_days: int
    compressed: bool = True
    pitr: bool = False
    before_migrations: bool = False


@dataclass(frozen=True)
class Erase:
    """The erase graph's root: GDPR erase walks the foreign keys that reach this table's
    primary key (pipelines/lifecycle/gdpr.py); ``log`` names the app table that records each
    step, if the seed has one (SaltBitter's compliance_logs)."""

    root: str = "users"
    log: str | None = None


StripeEffect = Callable[["UnitOfWork", Mapping[str, Any]], "str | None"]
AppTask = Callable[["UnitOfWork", str], None]


@dataclass(frozen=True)
class Profile:
    name: str
    title: str
    seed: str  # the seed document it follows
    schema: str = "public"
    users: Users = field(default_factory=Users)
    mails: tuple[Mail, ...] = ()
    rules: tuple[Rule, ...] = ()
    fan_outs: tuple[FanOut, ...] = ()
    cache: tuple[CachedTable, ...] = ()
    policies: str | None = None  # TOML under pipelines/lifecycle/policies/, or None: none
    backups: Backups | None = None
    erase: Erase = field(default_factory=Erase)
    # What a Stripe event does to the app's tables; None: tidemill's Lovendo effects
    # (workers/stripe_effects.py).
    stripe: StripeEffect | None = None
    # Flows carried as code, run by name by the ``run_app_task(name, key)`` actor.
    tasks: Mapping[str, AppTask] = field(default_factory=dict)
    # Every table and column the profile relies on, beyond what the pieces above name
    # (e.g. columns used inside `recipients` SQL), for `tidemill app check`.
    requires: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Tables tidemill's migrations own (Lovendo): attach runs the migrations for them.
    migrated: bool = False

    @property
    def policy_file(self) -> Path | None:
        """The profile's retention policies (pipelines/lifecycle/policies/<file>), if it has any."""
        if self.policies is None:
            return None
        return (APPS_DIR.parent / "pipelines" / "lifecycle" / "policies" / self.policies).resolve()

    @property
    def templates(self) -> Path:
        return APPS_DIR / self.name / "templates"

    def mail(self, kind: str) -> Mail:
        for m in self.mails:
            if m.kind == kind:
                return m
        raise LookupError(f"app {self.name!r} declares no mail {kind!r}")

    def fan_out(self, name: str) -> FanOut:
        for f in self.fan_outs:
            if f.name == name:
                return f
        raise LookupError(f"app {self.name!r} declares no fan-out {name!r}")

    def cache_map(self) -> dict[str, CachedTable]:
        return {c.table: c for c in self.cache}

    def required_columns(self) -> dict[str, set[str]]:
        """table -> columns, from every declaration that names them."""
        need: dict[str, set[str]] = {}

        def add(table: str, *cols: str) -> None:
            need.setdefault(table, set()).update(c for c in cols if c)

        u = self.users
        add(u.table, u.id, u.email)
        for rule in self.rules:
            add(rule.table, rule.key)
        for cached in self.cache:
            add(cached.table, *cached.columns)
        for table, cols in self.requires.items():
            add(table, *cols)
        return need
