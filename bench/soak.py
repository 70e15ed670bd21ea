"""Long soak: the whole system under a steady webhook load, sampled until it plateaus (or not).

    .venv/bin/python -m bench.soak [--minutes N] [--rate R] [--every S] [--quick]

Starts an embedded Postgres (migrated) and Valkey under a temporary directory, then tidemill's
processes as ``tidemill up`` runs them (``relay``, ``worker``, ``scheduler``, ``web``, each a
real subprocess with production logging), and posts signed ``payment_intent.succeeded`` events
at R per second to ``POST /webhooks/stripe`` from this process. The scheduler fires the
default retention policies on their crons (``outbox-relayed-prune`` every 10 minutes, the rest
nightly), as in production.

Every S seconds one line: elapsed minutes, events accepted, the RSS of each process (a
dramatiq worker's children counted one by one: the creep of issue #20 was in them) and the size
(``pg_total_relation_size``) and row estimate of each of tidemill's own tables. At the end: a
table of the samples nearest to 10, 60 and 120 minutes (those reached), each process's RSS
slope over the second half of the run (MB/min: a plateau is ~0), and one JSON line.

Goals (issue 18), printed, never asserted: each process's RSS growth after a warm-up (the first
10 minutes, or a third of a shorter run) < 5 %, and the intake p99 of each sample window over
time. Default 30 minutes at 40/s (``make bench``); the issue-20 report in docs/lifecycle.md is
``--minutes 120 --rate 20``. ``--quick``: 3 minutes at 20/s. The last line is one JSON object.

``--prune-every M --prune-age A`` (minutes) run ``outbox-relayed-prune`` every M minutes on
done rows older than A minutes instead of every 10 minutes on rows older than an hour (a copy
of the packaged policy file with that policy's schedule and age changed, given to every process
as ``TIDEMILL_POLICY_FILE``), so a run of a few minutes sees many prunes that delete rows: what
a default run sees only after its first hour. ``--backup-every M`` adds a schedule that runs
the hourly ``backup-incremental`` job (``backup_base``, a full base backup the first time) every
M minutes as well: the job whose freed 1 MiB buffers stepped the worker children's RSS up
(docs/lifecycle.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import stripe

from core.log import configure_logging
from core.proc import free_port, spawn, stop_process, wait_until
from core.stripe_samples import sample
from db.embedded import EmbeddedPostgres, EmbeddedValkey
from db.migrate import upgrade
from web.webhooks import PATH

ROOT = Path(__file__).resolve().parent.parent
OWN_TABLES = (
    "webhook_events",
    "outbox",
    "schedule_ticks",
    "pipeline_runs",
    "email_deliveries",
    "audit_logs",
    "ledger_entries",
)
MARKS_MIN = (10, 60, 120)


def rss_by_process(procs: dict[str, Any]) -> dict[str, float]:
    """MB resident per process; a process's children (dramatiq's worker processes, uvicorn's)
    are listed as name/child-N."""
    out: dict[str, float] = {}
    for name, proc in procs.items():
        try:
            root = psutil.Process(proc.pid)
            out[name] = root.memory_info().rss / 2**20
            for i, child in enumerate(sorted(root.children(recursive=True), key=lambda c: c.pid)):
                out[f"{name}/child-{i}"] = child.memory_info().rss / 2**20
        except psutil.Error:
            out[name] = 0.0
    return out


def qualified(conn: psycopg.Connection[Any], table: str) -> str:
    """tidemill's tables live in the ``tidemill`` schema; a shared one (audit_logs) may be the
    app's, in ``public``."""
    for schema in ("tidemill", "public"):
        found = conn.execute("SELECT to_regclass(%s)", (f"{schema}.{table}",)).fetchone()
        if found and found[0]:
            return f"{schema}.{table}"
    return table


def table_sizes(conn: psycopg.Connection[Any]) -> dict[str, tuple[float, int]]:
    """table -> (MB including indexes and TOAST, estimated rows)."""
    out = {}
    for table in OWN_TABLES:
        row = conn.execute(
            "SELECT pg_total_relation_size(c.oid), greatest(c.reltuples, 0)::bigint "
            "FROM pg_class c WHERE c.oid = to_regclass(%s)",
            (qualified(conn, table),),
        ).fetchone()
        if row:
            out[table] = (row[0] / 2**20, int(row[1]))
    return out


def finished_runs(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Scheduled work done so far: succeeded pipeline runs (prunes among them) and base
    backups, the two kinds of job a worker child's RSS is read against."""
    out = {}
    for name, table, where in (
        ("pipeline_runs", "pipeline_runs", "status = 'succeeded'"),
        ("backups", "backups", "status = 'complete'"),
    ):
        found = conn.execute("SELECT to_regclass(%s)", (qualified(conn, table),)).fetchone()
        if found and found[0]:
            row = conn.execute(f"SELECT count(*) FROM {qualified(conn, table)} WHERE {where}")
            out[name] = int(row.fetchone()[0])  # type: ignore[index]
    return out


class Load(threading.Thread):
    """Posts signed events at `rate` per second until stopped; counts answers."""

    def __init__(self, url: str, secret: str, users: list[str], rate: float) -> None:
        super().__init__(daemon=True)
        self.url, self.secret, self.users, self.rate = url, secret, users, rate
        self.stop_event = threading.Event()
        self.accepted = 0
        self.failed = 0
        self.latencies_ms: list[float] = []  # since the last take_latencies()
        self.lock = threading.Lock()

    def take_latencies(self) -> list[float]:
        with self.lock:
            taken, self.latencies_ms = self.latencies_ms, []
        return taken

    def run(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = 0
            while not self.stop_event.is_set():
                event = sample(
                    "payment_intent.succeeded",
                    user_id=self.users[i % len(self.users)],
                    amount=1000 + i % 5000,
                    ref=f"pi_soak_{uuid.uuid4().hex[:16]}",
                )
                body = json.dumps(event)
                header = stripe.WebhookSignature.generate_signature_header(body, self.secret)
                sent = time.perf_counter()
                try:
                    answer = client.post(
                        PATH,
                        content=body.encode(),
                        headers={"Content-Type": "application/json", "Stripe-Signature": header},
                    )
                    with self.lock:
                        self.latencies_ms.append((time.perf_counter() - sent) * 1000)
                    if answer.status_code == 200:
                        self.accepted += 1
                    else:
                        self.failed += 1
                except httpx.HTTPError:
                    self.failed += 1
                i += 1
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    self.stop_event.wait(delay)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (units per minute) of (minute, value) points."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    den = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / den if den else 0.0


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def growth_after_warmup(samples: list[dict[str, Any]], warmup_min: float) -> dict[str, float]:
    """Per process: RSS growth (%) from the first sample past warm-up to the last one."""
    warm = next((s for s in samples if s["minute"] >= warmup_min), samples[-1])
    last = samples[-1]
    out = {}
    for name, mb in last["rss_mb"].items():
        base = warm["rss_mb"].get(name, 0.0)
        out[name] = round((mb - base) / base * 100, 2) if base else 0.0
    return out


def fast_prune_policy_file(path: Path, every_min: int, age_min: int) -> Path:
    """A copy of the packaged policy file where ``outbox-relayed-prune`` runs every
    ``every_min`` minutes on rows done ``age_min`` minutes ago; every other policy unchanged."""
    from pipelines.lifecycle.policies import DEFAULT_FILE, load_policy_file

    text = DEFAULT_FILE.read_text()
    start = text.index('name = "outbox-relayed-prune"')
    end = text.find("[[policy]]", start)
    end = len(text) if end < 0 else end
    block = re.sub(r'(?m)^age = ".*"$', f'age = "{age_min} minutes"', text[start:end])
    block = re.sub(r'(?m)^schedule = ".*"$', f'schedule = "*/{every_min} * * * *"', block)
    path.write_text(text[:start] + block + text[end:])
    prune = next(p for p in load_policy_file(path) if p.name == "outbox-relayed-prune")
    assert prune.schedule == f"*/{every_min} * * * *", prune  # the edit took
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=40.0, help="webhooks per second")
    parser.add_argument("--every", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--quick", action="store_true", help="3 minutes at 20/s, every 20 s")
    parser.add_argument(
        "--prune-every",
        type=int,
        default=0,
        help="minutes between outbox-relayed-prune runs (default: the policy's 10)",
    )
    parser.add_argument(
        "--prune-age",
        type=int,
        default=2,
        help="with --prune-every: prune outbox rows done this many minutes ago (policy: 60)",
    )
    parser.add_argument(
        "--backup-every",
        type=int,
        default=0,
        help="minutes between extra backup-incremental runs (default: only the hourly one)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.rate, args.every = 3.0, 20.0, 20.0
    configure_logging(env="production", level="warning")
    root = Path(tempfile.mkdtemp(prefix="tidemill-soak-"))
    pg = EmbeddedPostgres(root / "pg", port=free_port())
    valkey = EmbeddedValkey(root / "valkey", port=free_port())
    procs: dict[str, Any] = {}
    load: Load | None = None
    samples: list[dict[str, Any]] = []
    try:
        url = pg.start()
        redis_url = valkey.start()
        upgrade(url)
        secret = "whsec_" + secrets.token_hex(16)
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if k not in ("BROKER_URL",)},
            "DATABASE_URL": url,
            "REDIS_URL": redis_url,
            "STORAGE_URL": f"file://{root / 'objects'}",
            "TIDEMILL_DATA_DIR": str(root / "data"),
            "TIDEMILL_ENV": "production",
            "LOG_LEVEL": "warning",
            "STRIPE_WEBHOOK_SECRETS": secret,
            "PYTHONPATH": str(ROOT),
        }
        if args.prune_every:
            env["TIDEMILL_POLICY_FILE"] = str(
                fast_prune_policy_file(root / "policies.toml", args.prune_every, args.prune_age)
            )
        if args.backup_every:
            env["TIDEMILL_SCHEDULES_EXTRA"] = json.dumps(
                [
                    {
                        "name": "soak-backup-incremental",
                        "cron": f"*/{args.backup_every} * * * *",
                        "actor": "backup_base",
                        "queue": "backups",
                        "kwargs": {"incremental": True},
                        "misfire": "skip",
                        "misfire_grace_s": 60,
                    }
                ]
            )
        with psycopg.connect(url, autocommit=True) as conn:
            users = [
                str(r[0])
                for r in conn.execute(
                    "INSERT INTO users (email) SELECT 'soak' || g || '@example.org' "
                    "FROM generate_series(1, 200) g RETURNING id"
                ).fetchall()
            ]
        logs = root / "logs"
        logs.mkdir()
        commands = {
            "relay": ["relay"],
            "worker": ["worker"],
            "scheduler": ["scheduler"],
            "web": ["web", "--port", str(port)],
        }
        for name, argv_ in commands.items():
            with open(logs / f"{name}.log", "wb") as log:
                procs[name] = spawn(
                    [sys.executable, "-m", "cli.main", *argv_],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=log,
                )
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        if not wait_until(healthy, timeout=120, interval=0.5):
            print("web did not become healthy; logs in", logs, file=sys.stderr)
            return 1
        load = Load(base, secret, users, args.rate)
        started = time.monotonic()
        load.start()
        deadline = started + args.minutes * 60
        header = False
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                now = time.monotonic()
                minute = (now - started) / 60
                conn.execute("ANALYZE " + ", ".join(qualified(conn, t) for t in OWN_TABLES))
                rss = rss_by_process(procs)
                sizes = table_sizes(conn)
                runs = finished_runs(conn)
                window_p99 = p99(load.take_latencies())
                sample_: dict[str, Any] = {
                    "minute": round(minute, 2),
                    "intake_p99_ms": None if window_p99 is None else round(window_p99, 1),
                    "accepted": load.accepted,
                    "failed": load.failed,
                    "rss_mb": rss,
                    "tables": sizes,
                    "runs": runs,
                }
                samples.append(sample_)
                if not header:
                    print(
                        "min  accepted  p99ms  "
                        + "  ".join(sample_["rss_mb"])
                        + "  | MB(rows) "
                        + " ".join(OWN_TABLES)
                        + "  | runs "
                        + " ".join(runs),
                        flush=True,
                    )
                    header = True
                print(
                    f"{minute:5.1f} {load.accepted:8d}  "
                    + f"{window_p99 or 0:5.1f}  "
                    + "  ".join(f"{v:.1f}" for v in rss.values())
                    + "  | "
                    + " ".join(f"{mb:.1f}({rows})" for mb, rows in sizes.values())
                    + "  | "
                    + " ".join(str(n) for n in runs.values()),
                    flush=True,
                )
                if now >= deadline:
                    break
                time.sleep(max(0.0, min(args.every, deadline - time.monotonic())))
    finally:
        if load is not None:
            load.stop_event.set()
            load.join(timeout=30)
        for proc in reversed(list(procs.values())):
            stop_process(proc, sig=signal.SIGTERM, timeout=30, group=True)
        valkey.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    if not samples:
        return 1
    marks = []
    for mark in MARKS_MIN:
        if samples[-1]["minute"] + 0.5 >= mark:
            marks.append(min(samples, key=lambda s: abs(s["minute"] - mark)))
    if not marks or marks[-1] is not samples[-1]:
        marks.append(samples[-1])  # and where the run ended
    print("\nat minute " + ", ".join(f"{s['minute']:.0f}" for s in marks))
    for name in samples[-1]["rss_mb"]:
        print(f"  rss {name:<20}" + "".join(f"{s['rss_mb'].get(name, 0):>10.1f}" for s in marks))
    for table in OWN_TABLES:
        print(
            f"  MB  {table:<20}"
            + "".join(f"{s['tables'].get(table, (0, 0))[0]:>10.1f}" for s in marks)
        )
    second_half = [s for s in samples if s["minute"] >= samples[-1]["minute"] / 2]
    slopes = {
        name: round(slope([(s["minute"], s["rss_mb"].get(name, 0.0)) for s in second_half]), 3)
        for name in samples[-1]["rss_mb"]
    }
    print("RSS slope over the second half (MB/min): " + json.dumps(slopes))
    warmup = min(10.0, samples[-1]["minute"] / 3)
    growth = growth_after_warmup(samples, warmup)
    print(f"RSS growth after a {warmup:.0f}-minute warm-up (%, goal < 5): " + json.dumps(growth))
    p99s = [s["intake_p99_ms"] for s in samples if s["intake_p99_ms"] is not None]
    if p99s:
        low, mid, high = min(p99s), sorted(p99s)[len(p99s) // 2], max(p99s)
        print(f"intake p99 per sample window (ms): min {low}, median {mid}, max {high}")
    last = samples[-1]
    print(
        json.dumps(
            {
                "bench": "soak",
                "minutes": last["minute"],
                "rate": args.rate,
                "prune_every_min": args.prune_every or 10,
                "backup_every_min": args.backup_every or 60,
                "accepted": last["accepted"],
                "failed": last["failed"],
                "rss_mb_end": {k: round(v, 1) for k, v in last["rss_mb"].items()},
                "rss_growth_pct_after_warmup": growth,
                "rss_slope_mb_per_min": slopes,
                "intake_p99_ms": ({"min": low, "median": mid, "max": high} if p99s else None),
                "tables_mb_end": {k: round(mb, 1) for k, (mb, _) in last["tables"].items()},
                "runs_succeeded": last["runs"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
