"""Stripe webhooks: intake through the real HTTP server and processing by a real worker, each
against its no-op baseline measured in the same run.

    .venv/bin/python -m bench.webhooks [--quick] [--intake N] [--events N] [--log-level L]

Starts an embedded Postgres (migrated) and Valkey under a temporary directory, inserts
users, then:

Intake. Two servers, each one uvicorn process on loopback:
  no-op   ``python -m bench.noop_web``: Starlette + uvicorn with ``cli.main web``'s arguments;
          ``POST /webhooks/stripe`` reads the body and answers 200 ``{"received": true}``;
  intake  ``python -m cli.main web``: the receiver (stripe's signature check, JSON checks, one
          transaction storing the event row and its outbox row, a log line).
The load generator runs in this process: CONCURRENCY senders on asyncio, each on its own
keep-alive HTTP/1.1 connection, posting payment_intent.succeeded events, every one a fresh
event id, built and signed with stripe's own signer before the clock starts. By default the
senders write prepared request bytes on asyncio streams (``--client raw``): httpx's
AsyncClient (``--client httpx``) spends ~1.5 ms of CPU per request, 15x the no-op server's,
so with it the baseline measures the client. RUNS alternating rounds of N requests per
variant, each on fresh connections after an untimed warm-up; throughput = the median round,
latency percentiles over every timed request. CPU per request is read for the server
process, Postgres (exited backends included) and the client; and the Postgres connections
opened per round (pg_stat_database.sessions). Afterwards every answer must be 200 with the
expected body, and every intake request must have stored one event row and one outbox row.

Processing. RUNS times, alternating:
  bare     queue_roundtrip's bare-dramatiq no-op worker (its ``run_once``), N messages: the
           yardstick, what a message round trip costs with no work;
  payments N payment_intent.succeeded events stored as the receiver stores them (event row,
           status received, plus outbox row), relayed by the real relay (``workers.outbox
           .drain``), then ``python -m cli.main worker --processes 1 --threads 8 --queue
           payments``; the drain is timed as queue_roundtrip times it (HLEN of
           ``dramatiq:payments.msgs``, from the first ack to the last).
After each payments run: every event processed, no message retried or dead-lettered, one
ledger entry per event, each user's balance equal to the sum of their ledger entries and to
the amounts sent. A failed check exits 1.

The servers and the worker run with TIDEMILL_ENV=production and LOG_LEVEL=info, as
docker-compose deploys them (``--log-level`` to compare). Goals (intake >= 0.5 x no-op,
processing >= 0.3 x no-op) are printed, never asserted. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import httpx
import psutil
import psycopg
import redis
import stripe

from bench import noop_web
from bench.noop_names import NAMESPACE, TIDEMILL_REDIS_DB
from bench.queue_roundtrip import (
    PROCESSES,
    RUNS,
    THREADS,
    BenchError,
    Variant,
    base_env,
    check_no_failures,
    make_variants,
    measure_drain,
    run_once,
    stop_worker,
    terminate,
    worker_rss_mb,
)
from core.log import configure_logging
from core.proc import free_port, spawn, stop_process, tail, wait_until
from core.stripe_samples import sample
from db.embedded import EmbeddedPostgres, EmbeddedValkey
from db.engine import dispose_all
from db.migrate import upgrade
from web.webhooks import PATH

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INTAKE = 5_000
QUICK_INTAKE = 1_000
DEFAULT_EVENTS = 5_000
QUICK_EVENTS = 1_000
CONCURRENCY = 16
WARMUP_PER_SENDER = 2  # untimed requests before each round: connections open, code warm
USERS = 100
EVENT_TYPE = "payment_intent.succeeded"
CURRENCY = "try"  # two decimals: 2500 minor units = 25.00
HOST = "127.0.0.1"
SERVER_START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 60.0
GOAL_INTAKE_RATIO = 0.5
GOAL_PROCESSING_RATIO = 0.3
NOOP_ANSWER = {"received": True}
INTAKE_ANSWER = {"received": True, "duplicate": False}


# --- CPU accounting ----------------------------------------------------------------------------


class CpuProbe:
    """CPU seconds (user + system) used by a process and its descendants, exited ones
    included: a Postgres backend that starts and ends inside the window (a connection the
    pool opened and closed) is counted through the postmaster's reaped-children times."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid

    def sample(self) -> float:
        if self.pid is None:  # this process: the load generator
            return time.process_time()
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
            reaped = root.cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        total = reaped.children_user + reaped.children_system
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                cpu = proc.cpu_times()
                total += cpu.user + cpu.system
        return total


def sample_all(probes: dict[str, CpuProbe]) -> dict[str, float]:
    return {name: probe.sample() for name, probe in probes.items()}


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before}


# --- shared set-up -----------------------------------------------------------------------------


@dataclass
class Bench:
    root: Path
    pg: EmbeddedPostgres
    valkey: EmbeddedValkey
    secret: str
    log_level: str
    users: list[str] = field(default_factory=list)
    rnd: random.Random = field(default_factory=lambda: random.Random(20_240_620))

    @property
    def database_url(self) -> str:
        return self.pg.url()

    @property
    def redis_url(self) -> str:
        return self.valkey.url(TIDEMILL_REDIS_DB)

    def tidemill_env(self) -> dict[str, str]:
        """A tidemill process's environment: the bench's servers, production logs."""
        env = base_env()
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "TIDEMILL_DATA_DIR": str(self.root / "data"),
                "TIDEMILL_ENV": "production",
                "LOG_LEVEL": self.log_level,
                "STRIPE_WEBHOOK_SECRETS": self.secret,
            }
        )
        return env

    def sql(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.database_url, autocommit=True)

    def pg_probe(self) -> CpuProbe:
        assert self.pg.proc is not None
        return CpuProbe(self.pg.proc.pid)

    def event(self, index: int) -> tuple[dict[str, Any], int]:
        """A fresh payment_intent.succeeded event for one of the users, and its amount."""
        amount = self.rnd.randint(100, 100_000)
        user = self.users[index % len(self.users)]
        return sample(EVENT_TYPE, user_id=user, amount=amount, currency=CURRENCY), amount


def insert_users(bench: Bench, n: int) -> None:
    users = [str(uuid.uuid4()) for _ in range(n)]
    with bench.sql() as sql, sql.cursor() as cur:
        cur.executemany(
            "INSERT INTO users (id, email, full_name) VALUES (%s, %s, 'Bench User')",
            [(u, f"bench-{u}@example.com") for u in users],
        )
    bench.users = users


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*headers))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


# --- intake ------------------------------------------------------------------------------------

Answer = tuple[int, bytes]


@dataclass(frozen=True)
class Round:
    requests: int
    elapsed_s: float
    latencies_s: list[float]
    cpu_s: dict[str, float]  # component -> CPU seconds over the round
    pg_sessions: int  # Postgres connections opened during the round

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed_s


@dataclass
class IntakeVariant:
    name: str
    port: int
    expected: dict[str, Any]
    probes: dict[str, CpuProbe]
    rounds: list[Round] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)  # every answer, warm-ups included

    def median_rate(self) -> float:
        return statistics.median(r.rate for r in self.rounds)

    def latencies(self) -> list[float]:
        return [lat for r in self.rounds for lat in r.latencies_s]

    def cpu_us_per_request(self, component: str) -> float:
        cpu = sum(r.cpu_s[component] for r in self.rounds)
        return cpu / sum(r.requests for r in self.rounds) * 1e6

    def pg_sessions_per_1k(self) -> float:
        return sum(r.pg_sessions for r in self.rounds) / sum(r.requests for r in self.rounds) * 1e3


class Client(Protocol):
    """The load generator: `open` one connection per sender, `post` on a sender's connection."""

    def prepare(self, body: bytes, signature: str) -> Any: ...

    async def open(self, senders: int) -> None: ...

    async def post(self, sender: int, request: Any) -> Answer: ...

    async def close(self) -> None: ...


class RawClient:
    """HTTP/1.1 over asyncio streams, one keep-alive connection per sender. Each request is
    written as bytes built before the clock starts and its answer is read by Content-Length:
    tens of microseconds of client CPU per request. The client shares the machine with the
    server, so its CPU must stay small next to the no-op server's; httpx's does not (several
    times the no-op server's), which makes the baseline measure the client."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def prepare(self, body: bytes, signature: str) -> bytes:
        head = (
            f"POST {PATH} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
            f"Content-Type: application/json\r\nStripe-Signature: {signature}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def open(self, senders: int) -> None:
        for _ in range(senders):
            self.conns.append(await asyncio.open_connection(HOST, self.port))

    async def post(self, sender: int, request: bytes) -> Answer:
        reader, writer = self.conns[sender]
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return int(head[9:12]), await reader.readexactly(length)

    async def close(self) -> None:
        for _, writer in self.conns:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self.conns = []


class HttpxClient:
    """httpx.AsyncClient, HTTP/1.1 keep-alive, one pooled connection per sender."""

    def __init__(self, port: int) -> None:
        self.url = f"http://{HOST}:{port}{PATH}"
        self.client: httpx.AsyncClient | None = None

    def prepare(self, body: bytes, signature: str) -> tuple[bytes, dict[str, str]]:
        return body, {"Content-Type": "application/json", "Stripe-Signature": signature}

    async def open(self, senders: int) -> None:
        limits = httpx.Limits(max_connections=senders, max_keepalive_connections=senders)
        self.client = httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S)

    async def post(self, sender: int, request: tuple[bytes, dict[str, str]]) -> Answer:
        assert self.client is not None
        body, headers = request
        response = await self.client.post(self.url, content=body, headers=headers)
        return response.status_code, response.content

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None


CLIENTS: dict[str, type[RawClient] | type[HttpxClient]] = {"raw": RawClient, "httpx": HttpxClient}


def signed_requests(bench: Bench, client: Client, n: int) -> list[Any]:
    """N fresh events, serialised, signed now (the signature carries the current time) and
    prepared for the client."""
    requests = []
    for i in range(n):
        event, _ = bench.event(i)
        body = json.dumps(event)
        signature = stripe.WebhookSignature.generate_signature_header(body, bench.secret)
        requests.append(client.prepare(body.encode(), signature))
    return requests


async def post_all(
    client: Client, requests: list[Any], concurrency: int
) -> tuple[float, list[float], list[Answer]]:
    """Post every request, `concurrency` at a time; (elapsed, latencies, answers)."""
    latencies = [0.0] * len(requests)
    answers: list[Answer] = [(0, b"")] * len(requests)
    indices = iter(range(len(requests)))  # shared: each sender takes the next request

    async def sender(number: int) -> None:
        for i in indices:
            started = time.perf_counter()
            answers[i] = await client.post(number, requests[i])
            latencies[i] = time.perf_counter() - started

    started = time.perf_counter()
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S + len(requests) * 0.1):
            await asyncio.gather(*(sender(k) for k in range(concurrency)))
    except (OSError, TimeoutError, asyncio.IncompleteReadError, httpx.HTTPError) as exc:
        raise BenchError(f"intake request failed: {type(exc).__name__}: {exc}") from None
    return time.perf_counter() - started, latencies, answers


_SESSIONS = "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"


def pg_sessions(stats: psycopg.Connection[Any]) -> int:
    row = stats.execute(_SESSIONS).fetchone()
    assert row is not None
    return int(row[0])


async def run_intake_rounds(
    bench: Bench, variants: list[IntakeVariant], n: int, concurrency: int, client_kind: str
) -> None:
    with bench.sql() as stats:
        await _run_intake_rounds(bench, variants, n, concurrency, client_kind, stats)


async def _run_intake_rounds(
    bench: Bench,
    variants: list[IntakeVariant],
    n: int,
    concurrency: int,
    client_kind: str,
    stats: psycopg.Connection[Any],
) -> None:
    for index in range(RUNS):
        for variant in variants:  # alternating, so drift hits both alike
            client: Client = CLIENTS[client_kind](variant.port)
            try:
                # Fresh connections every round (uvicorn closes keep-alive connections idle
                # for 5 s while the other variant runs), warmed up untimed.
                await client.open(concurrency)
                warmup = signed_requests(bench, client, WARMUP_PER_SENDER * concurrency)
                _, _, answers = await post_all(client, warmup, concurrency)
                variant.answers.extend(answers)
                requests = signed_requests(bench, client, n)
                sessions = pg_sessions(stats)
                before = sample_all(variant.probes)
                elapsed, latencies, answers = await post_all(client, requests, concurrency)
                after = sample_all(variant.probes)
                sessions = pg_sessions(stats) - sessions
                variant.answers.extend(answers)
            finally:
                await client.close()
            result = Round(n, elapsed, latencies, cpu_used(before, after), sessions)
            variant.rounds.append(result)
            progress(
                f"intake round {index + 1}/{RUNS} {variant.name}: {result.rate:,.0f} req/s "
                f"({n:,} in {elapsed:.2f} s, p50 {percentile(latencies, 50) * 1e3:.1f} ms, "
                + ", ".join(
                    f"{name} CPU {cpu / n * 1e6:,.0f} us/req" for name, cpu in result.cpu_s.items()
                )
                + f", {sessions} Postgres connections opened)"
            )


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def http_server(
    name: str, argv: list[str], env: dict[str, str], port: int, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as logf:
        proc = spawn(argv, env=env, cwd=ROOT, stdout=logf, stderr=logf)
    try:
        if not wait_until(
            lambda: _listening(port),
            timeout=SERVER_START_TIMEOUT_S,
            interval=0.1,
            alive=lambda: proc.poll() is None,
        ):
            raise BenchError(
                f"{name} server did not start on port {port} (exit code {proc.poll()}); "
                f"last log lines:\n{tail(log)}"
            )
        yield proc
    finally:
        stop_process(proc, sig=signal.SIGTERM, timeout=15)


def check_answers(variant: IntakeVariant) -> None:
    bad: dict[str, int] = {}
    for status, body in variant.answers:
        try:
            ok = status == 200 and json.loads(body) == variant.expected
        except ValueError:
            ok = False
        if not ok:
            key = f"{status} {body[:120]!r}"
            bad[key] = bad.get(key, 0) + 1
    if bad:
        shown = "; ".join(f"{count} x {key}" for key, count in bad.items())
        raise BenchError(f"{variant.name}: {sum(bad.values())} unexpected answers: {shown}")


def check_stored(bench: Bench, expected: int) -> None:
    """One event row (status received) and one pending outbox row per accepted request."""
    with bench.sql() as sql:
        events = dict(
            sql.execute("SELECT status, count(*) FROM webhook_events GROUP BY status").fetchall()
        )
        outbox = sql.execute(
            "SELECT count(*), count(DISTINCT args) FROM outbox "
            "WHERE actor = 'process_event' AND queue_name = 'payments' AND dispatched_at IS NULL"
        ).fetchone()
        unmatched = sql.execute(
            "SELECT count(*) FROM webhook_events e WHERE NOT EXISTS "
            "(SELECT 1 FROM outbox o WHERE o.args = jsonb_build_array(e.id))"
        ).fetchone()
    assert outbox is not None and unmatched is not None
    problems = []
    if events != {"received": expected}:
        problems.append(f"webhook_events by status {events}, expected {{'received': {expected}}}")
    if tuple(outbox) != (expected, expected):
        problems.append(
            f"{outbox[0]} pending outbox rows ({outbox[1]} distinct), expected {expected}"
        )
    if unmatched[0]:
        problems.append(f"{unmatched[0]} stored events have no outbox row")
    if problems:
        raise BenchError("intake stored the wrong rows: " + "; ".join(problems))


def clear_intake(bench: Bench) -> None:
    """The processing runs relay every pending outbox row: start them from empty tables."""
    with bench.sql() as sql:
        sql.execute("DELETE FROM outbox")
        sql.execute("DELETE FROM webhook_events")


def measure_intake(bench: Bench, n: int, concurrency: int, client_kind: str) -> list[IntakeVariant]:
    if noop_web.PATH != PATH:
        raise BenchError(f"bench.noop_web serves {noop_web.PATH}, the receiver {PATH}")
    python = sys.executable
    env = bench.tidemill_env()
    noop_port, web_port = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        noop = stack.enter_context(
            http_server(
                "no-op",
                [python, "-m", "bench.noop_web", "--host", HOST, "--port", str(noop_port)],
                env,
                noop_port,
                bench.root / "noop_web.log",
            )
        )
        web = stack.enter_context(
            http_server(
                "tidemill web",
                [python, "-m", "cli.main", "web", "--host", HOST, "--port", str(web_port)],
                env,
                web_port,
                bench.root / "web.log",
            )
        )
        client, postgres = CpuProbe(None), bench.pg_probe()
        variants = [
            IntakeVariant(
                "no-op server",
                noop_port,
                NOOP_ANSWER,
                {"client": client, "server": CpuProbe(noop.pid), "postgres": postgres},
            ),
            IntakeVariant(
                "tidemill receiver",
                web_port,
                INTAKE_ANSWER,
                {"client": client, "server": CpuProbe(web.pid), "postgres": postgres},
            ),
        ]
        asyncio.run(run_intake_rounds(bench, variants, n, concurrency, client_kind))
        if web.poll() is not None:
            raise BenchError(f"tidemill web exited early:\n{tail(bench.root / 'web.log')}")
    for variant in variants:
        check_answers(variant)
    receiver = variants[1]
    check_stored(bench, len(receiver.answers))
    clear_intake(bench)
    return variants


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


# --- report ------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def report(
    intake: list[IntakeVariant],
    processing: Processing,
    *,
    n_intake: int,
    concurrency: int,
    client_kind: str,
    log_level: str,
    took_s: float,
) -> dict[str, Any]:
    noop, receiver = intake
    print(
        f"webhook intake: {RUNS} rounds of {n_intake:,} POST /webhooks/stripe per variant, "
        f"{concurrency} in flight ({client_kind} client, HTTP/1.1 keep-alive, loopback), "
        f"1 uvicorn process each, LOG_LEVEL={log_level}"
    )
    rows = []
    for v in intake:
        lat = v.latencies()
        rows.append(
            (
                v.name,
                f"{v.median_rate():,.0f}",
                ", ".join(f"{r.rate:,.0f}" for r in v.rounds),
                ms(percentile(lat, 50)),
                ms(percentile(lat, 99)),
                f"{v.cpu_us_per_request('server'):,.0f}",
                f"{v.cpu_us_per_request('postgres'):,.0f}",
                f"{v.cpu_us_per_request('client'):,.0f}",
                f"{v.pg_sessions_per_1k():,.0f}",
            )
        )
    print_table(
        (
            "variant",
            "req/s (median)",
            "rounds (req/s)",
            "p50 ms",
            "p99 ms",
            "server CPU us/req",
            "Postgres CPU us/req",
            "client CPU us/req",
            "PG conns opened /1k req",
        ),
        rows,
    )
    intake_ratio = receiver.median_rate() / noop.median_rate()
    verdict = "met" if intake_ratio >= GOAL_INTAKE_RATIO else "NOT met"
    print(f"intake / no-op: {intake_ratio:.2f} (goal >= {GOAL_INTAKE_RATIO}: {verdict})")
    print()

    print(
        f"webhook processing: {processing.n:,} messages per run, {RUNS} runs per variant, "
        f"worker {PROCESSES} process x {THREADS} threads, default prefetch, "
        f"LOG_LEVEL={log_level} (tidemill)"
    )
    proc_rows = []
    for name, runs in (
        ("bare dramatiq no-op", processing.bare),
        ("process_event (payment_intent.succeeded)", processing.payments),
    ):
        pg_cpu = [r.postgres_cpu_us for r in runs if r.postgres_cpu_us is not None]
        proc_rows.append(
            (
                name,
                f"{statistics.median(r.rate for r in runs):,.0f}",
                ", ".join(f"{r.rate:,.0f}" for r in runs),
                f"{statistics.median(r.worker_cpu_us for r in runs):,.0f}",
                f"{statistics.median(r.worker_busy for r in runs):.0%}",
                f"{statistics.median(pg_cpu):,.0f}" if pg_cpu else "-",
                f"{statistics.median(r.rss_mb for r in runs):.1f}",
            )
        )
    print_table(
        (
            "variant",
            "msgs/s (median)",
            "runs (msgs/s)",
            "worker CPU us/msg",
            "worker CPU busy",
            "Postgres CPU us/msg",
            "worker RSS MB",
        ),
        proc_rows,
    )
    noop_rate = statistics.median(r.rate for r in processing.bare)
    events_rate = statistics.median(r.rate for r in processing.payments)
    processing_ratio = events_rate / noop_rate
    verdict = "met" if processing_ratio >= GOAL_PROCESSING_RATIO else "NOT met"
    print(
        f"processing / no-op: {processing_ratio:.2f} (goal >= {GOAL_PROCESSING_RATIO}: {verdict})"
    )
    print(
        f"checks passed: {processing.total_events:,} events processed once each, "
        f"{processing.total_events:,} ledger entries, every balance = sum of its ledger "
        "entries = amounts sent"
    )
    print(
        f"side effects: {processing.side_effect_rows:,} cache-invalidation outbox rows written "
        "by the users trigger (the app-writes flow, measured by bench.cache; not relayed here)"
    )
    print(f"took {took_s:.0f} s")
    lat = receiver.latencies()
    noop_lat = noop.latencies()
    figures: dict[str, Any] = {
        "intake_ratio": round(intake_ratio, 3),
        "intake_p50_ms": round(percentile(lat, 50) * 1e3, 2),
        "intake_p99_ms": round(percentile(lat, 99) * 1e3, 2),
        "processing_ratio": round(processing_ratio, 3),
        "events_per_s": round(events_rate, 1),
        "intake_events_per_s": round(receiver.median_rate(), 1),
        "noop_requests_per_s": round(noop.median_rate(), 1),
        "noop_p50_ms": round(percentile(noop_lat, 50) * 1e3, 2),
        "noop_p99_ms": round(percentile(noop_lat, 99) * 1e3, 2),
        "noop_msgs_per_s": round(noop_rate, 1),
        "intake_server_cpu_us_per_event": round(receiver.cpu_us_per_request("server"), 1),
        "noop_server_cpu_us_per_request": round(noop.cpu_us_per_request("server"), 1),
        "intake_postgres_cpu_us_per_event": round(receiver.cpu_us_per_request("postgres"), 1),
        "intake_pg_connections_per_1k": round(receiver.pg_sessions_per_1k(), 1),
        "worker_cpu_us_per_event": round(
            statistics.median(r.worker_cpu_us for r in processing.payments), 1
        ),
        "intake_requests": n_intake,
        "processing_events": processing.n,
        "concurrency": concurrency,
        "client": client_kind,
        "log_level": log_level,
    }
    return {"bench": "webhooks", "figures": figures}


# --- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.webhooks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_INTAKE:,} requests and {QUICK_EVENTS:,} events instead of "
        f"{DEFAULT_INTAKE:,} and {DEFAULT_EVENTS:,}",
    )
    parser.add_argument("--intake", type=int, help="requests per intake variant and round")
    parser.add_argument("--events", type=int, help="events (and no-op messages) per run")
    parser.add_argument(
        "--concurrency", type=int, default=CONCURRENCY, help="intake requests in flight"
    )
    parser.add_argument(
        "--client",
        default="raw",
        choices=sorted(CLIENTS),
        help="intake load generator (default: raw, asyncio streams; httpx: httpx.AsyncClient, "
        "whose own CPU caps the no-op baseline)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="LOG_LEVEL of the web server and worker (default: info, as deployed)",
    )
    args = parser.parse_args(argv)
    n_intake = args.intake or (QUICK_INTAKE if args.quick else DEFAULT_INTAKE)
    n_events = args.events or (QUICK_EVENTS if args.quick else DEFAULT_EVENTS)
    if n_intake < 100 or n_events < 100:
        parser.error("--intake and --events must be at least 100")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")

    started = time.monotonic()
    signal.signal(signal.SIGTERM, terminate)
    configure_logging(env="production", level="warning")
    root = Path(tempfile.mkdtemp(prefix="tidemill-bench-"))
    pg = EmbeddedPostgres(root, port=free_port())
    valkey = EmbeddedValkey(root, port=free_port())
    bench = Bench(
        root, pg, valkey, secret=f"whsec_bench_{secrets.token_hex(16)}", log_level=args.log_level
    )
    try:
        upgrade(pg.start())
        valkey.start()
        # This process relays outbox rows itself (workers.outbox.drain): its settings, read
        # when workers.broker is first imported, must name the bench's servers.
        os.environ.update(
            DATABASE_URL=bench.database_url,
            REDIS_URL=bench.redis_url,
            TIDEMILL_DATA_DIR=str(root / "data"),
            TIDEMILL_ENV="production",
            LOG_LEVEL="warning",
        )
        os.environ.pop("BROKER_URL", None)
        insert_users(bench, USERS)
        intake = measure_intake(bench, n_intake, args.concurrency, args.client)
        processing = measure_processing(bench, n_events)
        summary = report(
            intake,
            processing,
            n_intake=n_intake,
            concurrency=args.concurrency,
            client_kind=args.client,
            log_level=args.log_level,
            took_s=time.monotonic() - started,
        )
    except BenchError as exc:
        print(f"webhooks: error: {exc}", file=sys.stderr)
        return 1
    finally:
        dispose_all()  # this process's pools (the relay's), before Postgres stops
        valkey.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
