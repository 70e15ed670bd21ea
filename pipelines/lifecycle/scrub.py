"""Personal data out of rows that stay: Stripe payloads, archived rows, restored rows.

Shared by the live erase (``pipelines.lifecycle.gdpr``), the rewrite of archived objects and
the archive restore (``pipelines.lifecycle.archive``), so that all three treat an erased user's
rows the same way.

Stripe puts personal data in known places (API reference: Charge, PaymentMethod, PaymentIntent,
Checkout Session, Invoice, Customer):

- ``billing_details`` {name, email, phone, address, tax_id} on Charges and PaymentMethods;
- ``receipt_email`` on Charges and PaymentIntents; ``shipping`` {name, phone, address, carrier,
  tracking_number} on Charges, PaymentIntents and Customers;
- ``customer_details`` {name, email, phone, address, tax_ids, business_name, individual_name}
  and ``customer_email``, ``shipping_details``, ``collected_information`` on Checkout Sessions;
- ``customer_name``, ``customer_email``, ``customer_phone``, ``customer_address``,
  ``customer_shipping``, ``customer_tax_ids`` on Invoices;
- ``name``, ``email``, ``phone``, ``address``, ``description`` on a Customer object.

Those fields are cleared wherever they appear in the event (``data.object`` and
``data.previous_attributes`` alike). Ids (``id``, ``payment_intent``, ``charge``, ``invoice``,
amounts, statuses) stay: the ledger is keyed by them. Last, any string anywhere in the payload
that contains one of the user's identifiers (a metadata value, a free-text description) is
cleared too.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from psycopg import sql

# Containers of personal data: the whole value goes (becomes null).
PERSONAL_BLOCKS = frozenset(
    {
        "billing_details",
        "customer_details",
        "shipping",
        "shipping_details",
        "collected_information",
        "customer_address",
        "customer_shipping",
        "customer_tax_ids",
    }
)
# Scalar personal fields on any object.
PERSONAL_FIELDS = frozenset(
    {
        "receipt_email",
        "customer_email",
        "customer_name",
        "customer_phone",
        "email",
        "phone",
    }
)
# Fields that are personal only on a Customer object (``name`` on a Product is not).
CUSTOMER_FIELDS = frozenset({"name", "address", "description", "individual_name"})

SUBJECT_SALT = b"tidemill.erasure:"


def subject_hash(user_id: uuid.UUID | str) -> str:
    """The erasure record's subject: a salted sha256 of the user id (names nobody on its own,
    finds the user in a restored copy). ``pipelines.lifecycle.gdpr`` and SQL (``SUBJECT_HASH_SQL``)
    compute the same value."""
    return hashlib.sha256(SUBJECT_SALT + str(user_id).lower().encode()).hexdigest()


# The same digest in SQL over a uuid or text expression ``{}``.
SUBJECT_HASH_SQL = (
    "encode(sha256(convert_to('tidemill.erasure:' || lower(({})::text), 'UTF8')), 'hex')"
)


def scrub_stripe(value: Any, needles: Iterable[str]) -> Any:
    """A copy of a Stripe event (or object) without personal data; ids and amounts kept."""
    lowered = [n.lower() for n in needles if n]
    return _scrub(value, lowered)


def _mentions(text: str, needles: list[str]) -> bool:
    low = text.lower()
    return any(n in low for n in needles)


def _scrub(value: Any, needles: list[str], customer: bool = False) -> Any:
    if isinstance(value, dict):
        is_customer = customer or value.get("object") == "customer"
        # An event's data: previous_attributes hold old values of data.object's fields, so a
        # Customer's old name or address is as personal as its new one.
        inner = value.get("object")
        previous_of_customer = isinstance(inner, dict) and inner.get("object") == "customer"
        out: dict[str, Any] = {}
        for key, item in value.items():
            if (
                key in PERSONAL_BLOCKS
                or key in PERSONAL_FIELDS
                or (is_customer and key in CUSTOMER_FIELDS)
            ):
                out[key] = None
            else:
                nested = is_customer and key in ("shipping",)
                if key == "previous_attributes" and previous_of_customer:
                    nested = True
                out[key] = _scrub(item, needles, nested)
        return out
    if isinstance(value, list):
        return [_scrub(item, needles, customer) for item in value]
    if isinstance(value, str) and needles and _mentions(value, needles):
        return None
    return value


def contains_any(data: bytes, needles: Iterable[str]) -> list[str]:
    """Which of ``needles`` occur in ``data`` (case-insensitive, UTF-8)."""
    low = data.lower()
    return [n for n in needles if n and n.lower().encode() in low]


# ------------------------------------------------------------------ rows that point at a user

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


@dataclass(frozen=True)
class ForeignKey:
    child: str
    child_cols: tuple[str, ...]
    parent: str
    parent_cols: tuple[str, ...]
    on_delete: str  # pg_constraint.confdeltype: a, r, c, n, d


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


def scrub_columns(conn: Any) -> dict[str, list[str]]:
    """Per table, the nullable text/json/inet/array columns (what a detach can clear)."""
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


def user_columns(fks: Iterable[ForeignKey], table: str) -> list[str]:
    """The columns of ``table`` that reference ``users`` directly."""
    return [
        fk.child_cols[0]
        for fk in fks
        if fk.child == table and fk.parent == "users" and len(fk.child_cols) == 1
    ]


def like(value: str) -> str:
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


# Non-foreign-key mentions: table -> statement over ``{t}`` (the live table or a copy of its
# rows). %(pats)s are LIKE patterns of the user's identifiers; %(uid)s the id.
MENTIONS: dict[str, str] = {
    "outbox": "DELETE FROM {t} WHERE args::text ILIKE ANY(%(pats)s) "
    "OR kwargs::text ILIKE ANY(%(pats)s)",
    "audit_logs": "UPDATE {t} SET entity_id = NULL, actor = NULL, details = NULL "
    "WHERE entity_id ILIKE ANY(%(pats)s) OR actor ILIKE ANY(%(pats)s) "
    "OR details::text ILIKE ANY(%(pats)s)",
    "notifications": "DELETE FROM {t} WHERE title ILIKE ANY(%(pats)s) "
    "OR body ILIKE ANY(%(pats)s) OR data::text ILIKE ANY(%(pats)s)",
    "conversations": "UPDATE {t} SET participant_ids = array_remove(participant_ids, %(uid)s) "
    "WHERE %(uid)s = ANY(participant_ids)",
}


def erase_params(user: dict[str, Any]) -> dict[str, Any]:
    """The parameters every erase statement takes: the user, the tombstone that detached rows
    point at, the text a deleted message keeps, and LIKE patterns of the user's identifiers."""
    return {
        "uid": user["id"],
        "tombstone": TOMBSTONE_ID,
        "deleted": MESSAGE_DELETED,
        "pats": [like(v) for v in identifiers(user)],
    }


def erase_rows(
    conn: Any,
    relation: sql.Composable,
    table: str,
    *,
    user: dict[str, Any],
    fks: list[ForeignKey],
    scrub_cols: dict[str, list[str]],
) -> dict[str, int]:
    """Apply to ``relation`` (the live ``table`` or a temp copy of its rows) what an erase does
    to the rows that point straight at the user or mention them: delete, detach (legal hold:
    the row stays, its personal columns cleared) or anonymize (messages). Returns counts."""
    params = erase_params(user)
    counts: dict[str, int] = {}

    def add(label: str, n: int) -> None:
        counts[label] = counts.get(label, 0) + max(n, 0)

    for fk in fks:
        if fk.child != table or fk.parent != "users" or len(fk.child_cols) != 1:
            continue
        col = sql.Identifier(fk.child_cols[0])
        pred = sql.SQL("{} = %(uid)s").format(col)
        if (table, fk.child_cols[0]) in KEEP_ANONYMIZED:
            stmt = sql.SQL(
                "UPDATE {t} SET {c} = %(tombstone)s, content = %(deleted)s, metadata = NULL "
                "WHERE {p}"
            ).format(t=relation, c=col, p=pred)
            add(f"{table}:anonymize", conn.execute(stmt, params).rowcount)
        elif fk.on_delete in ("n", "d"):
            keep = KEEP_COLUMNS.get(table, set()) | {fk.child_cols[0]}
            sets = [sql.SQL("{} = NULL").format(col)] + [
                sql.SQL("{} = NULL").format(sql.Identifier(c))
                for c in scrub_cols.get(table, [])
                if c not in keep
            ]
            stmt = sql.SQL("UPDATE {t} SET {s} WHERE {p}").format(
                t=relation, s=sql.SQL(", ").join(sets), p=pred
            )
            add(f"{table}:detach", conn.execute(stmt, params).rowcount)
        else:
            stmt = sql.SQL("DELETE FROM {t} WHERE {p}").format(t=relation, p=pred)
            add(f"{table}:delete", conn.execute(stmt, params).rowcount)
    if table in MENTIONS:
        stmt = sql.SQL(MENTIONS[table]).format(t=relation)
        add(f"{table}:mentions", conn.execute(stmt, params).rowcount)
    if table == "webhook_events":
        add(f"{table}:scrubbed", scrub_webhook_payloads(conn, relation, identifiers(user)))
    return counts


def scrub_webhook_payloads(conn: Any, relation: sql.Composable, needles: list[str]) -> int:
    """Stripe payloads that mention the user, without their personal fields (ids kept)."""
    import json

    pats = [like(v) for v in needles]
    rows = conn.execute(
        sql.SQL(
            "SELECT id, payload FROM {t} WHERE payload::text ILIKE ANY(%s) "
            "OR last_error ILIKE ANY(%s)"
        ).format(t=relation),
        (pats, pats),
    ).fetchall()
    for event_id, payload in rows:
        conn.execute(
            sql.SQL(
                "UPDATE {t} SET payload = %s, last_error = "
                "CASE WHEN last_error ILIKE ANY(%s) THEN NULL ELSE last_error END WHERE id = %s"
            ).format(t=relation),
            (json.dumps(scrub_stripe(payload, needles)), pats, event_id),
        )
    return len(rows)


def ensure_tombstone(conn: Any) -> None:
    """The "Deleted User" row that signs anonymized messages (``sender_id`` is NOT NULL).

    deleted_at is set: the tombstone is nobody, so it gets no welcome e-mail (the app triggers
    skip deleted users); erase and the erase-users policy never pick it."""
    conn.execute(
        "INSERT INTO users (id, email, full_name, deleted_at) "
        "VALUES (%s, %s, 'Deleted User', now()) ON CONFLICT (id) DO NOTHING",
        (TOMBSTONE_ID, TOMBSTONE_EMAIL),
    )
