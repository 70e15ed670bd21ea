"""outbox triggers on app tables, fan-out and e-mail (issue 4)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 13:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Cached tables and the columns their Redis keys are built from. Frozen here (a migration must
# not change when code changes); db/cache_keys.py holds the live map and a test checks that the
# installed triggers carry the same columns.
CACHED = (
    ("users", ("id", "email", "username")),
    ("moments", ("id",)),
)

FUNCTIONS = """
-- Welcome e-mail: one outbox row per new user that can receive one. Statement-level with a
-- transition table: a bulk insert of users costs one trigger call, not one per row.
CREATE FUNCTION tidemill_welcome_outbox() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO outbox (actor, queue_name, args)
  SELECT 'send_welcome_email', 'emails', jsonb_build_array(n.id::text)
  FROM new_rows n
  WHERE n.deleted_at IS NULL AND coalesce(n.email, '') <> '';
  RETURN NULL;
END;
$$;

-- Fan-out: a moment inserted active notifies its creator's audience.
CREATE FUNCTION tidemill_moment_fanout_outbox() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO outbox (actor, queue_name, args)
  SELECT 'fan_out', 'notifications', jsonb_build_array('new_moment', n.id::text)
  FROM new_rows n WHERE n.status = 'active';
  RETURN NULL;
END;
$$;

-- A draft published later fans out then (the dedup key makes any repeat insert nothing).
-- Row-level with a WHEN clause, not statement-level: the condition is checked without calling
-- any function and without building transition tables, so the far more frequent ordinary
-- updates of moments pay nearly nothing for it.
CREATE FUNCTION tidemill_moment_publish_outbox() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO outbox (actor, queue_name, args)
  VALUES ('fan_out', 'notifications', jsonb_build_array('new_moment', NEW.id::text));
  RETURN NULL;
END;
$$;

-- Cache invalidation: one outbox row per statement carrying the distinct key columns (the
-- trigger's arguments) of every old and new row; the cache actor turns them into keys with
-- the declarative map in db/cache_keys.py. Old rows matter: a changed e-mail must drop the
-- key of the old address too.
CREATE FUNCTION tidemill_cache_outbox() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  payload jsonb;
BEGIN
  IF TG_OP = 'INSERT' THEN
    SELECT jsonb_agg(DISTINCT r.picked) INTO payload FROM (
      SELECT (SELECT jsonb_object_agg(c, j -> c) FROM unnest(TG_ARGV) AS c) AS picked
      FROM (SELECT to_jsonb(n) AS j FROM new_rows n) AS s) AS r;
  ELSIF TG_OP = 'DELETE' THEN
    SELECT jsonb_agg(DISTINCT r.picked) INTO payload FROM (
      SELECT (SELECT jsonb_object_agg(c, j -> c) FROM unnest(TG_ARGV) AS c) AS picked
      FROM (SELECT to_jsonb(o) AS j FROM old_rows o) AS s) AS r;
  ELSE
    SELECT jsonb_agg(DISTINCT r.picked) INTO payload FROM (
      SELECT (SELECT jsonb_object_agg(c, j -> c) FROM unnest(TG_ARGV) AS c) AS picked
      FROM (SELECT to_jsonb(o) AS j FROM old_rows o
            UNION ALL SELECT to_jsonb(n) FROM new_rows n) AS s) AS r;
  END IF;
  IF payload IS NULL THEN
    RETURN NULL;  -- the statement touched no row
  END IF;
  INSERT INTO outbox (actor, queue_name, kwargs)
  VALUES ('invalidate', 'cache', jsonb_build_object('table', TG_TABLE_NAME, 'rows', payload));
  RETURN NULL;
END;
$$;

CREATE TRIGGER users_welcome_outbox AFTER INSERT ON users
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION tidemill_welcome_outbox();

CREATE TRIGGER moments_fanout_insert AFTER INSERT ON moments
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION tidemill_moment_fanout_outbox();

CREATE TRIGGER moments_fanout_publish AFTER UPDATE OF status ON moments
FOR EACH ROW WHEN (OLD.status = 'draft' AND NEW.status = 'active')
EXECUTE FUNCTION tidemill_moment_publish_outbox();
"""


def cache_triggers(table: str, columns: Sequence[str]) -> str:
    # Three triggers: Postgres allows transition tables only on single-event triggers.
    args = ", ".join(f"'{c}'" for c in columns)
    return f"""
CREATE TRIGGER {table}_cache_insert AFTER INSERT ON {table}
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION tidemill_cache_outbox({args});
CREATE TRIGGER {table}_cache_update AFTER UPDATE ON {table}
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION tidemill_cache_outbox({args});
CREATE TRIGGER {table}_cache_delete AFTER DELETE ON {table}
REFERENCING OLD TABLE AS old_rows
FOR EACH STATEMENT EXECUTE FUNCTION tidemill_cache_outbox({args});
"""


def upgrade() -> None:
    op.create_table(
        "follows",
        sa.Column("followee_id", sa.UUID(), nullable=False),
        sa.Column("follower_id", sa.UUID(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("follower_id <> followee_id", name=op.f("ck_follows_not_self")),
        sa.ForeignKeyConstraint(
            ["followee_id"],
            ["users.id"],
            name=op.f("fk_follows_followee_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["follower_id"],
            ["users.id"],
            name=op.f("fk_follows_follower_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("followee_id", "follower_id", name=op.f("pk_follows")),
    )
    op.create_index(op.f("ix_follows_follower_id"), "follows", ["follower_id"], unique=False)
    op.create_table(
        "notification_preferences",
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("push", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_notification_preferences_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", "kind", name=op.f("pk_notification_preferences")),
    )
    op.add_column("notifications", sa.Column("dedup_key", sa.Text(), nullable=True))
    op.create_index(
        "uq_notifications_dedup",
        "notifications",
        ["user_id", "dedup_key", "created_at"],
        unique=True,
    )
    op.execute(FUNCTIONS)
    for table, columns in CACHED:
        op.execute(cache_triggers(table, columns))


def downgrade() -> None:
    for table, _ in CACHED:
        for event in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_cache_{event} ON {table}")
    op.execute("DROP TRIGGER IF EXISTS moments_fanout_publish ON moments")
    op.execute("DROP TRIGGER IF EXISTS moments_fanout_insert ON moments")
    op.execute("DROP TRIGGER IF EXISTS users_welcome_outbox ON users")
    op.execute("DROP FUNCTION IF EXISTS tidemill_cache_outbox()")
    op.execute("DROP FUNCTION IF EXISTS tidemill_moment_publish_outbox()")
    op.execute("DROP FUNCTION IF EXISTS tidemill_moment_fanout_outbox()")
    op.execute("DROP FUNCTION IF EXISTS tidemill_welcome_outbox()")
    op.drop_index("uq_notifications_dedup", table_name="notifications")
    op.drop_column("notifications", "dedup_key")
    op.drop_table("notification_preferences")
    op.drop_index(op.f("ix_follows_follower_id"), table_name="follows")
    op.drop_table("follows")
