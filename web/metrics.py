"""/metrics: dramatiq's worker metrics (multiprocess files) plus what dramatiq does not export:
queue depth and oldest-message age per queue, dead letters, outbox backlog, pipeline runs,
backup age, webhook outcomes. Everything is read at scrape time from the stores, with the same
bounded queries as the dashboard, so any number of web replicas report the same figures."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import text

from core.log import get_logger
from core.settings import Settings
from db.engine import get_database
from web.dashboard import broker_state, store

log = get_logger("web.metrics")


def authorized(settings: Settings, header: str | None) -> bool:
    """True when no token is configured, or the request carries ``Bearer <token>``."""
    if not settings.metrics_token:
        return True
    scheme, _, given = (header or "").partition(" ")
    # bytes: compare_digest raises TypeError on non-ASCII str (a stray header would 500)
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), settings.metrics_token.encode()
    )


def _gauge(name: str, doc: str, labels: list[str] | None = None, value: float | None = None) -> Any:
    if labels is None:
        return GaugeMetricFamily(name, doc, value=value if value is not None else 0.0)
    return GaugeMetricFamily(name, doc, labels=labels)


class StoreCollector:
    """Reads Redis and Postgres at scrape time. A part that fails (a broker that is not Redis,
    a table not created yet) is skipped and counted in tidemill_scrape_errors, so one broken
    source never hides the others."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        errors = _gauge("tidemill_scrape_errors", "Parts of this scrape that failed", ["part"])
        parts: list[tuple[str, Callable[[], Iterator[Metric]]]] = [
            ("broker", self._broker),
            ("outbox", self._outbox),
            ("jobs", self._jobs),
            ("pipelines", self._pipelines),
            ("backups", self._backups),
            ("webhooks", self._webhooks),
        ]
        for part, fn in parts:
            try:
                yield from list(fn())
                errors.add_metric([part], 0)
            except Exception as exc:
                log.warning("metrics_part_failed", part=part, error=type(exc).__name__)
                errors.add_metric([part], 1)
        yield errors

    def _broker(self) -> Iterator[Metric]:
        client = broker_state.broker_redis(self.settings)
        stats = broker_state.queue_stats(client, broker_state.queue_names(client))
        depth = _gauge(
            "tidemill_queue_messages", "Messages per queue and state", ["queue", "state"]
        )
        age = _gauge(
            "tidemill_queue_oldest_message_age_seconds",
            "How long the oldest ready message of a queue has waited",
            ["queue"],
        )
        dead = _gauge("tidemill_dead_letters", "Dead-lettered messages per queue", ["queue"])
        for q in stats:
            for state in ("ready", "delayed", "in_flight", "dead"):
                depth.add_metric([q.name, state], getattr(q, state))
            age.add_metric([q.name], q.oldest_age_s or 0.0)
            dead.add_metric([q.name], q.dead)
        yield depth
        yield age
        yield dead
        yield _gauge(
            "tidemill_workers",
            "Worker processes with a heartbeat in the last minute",
            value=len(broker_state.live_workers(client)),
        )

    def _outbox(self) -> Iterator[Metric]:
        backlog, oldest = store.outbox_backlog(self.settings)
        yield _gauge("tidemill_outbox_backlog", "Outbox rows not yet dispatched", value=backlog)
        yield _gauge(
            "tidemill_outbox_oldest_seconds",
            "Age of the oldest undispatched outbox row",
            value=oldest or 0.0,
        )
        from workers.outbox import outbox_rejected

        yield _gauge(
            "tidemill_outbox_rejected",
            "Outbox rows the relay refused (unknown actor); each needs an operator",
            value=outbox_rejected(self.settings),
        )

    def _jobs(self) -> Iterator[Metric]:
        """Jobs dispatched but not done (Postgres's record, not the broker's), the rescuer's
        re-sends, dead jobs. A growing oldest age with workers up means jobs are being lost
        and rescued, or failing slowly: the alert to set is oldest age > the deadline."""
        from prometheus_client.core import CounterMetricFamily

        from workers.rescuer import dead_jobs, in_flight, rescued_total

        jobs = _gauge(
            "tidemill_jobs_in_flight",
            "Jobs dispatched but not done yet (the outbox row is their record)",
            ["queue"],
        )
        oldest = _gauge(
            "tidemill_jobs_in_flight_oldest_seconds",
            "Time since the oldest job in flight was dispatched",
            ["queue"],
        )
        for queue, n, age in in_flight(self.settings):
            jobs.add_metric([queue], n)
            oldest.add_metric([queue], age)
        yield jobs
        yield oldest
        rescued = CounterMetricFamily(
            "tidemill_jobs_rescued",
            "Jobs the rescuer re-sent because they were not done within their deadline",
        )
        rescued.add_metric([], rescued_total(self.settings))
        yield rescued
        yield _gauge(
            "tidemill_jobs_dead",
            "Jobs whose retries are exhausted (marked dead in Postgres)",
            value=dead_jobs(self.settings),
        )

    def _pipelines(self) -> Iterator[Metric]:
        with get_database(self.settings).engine.connect() as conn:
            last = conn.execute(
                text(
                    "SELECT DISTINCT ON (pipeline) pipeline, status, rows_affected, bytes_written, "
                    "EXTRACT(EPOCH FROM finished_at - started_at) AS duration_s, "
                    "EXTRACT(EPOCH FROM finished_at) AS finished "
                    "FROM pipeline_runs WHERE finished_at IS NOT NULL AND NOT dry_run "
                    "ORDER BY pipeline, started_at DESC"
                )
            ).all()
            day = conn.execute(
                text(
                    "SELECT pipeline, status, count(*), coalesce(sum(rows_affected), 0) "
                    "FROM pipeline_runs "
                    "WHERE started_at > now() - interval '1 day' AND NOT dry_run "
                    "GROUP BY 1, 2"
                )
            ).all()
        rows = _gauge("tidemill_pipeline_last_run_rows", "Rows the last run affected", ["pipeline"])
        size = _gauge("tidemill_pipeline_last_run_bytes", "Bytes the last run wrote", ["pipeline"])
        took = _gauge(
            "tidemill_pipeline_last_run_duration_seconds", "Duration of the last run", ["pipeline"]
        )
        ok = _gauge(
            "tidemill_pipeline_last_run_success", "1 if the last run succeeded", ["pipeline"]
        )
        when = _gauge(
            "tidemill_pipeline_last_run_finished_timestamp_seconds",
            "When the last run finished",
            ["pipeline"],
        )
        for r in last:
            rows.add_metric([r.pipeline], r.rows_affected)
            size.add_metric([r.pipeline], r.bytes_written)
            took.add_metric([r.pipeline], float(r.duration_s or 0))
            ok.add_metric([r.pipeline], 1 if r.status == "succeeded" else 0)
            when.add_metric([r.pipeline], float(r.finished or 0))
        runs = _gauge(
            "tidemill_pipeline_runs_last_day",
            "Runs started in the last 24 h",
            ["pipeline", "status"],
        )
        day_rows = _gauge(
            "tidemill_pipeline_rows_last_day",
            "Rows affected by runs of the last 24 h",
            ["pipeline"],
        )
        totals: dict[str, int] = {}
        for r in day:
            runs.add_metric([str(r[0]), str(r[1])], int(r[2]))
            totals[str(r[0])] = totals.get(str(r[0]), 0) + int(r[3])
        for pipeline, n in totals.items():
            day_rows.add_metric([pipeline], n)
        yield from (rows, size, took, ok, when, runs, day_rows)

    def _backups(self) -> Iterator[Metric]:
        health = store.backup_health(self.settings)
        yield _gauge("tidemill_backup_rpo_seconds", "Recovery point objective", value=health.rpo_s)
        if health.age_s is not None:
            # absent (not 0) when there is no backup: "no backup" must not look like "fresh"
            yield _gauge(
                "tidemill_backup_age_seconds",
                "Age of the newest complete backup",
                value=health.age_s,
            )
        yield _gauge(
            "tidemill_backup_drill_failures_7d",
            "Failed restore drills in the last 7 days",
            value=health.failed_drills_7d,
        )
        drill = health.last_drill or {}
        if drill.get("restore_seconds") is not None:
            yield _gauge(
                "tidemill_backup_last_drill_restore_seconds",
                "Measured restore time (RTO) of the newest drill",
                value=float(drill["restore_seconds"]),
            )
        if drill.get("data_age_seconds") is not None:
            yield _gauge(
                "tidemill_backup_last_drill_data_age_seconds",
                "Measured data age (RPO) of the newest drill",
                value=float(drill["data_age_seconds"]),
            )

    def _webhooks(self) -> Iterator[Metric]:
        counts = store.webhook_window(self.settings, seconds=3600)
        outcomes = _gauge(
            "tidemill_webhook_events_last_hour",
            "Webhook events received in the last hour, by current status",
            ["status"],
        )
        for status, n in counts.items():
            outcomes.add_metric([status], n)
        yield outcomes


def render(settings: Settings) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    prom_dir = settings.data_dir / "prometheus"
    if prom_dir.is_dir() and any(prom_dir.glob("*.db")):
        MultiProcessCollector(registry, path=str(prom_dir))
    registry.register(StoreCollector(settings))
    return generate_latest(registry), CONTENT_TYPE_LATEST
