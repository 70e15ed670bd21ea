"""/metrics over real HTTP: figures read from the real broker and database, parsed with
prometheus_client's own text parser; and the per-minute counts a real worker records."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.settings import Settings
from tests.support import dashboard as support
from tests.support.dashboard import (
    DASH_QUEUE,
    dashboard_env,
    dead_letter,
    flaky_until_released,
    serve,
    wait_for,
)
from web.dashboard import broker_state
from workers.stats import dead_errors_keys

dash_settings = support.dash_settings
dash_url = support.dash_url


def scrape(url: str, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_queue_depth_age_and_dead_letters_per_queue(dash_url: str, redis_client: Any) -> None:
    for i in range(3):
        dead_letter("flaky_until_released", f"d{i}")
    # two ready messages, the oldest enqueued "a minute ago"
    for _ in range(2):
        flaky_until_released.send("ready")
    [first] = redis_client.lrange(f"dramatiq:{DASH_QUEUE}", 0, 0)
    raw = json.loads(redis_client.hget(f"dramatiq:{DASH_QUEUE}.msgs", first))
    raw["message_timestamp"] -= 60_000
    redis_client.hset(f"dramatiq:{DASH_QUEUE}.msgs", first, json.dumps(raw))
    flaky_until_released.send_with_options(args=("later",), delay=600_000)

    m = scrape(dash_url)
    q = (("queue", DASH_QUEUE),)
    assert m[("tidemill_queue_messages", (*q, ("state", "ready")))] == 2
    assert m[("tidemill_queue_messages", (*q, ("state", "delayed")))] == 1
    assert m[("tidemill_queue_messages", (*q, ("state", "dead")))] == 3
    assert m[("tidemill_queue_messages", (*q, ("state", "in_flight")))] == 0
    assert m[("tidemill_dead_letters", q)] == 3
    assert 59 <= m[("tidemill_queue_oldest_message_age_seconds", q)] < 600
    assert m[("tidemill_scrape_errors", (("part", "broker"),))] == 0


def test_only_worker_processes_count_as_live_workers(
    dash_url: str, dash_settings: Settings, redis_client: Any
) -> None:
    import dramatiq

    from tests.support.dashboard import VIEWER, sign_in
    from workers.broker import broker
    from workers.stats import WORKERS_KEY, worker_id

    # Given a process that only enqueues (dramatiq writes its broker heartbeat then too)
    redis_client.delete(WORKERS_KEY)
    flaky_until_released.send("enqueue-only")
    assert redis_client.zcard("dramatiq:__heartbeats__") >= 1
    assert scrape(dash_url)[("tidemill_workers", ())] == 0
    # When a real worker boots, it is counted; when it stops, it is not
    worker = dramatiq.Worker(broker, worker_threads=1, queues={"tests-none"})
    worker.start()
    try:
        assert redis_client.zrange(WORKERS_KEY, 0, -1) == [worker_id()]
        assert scrape(dash_url)[("tidemill_workers", ())] == 1
        with sign_in(dash_url, VIEWER) as viewer:
            page = viewer.get("/dashboard").text
        assert 'id="live-workers">1<' in page and worker_id() in page
    finally:
        worker.stop()
    assert redis_client.zcard(WORKERS_KEY) == 0
    assert scrape(dash_url)[("tidemill_workers", ())] == 0


def test_silent_workers_are_pruned_and_not_counted(dash_settings: Settings) -> None:
    from workers.stats import WORKERS_KEY, live_workers, write_worker_heartbeat

    client = broker_state.broker_redis(dash_settings)
    client.delete(WORKERS_KEY)
    t = 1_900_000_000.0
    write_worker_heartbeat(client, "host-a:1", now=t - 61)
    write_worker_heartbeat(client, "host-b:2", now=t - 30)
    assert [m for m, _ in live_workers(client, now=t)] == ["host-b:2"]  # a is too old
    write_worker_heartbeat(client, "host-c:3", now=t)
    assert set(client.zrange(WORKERS_KEY, 0, -1)) == {"host-b:2", "host-c:3"}  # a was pruned
    client.delete(WORKERS_KEY)


def test_in_flight_counts_fetched_unacked_messages(dash_settings: Settings) -> None:
    flaky_until_released.send("a")
    flaky_until_released.send("b")
    support.redis_broker.do_fetch(DASH_QUEUE, 1)  # a consumer holds one, unacked
    client = broker_state.broker_redis(dash_settings)
    [stats] = broker_state.queue_stats(client, [DASH_QUEUE])
    assert (stats.ready, stats.in_flight, stats.dead) == (1, 1, 0)


def test_outbox_pipelines_backups_and_webhooks(dash_url: str, sql: Any) -> None:
    sql.execute(
        "INSERT INTO outbox (actor, created_at) "
        "VALUES ('x', now() - interval '30 seconds'), ('y', now())"
    )
    sql.execute(
        "INSERT INTO outbox (actor, created_at, last_error) "
        "VALUES ('gone', now() - interval '1 hour', 'unknown actor gone')"
    )
    sql.execute(
        "INSERT INTO pipeline_runs (pipeline, started_at, finished_at, status, rows_affected, "
        "bytes_written) VALUES ('purge-notifications', now() - interval '2 hours', "
        "now() - interval '2 hours' + interval '5 seconds', 'succeeded', 10, 100), "
        "('purge-notifications', now() - interval '1 minute', now(), 'failed', 7, 0)"
    )
    for i, status in enumerate(("processed", "processed", "failed")):
        sql.execute(
            "INSERT INTO webhook_events (id, type, created, livemode, payload, status) "
            "VALUES (%s, 'charge.refunded', now(), false, '{}', %s)",
            (f"evt_m{i}", status),
        )
    has_backups = sql.execute("SELECT to_regclass('backups') IS NOT NULL").fetchone()[0]
    if has_backups:
        sql.execute("DELETE FROM backups")

    m = scrape(dash_url)
    assert m[("tidemill_outbox_backlog", ())] >= 2
    assert 29 <= m[("tidemill_outbox_oldest_seconds", ())] < 3600  # the refused row is not pending
    assert m[("tidemill_outbox_rejected", ())] == 1
    p = (("pipeline", "purge-notifications"),)
    assert m[("tidemill_pipeline_last_run_rows", p)] == 7
    assert m[("tidemill_pipeline_last_run_success", p)] == 0
    assert 59 <= m[("tidemill_pipeline_last_run_duration_seconds", p)] <= 120
    assert m[("tidemill_pipeline_runs_last_day", (*p, ("status", "failed")))] == 1
    assert m[("tidemill_webhook_events_last_hour", (("status", "failed"),))] == 1
    assert m[("tidemill_webhook_events_last_hour", (("status", "processed"),))] == 2
    assert m[("tidemill_backup_rpo_seconds", ())] == 900
    # no backup is "no figure", never a reassuring 0
    assert ("tidemill_backup_age_seconds", ()) not in m
    if has_backups:
        sql.execute(
            "INSERT INTO backups (kind, status, started_at, finished_at, key, storage_url) "
            "VALUES ('full', 'complete', now() - interval '11 minutes', "
            "now() - interval '10 minutes', 'k', 'file:///x')"
        )
        m = scrape(dash_url)
        assert 599 <= m[("tidemill_backup_age_seconds", ())] < 900


def test_metrics_token_is_required_when_set(db: str) -> None:
    with dashboard_env(TIDEMILL_METRICS_TOKEN="s3cret-token") as settings, serve(settings) as url:
        assert httpx.get(f"{url}/metrics", timeout=30).status_code == 401
        bad = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer nope"}, timeout=30)
        assert bad.status_code == 401
        # a non-ASCII token is refused, not a 500 (compare_digest raises on non-ASCII str)
        odd = httpx.get(
            f"{url}/metrics", headers={b"Authorization": "Bearer é".encode()}, timeout=30
        )
        assert odd.status_code == 401
        assert scrape(url, Authorization="Bearer s3cret-token")


def test_worker_records_throughput_failures_and_dead_letter_errors(
    dash_settings: Settings, inproc_worker: Any, redis_client: Any
) -> None:
    # Given 3 messages that succeed and 2 that fail for good, in a real worker
    redis_client.set("release:ok", "1")
    for _ in range(3):
        flaky_until_released.send("ok")
    for _ in range(2):
        flaky_until_released.send("nope")
    client = broker_state.broker_redis(dash_settings)

    def counted() -> tuple[int, int]:
        series = broker_state.per_minute(client, minutes=3)
        return sum(t for _, t, _ in series), sum(f for _, _, f in series)

    # Then the per-minute counts (buffered, flushed every second even when the queue is
    # quiet) say 5 finished, 2 of them failed
    assert wait_for(lambda: redis_client.zcard(f"dramatiq:{DASH_QUEUE}.XQ") == 2)
    assert wait_for(lambda: counted() == (5, 2)), counted()
    # and each dead letter's final error sits in the hash of its day of death
    errors: list[str] = []
    for rid, died in redis_client.zrange(f"dramatiq:{DASH_QUEUE}.XQ", 0, -1, withscores=True):
        [key] = [k for k in dead_errors_keys(DASH_QUEUE, died) if redis_client.hexists(k, rid)]
        errors.append(redis_client.hget(key, rid))
        assert 0 < redis_client.ttl(key) <= 8 * 86400  # the day's hash expires
    assert errors == ["PermanentError: not released yet for nope"] * 2


def test_prometheus_and_grafana_are_provisioned_against_what_metrics_exports() -> None:
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"prometheus", "grafana"} <= set(services)
    web_env = services["web"]["environment"]
    prom = yaml.safe_load((root / "deploy/prometheus/prometheus.yml").read_text())
    [job] = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"web:{web_env['TIDEMILL_WEB_PORT']}"]
    assert job["authorization"]["credentials"] == web_env["TIDEMILL_METRICS_TOKEN"]
    mounts = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    for path in ("deploy/prometheus/prometheus.yml", "deploy/grafana/provisioning"):
        assert f"./{path}:" in mounts and (root / path).exists()
    datasource = yaml.safe_load(
        (root / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    dashboard = json.loads((root / "deploy/grafana/dashboards/tidemill.json").read_text())
    exported = (root / "web/metrics.py").read_text()
    names = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"]
            names |= set(re.findall(r"\b(tidemill_[a-z0-9_]+|dramatiq_[a-z_]+)", target["expr"]))
    unknown = {n for n in names if n.startswith("tidemill_") and f'"{n}"' not in exported}
    assert not unknown, f"the Grafana dashboard queries metrics /metrics does not export: {unknown}"
    assert any(n.startswith("dramatiq_") for n in names)


@pytest.mark.slow
def test_dramatiq_worker_metrics_of_a_real_worker_process(
    db: str, sql: Any, redis_client: Any, tmp_path: Path
) -> None:
    from core.proc import stop_process
    from tests.conftest import start_cli

    # Given a real `tidemill worker` process writing dramatiq's multiprocess metric files
    data_dir = str(tmp_path / "data")
    env = dict(os.environ, TIDEMILL_DATA_DIR=data_dir)
    env.pop("dramatiq_prom_db", None)  # this process's broker set it to the session's data dir
    worker = start_cli(
        "worker",
        "tests.support.dashboard",
        "--processes",
        "1",
        "--threads",
        "2",
        "--queue",
        DASH_QUEUE,
        env=env,
    )
    try:
        redis_client.set("release:w", "1")
        for _ in range(3):
            flaky_until_released.send("w")
        flaky_until_released.send("never")  # fails for good
        assert wait_for(
            lambda: (
                support.processed_rows(sql, "w") == 3
                and redis_client.zcard(f"dramatiq:{DASH_QUEUE}.XQ") == 1
            ),
            timeout=60,
        )
    finally:
        stop_process(worker, group=True)
    # Then web's /metrics (same data dir) has dramatiq's own counters next to tidemill's
    with dashboard_env(TIDEMILL_DATA_DIR=data_dir) as settings, serve(settings) as url:
        m = scrape(url)
    labels = (("actor_name", "flaky_until_released"), ("queue_name", DASH_QUEUE))
    assert m[("dramatiq_messages_total", labels)] == 4
    assert m[("dramatiq_message_errors_total", labels)] == 1
    assert m[("tidemill_dead_letters", (("queue", DASH_QUEUE),))] == 1


def test_a_failing_source_is_reported_and_the_others_still_scraped(db: str) -> None:
    from core.proc import free_port

    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    with dashboard_env(BROKER_URL=dead_broker) as settings, serve(settings) as url:
        m = scrape(url)
    assert m[("tidemill_scrape_errors", (("part", "broker"),))] == 1
    assert m[("tidemill_scrape_errors", (("part", "outbox"),))] == 0
    assert ("tidemill_outbox_backlog", ()) in m
    assert not any(name == "tidemill_queue_messages" for name, _ in m)


def test_jobs_in_flight_oldest_age_rescued_and_dead(dash_url: str, sql: Any) -> None:
    # Given jobs dispatched but not done on two queues, one done, one dead, and past rescues
    sql.execute(
        "INSERT INTO outbox (actor, queue_name, dispatched_at, redeliver_at, done_at, dead_at) "
        "VALUES ('a', 'emails', now() - interval '90 seconds', now(), NULL, NULL), "
        "('a', 'emails', now() - interval '5 seconds', now(), NULL, NULL), "
        "('b', 'payments', now() - interval '20 seconds', now(), NULL, NULL), "
        "('b', 'payments', now() - interval '1 hour', now(), now(), NULL), "
        "('c', 'payments', now() - interval '1 hour', now(), NULL, now())"
    )
    sql.execute("INSERT INTO job_counters (name, value) VALUES ('rescued', 7)")
    m = scrape(dash_url)
    # Then /metrics reads them from Postgres, per queue
    assert m[("tidemill_jobs_in_flight", (("queue", "emails"),))] == 2
    assert m[("tidemill_jobs_in_flight", (("queue", "payments"),))] == 1
    assert 89 <= m[("tidemill_jobs_in_flight_oldest_seconds", (("queue", "emails"),))] < 600
    assert 19 <= m[("tidemill_jobs_in_flight_oldest_seconds", (("queue", "payments"),))] < 600
    assert m[("tidemill_jobs_rescued_total", ())] == 7
    assert m[("tidemill_jobs_dead", ())] == 1
    assert m[("tidemill_scrape_errors", (("part", "jobs"),))] == 0
