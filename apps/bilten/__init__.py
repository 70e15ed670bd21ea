"""Bilten (seed 001, event ticketing).

- Ticket purchase (payment -> tickets -> e-mail): a Stripe ``payment_intent.succeeded`` whose
  metadata names the Bilten payment completes it; the payments trigger then enqueues the
  ticket confirmation, which lists the payment's tickets.
- Event creation notifies (an e-mail to the organizer and the organizer's organization) and
  invalidates ``event:{id}`` and ``event:{id}:metrics``.
- Backups: a daily compressed dump, kept 30 days (the seed's backup script).
"""

from __future__ import annotations

from apps.bilten.stripe import apply_stripe_event
from apps.profile import Backups, Mail, Profile, Rule, Users
from db.cache_keys import APP_CACHE
from pipelines.backups.plan import PlannedBackup

TICKET_CONFIRMATION = Mail(
    kind="ticket_confirmation",
    recipients="""
        SELECT u.id AS user_id, u.email, concat_ws(' ', u.first_name, u.last_name) AS name,
               NULL AS language, p.amount::text AS amount, p.currency,
               string_agg(t.ticket_number || ' (' || e.title || ')', ', '
                          ORDER BY t.ticket_number) AS tickets
        FROM payments p
        JOIN users u ON u.id = p.user_id
        JOIN payment_items i ON i.payment_id = p.id
        JOIN tickets t ON t.id = i.ticket_id
        JOIN events e ON e.id = t.event_id
        WHERE p.id = %(key)s AND p.status = 'completed' AND u.is_active IS NOT FALSE
        GROUP BY u.id, u.email, u.first_name, u.last_name, p.amount, p.currency
    """,
)

EVENT_CREATED = Mail(
    kind="event_created",
    recipients="""
        SELECT u.id AS user_id, u.email, concat_ws(' ', u.first_name, u.last_name) AS name,
               NULL AS language, e.title AS title, e.start_date::text AS starts
        FROM events e
        JOIN users o ON o.id = e.organizer_id
        JOIN users u ON u.id = o.id
                     OR (o.organization_id IS NOT NULL AND u.organization_id = o.organization_id)
        WHERE e.id = %(key)s AND u.is_active IS NOT FALSE
    """,
)

PROFILE = Profile(
    name="bilten",
    title="Bilten",
    seed="001_1a4b1f1a11cb94ae.txt",
    users=Users(names=("concat_ws(' ', first_name, last_name)",), deleted="is_active = false"),
    mails=(TICKET_CONFIRMATION, EVENT_CREATED),
    rules=(
        Rule(
            name="bilten_payment_completed",
            table="payments",
            on="update",
            actor="send_app_mail",
            queue="emails",
            args=("'ticket_confirmation'", "n.id::text"),
            where="n.status = 'completed' AND o.status IS DISTINCT FROM 'completed'",
        ),
        Rule(
            name="bilten_event_created",
            table="events",
            on="insert",
            actor="send_app_mail",
            queue="emails",
            args=("'event_created'", "n.id::text"),
        ),
    ),
    cache=APP_CACHE["bilten"],
    policies="bilten.toml",
    backups=Backups(
        # "pg_dump … | gzip", daily, "keep last 30 days"
        plan=(
            PlannedBackup(name="backup-full", cron="0 3 * * *", actor="backup_full"),
            PlannedBackup(name="backup-prune", cron="0 6 * * *", actor="backup_prune"),
        ),
        keep_days=30,
    ),
    stripe=apply_stripe_event,
    requires={
        "users": ("first_name", "last_name", "is_active", "organization_id"),
        "payments": (
            "id",
            "user_id",
            "amount",
            "currency",
            "status",
            "transaction_id",
            "gateway_response",
            "updated_at",
        ),
        "payment_items": ("payment_id", "ticket_id"),
        "tickets": ("id", "ticket_number", "event_id", "user_id"),
        "events": ("id", "title", "organizer_id", "start_date"),
    },
)
