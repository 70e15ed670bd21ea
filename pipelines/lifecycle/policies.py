"""Retention policies as data: a TOML file of ``[[policy]]`` tables, validated before use.

``load_policies(settings)`` reads ``TIDEMILL_POLICY_FILE`` (default: the packaged
``pipelines/lifecycle/policies.toml``, seed Lovendo's retention table) and checks its shape without
touching a database, so the scheduler can read it at start-up. ``check_against_database``
then checks every table, column and filter against the live catalog; the engine calls it
before each run, so a policy naming a missing table or column fails with one clear line
instead of a half-run.

The pipeline actor is ``workers.lifecycle.run_pipeline(name, tick=None)`` on queue "pipelines".
"""

from __future__ import annotations

import re
import tomllib
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from core.settings import Settings, get_settings

DEFAULT_FILE = Path(__file__).resolve().parent / "policies.toml"
EXAMPLES_DIR = Path(__file__).resolve().parent / "policies"

# delete / expire: batch-delete old rows (expire is for rows whose life ended: tokens, codes);
# archive: stream rows to object storage, delete them once stored and verified;
# erase-users: GDPR hard delete of users soft-deleted longer than the age;
# partitions: create future monthly partitions of a partitioned table;
# expire-exports: GDPR exports past their download window leave storage and the catalogue.
ACTIONS = ("delete", "expire", "archive", "erase-users", "partitions", "expire-exports")
FORMATS = ("csv", "jsonl")
MISFIRES = ("once", "skip")
STORAGE_CLASSES = (
    "STANDARD",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "GLACIER_IR",
    "DEEP_ARCHIVE",
    "REDUCED_REDUNDANCY",
)
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_AGE = re.compile(r"^\s*(\d+)\s*(minute|hour|day|week|month|year)s?\s*$", re.IGNORECASE)
_KNOWN_KEYS = {
    "name",
    "description",
    "table",
    "age_column",
    "age",
    "action",
    "filter",
    "key_column",
    "batch_size",
    "schedule",
    "timezone",
    "misfire",
    "misfire_grace_s",
    "storage_class",
    "format",
    "months_ahead",
}


# Stripe retries an undelivered event for up to 3 days; a day more for clocks and backlogs.
WEBHOOK_DEDUP_MIN = timedelta(days=4)
_REFERENCE = datetime(2001, 1, 31, tzinfo=zoneinfo.ZoneInfo("UTC"))  # any fixed instant


class PolicyError(ValueError):
    """A policy file or policy that cannot be used; the message names the file and policy."""


@dataclass(frozen=True)
class Age:
    """A retention age: calendar months (years are 12 months) plus a fixed duration."""

    months: int = 0
    delta: timedelta = field(default_factory=timedelta)
    text: str = ""

    def cutoff(self, now: datetime) -> datetime:
        """The newest timestamp that is old enough at ``now`` (rows older than it qualify)."""
        at = now
        if self.months:
            total = at.year * 12 + at.month - 1 - self.months
            year, month = divmod(total, 12)
            month += 1
            day = min(at.day, _days_in_month(year, month))
            at = at.replace(year=year, month=month, day=day)
        return at - self.delta


def _days_in_month(year: int, month: int) -> int:
    nxt = datetime(year + (month == 12), month % 12 + 1, 1)
    return (nxt - timedelta(days=1)).day


def parse_age(text: str) -> Age:
    m = _AGE.match(text)
    if m is None:
        raise ValueError(
            f"age {text!r} is not '<n> minutes|hours|days|weeks|months|years' (e.g. '90 days')"
        )
    n, unit = int(m.group(1)), m.group(2).lower()
    if unit == "year":
        return Age(months=12 * n, text=text)
    if unit == "month":
        return Age(months=n, text=text)
    return Age(delta=timedelta(**{f"{unit}s": n}), text=text)


@dataclass(frozen=True)
class Policy:
    name: str
    schedule: str
    timezone: str = "UTC"
    misfire: str = "once"
    misfire_grace_s: int = 3600
    table: str = ""
    age_column: str = "created_at"
    age: Age = field(default_factory=Age)
    action: str = "delete"
    filter: str | None = None
    key_column: str = "id"
    batch_size: int = 5000
    storage_class: str | None = None
    format: str = "csv"
    months_ahead: int = 3
    description: str = ""

    def cutoff(self, now: datetime) -> datetime:
        return self.age.cutoff(now)


def _policy(raw: Mapping[str, Any], where: str) -> Policy:
    unknown = set(raw) - _KNOWN_KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise PolicyError(f"{where}: name must be lower-case letters, digits and '-'")
    where = f"{where} ({name})"

    def need(key: str, kind: type) -> Any:
        value = raw.get(key)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise PolicyError(f"{where}: {key} is required and must be a {kind.__name__}")
        return value

    action = need("action", str)
    if action not in ACTIONS:
        raise PolicyError(f"{where}: action {action!r} is not one of {', '.join(ACTIONS)}")
    table = need("table", str)
    if not _IDENT.match(table):
        raise PolicyError(f"{where}: table {table!r} is not a plain lower-case identifier")
    kwargs: dict[str, Any] = {"name": name, "table": table, "action": action}
    if action != "partitions":
        age_column = need("age_column", str)
        key_column = raw.get("key_column", "id")
        for label, ident in (("age_column", age_column), ("key_column", key_column)):
            if not isinstance(ident, str) or not _IDENT.match(ident):
                raise PolicyError(f"{where}: {label} {ident!r} is not a plain identifier")
        try:
            kwargs["age"] = parse_age(need("age", str))
        except ValueError as exc:
            raise PolicyError(f"{where}: {exc}") from None
        kwargs.update(age_column=age_column, key_column=key_column)
    if action == "erase-users" and table != "users":
        raise PolicyError(f"{where}: erase-users works on table 'users', not {table!r}")
    if (
        table == "webhook_events"
        and action in ("delete", "expire", "archive")
        and kwargs["age"].cutoff(_REFERENCE) > _REFERENCE - WEBHOOK_DEDUP_MIN
    ):
        # The event-id dedup is the row itself: an event gone from webhook_events before
        # Stripe stops retrying it would be accepted and applied again.
        raise PolicyError(
            f"{where}: webhook_events rows must be kept at least {WEBHOOK_DEDUP_MIN.days} days "
            "(Stripe retries an event for up to 3 days; the event-id dedup needs the row)"
        )
    if action == "expire-exports" and table != "gdpr_exports":
        raise PolicyError(f"{where}: expire-exports works on table 'gdpr_exports', not {table!r}")
    schedule = need("schedule", str)
    tz = raw.get("timezone", "UTC")
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        raise PolicyError(f"{where}: unknown timezone {tz!r}") from None
    try:
        from apscheduler.triggers.cron import CronTrigger

        CronTrigger.from_crontab(schedule, timezone=tz)
    except ValueError as exc:
        raise PolicyError(f"{where}: schedule {schedule!r} is not a crontab: {exc}") from None
    kwargs.update(schedule=schedule, timezone=tz)
    if "filter" in raw:
        flt = need("filter", str)
        # The filter is SQL from the repository's own policy file, reviewed like code; this
        # only refuses what cannot be a single boolean expression.
        if ";" in flt or "--" in flt:
            raise PolicyError(f"{where}: filter must be one SQL expression (no ';' or '--')")
        kwargs["filter"] = flt
    batch = raw.get("batch_size", 5000)
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 1_000_000:
        raise PolicyError(f"{where}: batch_size must be a whole number from 1 to 1000000")
    kwargs["batch_size"] = batch
    misfire = raw.get("misfire", "once")
    if misfire not in MISFIRES:
        raise PolicyError(f"{where}: misfire must be 'once' or 'skip'")
    grace = raw.get("misfire_grace_s", 3600)
    if not isinstance(grace, int) or isinstance(grace, bool) or grace < 1:
        raise PolicyError(f"{where}: misfire_grace_s must be a positive whole number")
    kwargs.update(misfire=misfire, misfire_grace_s=grace)
    sc = raw.get("storage_class")
    if sc is not None and sc not in STORAGE_CLASSES:
        raise PolicyError(f"{where}: storage_class {sc!r} is not one of {STORAGE_CLASSES}")
    fmt = raw.get("format", "csv")
    if fmt not in FORMATS:
        raise PolicyError(f"{where}: format must be 'csv' or 'jsonl'")
    ahead = raw.get("months_ahead", 3)
    if not isinstance(ahead, int) or isinstance(ahead, bool) or not 1 <= ahead <= 36:
        raise PolicyError(f"{where}: months_ahead must be 1 to 36")
    kwargs.update(
        storage_class=sc,
        format=fmt,
        months_ahead=ahead,
        description=str(raw.get("description", "")),
    )
    return Policy(**kwargs)


def parse_policies(text: str, *, source: str = "<policies>") -> list[Policy]:
    """Parse and shape-check a policy document (no database involved)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}") from None
    extra = set(doc) - {"policy", "app"}
    if extra:
        raise PolicyError(f"{source}: unknown top-level keys {sorted(extra)}")
    raws = doc.get("policy", [])
    if not isinstance(raws, list) or not raws:
        raise PolicyError(f"{source}: no [[policy]] tables")
    policies = [_policy(raw, f"{source} policy #{i + 1}") for i, raw in enumerate(raws)]
    seen: set[str] = set()
    for p in policies:
        if p.name in seen:
            raise PolicyError(f"{source}: policy name {p.name!r} is used twice")
        seen.add(p.name)
    return policies


def load_policy_file(path: Path | str) -> list[Policy]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror or exc}") from None
    return parse_policies(text, source=str(path))


def load_policies(settings: Settings | None = None) -> list[Policy]:
    settings = settings or get_settings()
    if settings.policy_file:
        return load_policy_file(settings.policy_file)
    from apps import get_profile  # issue 14: the served app's policies

    path = get_profile(settings.app).policy_file
    return load_policy_file(str(path)) if path is not None else []


def get_policy(name: str, settings: Settings | None = None) -> Policy:
    policies = load_policies(settings)
    for p in policies:
        if p.name == name:
            return p
    raise UnknownPipeline(
        f"no pipeline named {name!r}; known: {', '.join(p.name for p in policies)}"
    )


class UnknownPipeline(LookupError):
    """A pipeline name that is not in the policy file."""


_TIME_TYPES = {"timestamp with time zone", "timestamp without time zone", "date"}


def check_against_database(policies: Iterable[Policy], conn: Any) -> None:
    """Raise PolicyError unless every policy's table, columns and filter exist.

    ``conn`` is a psycopg connection; only catalog reads and an EXPLAIN are done.
    """
    for p in policies:
        cols = {
            r[0]: r[1]
            # Resolved through the search_path: an app table, or one of tidemill's own
            # (Bilten's backups, the apps' audit_logs) in the tidemill schema (issue 14).
            for r in conn.execute(
                "SELECT c.column_name, c.data_type FROM information_schema.columns c "
                "JOIN pg_class k ON k.relname = c.table_name "
                "JOIN pg_namespace n ON n.oid = k.relnamespace AND n.nspname = c.table_schema "
                "WHERE k.oid = to_regclass(quote_ident(%s))",
                (p.table,),
            ).fetchall()
        }
        if not cols:
            raise PolicyError(f"policy {p.name}: table {p.table!r} does not exist")
        if p.action == "partitions":
            kind = conn.execute(
                "SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", (p.table,)
            ).fetchone()
            if kind is None or kind[0] != "p":
                raise PolicyError(f"policy {p.name}: table {p.table!r} is not partitioned")
            continue
        for label, col in (("age_column", p.age_column), ("key_column", p.key_column)):
            if col not in cols:
                raise PolicyError(
                    f"policy {p.name}: {label} {col!r} does not exist in table {p.table!r}"
                )
        if cols[p.age_column] not in _TIME_TYPES:
            raise PolicyError(
                f"policy {p.name}: age_column {p.age_column!r} is {cols[p.age_column]}, "
                "not a timestamp"
            )
        if p.filter:
            import psycopg

            try:
                with conn.transaction():
                    conn.execute(f"EXPLAIN SELECT 1 FROM {p.table} WHERE {p.filter}")
            except psycopg.Error as exc:
                raise PolicyError(
                    f"policy {p.name}: filter {p.filter!r} is not valid here: "
                    f"{str(exc).strip().splitlines()[0]}"
                ) from None
