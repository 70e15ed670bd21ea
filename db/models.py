"""SQLAlchemy 2 typed models: the seed apps' tables tidemill touches, and tidemill's own.

Sources: Lovendo (users … audit_logs), SaltBitter (refresh_tokens, consent_logs,
compliance_logs, Stripe ids on subscriptions), Pomi (email_verifications, auth_tokens,
username/language on users). Coordinates are plain numerics: PostGIS is not required.
SQL stays PostgreSQL 15 compatible.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, INET, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from db.schema import qualify_models

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

DEFAULT_NOTIFICATION_PREFERENCES = (
    '{"messages": true, "requests": true, "reminders": true, "marketing": false}'
)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {
        uuid.UUID: UUID(as_uuid=True),
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSONB,
        list[str]: ARRAY(Text),
        Decimal: Numeric(10, 2),
        str: Text,
    }


def uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(primary_key=True, server_default=func.gen_random_uuid())


def now_col() -> Mapped[datetime]:
    return mapped_column(server_default=func.now())


def user_fk(*, nullable: bool = False, ondelete: str = "CASCADE") -> Mapped[Any]:
    return mapped_column(ForeignKey("users.id", ondelete=ondelete), nullable=nullable, index=True)


# --- the apps' tables ---------------------------------------------------------------------------


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint(
            "gender IN ('male', 'female', 'other', 'prefer_not_to_say')", name="gender"
        ),
        CheckConstraint("kyc_status IN ('pending', 'verified', 'rejected')", name="kyc_status"),
        Index("ix_users_deleted_at", "deleted_at", postgresql_where=text("deleted_at IS NOT NULL")),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    email: Mapped[str] = mapped_column(unique=True)
    username: Mapped[str | None] = mapped_column(unique=True)  # Pomi
    full_name: Mapped[str] = mapped_column(server_default="")
    avatar_url: Mapped[str | None]
    bio: Mapped[str | None]
    location: Mapped[str | None]
    date_of_birth: Mapped[date | None] = mapped_column(Date)
    gender: Mapped[str | None]
    phone: Mapped[str | None]
    language: Mapped[str | None]  # Pomi: preferred UI / e-mail language (en, am, ti, om, …)
    languages: Mapped[list[str]] = mapped_column(server_default="{}")
    interests: Mapped[list[str]] = mapped_column(server_default="{}")
    rating: Mapped[Decimal] = mapped_column(Numeric(2, 1), server_default="0")
    review_count: Mapped[int] = mapped_column(server_default="0")
    verified: Mapped[bool] = mapped_column(server_default=text("false"))
    email_verified: Mapped[bool] = mapped_column(server_default=text("false"))
    kyc_status: Mapped[str] = mapped_column(server_default="pending")
    push_token: Mapped[str | None]
    notification_preferences: Mapped[dict[str, Any]] = mapped_column(
        server_default=text(f"'{DEFAULT_NOTIFICATION_PREFERENCES}'::jsonb")
    )
    privacy_settings: Mapped[dict[str, Any]] = mapped_column(
        server_default=text("""'{"showOnlineStatus": true, "showLastSeen": true}'::jsonb""")
    )
    # the sum of the user's ledger entries in `currency` (other currencies: user_balances)
    balance: Mapped[Decimal] = mapped_column(Numeric(15, 3), server_default="0")
    currency: Mapped[str] = mapped_column(server_default="TRY")
    subscription_tier: Mapped[str] = mapped_column(server_default="free")  # SaltBitter
    stripe_customer_id: Mapped[str | None] = mapped_column(unique=True)
    created_at: Mapped[datetime] = now_col()
    updated_at: Mapped[datetime] = now_col()
    last_seen_at: Mapped[datetime | None] = mapped_column(server_default=func.now())
    deleted_at: Mapped[datetime | None]  # soft delete; hard delete 30 days later (GDPR)


class Moment(Base):
    __tablename__ = "moments"
    __table_args__ = (
        CheckConstraint(
            "status IN ('draft', 'active', 'full', 'completed', 'cancelled')", name="status"
        ),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = user_fk()
    title: Mapped[str]
    description: Mapped[str | None]
    category: Mapped[str]
    location: Mapped[str]
    latitude: Mapped[Decimal | None] = mapped_column(Numeric(9, 6))
    longitude: Mapped[Decimal | None] = mapped_column(Numeric(9, 6))
    date: Mapped[datetime]
    duration_hours: Mapped[int | None]
    max_participants: Mapped[int] = mapped_column(server_default="1")
    current_participants: Mapped[int] = mapped_column(server_default="0")
    price: Mapped[Decimal] = mapped_column(server_default="0")
    currency: Mapped[str] = mapped_column(server_default="TRY")
    images: Mapped[list[str]] = mapped_column(server_default="{}")
    tags: Mapped[list[str]] = mapped_column(server_default="{}")
    requirements: Mapped[str | None]
    status: Mapped[str] = mapped_column(server_default="active")
    is_featured: Mapped[bool] = mapped_column(server_default=text("false"))
    created_at: Mapped[datetime] = now_col()
    updated_at: Mapped[datetime] = now_col()


class Request(Base):
    __tablename__ = "requests"

    id: Mapped[uuid.UUID] = uuid_pk()
    moment_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("moments.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[uuid.UUID] = user_fk()
    message: Mapped[str | None]
    status: Mapped[str] = mapped_column(server_default="pending")
    created_at: Mapped[datetime] = now_col()
    updated_at: Mapped[datetime] = now_col()
    responded_at: Mapped[datetime | None]


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[uuid.UUID] = uuid_pk()
    participant_ids: Mapped[list[uuid.UUID]] = mapped_column(
        ARRAY(UUID(as_uuid=True)), server_default="{}"
    )
    moment_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("moments.id", ondelete="SET NULL"), index=True
    )
    # No foreign key: messages are archived out of Postgres while the conversation stays.
    last_message_id: Mapped[uuid.UUID | None]
    created_at: Mapped[datetime] = now_col()
    updated_at: Mapped[datetime] = now_col()


class Message(Base):
    __tablename__ = "messages"
    # issue #5: monthly RANGE partitions on created_at (migration 0005); the partition key is
    # part of the primary key, as Postgres requires of every unique index on such a table.
    __table_args__ = (
        Index("ix_messages_created_at_id", "created_at", "id"),
        {"postgresql_partition_by": "RANGE (created_at)"},
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    conversation_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    sender_id: Mapped[uuid.UUID] = user_fk()
    content: Mapped[str | None]
    type: Mapped[str] = mapped_column(server_default="text")
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    read_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(primary_key=True, server_default=func.now())


class Review(Base):
    __tablename__ = "reviews"
    __table_args__ = (CheckConstraint("rating BETWEEN 1 AND 5", name="rating"),)

    id: Mapped[uuid.UUID] = uuid_pk()
    moment_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("moments.id", ondelete="SET NULL"), index=True
    )
    reviewer_id: Mapped[uuid.UUID] = user_fk()
    reviewed_id: Mapped[uuid.UUID] = user_fk()
    rating: Mapped[int]
    comment: Mapped[str | None]
    created_at: Mapped[datetime] = now_col()


class Notification(Base):
    __tablename__ = "notifications"
    __table_args__ = (
        Index("ix_notifications_created_at_id", "created_at", "id"),
        # issue #4: fan-out dedup. created_at is part of the key because #5 partitions the
        # table by it (a unique index must contain the partition key); the fan-out sets it
        # from the subject, so a retry conflicts with the first insert.
        Index("uq_notifications_dedup", "user_id", "dedup_key", "created_at", unique=True),
        # issue #5: monthly RANGE partitions on created_at (migration 0005), see Message
        {"postgresql_partition_by": "RANGE (created_at)"},
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = user_fk()
    type: Mapped[str]
    title: Mapped[str]
    body: Mapped[str | None]
    data: Mapped[dict[str, Any] | None]
    read: Mapped[bool] = mapped_column(server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(primary_key=True, server_default=func.now())
    dedup_key: Mapped[str | None]  # issue #4: "<kind>:<subject id>", see uq_notifications_dedup


class Transaction(Base):
    __tablename__ = "transactions"
    __table_args__ = (Index("ix_transactions_created_at_id", "created_at", "id"),)

    id: Mapped[uuid.UUID] = uuid_pk()
    # SET NULL, not CASCADE: transactions stay 7 years (legal hold) after the user is erased.
    user_id: Mapped[uuid.UUID | None] = user_fk(nullable=True, ondelete="SET NULL")
    moment_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("moments.id", ondelete="SET NULL"), index=True
    )
    type: Mapped[str]
    amount: Mapped[Decimal] = mapped_column(Numeric(15, 3))  # three-decimal currencies
    currency: Mapped[str] = mapped_column(server_default="TRY")
    status: Mapped[str] = mapped_column(server_default="pending")
    description: Mapped[str | None]
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    stripe_payment_intent_id: Mapped[str | None] = mapped_column(unique=True)
    stripe_charge_id: Mapped[str | None] = mapped_column(unique=True)
    # open while Stripe holds the funds; won / lost once closed (a closed dispute never reopens)
    dispute_status: Mapped[str | None]
    created_at: Mapped[datetime] = now_col()
    updated_at: Mapped[datetime] = now_col()


class Favorite(Base):
    __tablename__ = "favorites"
    __table_args__ = (UniqueConstraint("user_id", "moment_id"),)

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = user_fk()
    moment_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("moments.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = now_col()


class Block(Base):
    __tablename__ = "blocks"
    __table_args__ = (UniqueConstraint("blocker_id", "blocked_id"),)

    id: Mapped[uuid.UUID] = uuid_pk()
    blocker_id: Mapped[uuid.UUID] = user_fk()
    blocked_id: Mapped[uuid.UUID] = user_fk()
    created_at: Mapped[datetime] = now_col()


class Report(Base):
    __tablename__ = "reports"

    id: Mapped[uuid.UUID] = uuid_pk()
    reporter_id: Mapped[uuid.UUID | None] = user_fk(nullable=True, ondelete="SET NULL")
    reported_user_id: Mapped[uuid.UUID | None] = user_fk(nullable=True, ondelete="SET NULL")
    reported_moment_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("moments.id", ondelete="SET NULL"), index=True
    )
    reason: Mapped[str]
    description: Mapped[str | None]
    status: Mapped[str] = mapped_column(server_default="pending")
    created_at: Mapped[datetime] = now_col()
    resolved_at: Mapped[datetime | None]


class Subscription(Base):
    """Lovendo's plan/period columns plus SaltBitter's Stripe ids and cancel flag."""

    __tablename__ = "subscriptions"

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = user_fk()
    tier: Mapped[str] = mapped_column(server_default="free")
    status: Mapped[str] = mapped_column(server_default="active")
    stripe_subscription_id: Mapped[str | None] = mapped_column(unique=True)
    stripe_customer_id: Mapped[str | None] = mapped_column(index=True)
    paytr_subscription_id: Mapped[str | None]
    current_period_start: Mapped[datetime | None]
    current_period_end: Mapped[datetime | None]
    cancel_at_period_end: Mapped[bool] = mapped_column(server_default=text("false"))
    # Stripe's event.created of the newest event applied: an older one never overwrites
    stripe_event_created: Mapped[datetime | None]
    stripe_event_id: Mapped[str | None]
    created_at: Mapped[datetime] = now_col()
    updated_at: Mapped[datetime] = now_col()


class KycVerification(Base):
    __tablename__ = "kyc_verifications"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'processing', 'approved', 'rejected')", name="status"
        ),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = user_fk()
    provider: Mapped[str] = mapped_column(server_default="onfido")
    external_id: Mapped[str | None]
    status: Mapped[str] = mapped_column(server_default="pending")
    document_type: Mapped[str | None]
    verification_data: Mapped[dict[str, Any] | None]
    rejection_reason: Mapped[str | None]
    created_at: Mapped[datetime] = now_col()
    updated_at: Mapped[datetime] = now_col()
    verified_at: Mapped[datetime | None]


class AuditLog(Base):
    """Who did what; no personal data (ids and action names only)."""

    __tablename__ = "audit_logs"
    __table_args__ = (
        Index("ix_audit_logs_performed_at_id", "performed_at", "id"),
        Index("ix_audit_logs_actor_performed_at_id", "actor", "performed_at", "id"),
        Index("ix_audit_logs_action_performed_at_id", "action", "performed_at", "id"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    action: Mapped[str]
    entity_type: Mapped[str]
    entity_id: Mapped[str | None]
    actor: Mapped[str | None]
    details: Mapped[dict[str, Any] | None]
    performed_at: Mapped[datetime] = now_col()


class RefreshToken(Base):
    __tablename__ = "refresh_tokens"

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = user_fk()
    token_hash: Mapped[str] = mapped_column(unique=True)
    device_info: Mapped[str | None]
    expires_at: Mapped[datetime] = mapped_column(index=True)
    revoked: Mapped[bool] = mapped_column(server_default=text("false"))
    created_at: Mapped[datetime] = now_col()
    last_used_at: Mapped[datetime | None] = mapped_column(server_default=func.now())


class ConsentLog(Base):
    __tablename__ = "consent_logs"

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = user_fk()
    consent_type: Mapped[str]
    granted: Mapped[bool]
    ip_address: Mapped[str | None] = mapped_column(INET)
    user_agent: Mapped[str | None]
    created_at: Mapped[datetime] = now_col()


class ComplianceLog(Base):
    """Kept 7 years. SET NULL (not SaltBitter's CASCADE): erasing a user must not erase the
    record that the erasure happened."""

    __tablename__ = "compliance_logs"
    __table_args__ = (
        Index("ix_compliance_logs_action_type_created_at", "action_type", "created_at"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID | None] = user_fk(nullable=True, ondelete="SET NULL")
    subject_ref: Mapped[str | None]  # a non-personal reference that survives the erasure
    action_type: Mapped[str]
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    ip_address: Mapped[str | None] = mapped_column(INET)
    created_at: Mapped[datetime] = now_col()


class EmailVerification(Base):
    __tablename__ = "email_verifications"

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = user_fk()
    email: Mapped[str]
    code: Mapped[str] = mapped_column(unique=True)
    attempts: Mapped[int] = mapped_column(server_default="0")
    max_attempts: Mapped[int] = mapped_column(server_default="3")
    expires_at: Mapped[datetime] = mapped_column(index=True)
    verified_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = now_col()


class AuthToken(Base):
    __tablename__ = "auth_tokens"

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = user_fk()
    token: Mapped[str] = mapped_column(unique=True)
    type: Mapped[str] = mapped_column(server_default="access")
    expires_at: Mapped[datetime] = mapped_column(index=True)
    revoked: Mapped[bool] = mapped_column(server_default=text("false"))
    revoked_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = now_col()
    updated_at: Mapped[datetime] = now_col()


# --- tidemill's own tables ----------------------------------------------------------------------


class WebhookEvent(Base):
    """One row per Stripe event id: a duplicate delivery inserts nothing."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        CheckConstraint(
            "status IN ('received', 'waiting', 'processed', 'ignored', 'failed')", name="status"
        ),
        Index("ix_webhook_events_status_received_at", "status", "received_at"),
    )

    id: Mapped[str] = mapped_column(primary_key=True)  # evt_…
    type: Mapped[str] = mapped_column(index=True)
    created: Mapped[datetime]  # Stripe's event.created: orders events per object
    livemode: Mapped[bool]
    api_version: Mapped[str | None]
    payload: Mapped[dict[str, Any]]
    received_at: Mapped[datetime] = now_col()
    status: Mapped[str] = mapped_column(server_default="received")
    attempts: Mapped[int] = mapped_column(server_default="0")
    last_error: Mapped[str | None]
    processed_at: Mapped[datetime | None]
    # the object whose state the event folds into (subscription id), set when it is applied
    subject_id: Mapped[str | None] = mapped_column(index=True)


class LedgerEntry(Base):
    """Every money movement, unique on its Stripe source: a duplicate or retried event inserts
    nothing. users.balance always equals the sum of a user's entries."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        CheckConstraint(
            "kind IN ('payment', 'refund', 'dispute_hold', 'dispute_release')", name="kind"
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    user_id: Mapped[uuid.UUID | None] = user_fk(nullable=True, ondelete="SET NULL")
    source_id: Mapped[str] = mapped_column(unique=True)  # pi_…, re_…, dp_…:hold, …
    kind: Mapped[str]
    amount: Mapped[Decimal] = mapped_column(Numeric(15, 3))
    currency: Mapped[str]
    stripe_charge_id: Mapped[str | None] = mapped_column(index=True)
    stripe_event_id: Mapped[str]
    created_at: Mapped[datetime] = now_col()


class UserBalance(Base):
    """A user's money in one currency: the sum of their ledger entries in it. Amounts in
    different currencies are never added together."""

    __tablename__ = "user_balances"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    currency: Mapped[str] = mapped_column(primary_key=True)  # upper-case ISO 4217
    amount: Mapped[Decimal] = mapped_column(Numeric(20, 3), server_default="0")
    updated_at: Mapped[datetime] = now_col()


class Outbox(Base):
    """Messages to send, written in the same transaction as the change that causes them."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_pending", "id", postgresql_where=text("dispatched_at IS NULL")),
        Index(
            "ix_outbox_in_flight",
            "redeliver_at",
            postgresql_where=text(
                "dispatched_at IS NOT NULL AND done_at IS NULL AND dead_at IS NULL"
            ),
        ),
        Index("ix_outbox_dead", "id", postgresql_where=text("dead_at IS NOT NULL")),
        # issue #20: the outbox-prune policy's keyset order (done rows only)
        Index(
            "ix_outbox_done_at_id", "done_at", "id", postgresql_where=text("done_at IS NOT NULL")
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    actor: Mapped[str]
    queue_name: Mapped[str] = mapped_column(server_default="default")
    args: Mapped[list[Any]] = mapped_column(JSONB, server_default="[]")
    kwargs: Mapped[dict[str, Any]] = mapped_column(server_default="{}")
    created_at: Mapped[datetime] = now_col()
    dispatched_at: Mapped[datetime | None]
    message_id: Mapped[str | None]
    last_error: Mapped[str | None]
    # issue #12: the row is the job's record until the actor's own commit sets done_at
    done_at: Mapped[datetime | None]
    dead_at: Mapped[datetime | None]
    redeliver_at: Mapped[datetime | None]
    retries: Mapped[int] = mapped_column(Integer, server_default="0")
    rescues: Mapped[int] = mapped_column(Integer, server_default="0")


class JobCounter(Base):
    """Counters that outlive pruned outbox rows and restarts (``rescued``)."""

    __tablename__ = "job_counters"

    name: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, server_default="0")


class PipelineRun(Base):
    __tablename__ = "pipeline_runs"
    __table_args__ = (
        CheckConstraint(
            "status IN ('running', 'succeeded', 'failed', 'interrupted')", name="status"
        ),
        Index("ix_pipeline_runs_pipeline_started_at", "pipeline", "started_at"),
        Index("ix_pipeline_runs_pipeline_tick", "pipeline", "tick"),
        Index("ix_pipeline_runs_status_id", "status", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    pipeline: Mapped[str]
    tick: Mapped[datetime | None]
    started_at: Mapped[datetime] = now_col()
    finished_at: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(server_default="running")
    rows_scanned: Mapped[int] = mapped_column(BigInteger, server_default="0")
    rows_affected: Mapped[int] = mapped_column(BigInteger, server_default="0")
    bytes_written: Mapped[int] = mapped_column(BigInteger, server_default="0")
    objects: Mapped[int] = mapped_column(Integer, server_default="0")
    error: Mapped[str | None]
    dry_run: Mapped[bool] = mapped_column(server_default=text("false"))
    progress: Mapped[dict[str, Any] | None]  # resume cursor after a crash
    manifest_key: Mapped[str | None]  # issue #5: the run's archive manifest in object storage


class ScheduleTick(Base):
    """Unique (schedule, tick): two schedulers firing the same tick insert one row."""

    __tablename__ = "schedule_ticks"
    __table_args__ = (
        UniqueConstraint("schedule", "tick"),
        CheckConstraint("kind IN ('scheduled', 'manual', 'catch-up')", name="kind"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    schedule: Mapped[str]
    tick: Mapped[datetime]
    fired_at: Mapped[datetime] = now_col()
    fired_by: Mapped[str | None]
    manual: Mapped[bool] = mapped_column(server_default=text("false"))
    # issue #6: how the tick came about, how many cron ticks it stands for (a catch-up after
    # downtime covers several) and the outbox row it wrote (for the last run's status).
    kind: Mapped[str] = mapped_column(server_default="scheduled")
    covers: Mapped[int] = mapped_column(Integer, server_default="1")
    outbox_id: Mapped[int | None] = mapped_column(BigInteger)


class EmailDelivery(Base):
    """Unique (kind, user): a retried or duplicated message sends nothing twice."""

    __tablename__ = "email_deliveries"
    __table_args__ = (
        UniqueConstraint("kind", "user_id"),
        CheckConstraint("status IN ('claimed', 'sent', 'failed', 'skipped')", name="status"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str]
    user_id: Mapped[uuid.UUID] = user_fk()
    status: Mapped[str] = mapped_column(server_default="claimed")
    claimed_at: Mapped[datetime] = now_col()
    sent_at: Mapped[datetime | None]
    provider_message_id: Mapped[str | None]
    error: Mapped[str | None]


# ---- issue #4: outbox triggers, e-mail, fan-out, cache (follows, preferences, ...) ----


class Follow(Base):
    """Who follows whom: a new moment notifies its creator's followers.

    The primary key leads with followee_id, so a creator's audience is one ordered index range
    (the fan-out's keyset batches walk it without sorting)."""

    __tablename__ = "follows"
    __table_args__ = (CheckConstraint("follower_id <> followee_id", name="not_self"),)

    followee_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    follower_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    created_at: Mapped[datetime] = now_col()


class NotificationPreference(Base):
    """Per user and notification kind; no row means the default (in-app and push on)."""

    __tablename__ = "notification_preferences"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(primary_key=True)  # e.g. new_moment
    enabled: Mapped[bool] = mapped_column(server_default=text("true"))
    push: Mapped[bool] = mapped_column(server_default=text("true"))
    updated_at: Mapped[datetime] = now_col()


# ---- issue #5: lifecycle pipelines (partitions, archive manifests, ...) ----


class ArchiveObject(Base):
    """One archived batch, inserted in the transaction that deletes its rows: an object in
    storage without a row here is an orphan of a killed run (its rows are still in Postgres)."""

    __tablename__ = "archive_objects"
    __table_args__ = (
        UniqueConstraint("storage_url", "key"),
        Index("ix_archive_objects_table_name_created_at", "table_name", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    run_id: Mapped[int | None] = mapped_column(
        ForeignKey("pipeline_runs.id", ondelete="SET NULL"), index=True
    )
    pipeline: Mapped[str]
    table_name: Mapped[str]
    key: Mapped[str]
    format: Mapped[str]
    rows: Mapped[int] = mapped_column(BigInteger)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str]
    first_key: Mapped[dict[str, Any]] = mapped_column(JSONB)
    last_key: Mapped[dict[str, Any]] = mapped_column(JSONB)
    storage_url: Mapped[str]
    schema_version: Mapped[str | None]
    created_at: Mapped[datetime] = now_col()


# ---- issue #6: scheduler (schedule state: paused, misfires, leader) ----
class ScheduleState(Base):
    """Per schedule: paused or not (read by every replica at fire time) and misfire counters.

    A row appears on the first pause, resume or misfire; no row means running, never missed.
    """

    __tablename__ = "schedule_state"

    name: Mapped[str] = mapped_column(primary_key=True)
    paused: Mapped[bool] = mapped_column(server_default=text("false"))
    changed_by: Mapped[str | None]  # who paused or resumed it last
    changed_at: Mapped[datetime | None]
    # Misfire plans were applied up to here: a restart does not count the same gap twice.
    caught_up_to: Mapped[datetime | None]
    missed_ticks: Mapped[int] = mapped_column(BigInteger, server_default="0")
    skipped_ticks: Mapped[int] = mapped_column(BigInteger, server_default="0")
    last_misfire_at: Mapped[datetime | None]


# ---- issue #7: backups and restore drills ----


class Backup(Base):
    """One backup: a row is 'complete' only after its manifest (written last) is stored."""

    __tablename__ = "backups"
    __table_args__ = (
        CheckConstraint("kind IN ('full', 'base', 'incremental')", name="kind"),
        CheckConstraint("status IN ('running', 'complete', 'failed', 'expired')", name="status"),
        Index("ix_backups_kind_started_at", "kind", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str]
    status: Mapped[str] = mapped_column(server_default="running")
    started_at: Mapped[datetime] = now_col()
    finished_at: Mapped[datetime | None]
    key: Mapped[str]
    manifest_key: Mapped[str | None]
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None]
    verified_at: Mapped[datetime | None]
    storage_url: Mapped[str]
    error: Mapped[str | None]
    # An incremental base backup is relative to this full base backup (restore needs both).
    parent_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("backups.id", ondelete="SET NULL")
    )
    storage_class: Mapped[str | None]
    # The moment the backed-up data reflects (dump snapshot / base backup end): the drill's RPO.
    data_at: Mapped[datetime | None]
    # First WAL segment a physical backup needs: WAL before it may be pruned.
    wal_start: Mapped[str | None]


class BackupDrill(Base):
    __tablename__ = "backup_drills"
    __table_args__ = (
        CheckConstraint("status IN ('running', 'passed', 'failed')", name="status"),
        Index("ix_backup_drills_started_at", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    backup_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("backups.id", ondelete="SET NULL"), index=True
    )
    started_at: Mapped[datetime] = now_col()
    finished_at: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(server_default="running")
    restore_seconds: Mapped[float | None] = mapped_column(Double)  # measured RTO
    # RPO: how old the restored data was when the drill ran
    data_age_seconds: Mapped[float | None] = mapped_column(Double)
    tables_checked: Mapped[int | None]
    mismatches: Mapped[dict[str, Any] | None]
    error: Mapped[str | None]
    # issue #16: per-table checksums of the restored copy; what `backup verify` found
    checksums: Mapped[dict[str, Any] | None]
    verify_problems: Mapped[list[Any] | None] = mapped_column(JSONB)


# ---- issue #8: dashboard (accounts, login attempts, ...) ----
# Accounts come from settings and sign-in attempts are counted in Redis; every dashboard action
# is a row in audit_logs. What the dashboard needs from Postgres is bounded reads: the newest
# webhook events and pipeline runs whatever their status, so an index leads with the time.
Index("ix_webhook_events_received_at_id", WebhookEvent.received_at, WebhookEvent.id)
Index("ix_pipeline_runs_started_at_id", PipelineRun.started_at, PipelineRun.id)


# ---- issue #15: GDPR lifecycle (erasure records, archive subject index, exports) ----


class Erasure(Base):
    """A completed erasure, kept for good: a restore re-applies those after its backup. No
    personal data: the subject is a salted sha256 of the user id
    (pipelines.lifecycle.gdpr.subject_hash)."""

    __tablename__ = "erasures"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    reference: Mapped[str] = mapped_column(unique=True)
    subject_hash: Mapped[str]
    erased_at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)
    erased_by: Mapped[str | None]


class ArchiveSubject(Base):
    """Which archive object holds rows of which subject (user id, Stripe customer id)."""

    __tablename__ = "archive_subjects"

    subject: Mapped[str] = mapped_column(primary_key=True)
    object_id: Mapped[int] = mapped_column(
        BigInteger,
        ForeignKey("archive_objects.id", ondelete="CASCADE"),
        primary_key=True,
        index=True,
    )


class ArchiveSuperseded(Base):
    """An archive object an erase replaced with a rewritten one, until it is deleted."""

    __tablename__ = "archive_superseded"

    storage_url: Mapped[str] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(primary_key=True)
    since: Mapped[datetime] = now_col()


class QueuePauseRow(Base):
    """A paused queue: workers on every host hold its messages until the row is deleted."""

    __tablename__ = "queue_pauses"

    queue: Mapped[str] = mapped_column(primary_key=True)
    paused_by: Mapped[str]
    paused_at: Mapped[datetime] = now_col()


class GdprExport(Base):
    """A GDPR export in storage and its download window."""

    __tablename__ = "gdpr_exports"

    export_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(index=True)
    key: Mapped[str]
    storage_url: Mapped[str]
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str]
    created_at: Mapped[datetime] = now_col()
    expires_at: Mapped[datetime] = mapped_column(index=True)
    requested_by: Mapped[str | None]


# issue 14: tidemill's own tables live in the tidemill schema (db/schema.py).
qualify_models(Base.metadata)
