"""Notification fan-out: a new moment notifies its creator's audience, in SQL, in batches.

The audience (followers, and users who favourited the creator's moments) is walked by keyset
in batches of ``TIDEMILL_FANOUT_BATCH``; each batch is one ``INSERT … SELECT … RETURNING`` (with
``ON CONFLICT DO NOTHING`` once a batch met rows already there) that also filters preferences,
blocks (either direction) and soft-deleted users, and commits on its own. Recipients never come
to Python; only the rows a batch actually inserted (and that have a push token) come back, to
be pushed. A retry therefore inserts nothing twice (the dedup key plus the subject's created_at
is unique per user) and pushes only what it inserted. Push is at most once: a crash between a
batch's commit and its push loses that push (the in-app notification is there).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dramatiq
import psycopg

from core.log import get_logger
from core.push import DEVICE_NOT_REGISTERED, PushError, PushMessage, PushTransport, open_push
from core.settings import Settings, get_settings
from db.engine import UnitOfWork
from workers.base import PermanentError, actor

log = get_logger(__name__)

NEW_MOMENT = "new_moment"
KINDS = (NEW_MOMENT,)
_ZERO_UUID = uuid.UUID(int=0)


class UnknownKind(PermanentError):
    """fan_out was asked for a kind it does not know."""


@dataclass
class FanOutResult:
    kind: str
    subject_id: str
    audience: int = 0  # candidates walked (before filters)
    inserted: int = 0
    pushed: int = 0
    tokens_cleared: int = 0
    batches: int = 0
    skipped: str | None = None  # why nothing was done
    receipt_checks: int = 0  # tickets handed to check_push_receipts (not kept: could be 1 M)
    conflicts: bool = False  # some recipients were notified already (a retry or a duplicate)


_SUBJECT = """
SELECT m.id, m.user_id, m.title, m.status, m.created_at,
       u.full_name, u.username, u.deleted_at
FROM moments m JOIN users u ON u.id = m.user_id
WHERE m.id = %(id)s
"""

# The first `batch` audience members after the cursor, in user id order. Each branch is
# limited on its own, so Postgres reads at most `batch` ids per branch (an index range on
# follows' primary key; the creator's moments' favourites), never the whole audience.
# The creator is excluded inside each branch (follows' CHECK does it there): filtering after
# the per-branch LIMIT could push a branch's next id out of this batch and past the cursor.
# The other filters come after the batch is cut, so the cursor walks the raw audience.
_BATCH_TEMPLATE = """
WITH batch AS (
  SELECT uid FROM (
    (SELECT f.follower_id AS uid FROM follows f
     WHERE f.followee_id = %(creator)s AND f.follower_id > %(after)s
     ORDER BY f.follower_id LIMIT %(batch)s)
    UNION
    (SELECT DISTINCT fav.user_id AS uid
     FROM favorites fav JOIN moments m ON m.id = fav.moment_id
     WHERE m.user_id = %(creator)s AND fav.user_id > %(after)s
       AND fav.user_id <> %(creator)s
     ORDER BY fav.user_id LIMIT %(batch)s)
  ) AS audience
  ORDER BY uid LIMIT %(batch)s
),
eligible AS MATERIALIZED (
  SELECT b.uid, u.push_token, coalesce(p.push, true) AS push
  FROM batch b
  -- one index probe per member (OFFSET 0 keeps the subquery from being flattened): a hash
  -- join read all of users per batch, O(users) each, O(users x batches) in all
  JOIN LATERAL (SELECT u.push_token FROM users u
                WHERE u.id = b.uid AND u.deleted_at IS NULL OFFSET 0) u ON true
  LEFT JOIN notification_preferences p ON p.user_id = b.uid AND p.kind = %(kind)s
  WHERE coalesce(p.enabled, true)
    AND NOT EXISTS (SELECT 1 FROM blocks bl
                    WHERE bl.blocker_id = b.uid AND bl.blocked_id = %(creator)s)
    AND NOT EXISTS (SELECT 1 FROM blocks bl
                    WHERE bl.blocker_id = %(creator)s AND bl.blocked_id = b.uid)
),
ins AS (
  INSERT INTO notifications (user_id, type, title, body, data, created_at, dedup_key)
  SELECT uid, %(kind)s, %(title)s, %(body)s, %(data)s::jsonb, %(created_at)s, %(dedup)s
  FROM eligible
  ORDER BY uid
  {on_conflict}
  RETURNING user_id
),
-- RETURNING sees only inserted columns: the tokens come from `eligible` by a hash join,
-- not by a second index probe into users per inserted row
push AS (
  SELECT e.uid, e.push_token
  FROM ins JOIN eligible e ON e.uid = ins.user_id
  WHERE e.push_token IS NOT NULL AND e.push_token <> '' AND e.push
)
SELECT (SELECT uid FROM batch ORDER BY uid DESC LIMIT 1) AS last_uid,
       (SELECT count(*) FROM batch) AS walked,
       (SELECT count(*) FROM ins) AS inserted,
       ARRAY(SELECT uid FROM push) AS push_users,
       ARRAY(SELECT push_token FROM push) AS push_tokens
"""

# A fresh fan-out (the common case) inserts with a plain INSERT: ON CONFLICT DO NOTHING costs
# a speculative insertion per row (an extra index descent and an extra WAL record). The unique
# index uq_notifications_dedup is what makes a notification exactly-once either way: a batch
# that meets an existing row (a retry, a duplicate message running alongside) fails whole and
# is run again with ON CONFLICT DO NOTHING, as is every later batch of that message. ORDER BY
# uid keeps two overlapping fan-outs waiting on each other's rows in the same order (no
# deadlock).
_BATCH = _BATCH_TEMPLATE.replace("{on_conflict}", "")
_BATCH_RETRY = _BATCH_TEMPLATE.replace(
    "{on_conflict}", "ON CONFLICT (user_id, dedup_key, created_at) DO NOTHING"
)

_CLEAR_TOKENS = """
UPDATE users SET push_token = NULL
FROM unnest(%(ids)s::uuid[], %(tokens)s::text[]) AS dead(id, token)
WHERE users.id = dead.id AND users.push_token = dead.token
"""


def deliver_fan_out(
    uow: UnitOfWork,
    kind: str,
    subject_id: str,
    *,
    settings: Settings | None = None,
    push: PushTransport | None = None,
    batch: int | None = None,
) -> FanOutResult:
    """Insert the notifications of one subject, batch by batch (a commit each), pushing each
    batch's inserted rows after its commit."""
    settings = settings or get_settings()
    result = FanOutResult(kind=kind, subject_id=str(subject_id))
    if kind not in KINDS:
        log.error("fan_out_unknown_kind", kind=str(kind)[:64])
        raise UnknownKind(f"unknown notification kind {str(kind)[:64]!r}")
    try:
        sid = uuid.UUID(str(subject_id))
    except ValueError:
        log.error("fan_out_bad_subject", kind=kind, subject_id=str(subject_id)[:64])
        raise PermanentError(f"not a moment id: {str(subject_id)[:64]!r}") from None
    moment = uow.sql(_SUBJECT, {"id": sid}).fetchone()
    reason = _skip_reason(moment)
    if reason or moment is None:
        result.skipped = reason
        log.info("fan_out_skipped", kind=kind, subject_id=str(sid), reason=reason)
        return result
    creator_name = (moment.full_name or "").strip() or moment.username or "Someone"
    params: dict[str, Any] = {
        "creator": moment.user_id,
        "kind": kind,
        "title": f"New moment from {creator_name}",
        "body": moment.title,
        "data": json.dumps({"moment_id": str(sid), "creator_id": str(moment.user_id)}),
        # deterministic: a retry conflicts with the first insert (see uq_notifications_dedup)
        "created_at": moment.created_at,
        "dedup": f"{kind}:{sid}",
        "batch": batch or settings.fanout_batch,
        "after": _ZERO_UUID,
    }
    transport = push or open_push(settings=settings)
    statement = _BATCH
    while True:
        try:
            row: Any = uow.sql(statement, params).fetchone()  # an aggregate: always one row
        except psycopg.errors.UniqueViolation:
            if statement is _BATCH_RETRY:
                raise
            # Someone already notified some of this batch (an earlier attempt, a duplicate
            # message): nothing of the batch is kept; from here on, skip what exists.
            uow.rollback()
            statement = _BATCH_RETRY
            result.conflicts = True
            continue
        # Commit per batch: progress is durable, locks and the WAL backlog stay bounded, and
        # a retry after a crash re-walks finished batches inserting nothing.
        uow.commit()
        if not row.walked:
            break
        result.batches += 1
        result.audience += row.walked
        result.inserted += row.inserted
        if row.push_tokens:
            _push_batch(uow, transport, result, row.push_users, row.push_tokens, params)
        params["after"] = row.last_uid
        if row.walked < params["batch"]:
            break
    log.info(
        "fan_out_done",
        kind=kind,
        subject_id=str(sid),
        audience=result.audience,
        inserted=result.inserted,
        pushed=result.pushed,
        tokens_cleared=result.tokens_cleared,
        batches=result.batches,
        conflicts=result.conflicts,
    )
    return result


def _skip_reason(moment: Any) -> str | None:
    if moment is None:
        return "missing_subject"
    if moment.deleted_at is not None:
        return "creator_deleted"
    if moment.status not in ("active", "full"):  # full: filled up before we got to it
        return f"status_{moment.status}"
    return None


def _push_batch(
    uow: UnitOfWork,
    transport: PushTransport,
    result: FanOutResult,
    user_ids: Sequence[uuid.UUID],
    tokens: Sequence[str],
    params: dict[str, Any],
) -> None:
    data = json.loads(params["data"]) | {"type": params["kind"]}
    messages = [
        PushMessage(to=token, title=params["title"], body=params["body"], data=data)
        for token in tokens
    ]
    owner = dict(zip(tokens, user_ids, strict=True))
    try:
        tickets = transport.send(messages)
    except PushError as exc:
        # The rows are committed; the in-app notification stands. Push is best effort.
        log.warning("push_failed", messages=len(messages), error=str(exc)[:200])
        return
    # A failed request (of several) comes back as REQUEST_FAILED tickets for its messages only:
    # the other requests' dead tokens are still cleared and their ok tickets receipt-checked.
    dead = [t for t in tickets if not t.ok and t.error == DEVICE_NOT_REGISTERED]
    other = [t for t in tickets if not t.ok and t.error != DEVICE_NOT_REGISTERED]
    if other:
        log.warning(
            "push_errors", messages=len(other), errors=sorted({t.error or "unknown" for t in other})
        )
    result.pushed += sum(1 for t in tickets if t.ok)
    if dead:
        result.tokens_cleared += clear_tokens(uow, [(owner[t.token], t.token) for t in dead])
    ok = {t.id: [str(owner[t.token]), t.token] for t in tickets if t.ok and t.id}
    if ok and transport.has_receipts:
        result.receipt_checks += len(ok)
        check_push_receipts.send_with_options(
            args=(ok,), delay=int(get_settings().push_receipt_delay_s * 1000)
        )


def clear_tokens(uow: UnitOfWork, dead: Sequence[tuple[Any, str]]) -> int:
    """Forget tokens Expo called DeviceNotRegistered; only if the user still has that token
    (they may have registered a new device meanwhile). Commits."""
    if not dead:
        return 0
    cleared = uow.sql(
        _CLEAR_TOKENS,
        {"ids": [uuid.UUID(str(u)) for u, _ in dead], "tokens": [t for _, t in dead]},
    ).rowcount
    uow.commit()
    log.info("push_tokens_cleared", tokens=cleared)
    return int(cleared)


def apply_receipts(
    uow: UnitOfWork, tickets: dict[str, list[str]], *, push: PushTransport | None = None
) -> int:
    """Fetch receipts of the given tickets (ticket id -> [user id, token]); clear the tokens
    whose receipt says DeviceNotRegistered. Returns how many were cleared."""
    transport = push or open_push()
    receipts = transport.receipts(list(tickets))
    dead = [
        (tickets[tid][0], tickets[tid][1])
        for tid, receipt in receipts.items()
        if tid in tickets and not receipt.ok and receipt.error == DEVICE_NOT_REGISTERED
    ]
    errors = sorted({r.error or "unknown" for r in receipts.values() if not r.ok})
    if errors:
        log.warning("push_receipt_errors", errors=errors)
    return clear_tokens(uow, dead)


@actor(queue_name="notifications", max_retries=10)
def fan_out(uow: UnitOfWork, kind: str, subject_id: str) -> None:
    """Notify the audience of a subject (enqueued by the moments trigger via the outbox)."""
    deliver_fan_out(uow, kind, subject_id)


@actor(queue_name="notifications", max_retries=5)
def check_push_receipts(uow: UnitOfWork, tickets: dict[str, list[str]]) -> None:
    try:
        apply_receipts(uow, tickets)
    except PushError as exc:
        log.warning("push_receipts_unavailable", tickets=len(tickets), error=str(exc)[:200])
        raise dramatiq.Retry(delay=60_000) from None


# ---- issue 14: the other apps' fan-out rules, declared in their profiles (apps/<app>/) ----


def deliver_app_fan_out(uow: UnitOfWork, name: str, key: str) -> int:
    """Run the served app's fan-out `name` for `key` (one set-based INSERT … SELECT in the
    message's transaction); returns the rows it inserted. The SQL is idempotent itself, so a
    retried or duplicated message inserts nothing more."""
    import psycopg

    from apps import active_profile

    profile = active_profile()
    try:
        rule = profile.fan_out(name)
    except LookupError as exc:
        raise PermanentError(str(exc)) from None
    try:
        inserted = uow.sql(rule.sql, {"key": key}).rowcount
    except psycopg.errors.DataError:
        raise PermanentError(f"fan-out {name}: bad key {str(key)[:64]!r}") from None
    log.info("app_fan_out_done", app=profile.name, fan_out=name, inserted=inserted)
    return int(inserted)


@actor(queue_name="notifications", max_retries=10)
def app_fan_out(uow: UnitOfWork, name: str, key: str) -> None:
    """An app's fan-out rule (Perfect Match: new match, new message), enqueued by the profile's
    triggers or by ``tidemill.enqueue('app_fan_out', '["name", "key"]', 'notifications')``."""
    deliver_app_fan_out(uow, name, key)
