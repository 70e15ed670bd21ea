"""One typed settings object, read once from the environment.

Every variable tidemill reads is declared in ``FIELDS`` with its default and a one-line
description; the README's configuration table and the docker-compose test are both checked
against this list, so a variable cannot be used without being documented.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """A setting has a value tidemill cannot use; the message names the variable."""


@dataclass(frozen=True)
class Field:
    env: str
    attr: str
    default: str | None
    help: str
    parse: Callable[[str, str], Any]


def _str(name: str, raw: str) -> str:
    return raw


def _int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None


def _pos_int(name: str, raw: str) -> int:
    value = _int(name, raw)
    if value < 1:
        raise SettingsError(f"{name}={raw!r} must be at least 1")
    return value


def _nonneg_int(name: str, raw: str) -> int:
    value = _int(name, raw)
    if value < 0:
        raise SettingsError(f"{name}={raw!r} must be 0 or more")
    return value


def _optional_pos_int(name: str, raw: str) -> int | None:
    return _pos_int(name, raw) if raw.strip() else None


def _port(name: str, raw: str) -> int:
    value = _int(name, raw)
    if not 0 < value < 65536:
        raise SettingsError(f"{name}={raw!r} is not a TCP port (1-65535)")
    return value


def _float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise SettingsError(f"{name}={raw!r} must be greater than 0")
    return value


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise SettingsError(f"{name}={raw!r} must be one of: {', '.join(choices)}")
        return value

    return parse


def _url(*schemes: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        scheme = urlsplit(raw).scheme
        if scheme not in schemes:
            raise SettingsError(
                f"{name}={redact_url(raw)!r} has scheme {scheme or '(none)'!r}; "
                f"expected one of: {', '.join(s + '://' for s in schemes)}"
            )
        return raw

    return parse


def _optional_url(*schemes: str) -> Callable[[str, str], str | None]:
    check = _url(*schemes)

    def parse(name: str, raw: str) -> str | None:
        return check(name, raw) if raw else None

    return parse


def _broker_url(name: str, raw: str) -> str | None:
    if raw and urlsplit(raw).scheme in {"amqp", "amqps"}:
        # The dashboard, the rescue of dead workers' messages and the GDPR scrub all read the
        # Redis broker's structures; see docs/scale-out.md for why RabbitMQ was dropped.
        raise SettingsError(
            f"{name}={redact_url(raw)!r}: RabbitMQ (amqp://) is not supported; use a redis:// "
            "or rediss:// URL (or leave it unset to share REDIS_URL)"
        )
    return _optional_url("redis", "rediss")(name, raw)


def _secrets(name: str, raw: str) -> tuple[str, ...]:
    secrets = tuple(s.strip() for s in raw.split(",") if s.strip())
    if not secrets:
        raise SettingsError(f"{name} must name at least one secret")
    return secrets


def redact_url(url: str) -> str:
    """The URL with its password replaced, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


FIELDS: tuple[Field, ...] = (
    Field(
        "TIDEMILL_ENV",
        "env",
        "development",
        "development (console logs) or production (JSON logs); test is used by the suite",
        _choice("development", "production", "test"),
    ),
    Field(
        "TIDEMILL_APP",
        "app",
        "lovendo",
        "the app profile tidemill serves (apps/<name>/): lovendo, bilten, perfect_match, "
        "saltbitter or pomi",
        _choice("lovendo", "bilten", "perfect_match", "saltbitter", "pomi"),
    ),
    Field(
        "TIDEMILL_DATA_DIR",
        "data_dir",
        ".data",
        "where embedded servers, dev mail and dev objects keep their files",
        _str,
    ),
    Field(
        "DATABASE_URL",
        "database_url",
        "",
        "Postgres URL (postgresql://user:pass@host:port/db); unset: embedded Postgres",
        _optional_url("postgresql", "postgres", "postgresql+psycopg"),
    ),
    # ---- issue #18 settings: FIELDS ----
    Field(
        "DATABASE_DIRECT_URL",
        "database_direct_url",
        "",
        "Postgres URL bypassing a transaction-mode pooler (PgBouncer) for what needs a session: "
        "the relay's LISTEN, leader and pipeline locks, migrations, backups; set when "
        "DATABASE_URL is a pooler (server-side prepared statements are then off); must name "
        "the same database as DATABASE_URL (otherwise ignored); unset: DATABASE_URL",
        _optional_url("postgresql", "postgres", "postgresql+psycopg"),
    ),
    Field(
        "REDIS_URL",
        "redis_url",
        "",
        "Redis URL for cache keys and locks (redis://host:port/0); unset: embedded Valkey",
        _optional_url("redis", "rediss", "unix"),
    ),
    Field(
        "BROKER_URL",
        "broker_url",
        "",
        "dramatiq broker: redis:// or rediss:// (RabbitMQ is not supported); unset: REDIS_URL",
        _broker_url,
    ),
    Field(
        "STORAGE_URL",
        "storage_url",
        "",
        "object storage for archives, exports and backups: file://PATH or s3://BUCKET/PREFIX; "
        "unset: file://DATA_DIR/objects",
        _optional_url("file", "s3"),
    ),
    Field(
        "S3_ENDPOINT_URL",
        "s3_endpoint_url",
        "",
        "S3 endpoint override (MinIO, moto); unset: AWS",
        _str,
    ),
    Field(
        "TIDEMILL_ENCRYPTION_KEY",
        "encryption_key",
        "",
        "encryption at rest: base64 of a 32-byte master key; when set, every object written "
        "through storage (backups, WAL, archives, exports) is AES-256-GCM envelope-encrypted",
        _str,
    ),
    Field(
        "TIDEMILL_ENCRYPTION_OLD_KEYS",
        "encryption_old_keys",
        "",
        "comma-separated base64 master keys still accepted for reading (key rotation)",
        _str,
    ),
    Field(
        "TIDEMILL_S3_SSE",
        "s3_sse",
        "",
        "S3 server-side encryption for every object: AES256 or aws:kms; unset: bucket default",
        _str,
    ),
    Field(
        "TIDEMILL_S3_SSE_KMS_KEY_ID",
        "s3_sse_kms_key_id",
        "",
        "KMS key id for TIDEMILL_S3_SSE=aws:kms; unset: the account's default key",
        _str,
    ),
    Field(
        "MAIL_URL",
        "mail_url",
        "",
        "mail transport: smtp://user:pass@host:port, smtps://…, ses://REGION or "
        "file://PATH; unset: file://DATA_DIR/mail",
        _optional_url("smtp", "smtps", "ses", "file"),
    ),
    Field(
        "MAIL_FROM",
        "mail_from",
        "Tidemill <no-reply@tidemill.local>",
        "sender address of outgoing mail",
        _str,
    ),
    Field("TIDEMILL_PG_PORT", "pg_port", "54329", "port of the embedded Postgres", _port),
    Field("TIDEMILL_REDIS_PORT", "redis_port", "63799", "port of the embedded Valkey", _port),
    Field("TIDEMILL_WEB_HOST", "web_host", "127.0.0.1", "address the HTTP server binds", _str),
    Field("TIDEMILL_WEB_PORT", "web_port", "8000", "port of the HTTP server", _port),
    Field(
        "TIDEMILL_WORKER_PROCESSES",
        "worker_processes",
        "2",
        "dramatiq worker processes started by `tidemill up` / `tidemill worker`",
        _pos_int,
    ),
    Field("TIDEMILL_WORKER_THREADS", "worker_threads", "8", "threads per worker process", _pos_int),
    Field(
        "TIDEMILL_WORKER_MALLOC_ARENA_MAX",
        "worker_malloc_arena_max",
        "2",
        "glibc malloc arenas a worker process's threads share (0: glibc's default, 8 per core); "
        "MALLOC_ARENA_MAX, if set, wins",
        _nonneg_int,
    ),
    Field(
        "TIDEMILL_WORKER_MMAP_THRESHOLD",
        "worker_mmap_threshold",
        "262144",
        "bytes from which a worker's malloc blocks are always mmapped and given back when freed "
        "(0: glibc's default, which rises after big blocks and then keeps them); "
        "MALLOC_MMAP_THRESHOLD_, if set, wins",
        _nonneg_int,
    ),
    Field(
        "TIDEMILL_WORKER_POLL_MS",
        "worker_poll_ms",
        "100",
        "longest an idle worker sleeps between polls of its queues (dramatiq's worker timeout); "
        "bounds the pickup delay of e.g. cache invalidations",
        _pos_int,
    ),
    Field(
        "TIDEMILL_MAX_RETRIES",
        "max_retries",
        "10",
        "retries of a failing message before it goes to the dead-letter queue",
        _int,
    ),
    Field(
        "TIDEMILL_MIN_BACKOFF_MS",
        "min_backoff_ms",
        "1000",
        "first retry delay; doubles each retry",
        _pos_int,
    ),
    Field("TIDEMILL_MAX_BACKOFF_MS", "max_backoff_ms", "3600000", "longest retry delay", _pos_int),
    Field(
        "TIDEMILL_TIME_LIMIT_MS",
        "time_limit_ms",
        "600000",
        "a message running longer than this is interrupted",
        _pos_int,
    ),
    Field(
        "TIDEMILL_MAX_AGE_MS",
        "max_age_ms",
        "259200000",
        "a message older than this (3 days, Stripe's retry window) is dropped, not run",
        _pos_int,
    ),
    Field(
        "TIDEMILL_HEARTBEAT_TIMEOUT_MS",
        "heartbeat_timeout_ms",
        "60000",
        "a Redis-broker worker silent this long is dead; its unacked messages are requeued",
        _pos_int,
    ),
    Field(
        "TIDEMILL_REDIS_MAINTENANCE_CHANCE",
        "redis_maintenance_chance",
        "1000",
        "per million broker commands: how often one also requeues dead workers' messages",
        _pos_int,
    ),
    Field(
        "TIDEMILL_RELAY_POLL_S",
        "relay_poll_s",
        "2",
        "outbox relay poll interval: the longest a row waits if its NOTIFY is lost",
        _float,
    ),
    Field(
        "TIDEMILL_RELAY_BATCH",
        "relay_batch",
        "500",
        "outbox rows claimed per relay transaction",
        _pos_int,
    ),
    Field(
        "TIDEMILL_CACHE_FAST_PATH",
        "cache_fast_path",
        "true",
        "true: the relay also UNLINKs the keys of the cache invalidations it sends, so they go "
        "within milliseconds of the commit; the worker's invalidate job still runs and marks "
        "the outbox row done (docs/app-writes.md)",
        lambda name, raw: (
            _choice("true", "false", "1", "0", "yes", "no", "on", "off")(name, raw)
            in {"true", "1", "yes", "on"}
        ),
    ),
    # ---- issue #12 settings: FIELDS ----
    Field(
        "TIDEMILL_REDELIVER_AFTER_S",
        "redeliver_after_s",
        "",
        "a job dispatched but not done this long is re-sent by the rescuer, same message id "
        "(default: the time limit plus 60 s; an actor with a longer time limit gets its own "
        "limit plus 60 s)",
        _float,
    ),
    Field(
        "TIDEMILL_RESCUER_POLL_S",
        "rescuer_poll_s",
        "5",
        "how often the rescuer looks for jobs past their redelivery deadline",
        _float,
    ),
    Field(
        "TIDEMILL_SHUTDOWN_GRACE_S",
        "shutdown_grace_s",
        "30",
        "how long `tidemill up` waits for its processes to stop before killing them",
        _float,
    ),
    Field(
        "STRIPE_WEBHOOK_SECRETS",
        "stripe_webhook_secrets",
        "whsec_tidemill_dev_secret",
        "comma-separated webhook signing secrets; every one is tried, so a secret can be "
        "rotated; the default is for development only",
        _secrets,
    ),
    Field(
        "STRIPE_WEBHOOK_TOLERANCE_S",
        "stripe_webhook_tolerance_s",
        "300",
        "oldest signature timestamp accepted (replay protection)",
        _pos_int,
    ),
    Field(
        "STRIPE_API_KEY",
        "stripe_api_key",
        "",
        "optional: when set, a subscription is re-read from Stripe's API after its events "
        "(the object Stripe holds now wins); unset, the events alone decide",
        _str,
    ),
    Field(
        "STRIPE_API_BASE",
        "stripe_api_base",
        "https://api.stripe.com",
        "Stripe API address (tests point it at a local server)",
        _url("http", "https"),
    ),
    Field(
        "TIDEMILL_WEB_BODY_TIMEOUT_S",
        "web_body_timeout_s",
        "10",
        "longest a request body may take to arrive; a slower client gets 408",
        _float,
    ),
    # ---- issue #4 settings: FIELDS ----
    Field(
        "PUSH_URL",
        "push_url",
        "",
        "push transport: base URL of Expo's push API (https://exp.host) or log:// (dev: log "
        "counts only); unset: log://",
        _optional_url("http", "https", "log"),
    ),
    Field(
        "PUSH_ACCESS_TOKEN",
        "push_access_token",
        "",
        "Expo access token sent as a Bearer header (needed when push security is enabled)",
        _str,
    ),
    Field(
        "TIDEMILL_PUSH_RECEIPT_DELAY_S",
        "push_receipt_delay_s",
        "900",
        "how long after sending a push its receipts are fetched (Expo: about 15 minutes)",
        _float,
    ),
    Field(
        "TIDEMILL_FANOUT_BATCH",
        "fanout_batch",
        "5000",
        "recipients per fan-out insert (one keyset batch, one commit)",
        _pos_int,
    ),
    Field(
        "TIDEMILL_MAIL_TIMEOUT_S",
        "mail_timeout_s",
        "30",
        "socket timeout of SMTP and SES calls",
        _float,
    ),
    # ---- issue #5 settings: FIELDS ----
    Field(
        "TIDEMILL_POLICY_FILE",
        "policy_file",
        "",
        "retention policies (TOML); unset: the packaged pipelines/lifecycle/policies.toml",
        _str,
    ),
    Field(
        "TIDEMILL_PIPELINE_LOCK_TIMEOUT_MS",
        "pipeline_lock_timeout_ms",
        "2000",
        "lock_timeout of each pipeline batch: a batch waits this long for a row lock, then "
        "the run fails and retries later instead of queueing behind app writes",
        _pos_int,
    ),
    Field(
        "TIDEMILL_PIPELINE_STATEMENT_TIMEOUT_MS",
        "pipeline_statement_timeout_ms",
        "60000",
        "statement_timeout of each pipeline batch (including its upload)",
        _pos_int,
    ),
    Field(
        "TIDEMILL_GDPR_GRACE_DAYS",
        "gdpr_grace_days",
        "30",
        "days a soft-deleted user can still be restored before GDPR erase removes them",
        _pos_int,
    ),
    Field(
        "TIDEMILL_GDPR_EXPORT_TTL_DAYS",
        "gdpr_export_ttl_days",
        "7",
        "download window of a GDPR export; the gdpr-exports-expire pipeline deletes it after",
        _pos_int,
    ),
    Field(
        "TIDEMILL_GDPR_REDIS_PATTERNS",
        "gdpr_redis_patterns",
        "",
        "extra Redis key patterns erased with a user, comma-separated templates over the "
        "user's columns, glob allowed (e.g. 'feed:{id}:*,otp:{phone}')",
        _str,
    ),
    # ---- issue #6 settings: FIELDS ----
    Field(
        "TIDEMILL_SCHEDULER_LEADER_RETRY_S",
        "scheduler_leader_retry_s",
        "2",
        "how often a standby scheduler tries the leader lock and the leader checks it still "
        "holds it",
        _float,
    ),
    Field(
        "TIDEMILL_SCHEDULES_EXTRA",
        "schedules_extra",
        "",
        "JSON list of extra schedules ({name, cron, actor, queue, timezone, kwargs, misfire, "
        "misfire_grace_s}); cron may have a leading seconds field",
        _str,
    ),
    # ---- issue #7 settings: FIELDS ----
    Field(
        "TIDEMILL_BACKUP_BEFORE_MIGRATE",
        "backup_before_migrate",
        "false",
        "true: `tidemill migrate` takes a logical backup first (refuses to migrate if it fails)",
        lambda name, raw: (
            _choice("true", "false", "1", "0", "yes", "no", "on", "off")(name, raw)
            in {"true", "1", "yes", "on"}
        ),
    ),
    Field(
        "TIDEMILL_BACKUP_ZSTD_LEVEL",
        "backup_zstd_level",
        "1",
        "zstd level for backups and archived WAL (1-19; 1 keeps up with pg_dump on 2 cores, "
        "3 is ~10 % smaller and slower)",
        _pos_int,
    ),
    Field(
        "TIDEMILL_BACKUP_ZSTD_THREADS",
        "backup_zstd_threads",
        "0",
        "zstd worker threads for logical backups; 0: one per CPU core",
        _int,
    ),
    Field(
        "TIDEMILL_BACKUP_CHECKSUM_SAMPLE",
        "backup_checksum_sample",
        "16",
        "per-table content checksums in logical backups (compared by the drill) cover about 1 "
        "in N rows, chosen by primary key; 1: every row (costs as much server CPU as the dump)",
        _pos_int,
    ),
    Field(
        "TIDEMILL_BACKUP_FULL_RETENTION_DAYS",
        "backup_full_retention_days",
        "",
        "daily full backups (logical dumps and full base backups) are kept this many days; "
        "unset: the served app profile's `keep_days` (SaltBitter 7, the others 30)",
        _optional_pos_int,
    ),
    Field(
        "TIDEMILL_BACKUP_INCREMENTAL_RETENTION_DAYS",
        "backup_incremental_retention_days",
        "7",
        "hourly incremental base backups are kept this many days",
        _pos_int,
    ),
    Field(
        "TIDEMILL_WAL_RETENTION_DAYS",
        "wal_retention_days",
        "7",
        "archived WAL is kept this many days, and always as far back as the oldest kept base "
        "backup needs",
        _pos_int,
    ),
    Field(
        "TIDEMILL_BACKUP_COLD_STORAGE_CLASS",
        "backup_cold_storage_class",
        "GLACIER",
        "S3 storage class daily full dumps move to once the restore drill has had its day",
        _str,
    ),
    Field(
        "TIDEMILL_BACKUP_COLD_AFTER_DAYS",
        "backup_cold_after_days",
        "1",
        "age in days after which `backup prune` moves full dumps to the cold storage class (s3)",
        _int,
    ),
    Field(
        "TIDEMILL_WAL_ARCHIVE",
        "wal_archive",
        "false",
        "true: the embedded Postgres archives WAL through `tidemill wal push` (PITR)",
        lambda name, raw: (
            _choice("true", "false", "1", "0", "yes", "no", "on", "off")(name, raw)
            in {"true", "1", "yes", "on"}
        ),
    ),
    Field(
        "TIDEMILL_ARCHIVE_TIMEOUT_S",
        "archive_timeout_s",
        "60",
        "archive_timeout of the embedded Postgres: the longest a commit waits to reach the WAL "
        "archive (the RPO; at most 900)",
        _pos_int,
    ),
    # ---- issue #8 settings: FIELDS ----
    Field(
        "TIDEMILL_DASHBOARD_USERS",
        "dashboard_users",
        "",
        "dashboard accounts, comma-separated NAME:ROLE:HASH (ROLE viewer or operator, HASH from "
        "`tidemill dashboard hash-password`); unset: nobody can sign in",
        _str,
    ),
    Field(
        "TIDEMILL_SESSION_SECRET",
        "session_secret",
        "",
        "no longer used: dashboard sessions are server-side records in Redis (issue #17), "
        "shared by every web replica and ended by sign-out; kept so old environments load",
        _str,
    ),
    Field(
        "TIDEMILL_SESSION_TTL_S",
        "session_ttl_s",
        "28800",
        "how long a dashboard sign-in lasts",
        _pos_int,
    ),
    Field(
        "TIDEMILL_LOGIN_MAX_FAILURES",
        "login_max_failures",
        "5",
        "failed sign-ins per (account, client address) within TIDEMILL_LOGIN_WINDOW_S before "
        "that pair waits 1, 2, 4, ... s between attempts",
        _pos_int,
    ),
    Field(
        "TIDEMILL_LOGIN_WINDOW_S",
        "login_window_s",
        "300",
        "window of the sign-in rate limit",
        _pos_int,
    ),
    Field(
        "TIDEMILL_LOGIN_ADDRESS_CAP",
        "login_address_cap",
        "50",
        "failed sign-ins from one client address (any account) within TIDEMILL_LOGIN_WINDOW_S "
        "before that address is refused",
        _pos_int,
    ),
    Field(
        "TIDEMILL_LOGIN_ACCOUNT_SOFT_LIMIT",
        "login_account_soft_limit",
        "20",
        "failed sign-ins on one account within the window after which addresses that have "
        "failed for it are held; an address with no failures is never held",
        _pos_int,
    ),
    Field(
        "TIDEMILL_LOGIN_MAX_DELAY_S",
        "login_max_delay_s",
        "300",
        "longest wait the progressive sign-in delay imposes on one (account, address)",
        _pos_int,
    ),
    Field(
        "TIDEMILL_TRUSTED_PROXIES",
        "trusted_proxies",
        "",
        "comma-separated addresses / CIDR blocks of reverse proxies whose X-Forwarded-For is "
        "believed; unset: the TCP peer is the client",
        _str,
    ),
    Field(
        "TIDEMILL_DASHBOARD_RPO_S",
        "dashboard_rpo_s",
        "900",
        "recovery point objective the newest backup's age is compared against (dashboard and "
        "/metrics)",
        _pos_int,
    ),
    Field(
        "TIDEMILL_METRICS_TOKEN",
        "metrics_token",
        "",
        "bearer token /metrics requires (Prometheus `authorization: credentials`); unset: "
        "/metrics is open, so keep it on an internal network",
        _str,
    ),
    Field(
        "LOG_LEVEL",
        "log_level",
        "info",
        "debug, info, warning or error",
        _choice("debug", "info", "warning", "error"),
    ),
)


@dataclass(frozen=True)
class Settings:
    env: str
    data_dir: Path
    database_url: str | None
    # ---- issue #18 settings: Settings attributes ----
    database_direct_url: str | None
    redis_url: str | None
    broker_url: str | None
    storage_url: str
    s3_endpoint_url: str | None
    encryption_key: str | None
    encryption_old_keys: str | None
    s3_sse: str | None
    s3_sse_kms_key_id: str | None
    mail_url: str
    mail_from: str
    pg_port: int
    redis_port: int
    web_host: str
    web_port: int
    worker_processes: int
    worker_threads: int
    worker_malloc_arena_max: int
    worker_mmap_threshold: int
    worker_poll_ms: int
    max_retries: int
    min_backoff_ms: int
    max_backoff_ms: int
    time_limit_ms: int
    max_age_ms: int
    heartbeat_timeout_ms: int
    redis_maintenance_chance: int
    relay_poll_s: float
    relay_batch: int
    cache_fast_path: bool
    # ---- issue #12 settings: Settings attributes ----
    redeliver_after_s: float | None
    rescuer_poll_s: float
    shutdown_grace_s: float
    stripe_webhook_secrets: tuple[str, ...]
    stripe_webhook_tolerance_s: int
    stripe_api_key: str
    stripe_api_base: str
    web_body_timeout_s: float
    log_level: str
    app: str  # issue 14: the app profile (apps/<name>/)
    # ---- issue #4 settings: Settings attributes ----
    push_url: str | None
    push_access_token: str | None
    push_receipt_delay_s: float
    fanout_batch: int
    mail_timeout_s: float
    # ---- issue #5 settings: Settings attributes ----
    policy_file: str | None
    pipeline_lock_timeout_ms: int
    pipeline_statement_timeout_ms: int
    gdpr_grace_days: int
    gdpr_export_ttl_days: int
    gdpr_redis_patterns: str | None
    # ---- issue #6 settings: Settings attributes ----
    scheduler_leader_retry_s: float
    schedules_extra: str | None
    # ---- issue #7 settings: Settings attributes ----
    backup_before_migrate: bool
    backup_zstd_level: int
    backup_zstd_threads: int
    backup_checksum_sample: int
    backup_full_retention_days: int | None
    backup_incremental_retention_days: int
    wal_retention_days: int
    backup_cold_storage_class: str
    backup_cold_after_days: int
    wal_archive: bool
    archive_timeout_s: int
    # ---- issue #8 settings: Settings attributes ----
    dashboard_users: str | None
    session_secret: str | None
    session_ttl_s: int
    login_max_failures: int
    login_window_s: int
    login_address_cap: int
    login_account_soft_limit: int
    login_max_delay_s: int
    trusted_proxies: str | None
    dashboard_rpo_s: int
    metrics_token: str | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in FIELDS:
            raw = environ.get(field.env)
            if raw is None or raw == "":
                raw = field.default or ""
            values[field.attr] = field.parse(field.env, raw) if raw else None
        data_dir = Path(values["data_dir"]).expanduser().resolve()
        values["data_dir"] = data_dir
        values["s3_endpoint_url"] = values["s3_endpoint_url"] or None
        values["storage_url"] = values["storage_url"] or f"file://{data_dir / 'objects'}"
        values["mail_url"] = values["mail_url"] or f"file://{data_dir / 'mail'}"
        if values["max_retries"] < 0:
            raise SettingsError(f"TIDEMILL_MAX_RETRIES={values['max_retries']} must be >= 0")
        if values["min_backoff_ms"] > values["max_backoff_ms"]:
            raise SettingsError("TIDEMILL_MIN_BACKOFF_MS must not exceed TIDEMILL_MAX_BACKOFF_MS")
        return cls(**values)

    # Resolved URLs: embedded servers fill these in when the variables are unset.
    @property
    def embedded_postgres(self) -> bool:
        return self.database_url is None

    @property
    def embedded_redis(self) -> bool:
        return self.redis_url is None

    @property
    def effective_broker_url(self) -> str:
        url = self.broker_url or self.redis_url
        if url is None:
            raise SettingsError("REDIS_URL is unset and no embedded Valkey is running")
        return url

    def with_urls(
        self, *, database_url: str | None = None, redis_url: str | None = None
    ) -> Settings:
        """A copy with the URLs of servers started on the fly (embedded defaults)."""
        return dataclasses.replace(
            self,
            database_url=database_url or self.database_url,
            # an embedded Postgres is nobody's pooler: its URL is the direct one
            database_direct_url=None if database_url else self.database_direct_url,
            redis_url=redis_url or self.redis_url,
        )

    def child_env(self) -> dict[str, str]:
        """Environment for a child process, so it resolves exactly these servers."""
        env = dict(os.environ)
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        env.pop("DATABASE_DIRECT_URL", None)
        if self.database_direct_url:
            env["DATABASE_DIRECT_URL"] = self.database_direct_url
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        env["TIDEMILL_DATA_DIR"] = str(self.data_dir)
        return env

    def describe(self) -> list[tuple[str, str]]:
        """(variable, value) pairs for the start-up banner, passwords redacted."""
        rows = []
        for field in FIELDS:
            value = getattr(self, field.attr)
            shown = "" if value is None else str(value)
            if (
                field.attr
                in {"database_url", "database_direct_url", "redis_url", "broker_url", "mail_url"}
                and shown
            ):
                shown = redact_url(shown)
            if field.attr == "stripe_webhook_secrets":
                shown = ", ".join(secret[:10] + "…" for secret in value)
            if (
                field.attr in {"session_secret", "metrics_token", "push_access_token"}
                or field.attr == "stripe_api_key"
            ) and shown:
                shown = "(set)"
            if field.attr == "dashboard_users" and shown:  # name:role, never the hash
                shown = ", ".join(":".join(e.split(":")[:2]) for e in shown.split(","))
            rows.append((field.env, shown))
        return rows


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use and then kept."""
    return Settings.from_env()


def reset_settings_cache() -> None:
    """Forget the cached settings (a process that changed its own environment, e.g. `up`)."""
    get_settings.cache_clear()
