"""The apps' Redis cache keys, declared once: which table's rows feed which keys.

The apps cache read-through (cache-aside, e.g. ``SETEX moment:{id} 300 …``); tidemill removes
the keys a committed change makes stale. Triggers on each cached table write the rows' key
columns into the outbox (see migration 0004); ``workers.cache.invalidate`` turns them into keys
with this map and deletes them. The TTL stays the backstop: a reader that fetched the old row
before the commit and writes the cache after the delete leaves a stale value for at most ttl_s.

Tables of the other seed apps (Pomi's ``events`` / ``event_rsvps``, Bilten's ``events``,
Perfect Match's ``matches``) are declared too: an app that has them installs the same triggers
with ``trigger_ddl(table)``.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from core.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class CachedTable:
    table: str
    keys: tuple[str, ...]  # str.format templates over the row's columns
    ttl_s: int  # the TTL the apps set: the most a missed invalidation can leave stale data
    app: str

    @property
    def columns(self) -> tuple[str, ...]:
        """The row columns the key templates use, in first-use order (the trigger's args)."""
        seen: dict[str, None] = {}
        for template in self.keys:
            for _, name, _, _ in string.Formatter().parse(template):
                if name:
                    seen.setdefault(name, None)
        return tuple(seen)


CACHE_MAP: dict[str, CachedTable] = {
    t.table: t
    for t in (
        # Lovendo: getMoment() caches moment:{id} for 5 minutes.
        CachedTable("moments", ("moment:{id}",), ttl_s=300, app="lovendo"),
        # Pomi: a profile under three lookups; a changed e-mail or username drops the old key
        # too, because the trigger sends old and new rows.
        CachedTable(
            "users",
            ("user:{id}", "user:email:{email}", "user:username:{username}"),
            ttl_s=3600,
            app="pomi",
        ),
        # Pomi events (+ the upcoming list) and Bilten's per-event metrics (300 s).
        CachedTable(
            "events", ("event:{id}", "events:upcoming", "event:{id}:metrics"), ttl_s=300, app="pomi"
        ),
        CachedTable("event_rsvps", ("event:rsvps:{event_id}",), ttl_s=300, app="pomi"),
        # Perfect Match: a match preview and both users' recent-match lists.
        CachedTable(
            "matches",
            ("match:{match_id}", "matches:recent:{user_id_1}", "matches:recent:{user_id_2}"),
            ttl_s=3600,
            app="perfect_match",
        ),
    )
}


# issue 14: each app's own map (the profile in apps/<name>/ names its entry). A table name
# means a different thing in each app (Bilten's and Pomi's `events`), so the cache actor looks
# keys up in the served app's map first, then in CACHE_MAP above (workers/cache.py).
APP_CACHE: dict[str, tuple[CachedTable, ...]] = {
    # the tables migration 0004 installed triggers on
    "lovendo": (CACHE_MAP["moments"], CACHE_MAP["users"]),
    # Bilten: getEventMetrics() caches event:{id}:metrics for 300 s; the event itself under
    # event:{id} ("Frequently accessed events").
    "bilten": (
        CachedTable("events", ("event:{id}", "event:{id}:metrics"), ttl_s=300, app="bilten"),
    ),
    # Perfect Match: "match:{matchId}" and "matches:recent:{userId}" (seed 002, Redis).
    "perfect_match": (
        CachedTable(
            "matches",
            ("match:{match_id}", "matches:recent:{user_id_1}", "matches:recent:{user_id_2}"),
            ttl_s=3600,
            app="perfect_match",
        ),
    ),
    # SaltBitter's seed names no cache keys.
    "saltbitter": (),
    # Pomi: the key map of seed 004 ("Redis Cache Keys").
    "pomi": (
        CachedTable(
            "users",
            ("user:{id}", "user:email:{email}", "user:username:{username}"),
            ttl_s=3600,
            app="pomi",
        ),
        CachedTable("events", ("event:{id}", "events:upcoming"), ttl_s=300, app="pomi"),
        CachedTable("event_rsvps", ("event:rsvps:{event_id}",), ttl_s=300, app="pomi"),
    ),
}


# Every key the apps (through this map) or tidemill derive from one user, as templates over the
# user's columns with glob wildcards: GDPR erase removes them all
# (pipelines.lifecycle.gdpr.redis_patterns; apps add theirs with TIDEMILL_GDPR_REDIS_PATTERNS).
USER_KEY_PATTERNS: tuple[str, ...] = (
    *CACHE_MAP["users"].keys,
    "matches:recent:{id}",  # Perfect Match: the user's recent-match list
    "session:{id}:*",  # the apps' per-device sessions
)


class UnknownCachedTable(LookupError):
    """A change names a table the map does not know (a trigger installed without a map entry)."""


def keys_for(
    table: str,
    rows: Iterable[Mapping[str, Any]],
    cache_map: Mapping[str, CachedTable] | None = None,
) -> set[str]:
    """Every key the given rows (old and new versions) of `table` feed, by `cache_map` (an
    app's map; default: Lovendo's ``CACHE_MAP``).

    A template whose column is NULL in a row yields no key for that row (a user without a
    username has no ``user:username:`` key).
    """
    entry = (CACHE_MAP if cache_map is None else cache_map).get(table)
    if entry is None:
        raise UnknownCachedTable(f"no cache keys declared for table {table!r}")
    keys: set[str] = set()
    for row in rows:
        for template in entry.keys:
            try:
                values = {c: row[c] for c in _columns(template)}
            except KeyError as exc:
                log.warning("cache_row_missing_column", table=table, column=str(exc))
                continue
            if any(v is None or v == "" for v in values.values()):
                continue
            keys.add(template.format(**values))
    return keys


def _columns(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def trigger_ddl(table: str, entry: CachedTable | None = None) -> str:
    """The three statement-level triggers that feed `table`'s changes to the outbox (the
    function ``tidemill.tidemill_cache_outbox`` comes with migration 0004, moved by 0014, or
    with `tidemill app attach`). Transition tables need
    single-event triggers, hence one per event."""
    entry = entry or CACHE_MAP[table]
    args = ", ".join("'" + c.replace("'", "''") + "'" for c in entry.columns)
    ident = '"' + table.replace('"', '""') + '"'
    return f"""
CREATE TRIGGER {table}_cache_insert AFTER INSERT ON {ident}
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION tidemill.tidemill_cache_outbox({args});
CREATE TRIGGER {table}_cache_update AFTER UPDATE ON {ident}
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION tidemill.tidemill_cache_outbox({args});
CREATE TRIGGER {table}_cache_delete AFTER DELETE ON {ident}
REFERENCING OLD TABLE AS old_rows
FOR EACH STATEMENT EXECUTE FUNCTION tidemill.tidemill_cache_outbox({args});
"""


# Key builders for the apps' read path (and tests), so writer and invalidator agree.
def moment_key(moment_id: object) -> str:
    return f"moment:{moment_id}"


def user_key(user_id: object) -> str:
    return f"user:{user_id}"


def user_email_key(email: str) -> str:
    return f"user:email:{email}"


def user_username_key(username: str) -> str:
    return f"user:username:{username}"


def event_key(event_id: object) -> str:
    return f"event:{event_id}"


def event_metrics_key(event_id: object) -> str:
    return f"event:{event_id}:metrics"


def event_rsvps_key(event_id: object) -> str:
    return f"event:rsvps:{event_id}"


UPCOMING_EVENTS_KEY = "events:upcoming"


def match_key(match_id: object) -> str:
    return f"match:{match_id}"


def recent_matches_key(user_id: object) -> str:
    return f"matches:recent:{user_id}"
