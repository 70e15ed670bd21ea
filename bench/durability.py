"""Durability: wipe the broker with jobs in flight; count what was lost and what was doubled,
time the recovery, and measure what the rescuer costs in throughput.

    .venv/bin/python -m bench.durability [--quick] [--jobs N]

Starts an embedded Postgres (migrated) and Valkey under a temporary directory, a real
`tidemill relay` (with its rescuer) and a real worker (1 process x 8 threads) for the bench
actor, whose effect is one row per run in a table without a unique key: a job applied twice is
a doubled row, and nothing but the done-marking prevents it.

(a) Wipe. N outbox rows are written; once the relay has dispatched all of them (most queued,
    some prefetched or running, some done) the broker is wiped with FLUSHALL. ``recovered_s``
    is the time from the wipe until every row is done; ``lost`` = jobs with no effect,
    ``doubled`` = effect rows beyond one per job. The redelivery deadline is
    ``TIDEMILL_REDELIVER_AFTER_S`` = 10 s here, so recovered_s is that plus the time to work
    through what was re-sent.
(b) Cost of the done-marking: a job's transaction (an effect insert, commit) with and without
    the done-marking UPDATE, in this process (``job_txn_us``, ``job_txn_with_done_mark_us``).
(c) Cost of the rescuer. N jobs from outbox insert to all done (deadline 600 s, so nothing
    is overdue), with the rescuer polling every second vs off (a poll interval longer than
    the run), alternating, median of the runs:
    ``rescue_overhead`` = 1 - rate(on) / rate(off).

Prints a table, then as its last line one JSON object with the figures. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
import redis

from core.log import configure_logging
from core.proc import free_port, spawn, stop_process, tail
from db.embedded import EmbeddedPostgres, EmbeddedValkey
from db.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
# The bench actor (bench/durability_actor.py, imported only by the worker and relay processes:
# importing it builds tidemill's broker from the environment).
QUEUE = "bench_durable"
ACTOR = "bench_durable_effect"
DEFAULT_JOBS = 10_000
QUICK_JOBS = 2_000
DEADLINE_S = 10.0
THROUGHPUT_DEADLINE_S = 600.0
TIMEOUT_S = 600.0


class BenchError(RuntimeError):
    """The bench could not measure (a process died, a timeout)."""


def base_env(
    pg_url: str, redis_url: str, root: Path, *, rescuer_poll_s: float, deadline_s: float
) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("BROKER_URL", "dramatiq_prom_db", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(name, None)
    env.update(
        {
            "DATABASE_URL": pg_url,
            "REDIS_URL": redis_url,
            "TIDEMILL_DATA_DIR": str(root / "data"),
            "TIDEMILL_ENV": "production",
            "LOG_LEVEL": "warning",
            "TIDEMILL_REDELIVER_AFTER_S": str(deadline_s),
            "TIDEMILL_RESCUER_POLL_S": str(rescuer_poll_s),
            "TIDEMILL_RELAY_POLL_S": "0.5",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        }
    )
    return env


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return spawn(
            [sys.executable, "-m", "cli.main", *argv], env=env, cwd=ROOT, stdout=out, stderr=out
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, sig=signal.SIGTERM, timeout=30, group=True)


def reset(conn: psycopg.Connection[Any], client: redis.Redis) -> None:
    conn.execute("TRUNCATE outbox, bench_effects, job_counters")
    client.flushall()


def add_jobs(conn: psycopg.Connection[Any], n: int) -> None:
    conn.execute(
        "INSERT INTO outbox (actor, queue_name, args) "
        "SELECT %s, %s, jsonb_build_array(g) FROM generate_series(1, %s) g",
        (ACTOR, QUEUE, n),
    )


def counts(conn: psycopg.Connection[Any]) -> tuple[int, int, int]:
    """(rows dispatched, rows done, rows) of the outbox."""
    row = conn.execute(
        "SELECT count(dispatched_at), count(done_at), count(*) FROM outbox"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def wait(what: str, check: Any, procs: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not check():
        for proc, log in procs:
            if proc.poll() is not None:
                raise BenchError(f"a process exited ({proc.returncode}) {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out {what}")
        time.sleep(0.05)


def effects(conn: psycopg.Connection[Any], n: int) -> tuple[int, int]:
    """(lost, doubled)"""
    row = conn.execute("SELECT count(*), count(DISTINCT job) FROM bench_effects").fetchone()
    assert row is not None
    total, distinct = int(row[0]), int(row[1])
    return n - distinct, total - distinct


def start_system(env: dict[str, str], root: Path, tag: str) -> list[tuple[Any, Path]]:
    """A real worker (1 process, 8 threads, the bench queue) and a real relay (which runs the
    rescuer), each logging to ``root/TAG-*.log``: [(worker, its log), (relay, its log)]."""
    worker_log, relay_log = root / f"{tag}-worker.log", root / f"{tag}-relay.log"
    worker_argv = ["worker", "bench.durability_actor", "--processes", "1", "--threads", "8"]
    worker = start([*worker_argv, "--queue", QUEUE], env, worker_log)
    relay = start(["relay", "bench.durability_actor"], env, relay_log)
    return [(worker, worker_log), (relay, relay_log)]


def wipe_run(pg_url: str, redis_url: str, root: Path, n: int) -> dict[str, Any]:
    env = base_env(pg_url, redis_url, root, rescuer_poll_s=1.0, deadline_s=DEADLINE_S)
    client = redis.Redis.from_url(redis_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        reset(conn, client)
        procs = start_system(env, root, "wipe")
        worker, relay = (proc for proc, _ in procs)
        try:
            add_jobs(conn, n)
            wait("dispatching", lambda: counts(conn)[0] == n, procs)
            _, done_before, _ = counts(conn)
            queued = int(client.hlen(f"dramatiq:{QUEUE}.msgs"))
            client.flushall()
            wiped = time.perf_counter()
            wait("recovering", lambda: counts(conn)[1] == n, procs)
            recovered_s = time.perf_counter() - wiped
            time.sleep(1.0)  # any straggling duplicate delivery gets its chance to double
            lost, doubled = effects(conn, n)
            rescued = conn.execute(
                "SELECT coalesce(sum(value), 0) FROM job_counters WHERE name = 'rescued'"
            ).fetchone()
        finally:
            stop(relay)
            stop(worker)
    assert rescued is not None
    return {
        "lost": lost,
        "doubled": doubled,
        "recovered_s": round(recovered_s, 2),
        "done_before_wipe": done_before,
        "in_broker_at_wipe": queued,
        "rescued": int(rescued[0]),
    }


def throughput_run(
    pg_url: str, redis_url: str, root: Path, n: int, *, rescuer: bool, index: int
) -> float:
    # A deadline longer than the run: what the rescuer costs when nothing is lost (its polls).
    # A deadline shorter than a backlog's drain re-sends still-queued jobs; the wipe run shows
    # how many.
    env = base_env(
        pg_url,
        redis_url,
        root,
        rescuer_poll_s=1.0 if rescuer else 86_400.0,
        deadline_s=THROUGHPUT_DEADLINE_S,
    )
    client = redis.Redis.from_url(redis_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        reset(conn, client)
        tag = f"{'on' if rescuer else 'off'}-{index}"
        procs = start_system(env, root, tag)
        worker, relay = (proc for proc, _ in procs)
        try:
            # both processes up: a warm-up job goes all the way through
            conn.execute(
                "INSERT INTO outbox (actor, queue_name, args) VALUES (%s, %s, '[0]'::jsonb)",
                (ACTOR, QUEUE),
            )
            wait("warming up", lambda: counts(conn)[1] == 1, procs)
            started = time.perf_counter()
            add_jobs(conn, n)
            wait("draining", lambda: counts(conn)[1] == n + 1, procs)
            elapsed = time.perf_counter() - started
        finally:
            stop(relay)
            stop(worker)
    return n / elapsed


def done_mark_cost(pg_url: str, n: int, *, reps: int = 3) -> tuple[float, float]:
    """(us per job transaction without, with the done-marking UPDATE): the effect insert and
    commit alone vs the same plus ``workers.jobs``' UPDATE, alternating, medians."""
    from workers.jobs import _MARK_DONE, COALESCED_ACTORS

    scrub = sorted(COALESCED_ACTORS)
    with psycopg.connect(pg_url) as conn:
        conn.execute("TRUNCATE outbox, bench_effects")
        ids = [
            int(r[0])
            for r in conn.execute(
                "INSERT INTO outbox (actor, queue_name, dispatched_at, redeliver_at) "
                "SELECT %s, %s, now(), now() FROM generate_series(1, %s) RETURNING id",
                (ACTOR, QUEUE, n * reps),
            ).fetchall()
        ]
        conn.commit()
        plain: list[float] = []
        marked: list[float] = []
        for rep in range(reps):
            for mark in (False, True):
                chunk = ids[rep * n : (rep + 1) * n]
                started = time.perf_counter()
                for job in chunk:
                    conn.execute("INSERT INTO bench_effects (job) VALUES (%s)", (job,))
                    if mark:
                        conn.execute(_MARK_DONE, {"ids": [job], "scrub": scrub})
                    conn.commit()
                took = (time.perf_counter() - started) / len(chunk) * 1e6
                (marked if mark else plain).append(took)
    return statistics.median(plain), statistics.median(marked)


def terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.durability",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_JOBS:,} jobs, one run each")
    parser.add_argument("--jobs", type=int, help="jobs per run (overrides --quick)")
    args = parser.parse_args(argv)
    n = args.jobs or (QUICK_JOBS if args.quick else DEFAULT_JOBS)
    runs = 1 if args.quick else 3

    signal.signal(signal.SIGTERM, terminate)
    configure_logging(env="production", level="warning")
    root = Path(tempfile.mkdtemp(prefix="tidemill-bench-durability-"))
    pg = EmbeddedPostgres(root, port=free_port())
    valkey = EmbeddedValkey(root, port=free_port())
    try:
        pg_url = pg.start()
        upgrade(pg_url)
        redis_url = valkey.start()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_effects (job bigint NOT NULL)")  # no unique key
        plain_us, marked_us = done_mark_cost(pg_url, min(n, 2_000))
        print(
            f"a job's transaction (effect insert + commit): {plain_us:,.0f} us; with the "
            f"done-marking UPDATE: {marked_us:,.0f} us (+{marked_us / plain_us - 1:.0%})",
            flush=True,
        )
        wipe = wipe_run(pg_url, redis_url, root, n)
        print(
            f"wipe: {n:,} jobs, FLUSHALL once all were dispatched ({wipe['done_before_wipe']:,} "
            f"done, {wipe['in_broker_at_wipe']:,} in the broker): lost {wipe['lost']}, "
            f"doubled {wipe['doubled']}, all done {wipe['recovered_s']:.1f} s after the wipe "
            f"(deadline {DEADLINE_S:.0f} s; {wipe['rescued']:,} re-sent)",
            flush=True,
        )
        rates: dict[bool, list[float]] = {True: [], False: []}
        for index in range(runs):
            for rescuer in (False, True):  # alternating, so drift hits both alike
                rate = throughput_run(pg_url, redis_url, root, n, rescuer=rescuer, index=index)
                rates[rescuer].append(rate)
                print(
                    f"  run {index + 1}/{runs} rescuer {'on ' if rescuer else 'off'}: "
                    f"{rate:,.0f} jobs/s",
                    file=sys.stderr,
                    flush=True,
                )
    except BenchError as exc:
        print(f"durability: error: {exc}", file=sys.stderr)
        return 1
    finally:
        valkey.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    overhead = 1 - on / off
    print(f"throughput, outbox insert to done: rescuer off {off:,.0f} jobs/s, on {on:,.0f} jobs/s")
    print(f"rescue_overhead: {overhead:.1%}")
    figures = {
        "jobs": n,
        "lost": wipe["lost"],
        "doubled": wipe["doubled"],
        "recovered_s": wipe["recovered_s"],
        "redeliver_after_s": DEADLINE_S,
        "rescued": wipe["rescued"],
        "jobs_per_s_rescuer_off": round(off, 1),
        "jobs_per_s_rescuer_on": round(on, 1),
        "rescue_overhead": round(overhead, 4),
        "job_txn_us": round(plain_us, 1),
        "job_txn_with_done_mark_us": round(marked_us, 1),
    }
    print(json.dumps({"bench": "durability", "figures": figures}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
