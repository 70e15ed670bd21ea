"""Data lifecycle: purge, archive and partition drop, each against its baseline in the same run.

    .venv/bin/python -m bench.lifecycle [--quick] [--rows N]

Starts an embedded Postgres (migrated) under a temporary directory, then:

Purge. N notifications older than 90 days (in the DEFAULT partition, so every row goes through
the batched path, none through a partition drop), made with ``INSERT … SELECT
generate_series`` and time-ordered ids.
  baseline  one unbatched ``DELETE FROM notifications WHERE created_at < cutoff``, timed, then
            rolled back (so the pipeline deletes the very same rows);
  pipeline  ``tidemill pipeline run notifications-purge`` as a real subprocess (batches of
            10,000, each its own transaction with lock/statement timeouts); rows/s from its
            ``pipeline_runs`` row, its longest transaction from its own report.
Archive. N messages older than 2 years where production keeps them: 90 % spread over
ARCHIVE_MONTHS old monthly partitions made by ``partitions.create_month`` (as maintenance makes
them), 10 % in the DEFAULT partition (a month nobody prepared).
  baseline  ``COPY (SELECT * FROM messages WHERE created_at < cutoff) TO STDOUT (FORMAT csv)``
            read to the end by this process (what it costs just to get the rows out), three
            times, the median;
  pipeline  ``tidemill pipeline run messages-archive`` into ``file://``: each old month whole
            (SHARE lock, ``COPY (SELECT …)`` of 20,000 to 40,000-row heap ranges, TRUNCATE, one
            commit; then detach + drop) and the DEFAULT rows by batches (``COPY (DELETE …
            RETURNING)`` per batch of 20,000); zstd, fsync + rename, sha256 read back, one
            archive_objects row per object, a manifest. The months must be gone afterwards
            and every object's rows are counted. Each path's rows and seconds come from the
            run row (``progress.paths``) and are printed against the same COPY rate.
Partition drop. N/5 notifications in one old monthly partition; the time of
``drop_partition`` (detach + drop).
Memory. Peak RSS of each pipeline subprocess (sampled every 20 ms); it must not grow with N.

Goals (purge >= 0.4 x DELETE with no transaction over 1 s, archive >= 0.6 x COPY, peak RSS
< 256 MB) are printed, never asserted. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from bench.rss import PeakRss
from core.log import configure_logging
from core.proc import free_port
from db.embedded import EmbeddedPostgres
from db.engine import dispose_all
from db.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROWS = 5_000_000
QUICK_ROWS = 200_000
COPY_ROUNDS = 3
ARCHIVE_MONTHS = 6  # old monthly partitions the archive rows are spread over
DEFAULT_SHARE = 0.1  # and the share of them in the DEFAULT partition

POLICIES = """
[[policy]]
name = "notifications-purge"
table = "notifications"
age_column = "created_at"
age = "90 days"
action = "delete"
batch_size = 10000
schedule = "45 2 * * *"

[[policy]]
name = "messages-archive"
table = "messages"
age_column = "created_at"
age = "2 years"
action = "archive"
batch_size = 20000
schedule = "30 2 * * *"
format = "csv"
"""

# Time-ordered ids (like UUIDv7): cheap to index, as the apps' own keys should be.
ORDERED_ID = "(lpad(to_hex(g), 12, '0') || '7000a000' || lpad(to_hex(g), 12, '0'))::uuid"


def fill_notifications(conn: Any, user: Any, n: int, start: datetime, step_ms: int) -> None:
    conn.execute(
        f"INSERT INTO notifications (id, user_id, type, title, body, data, created_at) "
        f"SELECT {ORDERED_ID}, %s, 'message', 'New message', 'Someone wrote to you', "
        "jsonb_build_object('conversation', g %% 1000), "
        "%s + g * (%s * interval '1 millisecond') FROM generate_series(1, %s) g",
        (user, start, step_ms, n),
    )


def fill_messages(
    conn: Any, conv: Any, user: Any, n: int, start: datetime, *, first: int = 1, step_ms: int = 5
) -> None:
    conn.execute(
        f"INSERT INTO messages (id, conversation_id, sender_id, content, created_at) "
        f"SELECT {ORDERED_ID}, %s, %s, 'message number ' || g || ', see you at the harbour', "
        "%s + (g - %s::int) * (%s * interval '1 millisecond') "
        "FROM generate_series(%s::int, %s::int) g",
        (conv, user, start, first, step_ms, first, first + n - 1),
    )


def fill_archive_messages(conn: Any, conv: Any, user: Any, n: int, now: datetime) -> int:
    """``n`` messages older than 2 years where production keeps them: monthly partitions made
    as tidemill makes them (``partitions.create_month``), rows spread over each month, and
    DEFAULT_SHARE of them in the DEFAULT partition (a month nobody prepared). Returns how many
    went to the DEFAULT partition."""
    from pipelines.lifecycle import partitions as parts

    first_month = parts.add_months(parts.month_start(now), -(24 + 2 + ARCHIVE_MONTHS))
    in_default = int(n * DEFAULT_SHARE)
    per_month = (n - in_default) // ARCHIVE_MONTHS
    month_ms = 28 * 24 * 3600 * 1000
    made = 0
    for i in range(ARCHIVE_MONTHS):
        month = parts.add_months(first_month, i)
        parts.create_month(conn, "messages", month)
        rows = per_month if i < ARCHIVE_MONTHS - 1 else n - in_default - made
        start = datetime(month.year, month.month, 1, tzinfo=UTC)
        fill_messages(conn, conv, user, rows, start, first=made + 1, step_ms=month_ms // rows)
        made += rows
    # older than any prepared month: the DEFAULT partition, archived batch by batch
    old = datetime(first_month.year, first_month.month, 1, tzinfo=UTC) - timedelta(days=60)
    fill_messages(conn, conv, user, in_default, old, first=made + 1, step_ms=5)
    return in_default


def run_pipeline_process(name: str, env: dict[str, str]) -> tuple[str, float]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "pipeline", "run", name],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rss = PeakRss(proc.pid)
    out, err = proc.communicate()
    rss.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline {name} failed ({proc.returncode}): {err.strip()[-500:]}")
    return out, rss.peak / (1024 * 1024)


def longest_transaction(cli_output: str) -> float:
    m = re.search(r"longest transaction ([0-9.]+)s", cli_output)
    return float(m.group(1)) if m else float("nan")


def scalar(conn: Any, query: str, params: Any = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def n_partitions(conn: Any) -> int:
    return int(
        scalar(conn, "SELECT count(*) FROM pg_inherits WHERE inhparent = 'messages'::regclass")
    )


def run_stats(conn: Any, name: str) -> tuple[int, float]:
    row = conn.execute(
        "SELECT rows_affected, extract(epoch FROM finished_at - started_at) FROM pipeline_runs "
        "WHERE pipeline = %s AND status = 'succeeded' ORDER BY id DESC LIMIT 1",
        (name,),
    ).fetchone()
    return int(row[0]), float(row[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lifecycle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_ROWS:,} rows instead of {DEFAULT_ROWS:,}"
    )
    parser.add_argument("--rows", type=int, help="rows per table")
    args = parser.parse_args(argv)
    n = args.rows or (QUICK_ROWS if args.quick else DEFAULT_ROWS)
    if n < 10_000:
        parser.error("--rows must be at least 10000")

    configure_logging(env="production", level="warning")
    root = Path(tempfile.mkdtemp(prefix="tidemill-bench-"))
    pg = EmbeddedPostgres(root, port=free_port())
    started = time.monotonic()
    try:
        url = pg.start()
        upgrade(url)
        policy_file = root / "policies.toml"
        policy_file.write_text(POLICIES)
        objects = root / "objects"
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "STORAGE_URL": f"file://{objects}",
            "TIDEMILL_POLICY_FILE": str(policy_file),
            "TIDEMILL_DATA_DIR": str(root / "data"),
            "TIDEMILL_ENV": "production",
            "LOG_LEVEL": "warning",
            "TIDEMILL_PIPELINE_STATEMENT_TIMEOUT_MS": "600000",
        }
        env.pop("BROKER_URL", None)
        now = datetime.now(UTC)
        with psycopg.connect(url, autocommit=True) as conn:
            user = scalar(
                conn, "INSERT INTO users (email) VALUES ('bench@example.com') RETURNING id"
            )
            conv = scalar(
                conn,
                "INSERT INTO conversations (participant_ids) VALUES (ARRAY[%s]::uuid[]) "
                "RETURNING id",
                (user,),
            )

            # ---- purge
            t = time.monotonic()
            # old enough (> 90 days) yet newer than any prepared month: the DEFAULT partition
            fill_notifications(conn, user, n, now - timedelta(days=400), 1)
            conn.execute("VACUUM ANALYZE notifications")
            print(f"setup: {n:,} notifications in {time.monotonic() - t:.1f}s", flush=True)
            cutoff = now - timedelta(days=90)
            t = time.monotonic()
            with conn.transaction(force_rollback=True):
                deleted = conn.execute(
                    "DELETE FROM notifications WHERE created_at < %s", (cutoff,)
                ).rowcount
            delete_s = time.monotonic() - t
            assert deleted == n, (deleted, n)
            conn.execute("VACUUM ANALYZE notifications")
            conn.execute("CHECKPOINT")
            out, purge_rss = run_pipeline_process("notifications-purge", env)
            purged, purge_s = run_stats(conn, "notifications-purge")
            assert purged == n, (purged, n)
            max_txn_s = longest_transaction(out)
            left = scalar(conn, "SELECT count(*) FROM notifications")
            assert left == 0, left

            # ---- archive
            # Let the purge's aftermath (dirty buffers, autovacuum of 5 M dead rows) settle so
            # it does not land on the next phase's fsyncs.
            conn.execute("VACUUM notifications")
            conn.execute("CHECKPOINT")
            t = time.monotonic()
            partitions_before = n_partitions(conn)
            in_default = fill_archive_messages(conn, conv, user, n, now)
            conn.execute("VACUUM ANALYZE messages")
            conn.execute("CHECKPOINT")
            print(f"setup: {n:,} messages in {time.monotonic() - t:.1f}s", flush=True)
            a_cutoff = now - timedelta(days=2 * 365)
            # COPY is read COPY_ROUNDS times and its median taken: on a shared machine one
            # read swung by 2x between runs (the archive itself can run once per fill).
            copy_times = []
            for _ in range(COPY_ROUNDS):
                t = time.monotonic()
                copied = 0
                with conn.cursor().copy(
                    "COPY (SELECT * FROM messages WHERE created_at < %s) TO STDOUT (FORMAT csv)",
                    (a_cutoff,),
                ) as copy:
                    for chunk in copy:
                        copied += bytes(chunk).count(b"\n")
                copy_times.append(time.monotonic() - t)
                assert copied == n, (copied, n)
            copy_s = statistics.median(copy_times)
            out, archive_rss = run_pipeline_process("messages-archive", env)
            # a whole month is one transaction (SHARE lock on that expired month only): its
            # length is reported on its own, not against the purge's 1 s goal
            archive_txn_s = longest_transaction(out)
            archived, archive_s = run_stats(conn, "messages-archive")
            assert archived == n, (archived, n)
            paths = scalar(
                conn,
                "SELECT progress->'paths' FROM pipeline_runs WHERE pipeline = 'messages-archive' "
                "ORDER BY id DESC LIMIT 1",
            )
            assert paths["batches"]["rows"] == in_default, (paths, in_default)
            assert n_partitions(conn) == partitions_before, "archived months still attached"
            stored = conn.execute(
                "SELECT sum(rows), sum(size_bytes), count(*) FROM archive_objects"
            )
            stored_rows, stored_bytes, n_objects = stored.fetchone() or (0, 0, 0)
            assert stored_rows == n and scalar(conn, "SELECT count(*) FROM messages") == 0

            # ---- partition drop
            from pipelines.lifecycle import partitions as parts

            month = date(2021, 1, 1)
            parts.create_month(conn, "notifications", month)
            fill_notifications(
                conn, user, n // 5, datetime(2021, 1, 1, tzinfo=UTC), 20 * 24 * 3600 * 1000 // n
            )
            in_part = scalar(conn, "SELECT count(*) FROM partitions.notifications_p2021_01")
            target = next(
                p
                for p in parts.list_partitions(conn, "notifications")
                if p.name == "notifications_p2021_01"
            )
            t = time.monotonic()
            parts.drop_partition(conn, "notifications", target)
            drop_s = time.monotonic() - t
    finally:
        dispose_all()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)

    purge_rate, delete_rate = n / purge_s, n / delete_s
    archive_rate, copy_rate = n / archive_s, n / copy_s
    peak = max(purge_rss, archive_rss)
    part_rows, part_s = paths["partitions"]["rows"], paths["partitions"]["seconds"]
    batch_rows, batch_s = paths["batches"]["rows"], paths["batches"]["seconds"]
    part_rate, batch_rate = part_rows / part_s, batch_rows / batch_s
    rows = [
        ("purge (batched pipeline)", f"{purge_rate:,.0f} rows/s", f"{purge_s:.2f}s"),
        ("  one unbatched DELETE", f"{delete_rate:,.0f} rows/s", f"{delete_s:.2f}s"),
        ("  longest purge transaction", f"{max_txn_s:.3f}s", "goal < 1 s"),
        ("archive to file:// (pipeline)", f"{archive_rate:,.0f} rows/s", f"{archive_s:.2f}s"),
        (
            "  COPY … TO STDOUT (median of reads)",
            f"{copy_rate:,.0f} rows/s",
            " ".join(f"{t:.2f}s" for t in copy_times),
        ),
        (
            f"  whole months ({ARCHIVE_MONTHS} partitions, {part_rows:,} rows)",
            f"{part_rate:,.0f} rows/s",
            f"{part_s:.2f}s, {part_rate / copy_rate:.2f} x COPY",
        ),
        (
            f"  batches (DEFAULT partition, {batch_rows:,} rows)",
            f"{batch_rate:,.0f} rows/s",
            f"{batch_s:.2f}s, {batch_rate / copy_rate:.2f} x COPY",
        ),
        ("  objects / compressed bytes", f"{n_objects}", f"{int(stored_bytes) / 1e6:.1f} MB"),
        ("  longest archive transaction (a month)", f"{archive_txn_s:.3f}s", ""),
        (f"drop a monthly partition ({in_part:,} rows)", f"{drop_s:.3f}s", ""),
        (
            "peak RSS purge / archive process",
            f"{purge_rss:.0f} / {archive_rss:.0f} MB",
            "goal < 256 MB",
        ),
    ]
    print(f"\nlifecycle benchmark, {n:,} rows per table ({time.monotonic() - started:.0f}s)")
    width = max(len(r[0]) for r in rows)
    for label, a, b in rows:
        print(f"  {label:<{width}}  {a:>18}  {b}")
    print(
        f"  purge_vs_delete {purge_rate / delete_rate:.2f} (goal >= 0.4), "
        f"archive_vs_copy {archive_rate / copy_rate:.2f} (goal >= 0.6)",
        flush=True,
    )
    summary = {
        "rows": n,
        "purge_vs_delete": round(purge_rate / delete_rate, 3),
        "max_txn_s": round(max_txn_s, 3),
        "archive_max_txn_s": round(archive_txn_s, 3),
        "archive_vs_copy": round(archive_rate / copy_rate, 3),
        "archive_rows_per_s": round(archive_rate),
        "archive_s": round(archive_s, 3),
        # per path, each against the same COPY rate (rows/s of the whole median read)
        "archive_partitions_vs_copy": round(part_rate / copy_rate, 3),
        "archive_batches_vs_copy": round(batch_rate / copy_rate, 3),
        "copy_s": [round(t, 3) for t in copy_times],
        "partition_drop_s": round(drop_s, 4),
        "peak_rss_mb": round(peak, 1),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
