"""Scheduler fail-over and the cost of a fenced fire, on a private embedded Postgres.

    .venv/bin/python -m bench.scheduler [--quick] [--rounds N] [--fires N]

(a) Takeover: two real ``tidemill scheduler`` processes share a schedule that ticks every
second (leader retry 0.5 s). Once the leader has fired, it is stopped, and the time until the
standby logs ``leader_acquired`` is taken from the two processes' clocks (same host). Each round
stops the leader one way:
- baseline: SIGTERM, a clean shutdown that releases the lock;
- SIGKILL: no release; the server ends the dead backend, which frees the lock.
Every round also checks the ticks: none recorded twice or enqueued twice, and every tick of the
grid fired or stood for by the new leader's catch-up.

(b) Fire cost: ``fire()`` rate in this process, with the leader fence (a ``pg_locks`` check in
the fire transaction) against the same fire without it (median of 3 interleaved runs).

Figures (last line, JSON): ``takeover_kill_s`` (median), ``takeover_kill_max_s``,
``takeover_clean_s`` (median), ``takeover_kill_vs_clean`` (ratio of medians; goal: SIGKILL
costs no more than a clean hand-over, and stays under 15 s), ``duplicates``, ``uncovered``,
``fire_per_s_fenced``, ``fire_per_s_plain``, ``fenced_vs_plain`` (ratio of rates).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from core.log import configure_logging
from core.proc import free_port, spawn, stop_process, tail, wait_until
from core.settings import Settings
from db.embedded import EmbeddedPostgres, EmbeddedValkey
from db.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
RETRY_S = 0.5
BOUND_S = 15.0


class BenchError(RuntimeError):
    pass


def _extra(name: str) -> str:
    return json.dumps(
        [
            {
                "name": name,
                "cron": "* * * * * *",
                "actor": "prune_outbox",  # a registered actor; its own queue keeps it apart
                "queue": "bench",
                "misfire_grace_s": 60,
            }
        ]
    )


def _acquired_at(log_path: Path) -> datetime | None:
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "leader_acquired":
            return datetime.fromisoformat(record["timestamp"])
    return None


def _ticks(conn: psycopg.Connection[Any], name: str) -> list[tuple[datetime, str, int, str]]:
    return [
        (r[0], r[1], r[2], r[3])
        for r in conn.execute(
            "SELECT tick, kind, covers, fired_by FROM schedule_ticks WHERE schedule = %s "
            "ORDER BY tick",
            (name,),
        )
    ]


def failover_round(
    url: str, env: dict[str, str], root: Path, name: str, sig: int
) -> tuple[float, int, int]:
    """(takeover seconds, duplicates, uncovered ticks) for one hand-over."""
    from schedules.schedule import cron_trigger

    env = dict(env, TIDEMILL_SCHEDULES_EXTRA=_extra(name))
    procs: dict[int, tuple[subprocess.Popen[bytes], Path]] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            for label in ("a", "b"):
                log_path = root / f"{name}-{label}.log"
                proc = spawn(
                    [sys.executable, "-m", "cli.main", "scheduler"],
                    env=env,
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=log_path.open("wb"),
                )
                procs[proc.pid] = (proc, log_path)
            if not wait_until(lambda: len(_ticks(conn, name)) >= 3, timeout=60, interval=0.1):
                raise BenchError("no ticks: " + " | ".join(tail(p, 5) for _, p in procs.values()))
            leader = int(_ticks(conn, name)[-1][3].rsplit(":", 1)[1])
            (standby,) = set(procs) - {leader}
            stopped_at = datetime.now(UTC)
            stop_process(procs[leader][0], sig=sig, group=True)
            standby_log = procs[standby][1]
            if not wait_until(lambda: _acquired_at(standby_log) is not None, timeout=60):
                raise BenchError("standby never took over: " + tail(standby_log, 10))
            # let the new leader fire a few ticks, so the grid check spans the hand-over
            wait_until(
                lambda: sum(1 for t in _ticks(conn, name) if t[3].endswith(f":{standby}")) >= 3,
                timeout=30,
                interval=0.1,
            )
        finally:
            for proc, _ in procs.values():
                stop_process(proc, sig=signal.SIGTERM, group=True)
        acquired = _acquired_at(standby_log)
        assert acquired is not None
        rows = _ticks(conn, name)
        enqueued = conn.execute(
            "SELECT count(*) - count(DISTINCT kwargs->>'tick') FROM outbox WHERE queue_name = %s",
            ("bench",),
        ).fetchone()
    duplicates = int(enqueued[0]) if enqueued else 0
    ticks = [r[0] for r in rows]
    duplicates += len(ticks) - len(set(ticks))
    trigger = cron_trigger("* * * * * *", "UTC")
    grid, probe = [ticks[0]], ticks[0]
    while probe < ticks[-1]:
        nxt = trigger.get_next_fire_time(None, probe + timedelta(microseconds=1))
        assert nxt is not None
        grid.append(nxt)
        probe = nxt
    missing = len(set(grid) - set(ticks))
    covered = sum(c - 1 for _, kind, c, _ in rows if kind == "catch-up")
    return (acquired - stopped_at).total_seconds(), duplicates, max(0, missing - covered)


def fire_rates(settings: Settings, n: int, *, reps: int = 3) -> tuple[float, float]:
    """(plain, fenced) fires per second: median of ``reps`` interleaved runs of ``n`` fires each,
    after a warm-up, so a noisy neighbour on the machine hits both variants alike."""
    from schedules.leader import LeaderLock
    from schedules.schedule import Schedule
    from schedules.scheduler import FireOutcome, fire

    assert settings.database_url
    schedule = Schedule(name="bench-fire", cron="* * * * * *", actor="x")
    # Nothing checks this lock during the loop: without a long idle timeout the server would
    # end the session after 10 s, and the fence would (rightly) refuse the rest.
    lock = LeaderLock(settings.database_url, identity="bench", idle_timeout_s=3600)
    if not lock.try_acquire():
        raise BenchError("leader lock busy")
    next_tick = [datetime(2030, 1, 1, tzinfo=UTC)]

    def run(count: int, fence: Any) -> float:
        started = time.perf_counter()
        for _ in range(count):
            next_tick[0] += timedelta(seconds=1)
            outcome = fire(schedule, next_tick[0], settings=settings, fence=fence)
            if outcome is not FireOutcome.FIRED:
                raise BenchError(f"fire at {next_tick[0]}: {outcome}")
        return count / (time.perf_counter() - started)

    try:
        run(max(50, n // 10), lock.fence)  # warm-up: pool, plans, caches
        plain, fenced = [], []
        for _ in range(reps):
            plain.append(run(n, None))
            fenced.append(run(n, lock.fence))
        return statistics.median(plain), statistics.median(fenced)
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scheduler",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds per way, 300 fires")
    parser.add_argument("--rounds", type=int, help="hand-overs per way (default 5)")
    parser.add_argument("--fires", type=int, help="fires per run (default 3,000)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    fires = args.fires or (300 if args.quick else 3_000)
    if rounds < 1 or fires < 1:
        parser.error("--rounds and --fires must be positive")

    configure_logging(env="production", level="warning")
    root = Path(tempfile.mkdtemp(prefix="tidemill-bench-scheduler-"))
    pg = EmbeddedPostgres(root, port=free_port())
    valkey = EmbeddedValkey(root, port=free_port())  # the CLI wants a Redis; the scheduler not
    try:
        url = pg.start()
        upgrade(url)
        valkey.start()
        env = dict(
            os.environ,
            DATABASE_URL=url,
            REDIS_URL=valkey.url(0),
            TIDEMILL_DATA_DIR=str(root / "data"),
            TIDEMILL_ENV="production",
            LOG_LEVEL="info",
            TIDEMILL_SCHEDULER_LEADER_RETRY_S=str(RETRY_S),
        )
        results: dict[str, list[float]] = {"clean": [], "kill": []}
        duplicates = uncovered = 0
        for i in range(rounds):
            for way, sig in (("clean", signal.SIGTERM), ("kill", signal.SIGKILL)):
                takeover, dup, unc = failover_round(url, env, root, f"bench-{way}-{i}", sig)
                results[way].append(takeover)
                duplicates += dup
                uncovered += unc
                print(f"  round {i + 1} {way:5}: takeover {takeover:5.2f} s", flush=True)
        settings = dataclasses.replace(
            Settings.from_env({**env, "TIDEMILL_ENV": "production"}), schedules_extra=None
        )
        plain, fenced = fire_rates(settings, fires)
    finally:
        from db.engine import dispose_all

        dispose_all()
        valkey.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)

    kill_med = statistics.median(results["kill"])
    clean_med = statistics.median(results["clean"])
    figures = {
        "rounds": rounds,
        "retry_s": RETRY_S,
        "takeover_kill_s": round(kill_med, 3),
        "takeover_kill_max_s": round(max(results["kill"]), 3),
        "takeover_clean_s": round(clean_med, 3),
        "takeover_kill_vs_clean": round(kill_med / clean_med, 3) if clean_med else None,
        "duplicates": duplicates,
        "uncovered": uncovered,
        "fire_per_s_fenced": round(fenced, 1),
        "fire_per_s_plain": round(plain, 1),
        "fenced_vs_plain": round(fenced / plain, 3),
    }
    print()
    print(f"{'measure':34} {'value':>12}")
    print(f"{'takeover after SIGTERM (median)':34} {clean_med:>10.2f} s")
    print(f"{'takeover after SIGKILL (median)':34} {kill_med:>10.2f} s")
    print(f"{'takeover after SIGKILL (max)':34} {max(results['kill']):>10.2f} s")
    print(f"{'  bound':34} {BOUND_S:>10.2f} s")
    print(f"{'duplicate ticks / messages':34} {duplicates:>12}")
    print(f"{'ticks neither fired nor covered':34} {uncovered:>12}")
    print(f"{'fires/s, no fence':34} {plain:>12.1f}")
    print(f"{'fires/s, fenced':34} {fenced:>12.1f}")
    print(f"{'fenced / plain':34} {fenced / plain:>12.3f}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
