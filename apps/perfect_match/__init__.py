"""Perfect Match (seed 002, AI dating).

- A new match notifies both users (``notifications`` rows) and drops ``match:{id}`` and both
  users' ``matches:recent:{id}``.
- A new message notifies the other side of the match.
- Retention: activity logs 90 days (the seed keeps no activity table in Postgres: the app's
  activity log is tidemill's ``audit_logs``, which attach creates), message data archived
  after a configurable period (the policy file; 1 year by default).
- Backups: daily, PITR enabled.
"""

from __future__ import annotations

from apps.profile import Backups, FanOut, Profile, Rule, Users
from db.cache_keys import APP_CACHE
from pipelines.backups.plan import PlannedBackup

# Idempotent: a retried message finds the rows it inserted and adds none.
NEW_MATCH = FanOut(
    name="new_match",
    sql="""
        INSERT INTO notifications (user_id, type, content)
        SELECT v.uid, 'new_match',
               jsonb_build_object('match_id', m.match_id, 'score', m.compatibility_score)
        FROM matches m
        CROSS JOIN LATERAL (VALUES (m.user_id_1), (m.user_id_2)) AS v(uid)
        WHERE m.match_id = %(key)s
          AND NOT EXISTS (SELECT 1 FROM notifications x
                          WHERE x.user_id = v.uid AND x.type = 'new_match'
                            AND x.content ->> 'match_id' = m.match_id::text)
    """,
)

NEW_MESSAGE = FanOut(
    name="new_message",
    sql="""
        INSERT INTO notifications (user_id, type, content)
        SELECT CASE WHEN m.user_id_1 = msg.sender_id THEN m.user_id_2 ELSE m.user_id_1 END,
               'new_message',
               jsonb_build_object('message_id', msg.message_id,
                                  'conversation_id', msg.conversation_id,
                                  'match_id', m.match_id)
        FROM messages msg
        JOIN conversations c ON c.conversation_id = msg.conversation_id
        JOIN matches m ON m.match_id = c.match_id
        WHERE msg.message_id = %(key)s
          AND NOT EXISTS (SELECT 1 FROM notifications x
                          WHERE x.type = 'new_message'
                            AND x.content ->> 'message_id' = msg.message_id::text)
    """,
)

PROFILE = Profile(
    name="perfect_match",
    title="Perfect Match",
    seed="002_97627617e9ce33ee.txt",
    users=Users(id="user_id", names=("concat_ws(' ', first_name, last_name)",)),
    fan_outs=(NEW_MATCH, NEW_MESSAGE),
    rules=(
        Rule(
            name="perfect_match_new_match",
            table="matches",
            on="insert",
            actor="app_fan_out",
            queue="notifications",
            args=("'new_match'", "n.match_id::text"),
            key="match_id",
        ),
        Rule(
            name="perfect_match_new_message",
            table="messages",
            on="insert",
            actor="app_fan_out",
            queue="notifications",
            args=("'new_message'", "n.message_id::text"),
            key="message_id",
        ),
    ),
    cache=APP_CACHE["perfect_match"],
    policies="perfect_match.toml",
    backups=Backups(
        plan=(
            PlannedBackup(name="backup-full", cron="0 3 * * *", actor="backup_full"),
            PlannedBackup(name="backup-prune", cron="0 6 * * *", actor="backup_prune"),
        ),
        keep_days=30,
        pitr=True,
    ),
    requires={
        "users": ("first_name", "last_name"),
        "matches": ("match_id", "user_id_1", "user_id_2", "compatibility_score"),
        "conversations": ("conversation_id", "match_id"),
        "messages": ("message_id", "conversation_id", "sender_id", "sent_at"),
        "notifications": ("user_id", "type", "content", "created_at"),
    },
)
