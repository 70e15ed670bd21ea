"""Processing half of bench/webhooks.py: stored payment events relayed to a real worker,
against bare dramatiq's no-op round trip, and the ledger checks after each run."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from decimal import Decimal

import psycopg
import redis

from bench.noop_names import NAMESPACE
from bench.queue_roundtrip import (
    PROCESSES,
    RUNS,
    THREADS,
    BenchError,
    Variant,
    check_no_failures,
    make_variants,
    measure_drain,
    run_once,
    stop_worker,
    worker_rss_mb,
)
from bench.webhooks_common import ROOT, Bench, progress
from core.proc import spawn

# --- processing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessingRun:
    rate: float
    timed: int
    elapsed_s: float
    worker_cpu_us: float  # per event
    worker_busy: float
    postgres_cpu_us: float | None  # per event, worker start-up included; bare: not measured
    rss_mb: float


@dataclass
class Processing:
    n: int
    expected_balances: dict[str, Decimal] = field(default_factory=dict)
    total_events: int = 0
    side_effect_rows: int = 0  # outbox rows for other actors (the users cache trigger)
    bare: list[ProcessingRun] = field(default_factory=list)
    payments: list[ProcessingRun] = field(default_factory=list)


def payments_variant(bench: Bench) -> Variant:
    argv = [sys.executable, "-m", "cli.main", "worker"]
    argv += ["--processes", str(PROCESSES), "--threads", str(THREADS), "--queue", "payments"]
    return Variant(
        "tidemill payments",
        "payments",
        "process_event",
        bench.redis_url,
        argv,
        bench.tidemill_env(),
    )


_STORE_EVENT = """
    INSERT INTO webhook_events (id, type, created, livemode, api_version, payload, status, attempts)
    VALUES (%s, %s, to_timestamp(%s), %s, %s, CAST(%s AS jsonb), 'received', 0)
"""
_STORE_OUTBOX = (
    "INSERT INTO outbox (actor, queue_name, args) "
    "VALUES ('process_event', 'payments', CAST(%s AS jsonb))"
)


def store_events(bench: Bench, processing: Processing) -> list[str]:
    """N events as the receiver stores them (event row + outbox row, one transaction here
    for all of them); returns their ids and adds their amounts to the expected balances."""
    rows, outbox, ids = [], [], []
    for i in range(processing.n):
        event, amount = bench.event(i)
        user = event["data"]["object"]["metadata"]["user_id"]
        credit = (Decimal(amount) / 100).quantize(Decimal("0.01"))
        processing.expected_balances[user] = (
            processing.expected_balances.get(user, Decimal(0)) + credit
        )
        payload = json.dumps(event)
        rows.append(
            (
                event["id"],
                event["type"],
                event["created"],
                event["livemode"],
                event["api_version"],
                payload,
            )
        )
        outbox.append((json.dumps([event["id"]]),))
        ids.append(event["id"])
    with psycopg.connect(bench.database_url) as conn, conn.cursor() as cur:
        cur.executemany(_STORE_EVENT, rows)
        cur.executemany(_STORE_OUTBOX, outbox)
    return ids


def relay(n: int) -> None:
    """The real relay, in this process: outbox rows -> process_event messages."""
    import workers.actors  # noqa: F401  (as `cli.main relay`: the relay must know every actor)
    from core.settings import get_settings
    from workers.broker import broker
    from workers.outbox import drain

    settings = get_settings()
    sent = drain(broker, batch=settings.relay_batch, settings=settings)
    if sent != n:
        raise BenchError(f"the relay sent {sent} messages, expected {n}")


def run_payments(bench: Bench, processing: Processing, index: int) -> ProcessingRun:
    variant = payments_variant(bench)
    client = redis.Redis.from_url(variant.redis_url)
    try:
        client.flushdb()  # the bench's own server: no leftovers from the previous run
        ids = store_events(bench, processing)
        relay(processing.n)
        queued = int(client.hlen(f"{NAMESPACE}:{variant.queue}.msgs"))
        if queued != processing.n:
            raise BenchError(f"{queued} process_event messages queued, expected {processing.n}")
        log = bench.root / f"payments-{index}.log"
        postgres = bench.pg_probe()
        with open(log, "wb") as logf:
            proc = spawn(variant.argv, env=variant.env, cwd=ROOT, stdout=logf, stderr=logf)
        try:
            pg_before = postgres.sample()
            drain = measure_drain(client, variant, processing.n, proc, log)
            pg_cpu = postgres.sample() - pg_before
            rss = worker_rss_mb(proc)
            check_no_failures(client, variant, log)
        finally:
            stop_worker(proc)
    finally:
        client.close()
    processing.total_events += processing.n
    verify_processing(bench, processing, ids)
    return ProcessingRun(
        rate=drain.messages / drain.elapsed_s,
        timed=drain.messages,
        elapsed_s=drain.elapsed_s,
        worker_cpu_us=drain.cpu_s / drain.messages * 1e6,
        worker_busy=drain.cpu_s / drain.elapsed_s,
        postgres_cpu_us=pg_cpu / processing.n * 1e6,
        rss_mb=rss,
    )


def verify_processing(bench: Bench, processing: Processing, ids: list[str]) -> None:
    """Every event applied exactly once, and the money adds up."""
    n = len(ids)
    problems = []
    with bench.sql() as sql:
        statuses = dict(
            sql.execute(
                "SELECT status, count(*) FROM webhook_events WHERE id = ANY(%s) GROUP BY status",
                (ids,),
            ).fetchall()
        )
        if statuses != {"processed": n}:
            problems.append(f"events by status {statuses}, expected {{'processed': {n}}}")
        counts = sql.execute(
            "SELECT count(*), count(*) FILTER (WHERE stripe_event_id = ANY(%s)) "
            "FROM ledger_entries",
            (ids,),
        ).fetchone()
        assert counts is not None
        if tuple(counts) != (processing.total_events, n):
            problems.append(
                f"{counts[0]} ledger entries ({counts[1]} from this run), expected "
                f"{processing.total_events} ({n} from this run)"
            )
        drift = sql.execute(
            """SELECT u.id::text, u.balance, COALESCE(sum(l.amount), 0) FROM users u
               LEFT JOIN ledger_entries l ON l.user_id = u.id GROUP BY u.id, u.balance
               HAVING u.balance <> COALESCE(sum(l.amount), 0)"""
        ).fetchall()
        if drift:
            problems.append(
                f"{len(drift)} users' balance differs from the sum of their ledger entries, "
                f"e.g. {drift[0][0]}: balance {drift[0][1]}, ledger {drift[0][2]}"
            )
        balances = dict(
            sql.execute(
                "SELECT id::text, balance FROM users WHERE id = ANY(%s::uuid[])",
                (bench.users,),
            ).fetchall()
        )
        wrong = [
            (u, balances.get(u), expected)
            for u, expected in processing.expected_balances.items()
            if balances.get(u) != expected
        ]
        if wrong:
            u, got, expected = wrong[0]
            problems.append(
                f"{len(wrong)} users' balance differs from the amounts sent, "
                f"e.g. {u}: {got}, expected {expected}"
            )
        # The bench relays process_event rows; applying a payment also changes the user, whose
        # cache-invalidation trigger writes outbox rows for the cache actor. Those are the
        # app-writes flow's (measured by bench.cache): counted, and cleared for the next run.
        pending = sql.execute(
            "SELECT count(*) FROM outbox WHERE dispatched_at IS NULL AND actor = 'process_event'"
        ).fetchone()
        assert pending is not None
        if pending[0]:
            problems.append(f"{pending[0]} process_event outbox rows not relayed")
        other = sql.execute(
            "DELETE FROM outbox WHERE dispatched_at IS NULL AND actor <> 'process_event'"
        ).rowcount
        processing.side_effect_rows += other
    if problems:
        raise BenchError("processing check failed: " + "; ".join(problems))


def measure_processing(bench: Bench, n: int) -> Processing:
    bare = next(
        v for v in make_variants(bench.pg, bench.valkey, bench.root, None) if "bare" in v.name
    )
    processing = Processing(n)
    for index in range(RUNS):  # alternating, so drift hits both alike
        run = run_once(bare, n, bench.root, index)
        processing.bare.append(
            ProcessingRun(
                rate=run.msgs_per_s,
                timed=run.timed_messages,
                elapsed_s=run.elapsed_s,
                worker_cpu_us=run.cpu_us_per_msg,
                worker_busy=run.cpu_util,
                postgres_cpu_us=None,
                rss_mb=run.rss_mb,
            )
        )
        progress(
            f"processing run {index + 1}/{RUNS} {bare.name} no-op: {run.msgs_per_s:,.0f} msgs/s "
            f"({run.timed_messages:,} in {run.elapsed_s:.2f} s, "
            f"worker CPU {run.cpu_us_per_msg:,.0f} us/msg, {run.cpu_util:.0%} busy)"
        )
        payments = run_payments(bench, processing, index)
        processing.payments.append(payments)
        progress(
            f"processing run {index + 1}/{RUNS} process_event: {payments.rate:,.0f} events/s "
            f"({payments.timed:,} in {payments.elapsed_s:.2f} s, worker CPU "
            f"{payments.worker_cpu_us:,.0f} us/event, {payments.worker_busy:.0%} busy, "
            f"Postgres CPU {payments.postgres_cpu_us:,.0f} us/event); checks passed"
        )
    return processing
