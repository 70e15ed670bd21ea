"""Lovendo (seed 000): tidemill's first app. Its tables come with tidemill's own migrations
(0001-0008), so `attach` runs them; its Stripe effects are tidemill's built-in ones
(workers/stripe_effects.py), its triggers those of migrations 0002 and 0004."""

from __future__ import annotations

from apps.profile import Backups, Profile, Users
from db.cache_keys import APP_CACHE
from pipelines.backups.plan import BACKUP_PLAN

PROFILE = Profile(
    name="lovendo",
    title="Lovendo",
    seed="000_bb1008281a2419e8.txt",
    users=Users(
        names=("full_name", "username"),
        language="language",
        deleted="deleted_at IS NOT NULL",
    ),
    cache=APP_CACHE["lovendo"],
    policies="../policies.toml",
    # RPO 15 min / RTO 1 h: daily fulls, hourly incrementals, WAL archiving, a daily drill.
    backups=Backups(plan=BACKUP_PLAN, keep_days=30, pitr=True),
    requires={
        "users": ("full_name", "username", "language", "deleted_at", "stripe_customer_id"),
        "moments": ("id", "status"),
        "notifications": ("user_id",),
        "transactions": ("stripe_payment_intent_id",),
        "subscriptions": ("stripe_subscription_id",),
    },
    migrated=True,
)
