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

log = get_logger(__name__)

TOMBSTONE_ID = uuid.UUID("00000000-0000-0000-0000-000000000000")
TOMBSTONE_EMAIL = "deleted-user@deleted.local"
MESSAGE_DELETED = "[Message deleted]"  # Lovendo's delete_user_data

# (child table, FK column) -> what to do instead of following ON DELETE.
KEEP_ANONYMIZED = {("messages", "sender_id")}
# Columns kept on rows detached from the user: what the legal hold or the ledger needs.
KEEP_COLUMNS = {
    "transactions": {
        "type",
        "amount",
        "currency",
        "status",
        "stripe_payment_intent_id",
        "stripe_charge_id",
        "dispute_status",
    },
    "ledger_entries": {"source_id", "kind", "currency", "stripe_charge_id", "stripe_event_id"},
    "compliance_logs": {"action_type", "subject_ref"},
}


class GdprError(Exception):
    """Root of GDPR errors."""


class UserNotFound(GdprError, LookupError):
    pass


class NotEligible(GdprError):
    """The user is not soft-deleted, or still inside the grace period: nothing erased."""


@dataclass(frozen=True)
class ForeignKey:
    child: str
    child_cols: tuple[str, ...]
    parent: str
    parent_cols: tuple[str, ...]
    on_delete: str  # pg_constraint.confdeltype: a, r, c, n, d


@dataclass(frozen=True)
class Step:
    table: str
    action: str  # delete | detach | anonymize
    via: str  # human-readable path, e.g. "moments.user_id -> requests.moment_id"
    statement: sql.Composed | sql.SQL = field(compare=False)


def foreign_keys(conn: Any) -> list[ForeignKey]:
    """Every foreign key between tables of the public schema (partition clones excluded)."""
    rows = conn.execute(
        """
        SELECT cc.relname, pc.relname, c.confdeltype,
               ARRAY(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
                     JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n
                     ORDER BY k.o),
               ARRAY(SELECT a.attname FROM unnest(c.confkey) WITH ORDINALITY k(n, o)
                     JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n
                     ORDER BY k.o)
        FROM pg_constraint c
        JOIN pg_class cc ON cc.oid = c.conrelid
        JOIN pg_class pc ON pc.oid = c.confrelid
        JOIN pg_namespace cn ON cn.oid = cc.relnamespace
        WHERE c.contype = 'f' AND c.conparentid = 0 AND cn.nspname = 'public'
        ORDER BY cc.relname, c.conname
        """
    ).fetchall()
    return [ForeignKey(r[0], tuple(r[3]), r[1], tuple(r[4]), str(r[2])) for r in rows]


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


# Non-foreign-key mentions: (table, statement). %(pats)s are LIKE patterns of the user's
# identifiers; %(uid)s the id. Each is skipped if its table does not exist.
MENTIONS: tuple[tuple[str, str], ...] = (
    (
        "outbox",
        "DELETE FROM outbox WHERE args::text LIKE ANY(%(pats)s) OR kwargs::text LIKE ANY(%(pats)s)",
    ),
    (
        "webhook_events",
        "UPDATE webhook_events SET payload = jsonb_build_object('id', id, 'type', type, "
        "'redacted', true), last_error = NULL WHERE payload::text LIKE ANY(%(pats)s) "
        "OR last_error LIKE ANY(%(pats)s)",
    ),
    (
        "audit_logs",
        "UPDATE audit_logs SET entity_id = NULL, actor = NULL, details = NULL "
        "WHERE entity_id LIKE ANY(%(pats)s) OR actor LIKE ANY(%(pats)s) "
        "OR details::text LIKE ANY(%(pats)s)",
    ),
    (
        "notifications",
        "DELETE FROM notifications WHERE title LIKE ANY(%(pats)s) OR body LIKE ANY(%(pats)s) "
        "OR data::text LIKE ANY(%(pats)s)",
    ),
    (
        "conversations",
        "UPDATE conversations SET participant_ids = array_remove(participant_ids, %(uid)s) "
        "WHERE %(uid)s = ANY(participant_ids)",
    ),
)


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def identifiers(user: dict[str, Any]) -> list[str]:
    """Strings that identify the user, for finding mentions outside foreign keys."""
    values = [str(user["id"])]
    for col in ("email", "username", "phone", "stripe_customer_id", "push_token"):
        if user.get(col):
            values.append(str(user[col]))
    name = (user.get("full_name") or "").strip()
    if len(name) >= 4 and name != "Deleted User":  # shorter names match too much
        values.append(name)
    return values


def scrub_columns(conn: Any) -> dict[str, list[str]]:
    rows = conn.execute(
        """
        SELECT table_name, column_name FROM information_schema.columns
        WHERE table_schema = 'public' AND is_nullable = 'YES'
          AND data_type IN ('text', 'character varying', 'jsonb', 'json', 'inet', 'ARRAY')
        ORDER BY table_name, ordinal_position
        """
    ).fetchall()
    out: dict[str, list[str]] = {}
    for table, column in rows:
        out.setdefault(table, []).append(column)
    return out


@dataclass
class EraseResult:
    reference: str
    erased: bool
    counts: dict[str, int]
    redis_keys: int = 0
    broker_messages: int = 0  # queued / dead-lettered dramatiq messages about the user
    steps: list[str] = field(default_factory=list)


def _ensure_tombstone(conn: Any) -> None:
    # deleted_at is set: the tombstone is nobody, so it gets no welcome e-mail (the app
    # triggers skip deleted users); erase and the erase-users policy never pick it.
    conn.execute(
        "INSERT INTO users (id, email, full_name, deleted_at) "
        "VALUES (%s, %s, 'Deleted User', now()) ON CONFLICT (id) DO NOTHING",
        (TOMBSTONE_ID, TOMBSTONE_EMAIL),
    )


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


def request_erasure(
    user_id: uuid.UUID | str, *, settings: Settings | None = None, now: datetime | None = None
) -> datetime:
    """Soft-delete the user now (the grace period starts) and log data_deletion_requested.
    Returns when the user becomes erasable."""
    from pipelines.engine import connect

    settings = settings or get_settings()
    uid = parse_user_id(str(user_id))
    now = now or datetime.now(UTC)
    with connect(settings) as conn, conn.transaction():
        user = _load_user(conn, uid, lock=True)
        if user is None or uid == TOMBSTONE_ID:
            raise UserNotFound(f"no user {uid}")
        deleted_at = user["deleted_at"] or now
        conn.execute("UPDATE users SET deleted_at = %s WHERE id = %s", (deleted_at, uid))
        _compliance(
            conn,
            "data_deletion_requested",
            uid,
            f"erasure:{uuid.uuid4()}",
            {
                "grace_days": settings.gdpr_grace_days,
            },
        )
    log.info("gdpr_erasure_requested", grace_days=settings.gdpr_grace_days)
    return deleted_at + timedelta(days=settings.gdpr_grace_days)


def _compliance(
    conn: Any, action: str, uid: uuid.UUID | None, ref: str, meta: dict[str, Any]
) -> None:
    conn.execute(
        "INSERT INTO compliance_logs (user_id, subject_ref, action_type, metadata) "
        "VALUES (%s, %s, %s, %s)",
        (uid, ref, action, json.dumps(meta)),
    )


def erase(
    user_id: uuid.UUID | str,
    *,
    settings: Settings | None = None,
    now: datetime | None = None,
    by: str = "system",
    dry_run: bool = False,
) -> EraseResult:
    """Hard-delete a user soft-deleted at least the grace period ago (FK order, one
    transaction), then drop their Redis keys. Raises UserNotFound / NotEligible."""
    from pipelines.engine import connect

    settings = settings or get_settings()
    uid = parse_user_id(str(user_id))
    now = now or datetime.now(UTC)
    grace = timedelta(days=settings.gdpr_grace_days)
    reference = f"erasure:{uuid.uuid4()}"
    with connect(settings) as conn:
        user = _load_user(conn, uid, lock=False)
        if user is None or uid == TOMBSTONE_ID:
            log.warning("gdpr_erase_unknown_user")
            raise UserNotFound(f"no user {uid}")
        _check_eligible(user, now, grace)
        steps = plan_erase(foreign_keys(conn), scrub_columns(conn))
        result = EraseResult(reference, False, {}, steps=[f"{s.action} {s.via}" for s in steps])
        if dry_run:
            return result
        # The request is on record even if the erase below fails and is retried.
        with conn.transaction():
            _compliance(
                conn,
                "data_deletion_requested",
                uid,
                reference,
                {
                    "grace_days": settings.gdpr_grace_days,
                    "by": by,
                },
            )
        with conn.transaction():
            conn.execute(
                sql.SQL("SET LOCAL lock_timeout = {}").format(
                    sql.Literal(settings.pipeline_lock_timeout_ms)
                )
            )
            user = _load_user(conn, uid, lock=True)  # re-check under the row lock
            if user is None:
                raise UserNotFound(f"no user {uid}")
            _check_eligible(user, now, grace)  # restored meanwhile? then untouched
            _ensure_tombstone(conn)
            conn.execute("UPDATE users SET push_token = NULL WHERE id = %s", (uid,))
            params = {
                "uid": uid,
                "tombstone": TOMBSTONE_ID,
                "deleted": MESSAGE_DELETED,
                "pats": [_like(v) for v in identifiers(user)],
            }
            counts: dict[str, int] = {}
            for step in steps:
                n = conn.execute(step.statement, params).rowcount
                label = f"{step.table}:{step.action}"
                counts[label] = counts.get(label, 0) + max(n, 0)
            existing = {
                r[0]
                for r in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                ).fetchall()
            }
            for table, statement in MENTIONS:
                if table in existing:
                    n = conn.execute(statement, params).rowcount
                    label = f"{table}:mentions"
                    counts[label] = counts.get(label, 0) + max(n, 0)
            # Redis first, while the transaction can still roll back: if Redis is down the
            # erase fails whole and is retried, rather than leaving cached personal data of a
            # user nobody can find any more. Once more after the commit, in case an app
            # re-cached the profile in between.
            result.redis_keys = _drop_redis_keys(user, settings)
            result.broker_messages = _drop_dramatiq_messages(user, settings)
            _compliance(conn, "data_deletion_completed", None, reference, {"counts": counts})
            conn.execute(
                "INSERT INTO audit_logs (action, entity_type, entity_id, actor, details) "
                "VALUES ('gdpr_erase', 'user_erasure', %s, %s, %s)",
                (reference, by, json.dumps({"counts": counts})),
            )
        result.counts = counts
        result.erased = True
    result.redis_keys += _drop_redis_keys(user, settings)
    # and a message enqueued about the user meanwhile (e.g. relayed from the outbox just
    # before the commit removed its row) goes too.
    result.broker_messages += _drop_dramatiq_messages(user, settings)
    log.info(
        "gdpr_user_erased",
        reference=reference,
        rows=sum(counts.values()),
        redis_keys=result.redis_keys,
        broker_messages=result.broker_messages,
    )
    return result


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


def _drop_redis_keys(user: dict[str, Any], settings: Settings) -> int:
    from db.cache_keys import keys_for
    from db.redis import get_redis

    client = get_redis(settings)
    keys = set(keys_for("users", [user]))
    # Anything else keyed by the user's id (sessions, feeds, counters): SCAN walks the key
    # space in small steps, so a large Redis is not blocked.
    for key in client.scan_iter(match=f"*{user['id']}*", count=1000):
        keys.add(key.decode() if isinstance(key, bytes) else key)
    return int(client.unlink(*sorted(keys))) if keys else 0


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


def run_erase_policy(ctx: Any) -> list[str]:
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
            res = erase(uid, settings=ctx.settings, now=ctx.now, by=f"pipeline:{policy.name}")
        except NotEligible:  # restored or re-dated since we listed it
            ctx.advance(scanned=1, affected=0)
            continue
        except UserNotFound:
            ctx.advance(scanned=1, affected=0)
            continue
        ctx.advance(scanned=1, affected=1 if res.erased else 0)
    return plan


# ---------------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportResult:
    export_id: str
    key: str
    size: int
    sha256: str


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
    from pipelines.engine import connect

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
        put = open_storage(settings=settings).put_bytes(key, document)
        with conn.transaction():
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
    return ExportResult(export_id, key, put.size, put.sha256)
