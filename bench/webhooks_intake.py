"""Intake half of bench/webhooks.py: signed requests from asyncio senders against the no-op
server and the real receiver, and the checks that every answer and every stored row is right."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import psycopg
import stripe

from bench import noop_web
from bench.queue_roundtrip import (
    RUNS,
    BenchError,
)
from bench.webhooks_common import (
    HOST,
    INTAKE_ANSWER,
    NOOP_ANSWER,
    REQUEST_TIMEOUT_S,
    ROOT,
    SERVER_START_TIMEOUT_S,
    WARMUP_PER_SENDER,
    Answer,
    Bench,
    CpuProbe,
    cpu_used,
    percentile,
    progress,
    sample_all,
)
from core.proc import free_port, spawn, stop_process, tail, wait_until
from web.webhooks import PATH


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
