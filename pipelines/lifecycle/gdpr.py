"""GDPR: erase a user soft-deleted longer than the grace period; export a user's data.

Erase finds everything that points at the user through the foreign-key catalog
(``pg_constraint``), not a hand-kept list, so a table added later is covered. The plan walks the
graph from ``users`` and orders the steps children first:

- a row that ``CASCADE``s (or restricts) is deleted explicitly, after its own children;
- a ``SET NULL`` reference is detached, and when it pointed straight at the user the row's other
  nullable text/json/inet columns are cleared too (``transactions`` stay 7 years for the legal
  hold, but with nothing that says whose they were);
- ``messages`` stay for the other participants' conversation context, anonymized as Lovendo's
  ``delete_user_data`` does (content ``[Message deleted]``) and re-attributed to a fixed
  "Deleted User" tombstone row, since ``sender_id`` cannot be NULL.

Places that mention the user without a foreign key (outbox payloads, Stripe webhook payloads,
audit entries, notifications about the user, conversation participant lists) are listed in
``MENTIONS``. The user's Redis keys are removed after the commit. The compliance trail
(``data_deletion_requested`` / ``data_deletion_completed``) and the audit entry name the
erasure by a random reference, never by the user's id, e-mail or name.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import sql

from core.log import get_logger
from core.settings import Settings, get_settings
from db.schema import SCHEMA as TIDEMILL_SCHEMA
from pipelines.lifecycle import archive
from pipelines.lifecycle.context import RunContext, connect
from pipelines.lifecycle.scrub import (
    KEEP_ANONYMIZED,
    KEEP_COLUMNS,
    MENTIONS,
    MESSAGE_DELETED,
    SUBJECT_HASH_SQL,
    TOMBSTONE_EMAIL,
    TOMBSTONE_ID,
    ForeignKey,
    ensure_tombstone,
    erase_params,
    foreign_keys,
    identifiers,
    scrub_columns,
    scrub_webhook_payloads,
    subject_hash,
)

__all__ = [
    "MESSAGE_DELETED",
    "TOMBSTONE_EMAIL",
    "TOMBSTONE_ID",
    "ErasePlan",
    "GdprError",
    "NotEligible",
    "UserNotFound",
    "erase",
    "export",
    "foreign_keys",
    "plan_erase",
    "reapply_erasures",
    "request_erasure",
]

log = get_logger(__name__)


class GdprError(Exception):
    """Root of GDPR errors."""


class UserNotFound(GdprError, LookupError):
    pass


class NotEligible(GdprError):
    """The user is not soft-deleted, or still inside the grace period: nothing erased."""


ARCHIVE_RACE_ATTEMPTS = 3


class _ArchivedMeanwhile(Exception):
    def __init__(self, objects: int) -> None:
        super().__init__(f"{objects} archived object(s) hold the user's rows")
        self.objects = objects


@dataclass(frozen=True)
class Step:
    table: str
    action: str  # delete | detach | anonymize
    via: str  # human-readable path, e.g. "moments.user_id -> requests.moment_id"
    statement: sql.Composed | sql.SQL = field(compare=False)


def _cols(cols: Sequence[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(c) for c in cols)


def plan_erase(fks: Sequence[ForeignKey], scrub_columns: dict[str, list[str]]) -> list[Step]:
    """Steps that remove the user ``%(uid)s`` in foreign-key order (no I/O).

    ``scrub_columns``: per table, the nullable text/json/inet columns to clear on rows that
    pointed straight at the user and are kept.
    """
    by_parent: dict[str, list[ForeignKey]] = {}
    for fk in fks:
        by_parent.setdefault(fk.parent, []).append(fk)
    steps: list[Step] = []

    def visit(table: str, where: sql.Composable, path: tuple[str, ...], depth: int) -> None:
        for fk in by_parent.get(table, []):
            if fk.child in path:  # self- or cyclic reference: the walk stops here
                continue
            child_t = sql.Identifier("public", fk.child)
            pred = sql.SQL("({cc}) IN (SELECT {pc} FROM {pt} WHERE {w})").format(
                cc=_cols(fk.child_cols),
                pc=_cols(fk.parent_cols),
                pt=sql.Identifier("public", table),
                w=where,
            )
            via = " -> ".join([*path, f"{fk.child}.{','.join(fk.child_cols)}"])
            if (fk.child, fk.child_cols[0]) in KEEP_ANONYMIZED and depth == 0:
                stmt = sql.SQL(
                    "UPDATE {t} SET {fk} = %(tombstone)s, content = %(deleted)s, "
                    "metadata = NULL WHERE {p}"
                ).format(t=child_t, fk=sql.Identifier(fk.child_cols[0]), p=pred)
                steps.append(Step(fk.child, "anonymize", via, stmt))
            elif fk.on_delete in ("n", "d"):
                sets = [sql.SQL("{} = NULL").format(sql.Identifier(c)) for c in fk.child_cols]
                if depth == 0:
                    keep = KEEP_COLUMNS.get(fk.child, set()) | set(fk.child_cols)
                    sets += [
                        sql.SQL("{} = NULL").format(sql.Identifier(c))
                        for c in scrub_columns.get(fk.child, [])
                        if c not in keep
                    ]
                stmt = sql.SQL("UPDATE {t} SET {s} WHERE {p}").format(
                    t=child_t, s=sql.SQL(", ").join(sets), p=pred
                )
                steps.append(Step(fk.child, "detach", via, stmt))
            else:
                visit(fk.child, pred, (*path, fk.child), depth + 1)
                steps.append(
                    Step(
                        fk.child,
                        "delete",
                        via,
                        sql.SQL("DELETE FROM {t} WHERE {p}").format(t=child_t, p=pred),
                    )
                )

    root = sql.SQL("id = %(uid)s")
    visit("users", root, ("users",), 0)
    steps.append(
        Step("users", "delete", "users", sql.SQL("DELETE FROM public.users WHERE id = %(uid)s"))
    )
    return steps


@dataclass
class EraseResult:
    reference: str
    erased: bool
    counts: dict[str, int]
    redis_keys: int = 0
    broker_messages: int = 0  # queued / dead-lettered dramatiq messages about the user
    steps: list[str] = field(default_factory=list)
    exports_deleted: int = 0
    archives_rewritten: int = 0


@dataclass(frozen=True)
class ErasePlan:
    """Everything an erase will touch, found without changing anything (the dry run prints
    it; ``erase`` carries it out)."""

    user_id: uuid.UUID
    steps: list[Step]
    exports: list[str]  # export object keys
    archive_objects: list[str]  # archived objects to rewrite
    redis_patterns: list[str]

    def lines(self) -> list[str]:
        out = [f"{s.action} {s.via}" for s in self.steps]
        out += [f"scrub {t} mentions" for t in MENTIONS]
        out.append("scrub personal fields of Stripe payloads in webhook_events")
        out += [f"delete export {k}" for k in self.exports]
        out += [f"rewrite archive {k} without the user's rows" for k in self.archive_objects]
        out += [f"remove Redis keys {p}" for p in self.redis_patterns]
        out.append("record the erasure (ids only) in erasures and gdpr/erasures/ in storage")
        return out


def _load_user(conn: Any, user_id: uuid.UUID, *, lock: bool) -> dict[str, Any] | None:
    cur = conn.execute(
        "SELECT * FROM users WHERE id = %s" + (" FOR UPDATE" if lock else ""), (user_id,)
    )
    row = cur.fetchone()
    if row is None:
        return None
    return dict(zip([c.name for c in cur.description], row, strict=True))


def parse_user_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(text))
    except ValueError:
        log.warning("gdpr_bad_user_id", length=len(str(text)))
        raise UserNotFound(f"{text!r} is not a user id (a UUID)") from None


@dataclass(frozen=True)
class RequestPlan:
    user_id: uuid.UUID
    already_deleted_at: datetime | None
    erasable_at: datetime

    def lines(self) -> list[str]:
        first = (
            f"keep the soft-delete of {self.already_deleted_at.isoformat()}"
            if self.already_deleted_at
            else "soft-delete the user now (users.deleted_at)"
        )
        return [
            first,
            "log data_deletion_requested in compliance_logs",
            f"the user becomes erasable at {self.erasable_at.isoformat()}",
        ]


def request_erasure(
    user_id: uuid.UUID | str,
    *,
    settings: Settings | None = None,
    now: datetime | None = None,
    by: str = "system",
    dry_run: bool = False,
) -> RequestPlan:
    """Soft-delete the user now (the grace period starts) and log data_deletion_requested.
    Returns the plan (``erasable_at``: when the user becomes erasable)."""
    settings = settings or get_settings()
    uid = parse_user_id(str(user_id))
    now = now or datetime.now(UTC)
    with connect(settings, read_only=dry_run) as conn, conn.transaction():
        user = _load_user(conn, uid, lock=not dry_run)
        if user is None or uid == TOMBSTONE_ID:
            raise UserNotFound(f"no user {uid}")
        deleted_at = user["deleted_at"] or now
        plan = RequestPlan(
            uid, user["deleted_at"], deleted_at + timedelta(days=settings.gdpr_grace_days)
        )
        if dry_run:
            return plan
        conn.execute("UPDATE users SET deleted_at = %s WHERE id = %s", (deleted_at, uid))
        _compliance(
            conn,
            "data_deletion_requested",
            uid,
            f"erasure:{uuid.uuid4()}",
            {"grace_days": settings.gdpr_grace_days, "by": by},
        )
    log.info("gdpr_erasure_requested", grace_days=settings.gdpr_grace_days)
    return plan


def _compliance(
    conn: Any, action: str, uid: uuid.UUID | None, ref: str, meta: dict[str, Any]
) -> None:
    conn.execute(
        "INSERT INTO compliance_logs (user_id, subject_ref, action_type, metadata) "
        "VALUES (%s, %s, %s, %s)",
        (uid, ref, action, json.dumps(meta)),
    )


def subjects_of(user: dict[str, Any]) -> list[str]:
    """What the archive_subjects index names the user by."""
    out = [str(user["id"])]
    if user.get("stripe_customer_id"):
        out.append(str(user["stripe_customer_id"]))
    return out


def plan_user_erase(conn: Any, user: dict[str, Any], settings: Settings) -> ErasePlan:
    """Read-only: what erasing ``user`` will touch."""
    from core.storage import open_storage

    steps = plan_erase(foreign_keys(conn), scrub_columns(conn))
    exports = [
        r[0]
        for r in conn.execute(
            "SELECT key FROM gdpr_exports WHERE user_id = %s ORDER BY created_at", (user["id"],)
        ).fetchall()
    ]
    objects = [
        r[1]
        for r in archive.objects_holding(
            conn, open_storage(settings=settings).url, subjects_of(user)
        )
    ]
    return ErasePlan(user["id"], steps, exports, objects, redis_patterns(user, settings))


def erase(
    user_id: uuid.UUID | str,
    *,
    settings: Settings | None = None,
    now: datetime | None = None,
    by: str = "system",
    dry_run: bool = False,
) -> EraseResult:
    """Hard-delete a user soft-deleted at least the grace period ago: their exports and their
    rows in archived objects first, then the database (FK order, one transaction) with an
    ``erasures`` record, then their Redis keys. Raises UserNotFound / NotEligible.

    ``dry_run``: the plan only, read on a READ ONLY session."""
    from core.storage import open_storage

    settings = settings or get_settings()
    uid = parse_user_id(str(user_id))
    now = now or datetime.now(UTC)
    grace = timedelta(days=settings.gdpr_grace_days)
    reference = f"erasure:{uuid.uuid4()}"
    with connect(settings, read_only=dry_run) as conn:
        user = _load_user(conn, uid, lock=False)
        if user is None or uid == TOMBSTONE_ID:
            log.warning("gdpr_erase_unknown_user")
            raise UserNotFound(f"no user {uid}")
        _check_eligible(user, now, grace)
        plan = plan_user_erase(conn, user, settings)
        result = EraseResult(reference, False, {}, steps=plan.lines())
        if dry_run:
            return result
        storage = open_storage(settings=settings)
        # The request is on record even if the erase below fails and is retried.
        with conn.transaction():
            _compliance(
                conn,
                "data_deletion_requested",
                uid,
                reference,
                {"grace_days": settings.gdpr_grace_days, "by": by},
            )
        # Storage before the rows that find it: if this fails, the erase fails whole and is
        # retried; the user is still there to be found (and still soft-deleted, so unseen).
        archive.sweep_superseded(conn, storage)
        for key in plan.exports:
            storage.delete(key)
        result.exports_deleted = len(plan.exports)
        # An archive batch or month that read the user's rows before the transaction below
        # could change them, and committed after the rewrite, holds them in an object the
        # rewrite did not see. The transaction's own updates wait for such an archive (row or
        # month locks), so a check after them sees its objects: then roll back and rewrite.
        for attempt in range(1, ARCHIVE_RACE_ATTEMPTS + 1):
            try:
                rewritten = archive.rewrite_for_erasure(
                    conn,
                    storage,
                    user,
                    subjects=subjects_of(user),
                    settings=settings,
                    tag=reference.rsplit(":", 1)[-1][:8],
                )
                result.archives_rewritten += len(rewritten)
                with conn.transaction():
                    conn.execute(
                        sql.SQL("SET LOCAL lock_timeout = {}").format(
                            sql.Literal(settings.pipeline_lock_timeout_ms)
                        )
                    )
                    locked = _load_user(conn, uid, lock=True)  # re-check under the row lock
                    if locked is None:
                        raise UserNotFound(f"no user {uid}")
                    user = locked
                    _check_eligible(user, now, grace)  # restored meanwhile? then untouched
                    counts = erase_in_database(conn, user, plan.steps, archived_meanwhile=True)
                    counts["gdpr_exports:delete"] = conn.execute(
                        "DELETE FROM gdpr_exports WHERE user_id = %s", (uid,)
                    ).rowcount
                    # Redis first, while the transaction can still roll back: if Redis is
                    # down the erase fails whole and is retried, rather than leaving cached
                    # personal data of a user nobody can find any more. Once more after the
                    # commit, in case an app re-cached the profile in between.
                    result.redis_keys = _drop_redis_keys(user, settings)
                    result.broker_messages = _drop_dramatiq_messages(user, settings)
                    counts["archives:rewritten"] = result.archives_rewritten
                    counts["exports:deleted"] = len(plan.exports)
                    _compliance(
                        conn, "data_deletion_completed", None, reference, {"counts": counts}
                    )
                    conn.execute(
                        "INSERT INTO audit_logs (action, entity_type, entity_id, actor, details) "
                        "VALUES ('gdpr_erase', 'user_erasure', %s, %s, %s)",
                        (reference, by, json.dumps({"counts": counts})),
                    )
                    recorded = conn.execute(
                        "INSERT INTO erasures (reference, subject_hash, erased_by) "
                        "VALUES (%s, %s, %s) RETURNING erased_at",
                        (reference, subject_hash(uid), by),
                    ).fetchone()
                    erased_at = recorded[0] if recorded else now
                break
            except _ArchivedMeanwhile as late:
                log.warning("gdpr_erase_archived_meanwhile", objects=late.objects, attempt=attempt)
                if attempt == ARCHIVE_RACE_ATTEMPTS:
                    raise GdprError(
                        "an archive run kept storing the user's rows during the erase; "
                        "nothing was erased, try again"
                    ) from None
        result.counts = counts
        result.erased = True
    result.redis_keys += _drop_redis_keys(user, settings)
    # and a message enqueued about the user meanwhile (e.g. relayed from the outbox just
    # before the commit removed its row) goes too.
    result.broker_messages += _drop_dramatiq_messages(user, settings)
    _write_ledger(storage, reference, uid, erased_at, by)
    log.info(
        "gdpr_user_erased",
        reference=reference,
        rows=sum(counts.values()),
        redis_keys=result.redis_keys,
        broker_messages=result.broker_messages,
        exports=result.exports_deleted,
        archives=result.archives_rewritten,
    )
    return result


def erase_in_database(
    conn: Any, user: dict[str, Any], steps: list[Step], *, archived_meanwhile: bool = False
) -> dict[str, int]:
    """The database part of an erase, inside the caller's transaction: the plan's steps in FK
    order, then the mentions outside foreign keys and the Stripe payloads.

    ``archived_meanwhile``: the caller rewrote every archived object holding the user just
    before; an index entry still naming the user now is an object archived since (its rows
    read before these updates, which waited for its commit): raise _ArchivedMeanwhile rather
    than drop that entry, so the caller rewrites it too."""
    uid = user["id"]
    ensure_tombstone(conn)
    conn.execute("UPDATE users SET push_token = NULL WHERE id = %s", (uid,))
    needles = identifiers(user)
    params = erase_params(user)
    counts: dict[str, int] = {}
    for step in steps:
        n = conn.execute(step.statement, params).rowcount
        label = f"{step.table}:{step.action}"
        counts[label] = counts.get(label, 0) + max(n, 0)
    # table -> schema: the app's tables (public) and tidemill's own (db/schema.py), where
    # jobs, webhook payloads and other mentions of the user live.
    existing = dict(
        conn.execute(
            "SELECT tablename, schemaname FROM pg_tables WHERE schemaname = ANY(%s) "
            "ORDER BY schemaname = 'public'",
            (["public", TIDEMILL_SCHEMA],),
        ).fetchall()
    )
    for table, statement in MENTIONS.items():
        if table in existing:
            stmt = sql.SQL(statement).format(t=sql.Identifier(existing[table], table))
            n = conn.execute(stmt, params).rowcount
            counts[f"{table}:mentions"] = counts.get(f"{table}:mentions", 0) + max(n, 0)
    if "webhook_events" in existing:
        counts["webhook_events:scrubbed"] = scrub_webhook_payloads(
            conn, sql.Identifier(existing["webhook_events"], "webhook_events"), needles
        )
    subjects = subjects_of(user)
    if "archive_subjects" in existing:
        if archived_meanwhile:
            late = conn.execute(
                sql.SQL("SELECT count(DISTINCT object_id) FROM {} WHERE subject = ANY(%s)").format(
                    sql.Identifier(existing["archive_subjects"], "archive_subjects")
                ),
                (subjects,),
            ).fetchone()
            if late and late[0]:
                raise _ArchivedMeanwhile(int(late[0]))
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE subject = ANY(%s)").format(
                sql.Identifier(existing["archive_subjects"], "archive_subjects")
            ),
            (subjects,),
        )
    return counts


LEDGER_PREFIX = "gdpr/erasures/"


def _write_ledger(
    storage: Any, reference: str, uid: uuid.UUID, erased_at: datetime, by: str
) -> None:
    """The erasure in storage too (ids only): a restore when the database itself is lost
    still knows whom to erase again. Best effort after the commit: the ``erasures`` table has
    it; ``reapply_erasures`` reads both."""
    stamp = erased_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    key = f"{LEDGER_PREFIX}{stamp}-{reference.split(':')[-1]}.json"
    doc = {
        "kind": "tidemill.erasure",
        "reference": reference,
        "subject_hash": subject_hash(uid),
        "erased_at": erased_at.isoformat(),
        "by": by,
    }
    try:
        storage.put_bytes(key, json.dumps(doc).encode())
    except Exception as exc:  # the database record stands; the ledger copy is a backstop
        log.error("gdpr_erasure_ledger_failed", reference=reference, error=type(exc).__name__)


def _check_eligible(user: dict[str, Any], now: datetime, grace: timedelta) -> None:
    deleted_at = user["deleted_at"]
    if deleted_at is None:
        log.info("gdpr_erase_not_deleted")
        raise NotEligible("the user is not soft-deleted (deleted_at is NULL): nothing erased")
    if deleted_at > now - grace:
        log.info("gdpr_erase_in_grace", erasable_at=(deleted_at + grace).isoformat())
        raise NotEligible(
            f"the user was soft-deleted at {deleted_at.isoformat()}, inside the "
            f"{grace.days}-day grace period (erasable from {(deleted_at + grace).isoformat()})"
        )


def redis_patterns(user: dict[str, Any], settings: Settings) -> list[str]:
    """Redis key patterns (glob) that name the user: the declared cache map
    (db.cache_keys.USER_KEY_PATTERNS) and the apps' extra TIDEMILL_GDPR_REDIS_PATTERNS, filled
    in with the user's columns (a template whose column is empty yields nothing), plus any key
    holding the user's id."""
    from db.cache_keys import USER_KEY_PATTERNS

    extra = [p.strip() for p in (settings.gdpr_redis_patterns or "").split(",") if p.strip()]
    out: list[str] = []
    for template in (*USER_KEY_PATTERNS, *extra):
        try:
            values = {c: user.get(c) for c in _template_columns(template)}
        except ValueError:
            log.warning("gdpr_bad_redis_pattern", pattern=template[:60])
            continue
        if any(v is None or v == "" for v in values.values()):
            continue
        out.append(template.format(**{k: _glob_escape(str(v)) for k, v in values.items()}))
    out.append(f"*{user['id']}*")
    return sorted(set(out))


def _template_columns(template: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _glob_escape(value: str) -> str:
    # A user's e-mail or name could hold glob characters: matched literally, never as a glob.
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in value)


# tidemill's own Redis namespace, whose values may carry a user (dashboard selections of dead
# letters, per-day dead-letter error texts, workers/stats.py): entries that mention the user
# are removed. dramatiq's own keys are handled message by message (_drop_dramatiq_messages).
OWN_NAMESPACES = ("tidemill:*",)


def _drop_redis_keys(user: dict[str, Any], settings: Settings) -> int:
    from db.redis import get_redis

    client = get_redis(settings)
    keys: set[str] = set()
    # SCAN walks the key space in small steps, so a large Redis is not blocked.
    for pattern in redis_patterns(user, settings):
        for key in client.scan_iter(match=pattern, count=1000):
            keys.add(key.decode() if isinstance(key, bytes) else key)
    removed = int(client.unlink(*sorted(keys))) if keys else 0
    return removed + _scrub_own_keys(client, identifiers(user))


def _scrub_own_keys(client: Any, needles: list[str]) -> int:
    """Entries of tidemill's own keys whose text mentions the user: hash fields, list items,
    set members go; a string key that mentions them goes whole."""
    low = [n.lower() for n in needles]

    def hit(value: Any) -> bool:
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        return any(n in text.lower() for n in low)

    removed = 0
    for pattern in OWN_NAMESPACES:
        for raw in client.scan_iter(match=pattern, count=1000):
            key = raw.decode() if isinstance(raw, bytes) else raw
            kind = client.type(key)
            kind = kind.decode() if isinstance(kind, bytes) else kind
            if kind == "string":
                if hit(client.get(key) or b""):
                    removed += int(client.unlink(key))
            elif kind == "hash":
                fields = [f for f, v in client.hscan_iter(key, count=500) if hit(f) or hit(v)]
                if fields:
                    removed += int(client.hdel(key, *fields))
            elif kind == "list":
                for item in {i for i in client.lrange(key, 0, -1) if hit(i)}:
                    removed += int(client.lrem(key, 0, item))
            elif kind == "set":
                members = [m for m in client.sscan_iter(key, count=500) if hit(m)]
                if members:
                    removed += int(client.srem(key, *members))
            elif kind == "zset":
                members = [m for m, _ in client.zscan_iter(key, count=500) if hit(m)]
                if members:
                    removed += int(client.zrem(key, *members))
    return removed


# dramatiq's Redis broker keeps, per queue Q (and its delay queue Q.DQ): the list ``ns:Q`` of
# waiting message ids, the hash ``ns:Q.msgs`` id -> encoded message, and for dead letters the
# sorted set ``ns:Q.XQ`` with the hash ``ns:Q.XQ.msgs``. tidemill's broker (workers/broker.py)
# uses dramatiq's default namespace.
DRAMATIQ_NAMESPACE = "dramatiq"
# Atomic against dramatiq's own dispatch script: drop the message's data, then its id from
# the queue (list) or the dead letters (sorted set). A message a worker already fetched keeps
# running (its data is in the worker's memory); with its data gone, a nack does not
# dead-letter it and a requeue does not put it back, since dramatiq checks the hash first.
_DROP_MESSAGE = """
if redis.call('hdel', KEYS[1], ARGV[1]) == 0 then return 0 end
local kind = redis.call('type', KEYS[2])['ok']
if kind == 'list' then redis.call('lrem', KEYS[2], 0, ARGV[1])
elseif kind == 'zset' then redis.call('zrem', KEYS[2], ARGV[1]) end
return 1
"""


def _names_user(message: dict[str, Any], needles: set[str]) -> bool:
    """Whether one of the message's own arguments is the user's id or e-mail.

    Only top-level arguments count: a message about this user (a welcome e-mail, an export, an
    erase, a push to them). A message that carries the user among others, nested in a list or
    a mapping (a merged cache invalidation, a batch of push receipts), is kept: dropping it
    would skip the others' work, and it holds ids or cache keys only until processed.
    """
    values = [*(message.get("args") or ()), *(message.get("kwargs") or {}).values()]
    return any(isinstance(v, str) and v.strip().lower() in needles for v in values)


def _drop_dramatiq_messages(user: dict[str, Any], settings: Settings) -> int:
    """Queued, delayed and dead-lettered dramatiq messages about the erased user: they would
    only fail (the user is gone) or replay its personal data, so they are removed."""
    from urllib.parse import urlsplit

    import redis

    url = settings.effective_broker_url
    if urlsplit(url).scheme not in {"redis", "rediss", "unix"}:
        log.info("gdpr_broker_not_redis", detail="queued messages are left to the broker")
        return 0
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
    needles = {str(user["id"]).lower()}
    if user.get("email"):
        needles.add(str(user["email"]).strip().lower())
    try:
        return _drop_matching(client, needles)
    finally:
        client.close()


def _drop_matching(client: Any, needles: set[str]) -> int:
    drop = client.register_script(_DROP_MESSAGE)
    removed = 0
    for raw in client.scan_iter(match=f"{DRAMATIQ_NAMESPACE}:*.msgs", count=1000):
        hash_key = raw.decode() if isinstance(raw, bytes) else raw
        if client.type(hash_key) not in (b"hash", "hash"):
            continue
        queue_key = hash_key[: -len(".msgs")]
        for message_id, data in client.hscan_iter(hash_key, count=500):
            try:
                message = json.loads(data)
            except ValueError:
                continue
            if isinstance(message, dict) and _names_user(message, needles):
                removed += int(drop(keys=[hash_key, queue_key], args=[message_id]))
                log.info(
                    "gdpr_message_dropped",
                    queue=queue_key.split(":", 1)[-1],
                    actor=message.get("actor_name"),
                )
    return removed


# ---------------------------------------------------------------------------- the policy


def run_erase_policy(ctx: RunContext) -> list[str]:
    """erase-users: every user soft-deleted before the cutoff, one transaction each."""
    policy = ctx.policy
    rows = ctx.work.execute(
        sql.SQL(
            "SELECT id FROM users WHERE deleted_at IS NOT NULL AND deleted_at < %s AND id <> %s"
            "{f} ORDER BY deleted_at, id"
        ).format(
            f=sql.SQL(" AND (" + policy.filter.replace("%", "%%") + ")")
            if policy.filter
            else sql.SQL("")
        ),
        (ctx.cutoff, TOMBSTONE_ID),
    ).fetchall()
    ctx.expected = len(rows)
    plan = [f"erase {len(rows)} users soft-deleted before {ctx.cutoff.isoformat()}"]
    if ctx.dry_run:
        return plan
    for (uid,) in rows:
        try:
            res = erase(
                uid, settings=ctx.settings, now=ctx.now, by=ctx.by or f"pipeline:{policy.name}"
            )
        except (NotEligible, UserNotFound):  # restored or re-dated since we listed it
            ctx.advance(scanned=1, affected=0)
            continue
        ctx.advance(scanned=1, affected=1 if res.erased else 0)
    return plan


# ------------------------------------------------------------------ restores re-apply erasures


def erasure_records(
    *, settings: Settings | None = None, storage: Any = None, database_url: str | None = None
) -> dict[str, tuple[str, datetime]]:
    """reference -> (subject_hash, erased_at) of every recorded erasure: the storage ledger
    (``gdpr/erasures/``, survives the database) and the ``erasures`` table of the live
    database (``database_url``, default the configured one), when reachable."""
    import psycopg

    from core.storage import open_storage
    from db.engine import libpq_url

    settings = settings or get_settings()
    out: dict[str, tuple[str, datetime]] = {}
    storage = storage or open_storage(settings=settings)
    for info in storage.list(LEDGER_PREFIX):
        try:
            doc = json.loads(storage.get_bytes(info.key))
            out[str(doc["reference"])] = (
                str(doc["subject_hash"]),
                datetime.fromisoformat(str(doc["erased_at"])),
            )
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("gdpr_ledger_unreadable", key=info.key, error=type(exc).__name__)
    url = database_url or settings.database_url
    if url:
        try:
            with psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=5) as conn:
                for ref, digest, at in conn.execute(
                    "SELECT reference, subject_hash, erased_at FROM erasures"
                ).fetchall():
                    out.setdefault(ref, (digest, at))
        except psycopg.Error as exc:  # the live database may be what was lost
            log.warning("gdpr_erasures_table_unreadable", error=type(exc).__name__)
    return out


def reapply_erasures(
    database_url: str,
    *,
    since: datetime | None,
    settings: Settings | None = None,
    storage: Any = None,
    source_database_url: str | None = None,
) -> int:
    """Erase again, in the restored database at ``database_url``, every user whose erasure
    was recorded after ``since`` (the backup's time; None: every recorded erasure). Call it
    before the restored database is handed over. Database only: Redis, exports and archives
    were cleaned when the erasure happened. Returns how many users were erased again."""
    import psycopg

    from db.engine import libpq_url

    settings = settings or get_settings()
    records = erasure_records(settings=settings, storage=storage, database_url=source_database_url)
    wanted = {
        digest: ref
        for ref, (digest, at) in records.items()
        if since is None or at >= since - timedelta(minutes=5)  # clock skew: erase again, harmless
    }
    if not wanted:
        return 0
    erased = 0
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, subject FROM (SELECT id, "
            + SUBJECT_HASH_SQL.format("id")
            + " AS subject FROM users) u WHERE subject = ANY(%s)",
            (list(wanted),),
        ).fetchall()
        steps = plan_erase(foreign_keys(conn), scrub_columns(conn)) if rows else []
        for uid, digest in rows:
            with conn.transaction():
                user = _load_user(conn, uid, lock=True)
                if user is None:
                    continue
                erase_in_database(conn, user, steps)
                if _has_table(conn, "gdpr_exports"):
                    conn.execute("DELETE FROM gdpr_exports WHERE user_id = %s", (uid,))
                if _has_table(conn, "erasures"):
                    conn.execute(
                        "INSERT INTO erasures (reference, subject_hash, erased_by) "
                        "VALUES (%s, %s, 'restore') ON CONFLICT (reference) DO NOTHING",
                        (wanted[digest], digest),
                    )
            erased += 1
    log.info("gdpr_erasures_reapplied", users=erased, recorded=len(wanted))
    return erased


def _has_table(conn: Any, name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s)", (f"public.{name}",)).fetchone()
    return bool(row and row[0])


# ---------------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportResult:
    export_id: str
    key: str
    size: int
    sha256: str
    expires_at: datetime | None = None


_EXPORT = """
SELECT jsonb_build_object(
  'user', (SELECT to_jsonb(u) FROM users u WHERE id = %(uid)s),
  'moments', (SELECT jsonb_agg(to_jsonb(m)) FROM moments m WHERE user_id = %(uid)s),
  'messages', (SELECT jsonb_agg(to_jsonb(msg)) FROM messages msg WHERE sender_id = %(uid)s),
  'reviews', (SELECT jsonb_agg(to_jsonb(r)) FROM reviews r WHERE reviewer_id = %(uid)s),
  'transactions', (SELECT jsonb_agg(to_jsonb(t)) FROM transactions t WHERE user_id = %(uid)s),
  'subscriptions', (SELECT jsonb_agg(to_jsonb(s)) FROM subscriptions s WHERE user_id = %(uid)s),
  'notifications', (SELECT jsonb_agg(to_jsonb(n)) FROM notifications n WHERE user_id = %(uid)s),
  'consents', (SELECT jsonb_agg(to_jsonb(c)) FROM consent_logs c WHERE user_id = %(uid)s),
  'exported_at', now()
)
"""


def export(
    user_id: uuid.UUID | str, *, settings: Settings | None = None, by: str = "system"
) -> ExportResult:
    """Write the user's data as JSON to storage (Lovendo's export_user_data shape plus
    subscriptions, notifications and consents)."""
    from core.storage import open_storage

    settings = settings or get_settings()
    uid = parse_user_id(str(user_id))
    export_id = str(uuid.uuid4())
    # The key carries a random id, not the user's: the compliance log that names it must not
    # become personal data once the user is erased.
    key = f"gdpr/exports/{export_id}.json"
    with connect(settings) as conn:
        if _load_user(conn, uid, lock=False) is None:
            log.warning("gdpr_export_unknown_user")
            raise UserNotFound(f"no user {uid}")
        with conn.transaction():
            _compliance(conn, "data_export_requested", uid, f"export:{export_id}", {"by": by})
        row = conn.execute(_EXPORT, {"uid": uid}).fetchone()
        document = json.dumps(row[0] if row else None, indent=1, default=str).encode()
        storage = open_storage(settings=settings)
        # Catalogued before the upload: an export is never in storage without its row, so the
        # expiry pipeline and the user's erase always find it.
        with conn.transaction():
            catalogued = conn.execute(
                "INSERT INTO gdpr_exports (export_id, user_id, key, storage_url, size_bytes, "
                "sha256, expires_at, requested_by) VALUES (%s, %s, %s, %s, 0, '', "
                "now() + make_interval(days => %s), %s) RETURNING expires_at",
                (export_id, uid, key, storage.url, settings.gdpr_export_ttl_days, by),
            ).fetchone()
            assert catalogued is not None
            expires_at = catalogued[0]
        put = storage.put_bytes(key, document)
        with conn.transaction():
            conn.execute(
                "UPDATE gdpr_exports SET size_bytes = %s, sha256 = %s WHERE export_id = %s",
                (put.size, put.sha256, export_id),
            )
            _compliance(
                conn,
                "data_export_completed",
                uid,
                f"export:{export_id}",
                {
                    "key": key,
                    "size": put.size,
                    "sha256": put.sha256,
                },
            )
    log.info("gdpr_user_exported", export_id=export_id, size=put.size)
    return ExportResult(export_id, key, put.size, put.sha256, expires_at)


@dataclass(frozen=True)
class ExpirePlan:
    cutoff: datetime
    exports: int

    def lines(self) -> list[str]:
        return [
            f"delete {self.exports} GDPR export(s) whose download window ended before "
            f"{self.cutoff.isoformat()} (object, then catalogue row)"
        ]


def run_expire_exports(ctx: RunContext) -> ExpirePlan:
    """expire-exports: exports past their download window leave storage, then the catalogue.
    A crash between the two leaves the row; the next run deletes the (gone) object again."""
    cutoff = ctx.cutoff
    count = ctx.work.execute(
        "SELECT count(*) FROM gdpr_exports WHERE expires_at < %s", (cutoff,)
    ).fetchone()
    plan = ExpirePlan(cutoff, int(count[0]) if count else 0)
    ctx.expected = plan.exports
    if ctx.dry_run:
        return plan
    while True:
        with ctx.batch() as conn:
            rows = conn.execute(
                "SELECT export_id, key FROM gdpr_exports WHERE expires_at < %s "
                "ORDER BY expires_at, export_id LIMIT %s FOR UPDATE SKIP LOCKED",
                (cutoff, ctx.policy.batch_size),
            ).fetchall()
            if not rows:
                break
            for _export_id, key in rows:
                ctx.storage.delete(key)
            # The compliance trail (SaltBitter) records the deletion with the export it names.
            conn.execute(
                "WITH gone AS (DELETE FROM gdpr_exports WHERE export_id = ANY(%s) "
                "RETURNING user_id, export_id) "
                "INSERT INTO compliance_logs (user_id, subject_ref, action_type, metadata) "
                "SELECT user_id, 'export:' || export_id, 'data_export_deleted', "
                "jsonb_build_object('reason', 'download window ended', 'by', %s::text) "
                "FROM gone",
                ([r[0] for r in rows], ctx.by or f"pipeline:{ctx.policy.name}"),
            )
        ctx.advance(scanned=len(rows), affected=len(rows), objects=len(rows))
    return plan
