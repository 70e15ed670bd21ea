"""Shared pieces of bench/webhooks.py: its constants, the benchmark's servers and users, CPU
accounting and table printing."""

from __future__ import annotations

import contextlib
import random
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench.noop_names import TIDEMILL_REDIS_DB
from bench.queue_roundtrip import (
    base_env,
)
from core.stripe_samples import sample
from db.embedded import EmbeddedPostgres, EmbeddedValkey

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
