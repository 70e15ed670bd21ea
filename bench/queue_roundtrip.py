"""Queue round trip: a no-op actor through tidemill's stack against bare dramatiq, same run.

    .venv/bin/python -m bench.queue_roundtrip [--quick] [--messages N] [--prefetch P]

Starts an embedded Postgres (migrated) and Valkey under a temporary directory, then for each
variant, three times, alternating:

- enqueue N messages while no worker runs (not timed);
- start the worker subprocess (1 process, 8 threads):
  (tidemill's messages each stand for an outbox row, as relayed jobs do, so its worker marks
  each row done in the message's commit: the durable-jobs cost is in the figure);
  bare     ``python -m dramatiq bench.noop_bare``: RedisBroker, dramatiq's default middleware;
  tidemill ``python -m cli.main worker bench.noop_tidemill``: tidemill's broker and middleware,
           TIDEMILL_ENV=production, LOG_LEVEL=warning, as deployed;
- poll ``HLEN dramatiq:<queue>.msgs`` (a message leaves that hash when it is acked) every
  10 ms: the clock starts when the count first drops below N and stops when it reaches 0, so
  worker start-up is not timed; throughput = messages acked in that window / elapsed;
- read the CPU time the worker process (the dramatiq child, not the parent) used over the
  same window, and its resident memory right after the drain.

Prints a table, then as its last line one JSON object with the medians. The goal (tidemill
within 15% of bare dramatiq) is printed, never asserted: wall times are not pass/fail here.

Read the CPU column too. With dramatiq's default prefetch (2 x threads = 16), a worker's
consumer sleeps 5-10 ms whenever 16 messages are in flight, which caps a no-op actor near
2,000 msgs/s whatever the middleware costs, as long as 16 messages take less than that sleep.
``--prefetch P`` (dramatiq_queue_prefetch, both workers) lifts the cap and shows the
CPU-bound throughput instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import psycopg
import redis
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker

from bench.noop_names import (
    BARE_ACTOR,
    BARE_BROKER_URL_ENV,
    BARE_QUEUE,
    BARE_REDIS_DB,
    NAMESPACE,
    TIDEMILL_ACTOR,
    TIDEMILL_QUEUE,
    TIDEMILL_REDIS_DB,
)
from core.log import configure_logging
from core.proc import free_port, spawn, stop_process, tail
from db.embedded import EmbeddedPostgres, EmbeddedValkey
from db.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MESSAGES = 20_000
QUICK_MESSAGES = 2_000
CPU_BOUND_PREFETCH = 256
RUNS = 3
PROCESSES = 1
THREADS = 8
POLL_S = 0.01
START_TIMEOUT_S = 60.0  # worker start-up, until the first ack
MIN_DRAIN_TIMEOUT_S = 60.0  # plus 10 ms per message: far beyond any plausible drain
GOAL_OVERHEAD = 0.15
MB = 1024 * 1024


class BenchError(RuntimeError):
    """The bench could not measure (a worker died, messages failed, a timeout)."""


@dataclass(frozen=True)
class Variant:
    name: str
    queue: str
    actor: str
    redis_url: str
    argv: list[str]
    env: dict[str, str]
    # tidemill's messages stand for outbox rows, as every relayed job does: the worker marks
    # each row done in the message's commit (the durable-jobs cost is measured, not skipped)
    outbox_url: str | None = None


@dataclass(frozen=True)
class Run:
    msgs_per_s: float
    timed_messages: int
    elapsed_s: float
    rss_mb: float
    cpu_us_per_msg: float  # worker CPU per message: the cost even when not CPU-bound
    cpu_util: float  # worker CPU seconds per wall second (1.0 = one core busy)


@dataclass
class Results:
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def median_rate(self, name: str) -> float:
        return statistics.median(r.msgs_per_s for r in self.runs[name])

    def median_rss(self, name: str) -> float:
        return statistics.median(r.rss_mb for r in self.runs[name])

    def median_cpu_us(self, name: str) -> float:
        return statistics.median(r.cpu_us_per_msg for r in self.runs[name])

    def median_cpu_util(self, name: str) -> float:
        return statistics.median(r.cpu_util for r in self.runs[name])


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    # Anything that would point a worker somewhere other than the bench's own servers.
    for name in (
        "BROKER_URL",
        "dramatiq_queue_prefetch",  # only --prefetch sets it, for both workers alike
        "dramatiq_prom_db",
        "PROMETHEUS_MULTIPROC_DIR",
        "prometheus_multiproc_dir",
    ):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def make_variants(
    pg: EmbeddedPostgres,
    valkey: EmbeddedValkey,
    root: Path,
    prefetch: int | None,
    *,
    without_outbox: bool = False,
) -> list[Variant]:
    python = sys.executable
    pool = ["--processes", str(PROCESSES), "--threads", str(THREADS)]
    common = base_env()
    if prefetch:
        common["dramatiq_queue_prefetch"] = str(prefetch)
    bare_env = dict(common)
    bare_env[BARE_BROKER_URL_ENV] = valkey.url(BARE_REDIS_DB)
    tidemill_env = dict(common)
    tidemill_env.update(
        {
            "DATABASE_URL": pg.url(),
            "REDIS_URL": valkey.url(TIDEMILL_REDIS_DB),
            "TIDEMILL_DATA_DIR": str(root / "data"),
            "TIDEMILL_ENV": "production",
            "LOG_LEVEL": "warning",
        }
    )
    variants = [
        Variant(
            "bare dramatiq",
            BARE_QUEUE,
            BARE_ACTOR,
            valkey.url(BARE_REDIS_DB),
            [python, "-m", "dramatiq", "bench.noop_bare", *pool],
            bare_env,
        ),
        Variant(
            "tidemill",
            TIDEMILL_QUEUE,
            TIDEMILL_ACTOR,
            valkey.url(TIDEMILL_REDIS_DB),
            [python, "-m", "cli.main", "worker", "bench.noop_tidemill", *pool],
            tidemill_env,
            outbox_url=pg.url(),
        ),
    ]
    if without_outbox:
        # the same stack with messages that stand for no outbox row: the done-marking's cost
        # is the difference between the two tidemill lines
        variants.append(
            Variant(
                "tidemill, no outbox row",
                TIDEMILL_QUEUE,
                TIDEMILL_ACTOR,
                valkey.url(TIDEMILL_REDIS_DB),
                [python, "-m", "cli.main", "worker", "bench.noop_tidemill", *pool],
                tidemill_env,
            )
        )
    return variants


def enqueue(variant: Variant, n: int) -> None:
    """N messages through dramatiq's own enqueue path, one by one (not timed)."""
    client = redis.Redis.from_url(variant.redis_url)
    client.flushdb()  # the bench's own server: no leftovers from the previous run
    broker = RedisBroker(client=client, middleware=[])
    outbox_ids: list[int | None] = [None] * n
    if variant.outbox_url:
        with psycopg.connect(variant.outbox_url, autocommit=True) as conn:
            conn.execute("TRUNCATE outbox")
            outbox_ids = [
                int(row[0])
                for row in conn.execute(
                    "INSERT INTO outbox (actor, queue_name, dispatched_at, redeliver_at) "
                    "SELECT %s, %s, now(), now() + interval '1 hour' "
                    "FROM generate_series(1, %s) RETURNING id",
                    (variant.actor, variant.queue, n),
                ).fetchall()
            ]
    try:
        for outbox_id in outbox_ids:
            broker.enqueue(
                Message(
                    queue_name=variant.queue,
                    actor_name=variant.actor,
                    args=(),
                    kwargs={},
                    options={} if outbox_id is None else {"outbox_id": outbox_id},
                )
            )
        count = int(client.hlen(f"{NAMESPACE}:{variant.queue}.msgs"))
    finally:
        client.close()
    if count != n:
        raise BenchError(f"{variant.name}: enqueued {count} messages, expected {n}")


def worker_processes(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The dramatiq worker processes under the CLI's main process (no multiprocessing helpers)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    workers = []
    for child in children:
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "resource_tracker" in cmdline or "forkserver" in cmdline:
            continue
        workers.append(child)
    return workers


def worker_rss_mb(proc: subprocess.Popen[bytes]) -> float:
    total = 0
    found = 0
    for worker in worker_processes(proc):
        try:
            total += worker.memory_info().rss
            found += 1
        except psutil.NoSuchProcess:
            continue
    if found != PROCESSES:
        raise BenchError(f"expected {PROCESSES} worker process(es), found {found}")
    return total / MB


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to dramatiq's main process (it stops its workers), wait; then make sure."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    stop_process(proc, sig=signal.SIGTERM, timeout=30)
    _, alive = psutil.wait_procs(descendants, timeout=10)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=5)


def worker_cpu_s(proc: subprocess.Popen[bytes]) -> float:
    """CPU seconds (user + system) the worker process(es) used so far."""
    total = 0.0
    for worker in worker_processes(proc):
        try:
            times = worker.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


@dataclass(frozen=True)
class Drain:
    messages: int  # acked while the clock ran
    elapsed_s: float
    cpu_s: float  # worker CPU time over the same window


def measure_drain(
    client: redis.Redis, variant: Variant, n: int, proc: subprocess.Popen[bytes], log: Path
) -> Drain:
    msgs_key = f"{NAMESPACE}:{variant.queue}.msgs"
    queue_key = f"{NAMESPACE}:{variant.queue}"

    def counts() -> tuple[int, int, float]:
        with client.pipeline(transaction=False) as pipe:
            pipe.hlen(msgs_key)
            pipe.llen(queue_key)
            unacked, queued = pipe.execute()
        return int(unacked), int(queued), time.perf_counter()

    def check_alive(what: str) -> None:
        if proc.poll() is not None:
            raise BenchError(
                f"{variant.name} worker exited ({proc.returncode}) {what}; "
                f"last log lines:\n{tail(log)}"
            )

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        start_count, _, started = counts()
        if start_count < n:
            cpu_started = worker_cpu_s(proc)
            break
        check_alive("before taking a message")
        if time.monotonic() > deadline:
            raise BenchError(
                f"{variant.name} worker took no message within {START_TIMEOUT_S:.0f} s; "
                f"last log lines:\n{tail(log)}"
            )
        time.sleep(POLL_S)

    deadline = time.monotonic() + MIN_DRAIN_TIMEOUT_S + n * 0.01
    while True:
        time.sleep(POLL_S)
        unacked, queued, now = counts()
        if unacked == 0:
            cpu_used = worker_cpu_s(proc) - cpu_started
            break
        check_alive(f"with {unacked} messages unacked")
        if time.monotonic() > deadline:
            raise BenchError(
                f"{variant.name}: {unacked} messages unacked ({queued} not fetched) "
                f"at the drain deadline"
            )
    if queued:
        raise BenchError(f"{variant.name}: {queued} message ids left in {queue_key}")
    return Drain(messages=start_count, elapsed_s=now - started, cpu_s=cpu_used)


def check_all_done(variant: Variant, n: int) -> None:
    """Every message that stands for an outbox row marked it done. (A no-op actor writes
    nothing to Postgres, so its rows are marked in batches every 250 ms: give them a moment.)"""
    if not variant.outbox_url:
        return
    done = 0
    with psycopg.connect(variant.outbox_url, autocommit=True) as conn:
        for _ in range(100):
            row = conn.execute("SELECT count(done_at) FROM outbox").fetchone()
            done = int(row[0]) if row else 0
            if done == n:
                return
            time.sleep(0.05)
    raise BenchError(f"{variant.name}: {done} of {n} outbox rows marked done")


def check_no_failures(client: redis.Redis, variant: Variant, log: Path) -> None:
    """A failed message is acked too (and re-enqueued delayed, or dead-lettered): not a success."""
    delayed = int(client.hlen(f"{NAMESPACE}:{variant.queue}.DQ.msgs"))
    dead = int(client.hlen(f"{NAMESPACE}:{variant.queue}.XQ.msgs"))
    if delayed or dead:
        raise BenchError(
            f"{variant.name}: {delayed} messages retried, {dead} dead-lettered; "
            f"last log lines:\n{tail(log)}"
        )


def run_once(variant: Variant, n: int, logdir: Path, index: int) -> Run:
    enqueue(variant, n)
    log = logdir / f"{variant.name.replace(' ', '_')}-{index}.log"
    client = redis.Redis.from_url(variant.redis_url)
    with open(log, "wb") as logf:
        proc = spawn(variant.argv, env=variant.env, cwd=ROOT, stdout=logf, stderr=logf)
    try:
        drain = measure_drain(client, variant, n, proc, log)
        rss = worker_rss_mb(proc)
        check_no_failures(client, variant, log)
        check_all_done(variant, n)
    finally:
        stop_worker(proc)
        client.close()
    return Run(
        msgs_per_s=drain.messages / drain.elapsed_s,
        timed_messages=drain.messages,
        elapsed_s=drain.elapsed_s,
        rss_mb=rss,
        cpu_us_per_msg=drain.cpu_s / drain.messages * 1e6,
        cpu_util=drain.cpu_s / drain.elapsed_s,
    )


def report(
    results: Results, bare: str, tidemill: str, n: int, prefetch: int | None
) -> dict[str, Any]:
    bare_rate = results.median_rate(bare)
    tidemill_rate = results.median_rate(tidemill)
    overhead = 1 - tidemill_rate / bare_rate
    rows = []
    for name, runs in results.runs.items():
        each = ", ".join(f"{r.msgs_per_s:,.0f}" for r in runs)
        rows.append(
            (
                name,
                f"{results.median_rate(name):,.0f}",
                each,
                f"{results.median_cpu_us(name):,.0f}",
                f"{results.median_cpu_util(name):.0%}",
                f"{results.median_rss(name):.1f}",
            )
        )
    headers = (
        "variant",
        "msgs/s (median)",
        "runs (msgs/s)",
        "worker CPU us/msg",
        "worker CPU busy",
        "worker RSS MB",
    )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(
        f"queue round trip: {n:,} no-op messages per run, {RUNS} runs per variant, "
        f"worker {PROCESSES} process x {THREADS} threads, "
        f"prefetch {prefetch or f'{2 * THREADS} (default)'}"
    )
    print(line.format(*headers))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))
    verdict = "met" if overhead <= GOAL_OVERHEAD else "NOT met"
    print(
        f"tidemill overhead vs bare dramatiq: {overhead:.1%} "
        f"(goal <= {GOAL_OVERHEAD:.0%}: {verdict})"
    )
    cpu_ratio = results.median_cpu_us(tidemill) / results.median_cpu_us(bare)
    print(
        f"tidemill worker CPU per message: {cpu_ratio:.2f}x bare dramatiq's "
        "(throughput hides it while the worker is not CPU-bound)"
    )
    figures: dict[str, Any] = {
        "noop_msgs_per_s": round(bare_rate, 1),
        "tidemill_msgs_per_s": round(tidemill_rate, 1),
        "overhead": round(overhead, 4),
        "worker_rss_mb": round(results.median_rss(tidemill), 1),
        "messages": n,
    }
    if prefetch:  # not the default configuration: say so in the figures
        figures["queue_prefetch"] = prefetch
    return {"bench": "queue_roundtrip", "figures": figures}


def measure(
    pg: EmbeddedPostgres,
    valkey: EmbeddedValkey,
    root: Path,
    n: int,
    prefetch: int | None,
    *,
    without_outbox: bool = False,
) -> dict[str, Any]:
    variants = make_variants(pg, valkey, root, prefetch, without_outbox=without_outbox)
    results = Results({v.name: [] for v in variants})
    for index in range(RUNS):
        for variant in variants:  # alternating, so drift hits both alike
            run = run_once(variant, n, root, index)
            results.runs[variant.name].append(run)
            print(
                f"  run {index + 1}/{RUNS} {variant.name}: {run.msgs_per_s:,.0f} msgs/s "
                f"({run.timed_messages:,} in {run.elapsed_s:.2f} s, "
                f"worker CPU {run.cpu_us_per_msg:,.0f} us/msg, {run.cpu_util:.0%} busy, "
                f"RSS {run.rss_mb:.1f} MB)",
                file=sys.stderr,
                flush=True,
            )
    return report(results, variants[0].name, variants[1].name, n, prefetch)


def terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwind through the finally blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.queue_roundtrip",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_MESSAGES:,} messages per run instead of {DEFAULT_MESSAGES:,}",
    )
    parser.add_argument("--messages", type=int, help="messages per run (overrides --quick)")
    parser.add_argument(
        "--prefetch",
        type=int,
        help=f"messages a worker prefetches (default: dramatiq's, 2 x threads = {2 * THREADS})",
    )
    parser.add_argument(
        "--without-outbox",
        action="store_true",
        help="also run tidemill with messages that stand for no outbox row (no done-marking)",
    )
    args = parser.parse_args(argv)
    n = args.messages or (QUICK_MESSAGES if args.quick else DEFAULT_MESSAGES)
    if n < 100:
        parser.error("--messages must be at least 100")
    if args.prefetch is not None and args.prefetch < 1:
        parser.error("--prefetch must be at least 1")

    signal.signal(signal.SIGTERM, terminate)
    configure_logging(env="production", level="warning")
    root = Path(tempfile.mkdtemp(prefix="tidemill-bench-"))
    pg = EmbeddedPostgres(root, port=free_port())
    valkey = EmbeddedValkey(root, port=free_port())
    try:
        upgrade(pg.start())
        valkey.start()
        # Two regimes unless one is asked for: dramatiq's default prefetch (the configuration
        # that runs; the queue's polling sets the pace) and a lifted prefetch (the worker is
        # CPU-bound, so every microsecond of middleware shows in throughput).
        passes = [args.prefetch] if args.prefetch else [None, CPU_BOUND_PREFETCH]
        summary: dict[str, Any] = {}
        for prefetch in passes:
            figures = measure(pg, valkey, root, n, prefetch, without_outbox=args.without_outbox)
            if not summary:
                summary = figures
            else:
                summary["figures"].update(
                    cpu_bound_noop_msgs_per_s=figures["figures"]["noop_msgs_per_s"],
                    cpu_bound_tidemill_msgs_per_s=figures["figures"]["tidemill_msgs_per_s"],
                    cpu_bound_overhead=figures["figures"]["overhead"],
                    cpu_bound_prefetch=prefetch,
                )
    except BenchError as exc:
        print(f"queue_roundtrip: error: {exc}", file=sys.stderr)
        return 1
    finally:
        valkey.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
