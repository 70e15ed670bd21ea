"""SaltBitter's GDPR flows (seed 003, compliance_logs action types).

The app records a request by inserting ``data_export_requested`` or ``data_deletion_requested``
into ``compliance_logs``; the profile's trigger enqueues ``run_app_task`` with the request row's
id, and these functions do the work and record ``data_export_completed`` /
``data_deletion_completed`` in the same transaction. Each is idempotent on the request id: a
completed row naming the request ends a retry before it starts.

Deletion keeps the compliance trail: the user's compliance rows are detached (user_id NULL, a
sha256 of the id in metadata) before the user row goes, since ``ON DELETE CASCADE`` would
take them too; every other row of the user goes by the schema's own cascades.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from db.engine import UnitOfWork

_REQUEST = """
    SELECT id, user_id, action_type FROM compliance_logs WHERE id = %(id)s
"""
_DONE = """
    SELECT 1 FROM compliance_logs
    WHERE action_type = %(done)s AND metadata ->> 'request_id' = %(id)s::text LIMIT 1
"""
_EXPORT = """
    SELECT jsonb_build_object(
      'user', (SELECT to_jsonb(u) - 'password_hash' FROM users u WHERE u.id = %(uid)s),
      'profile', (SELECT to_jsonb(p) FROM profiles p WHERE p.user_id = %(uid)s),
      'attachment_assessments', (SELECT coalesce(jsonb_agg(a ORDER BY a.created_at), '[]')
                                 FROM attachment_assessments a WHERE a.user_id = %(uid)s),
      'subscriptions', (SELECT coalesce(jsonb_agg(s), '[]') FROM subscriptions s
                        WHERE s.user_id = %(uid)s),
      'matches', (SELECT coalesce(jsonb_agg(m ORDER BY m.matched_at), '[]') FROM matches m
                  WHERE %(uid)s IN (m.user_a_id, m.user_b_id)),
      'messages', (SELECT coalesce(jsonb_agg(x ORDER BY x.sent_at), '[]') FROM messages x
                   WHERE %(uid)s IN (x.from_user_id, x.to_user_id)),
      'consents', (SELECT coalesce(jsonb_agg(c ORDER BY c.created_at), '[]')
                   FROM consent_logs c WHERE c.user_id = %(uid)s)
    )
"""
_LOG = """
    INSERT INTO compliance_logs (user_id, action_type, metadata)
    VALUES (%(uid)s, %(action)s, %(meta)s::jsonb)
"""


def _request(uow: UnitOfWork, key: str, wanted: str) -> Any:
    from workers.base import PermanentError  # not at import: profiles load without a broker

    try:
        rid = uuid.UUID(str(key))
    except ValueError:
        raise PermanentError(f"not a compliance log id: {str(key)[:64]!r}") from None
    row = uow.sql(_REQUEST + " FOR UPDATE", {"id": rid}).fetchone()
    if row is None or row.action_type != wanted:
        raise PermanentError(f"no {wanted} request {rid}")
    return row


def subject(user_id: object) -> str:
    """A stable reference to an erased user that is not the id itself."""
    return hashlib.sha256(f"saltbitter:{user_id}".encode()).hexdigest()


def export(uow: UnitOfWork, key: str) -> None:
    from core.storage import open_storage

    req = _request(uow, key, "data_export_requested")
    if uow.sql(_DONE, {"done": "data_export_completed", "id": req.id}).fetchone():
        return
    if req.user_id is None:
        from workers.base import PermanentError

        raise PermanentError(f"export request {req.id} names no user")
    found = uow.sql(_EXPORT, {"uid": req.user_id}).fetchone()
    doc = found[0] if found is not None else None
    data = json.dumps(doc, indent=1, default=str, sort_keys=True).encode()
    # a random object name: the log that names it must not identify the user once erased
    object_key = f"gdpr/exports/saltbitter/{uuid.uuid4()}.json"
    put = open_storage().put_bytes(object_key, data)
    meta = {"request_id": str(req.id), "key": object_key, "size": put.size, "sha256": put.sha256}
    uow.sql(_LOG, {"uid": req.user_id, "action": "data_export_completed", "meta": json.dumps(meta)})


def delete(uow: UnitOfWork, key: str) -> None:
    req = _request(uow, key, "data_deletion_requested")
    if uow.sql(_DONE, {"done": "data_deletion_completed", "id": req.id}).fetchone():
        return
    ref = subject(req.user_id) if req.user_id is not None else None
    counts: dict[str, int] = {}
    if req.user_id is not None:
        counts["compliance_logs_kept"] = uow.sql(
            "UPDATE compliance_logs SET user_id = NULL, metadata = coalesce(metadata, '{}'::jsonb)"
            " || jsonb_build_object('subject', %(ref)s::text) WHERE user_id = %(uid)s",
            {"uid": req.user_id, "ref": ref},
        ).rowcount
        counts["users"] = uow.sql(
            "DELETE FROM users WHERE id = %(uid)s", {"uid": req.user_id}
        ).rowcount
    meta = {"request_id": str(req.id), "subject": ref, "counts": counts}
    uow.sql(_LOG, {"uid": None, "action": "data_deletion_completed", "meta": json.dumps(meta)})
