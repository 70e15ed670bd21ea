"""Units of work through PgBouncer (transaction pooling) against the same units straight to
Postgres, measured in the same run.

    .venv/bin/python -m bench.pgbouncer [--quick] [--units N] [--threads T]

Each unit is what a worker message costs the database: one transaction with an INSERT and
its commit, through tidemill's engine (``db.engine.Database``: psycopg, SQLAlchemy pool; the
pooled one without server-side prepared statements, as DATABASE_DIRECT_URL makes it). Rounds
alternate between the two so that machine noise hits both. Prints units per second each way
and the ratio pooled / direct.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psycopg

from core.proc import free_port
from db.embedded import EmbeddedPostgres
from db.engine import Database
from tests.support.pgbouncer import PgBouncer


def run_units(db: Database, *, units: int, threads: int) -> float:
    """Units per second with `threads` threads sharing the work."""
    per_thread = units // threads

    def work() -> None:
        raw = db.engine.raw_connection()
        try:
            conn = raw.driver_connection
            assert conn is not None
            for _ in range(per_thread):
                conn.execute("INSERT INTO bench_units (note) VALUES (%s)", ("unit",))
                conn.commit()
        finally:
            raw.close()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return per_thread * threads / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer units, fewer rounds")
    parser.add_argument("--units", type=int, help="units of work per round")
    parser.add_argument("--threads", type=int, default=8, help="client threads (a worker's)")
    args = parser.parse_args(argv)
    units = args.units or (2_000 if args.quick else 10_000)
    rounds = 3 if args.quick else 5
    root = Path(tempfile.mkdtemp(prefix="tidemill-bench-pgbouncer-"))
    pg = EmbeddedPostgres(root, port=free_port())
    bouncer = PgBouncer(root, server_host="127.0.0.1", server_port=pg.port, pool_size=8)
    try:
        pg.start()
        bouncer.start()
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_units (id bigserial PRIMARY KEY, note text)")
        direct = Database(pg.url(), pool_size=args.threads)
        pooled = Database(bouncer.url("tidemill"), pool_size=args.threads, pooled=True)
        run_units(direct, units=units // 4, threads=args.threads)  # warm both pools
        run_units(pooled, units=units // 4, threads=args.threads)
        rates: dict[str, list[float]] = {"direct": [], "pgbouncer": []}
        for _ in range(rounds):
            rates["direct"].append(run_units(direct, units=units, threads=args.threads))
            rates["pgbouncer"].append(run_units(pooled, units=units, threads=args.threads))
        direct.dispose()
        pooled.dispose()
    finally:
        bouncer.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    med = {name: statistics.median(values) for name, values in rates.items()}
    print(f"units of work ({args.threads} threads, {units} per round, median of {rounds}):")
    for name, value in med.items():
        print(f"  {name:<10} {value:8.0f} /s")
    print(f"pgbouncer / direct: {med['pgbouncer'] / med['direct']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
