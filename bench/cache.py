"""Cache invalidation latency: commit -> key gone, through the real path, at a fixed rate.

    .venv/bin/python -m bench.cache [--quick] [--commits N] [--rate R]

Starts an embedded Postgres (migrated) and Valkey, a ``tidemill relay`` and a ``tidemill
worker -Q cache`` subprocess (production logs), then, at R commits/s (default 1,000) paced
over 8 client connections:

- ``SETEX moment:{id} 300 …`` for a moment of its own (one moment per commit, so every commit
  is measured and no later commit can stamp its key), then ``UPDATE moments … WHERE id = …``
  in autocommit; the clock starts when the commit returns;
- the moments trigger writes the outbox row, whose wake-up NOTIFY carries the change; on the
  fast path (``TIDEMILL_CACHE_FAST_PATH``, on by default) the relay UNLINKs the key on
  receipt (commit -> NOTIFY -> UNLINK), then enqueues ``cache.invalidate``, and the worker's
  job UNLINKs it again and marks the row done;
- a Redis keyspace-notification subscriber (``__keyevent@0__:unlink`` / ``del``) stamps the
  moment the key is gone. latency = gone - commit; p50 / p99 over all commits after a warm-up.

Baseline, same run and rate: the seed's own design, a per-row trigger doing
``pg_notify('cache_invalidation', id)`` and a listener deleting the key directly (no outbox,
no broker; it loses every change made while the listener is away, which is why tidemill does
not do this). ``vs_notify`` = tidemill p50 / baseline p50: what durability costs.

Then the same commits through tidemill twice: first with the fast path off (the durable path
alone: relay -> broker -> worker, what every invalidation cost before issue 18), then on.
``fast_vs_durable_p99`` = fast-path p99 / durable-only p99.

The goal (p99 <= 10 ms, issue 18) is printed, never asserted. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
import redis

from core.log import configure_logging
from core.proc import free_port, spawn, stop_process, tail, wait_until
from db.embedded import EmbeddedPostgres, EmbeddedValkey
from db.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_COMMITS = 20_000
QUICK_COMMITS = 3_000
WARMUP = 300
GOAL_P99_MS = 10.0

BASELINE_SQL = """
CREATE FUNCTION bench_notify_moment() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('cache_invalidation', NEW.id::text);
  RETURN NULL;
END;
$$;
CREATE TRIGGER bench_notify_moment AFTER UPDATE ON moments
FOR EACH ROW EXECUTE FUNCTION bench_notify_moment();
"""


class BenchError(RuntimeError):
    pass


def terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class GoneWatcher:
    """Stamps (monotonic) when each key is deleted, from Redis keyspace notifications."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client  # keep it: a collected client closes the pub/sub connection
        client.config_set("notify-keyspace-events", "Eg")
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe("__keyevent@0__:unlink", "__keyevent@0__:del")
        self.gone: dict[str, float] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            message = self.pubsub.get_message(timeout=0.1)
            if message is not None:
                self.gone[message["data"].decode()] = time.monotonic()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.pubsub.close()


class NotifyListener:
    """The baseline: LISTEN cache_invalidation and DEL moment:{id} straight away."""

    def __init__(self, url: str, client: redis.Redis) -> None:
        self.url = url
        self.client = client
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("LISTEN cache_invalidation")
            self.ready.set()
            while not self.stopping.is_set():
                for note in conn.notifies(timeout=0.2):
                    self.client.unlink(f"moment:{note.payload}")

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)


CLIENTS = 8  # one connection cannot commit 1,000/s here (each commit waits for its flush)


def run_load(
    url: str, client: redis.Redis, watcher: GoneWatcher, moment_ids: list[str], n: int, rate: float
) -> tuple[list[float], int, float]:
    """n paced commits from CLIENTS connections, commit i on moment i (its own key, so each
    commit's deletion is stamped for that commit alone); returns latencies (ms, after
    warm-up), keys never removed, and the rate achieved."""
    if len(moment_ids) < n:
        raise BenchError(f"{n:,} commits need {n:,} moments, got {len(moment_ids):,}")
    committed: list[list[tuple[int, str, float]]] = [[] for _ in range(CLIENTS)]
    interval = CLIENTS / rate
    start = time.monotonic() + 0.1

    def load(c: int) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT 1")
            for i in range(c, n, CLIENTS):
                delay = start + (i // CLIENTS) * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                mid = moment_ids[i]
                key = f"moment:{mid}"
                watcher.gone.pop(key, None)
                client.set(key, "cached", ex=300)
                conn.execute("UPDATE moments SET title = %s WHERE id = %s", (f"t{i}", mid))
                committed[c].append((i, key, time.monotonic()))

    # where a backlog builds, if one does: the outbox (relay behind) or the queue (worker behind)
    depth = {"outbox": 0, "queue": 0}
    done = threading.Event()

    def sample() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while not done.wait(0.05):
                row = conn.execute(
                    "SELECT count(*) FROM outbox WHERE dispatched_at IS NULL"
                ).fetchone()
                depth["outbox"] = max(depth["outbox"], int(row[0]) if row else 0)
                depth["queue"] = max(depth["queue"], int(client.llen("dramatiq:cache")))

    threads = [threading.Thread(target=load, args=(c,)) for c in range(CLIENTS)]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    sampler.join()
    print(f"  max outbox backlog {depth['outbox']:,}, max cache queue {depth['queue']:,}")
    elapsed = max(t for rows in committed for _, _, t in rows) - start
    # every commit after the warm-up, each on a key no other commit of this pass touches
    measured = {key: t for rows in committed for i, key, t in rows if i >= WARMUP}
    wait_until(lambda: all(k in watcher.gone for k in measured), timeout=30)
    latencies = [(watcher.gone[k] - t) * 1000 for k, t in measured.items() if k in watcher.gone]
    missing = sum(1 for k in measured if k not in watcher.gone)
    return latencies, missing, n / elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cache",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_COMMITS:,} commits")
    parser.add_argument(
        "--commits", type=int, help=f"commits per pass (default {DEFAULT_COMMITS:,})"
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="commits per second")
    args = parser.parse_args(argv)
    n = args.commits or (QUICK_COMMITS if args.quick else DEFAULT_COMMITS)
    if n <= WARMUP * 2:
        parser.error(f"--commits must be more than {WARMUP * 2}")
    if args.rate <= 0:
        parser.error("--rate must be positive")

    signal.signal(signal.SIGTERM, terminate)
    configure_logging(env="production", level="warning")
    root = Path(tempfile.mkdtemp(prefix="tidemill-bench-cache-"))
    pg = EmbeddedPostgres(root, port=free_port())
    valkey = EmbeddedValkey(root, port=free_port())
    procs: list[Any] = []
    try:
        url = pg.start()
        upgrade(url)
        valkey.start()
        client = redis.Redis.from_url(valkey.url(0))
        env = dict(
            os.environ,
            DATABASE_URL=url,
            REDIS_URL=valkey.url(0),
            TIDEMILL_DATA_DIR=str(root / "data"),
            TIDEMILL_ENV="production",
            LOG_LEVEL="warning",
        )
        # The worker runs with tidemill's default poll ceiling (TIDEMILL_WORKER_POLL_MS).
        env.pop("dramatiq_worker_timeout", None)
        with psycopg.connect(url, autocommit=True) as conn:
            # setup rows without trigger side effects (welcome mails, fan-outs)
            conn.execute("SET session_replication_role = replica")
            owner = conn.execute(
                "INSERT INTO users (email) VALUES ('bench@example.com') RETURNING id"
            ).fetchone()
            assert owner is not None
            conn.execute(
                "INSERT INTO moments (user_id, title, category, location, date, status) "
                "SELECT %s, 'm' || g, 'bench', 'here', now(), 'draft' "
                "FROM generate_series(1, %s) g",
                (owner[0], n),
            )
            moment_ids = [
                str(r[0]) for r in conn.execute("SELECT id FROM moments ORDER BY id").fetchall()
            ]
        watcher = GoneWatcher(redis.Redis.from_url(valkey.url(0)))

        # baseline: the seed's NOTIFY-and-delete, tidemill's trigger off
        print(f"baseline: pg_notify + listener, {n:,} commits at {args.rate:,.0f}/s", flush=True)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(BASELINE_SQL)
            conn.execute("ALTER TABLE moments DISABLE TRIGGER moments_cache_update")
        listener = NotifyListener(url, client)
        listener.ready.wait(10)
        base, base_missing, base_rate = run_load(url, client, watcher, moment_ids, n, args.rate)
        listener.stop()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP TRIGGER bench_notify_moment ON moments")
            conn.execute("ALTER TABLE moments ENABLE TRIGGER moments_cache_update")

        # tidemill: trigger -> outbox -> relay (-> fast path UNLINK) -> worker -> UNLINK
        logs = root / "logs"
        logs.mkdir()

        def start(name: str, argv_: list[str], **extra: str) -> None:
            out = open(logs / f"{name}.log", "ab")  # noqa: SIM115  (closed with the process)
            proc = spawn(
                [sys.executable, "-m", "cli.main", *argv_],
                env={**env, **extra},
                cwd=ROOT,
                stdout=out,
                stderr=out,
            )
            procs.append((name, proc, out))

        def warm(label: str) -> None:
            """Wait until a change goes all the way through."""
            probe = moment_ids[0]
            client.set(f"moment:{probe}", "x")
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("UPDATE moments SET title = %s WHERE id = %s", (label, probe))
            if not wait_until(lambda: not client.exists(f"moment:{probe}"), timeout=60):
                raise BenchError(
                    "relay + worker never removed the probe key:\n"
                    + "".join(tail(logs / f"{name}.log") for name, _, _ in procs)
                )

        start("worker", ["worker", "--processes", "1", "--threads", "4", "--queue", "cache"])
        start("relay", ["relay"], TIDEMILL_CACHE_FAST_PATH="false")
        warm("probe-durable")
        print(
            f"tidemill, durable path only: outbox -> relay -> worker, {n:,} commits at "
            f"{args.rate:,.0f}/s",
            flush=True,
        )
        slow, slow_missing, slow_rate = run_load(url, client, watcher, moment_ids, n, args.rate)
        _, relay, out = procs.pop()
        stop_process(relay, group=True)
        out.close()
        start("relay", ["relay"], TIDEMILL_CACHE_FAST_PATH="true")
        warm("probe-fast")
        print(
            f"tidemill, fast path: outbox -> relay UNLINK (+ worker), {n:,} commits at "
            f"{args.rate:,.0f}/s",
            flush=True,
        )
        lat, missing, rate = run_load(url, client, watcher, moment_ids, n, args.rate)
        watcher.stop()
    except BenchError as exc:
        print(f"cache: error: {exc}", file=sys.stderr)
        return 1
    finally:
        for _, proc, out in procs:
            stop_process(proc, group=True)
            out.close()
        valkey.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)

    def row(name: str, values: list[float], achieved: float, lost: int) -> str:
        return (
            f"{name:<28}{achieved:>10,.0f}{statistics.median(values):>10.2f}"
            f"{percentile(values, 0.99):>10.2f}{max(values):>10.2f}{lost:>8}"
        )

    print()
    print(f"{'path':<28}{'commits/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'lost':>8}")
    print(row("notify+listener (baseline)", base, base_rate, base_missing))
    print(row("tidemill, durable path only", slow, slow_rate, slow_missing))
    print(row("tidemill, fast path", lat, rate, missing))
    p50, p99 = statistics.median(lat), percentile(lat, 0.99)
    base_p99, slow_p99 = percentile(base, 0.99), percentile(slow, 0.99)
    print(
        f"\ncommit -> key gone p99 {p99:.2f} ms, goal <= {GOAL_P99_MS:.0f} ms: "
        f"{'met' if p99 <= GOAL_P99_MS else 'NOT met'} "
        f"(p99 vs the baseline's {p99 / base_p99:.2f}, vs the durable path's {p99 / slow_p99:.2f})"
    )
    figures = {
        "invalidation_p50_ms": round(p50, 2),
        "invalidation_p99_ms": round(p99, 2),
        "goal_p99_ms": GOAL_P99_MS,
        "baseline_notify_p50_ms": round(statistics.median(base), 2),
        "baseline_notify_p99_ms": round(base_p99, 2),
        "durable_only_p50_ms": round(statistics.median(slow), 2),
        "durable_only_p99_ms": round(slow_p99, 2),
        "vs_notify": round(p50 / statistics.median(base), 2),
        "vs_notify_p99": round(p99 / base_p99, 2),
        "fast_vs_durable_p99": round(p99 / slow_p99, 2),
        "commits_per_s": round(rate),
        "commits": n,
        "keys_not_removed": missing + slow_missing,
    }
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
