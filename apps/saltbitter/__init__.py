"""SaltBitter (seed 003, dating with AI coaching).

- Stripe subscription events set ``subscriptions`` and ``users.subscription_tier``.
- GDPR: the app writes ``data_export_requested`` / ``data_deletion_requested`` into
  ``compliance_logs``; tidemill does the export / the deletion and writes
  ``data_export_completed`` / ``data_deletion_completed``.
- Refresh tokens expire after 7 days; compliance logs are kept 7 years.
- Backups: daily at 03:00 UTC, kept 7 days, plus PITR.
"""

from __future__ import annotations

from apps.profile import Backups, Erase, Profile, Rule, Users
from apps.saltbitter import gdpr
from apps.saltbitter.stripe import apply_stripe_event
from pipelines.backups.plan import PlannedBackup

PROFILE = Profile(
    name="saltbitter",
    title="SaltBitter",
    seed="003_0d5e6b099e04db8b.txt",
    users=Users(names=("(SELECT p.name FROM profiles p WHERE p.user_id = users.id)",)),
    rules=(
        Rule(
            name="saltbitter_gdpr_request",
            table="compliance_logs",
            on="insert",
            actor="run_app_task",
            queue="gdpr",
            args=(
                "CASE n.action_type WHEN 'data_export_requested' THEN 'gdpr_export' "
                "ELSE 'gdpr_delete' END",
                "n.id::text",
            ),
            where="n.action_type IN ('data_export_requested', 'data_deletion_requested')",
        ),
    ),
    policies="saltbitter.toml",
    backups=Backups(
        plan=(
            PlannedBackup(name="backup-full", cron="0 3 * * *", actor="backup_full"),
            PlannedBackup(name="backup-base", cron="30 3 * * *", actor="backup_base"),
            PlannedBackup(name="backup-prune", cron="0 6 * * *", actor="backup_prune"),
        ),
        keep_days=7,
        pitr=True,
    ),
    erase=Erase(root="users", log="compliance_logs"),
    stripe=apply_stripe_event,
    tasks={"gdpr_export": gdpr.export, "gdpr_delete": gdpr.delete},
    requires={
        "users": ("subscription_tier",),
        "profiles": ("user_id", "name"),
        "subscriptions": (
            "user_id",
            "tier",
            "stripe_subscription_id",
            "stripe_customer_id",
            "status",
            "current_period_start",
            "current_period_end",
            "cancel_at_period_end",
            "updated_at",
        ),
        "compliance_logs": ("id", "user_id", "action_type", "metadata", "created_at"),
        "consent_logs": ("user_id", "consent_type", "granted"),
        "refresh_tokens": ("created_at", "expires_at"),
    },
)
