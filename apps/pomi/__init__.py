"""Pomi (seed 004, community app).

- A welcome e-mail to each new user, in their language (en, am).
- The key map of "Redis Cache Keys" (``user:{id}``, ``user:email:…``, ``user:username:…``,
  ``event:{id}``, ``events:upcoming``, ``event:rsvps:{id}``) is invalidated on change.
- Expired e-mail verifications and auth tokens go; soft-deleted rows (users, events,
  marketplace listings, businesses) are purged 30 days after deletion.
- "Backup Before Migrations": attach (a change to the app's database) and ``tidemill
  migrate`` take a backup first.
"""

from __future__ import annotations

from apps.profile import Backups, Profile, Rule, Users
from db.cache_keys import APP_CACHE

PROFILE = Profile(
    name="pomi",
    title="Pomi",
    seed="004_72cd5f7c906c7c6d.txt",
    users=Users(
        names=("concat_ws(' ', first_name, last_name)", "username"),
        language="language",
        deleted="deleted_at IS NOT NULL OR status = 'deleted'",
    ),
    # the welcome e-mail (tidemill's welcome actor, Pomi's templates: English and Amharic)
    rules=(
        Rule(
            name="pomi_welcome",
            table="users",
            on="insert",
            actor="send_welcome_email",
            queue="emails",
            args=("n.id::text",),
            where="n.deleted_at IS NULL AND n.status IS DISTINCT FROM 'deleted'",
        ),
    ),
    cache=APP_CACHE["pomi"],
    policies="pomi.toml",
    backups=Backups(plan=(), keep_days=30, before_migrations=True),
    requires={
        "users": ("username", "first_name", "last_name", "language", "status", "deleted_at"),
        "email_verifications": ("expires_at",),
        "auth_tokens": ("expires_at",),
        "events": ("deleted_at",),
        "marketplace_listings": ("deleted_at",),
        "businesses": ("deleted_at",),
    },
)
