"""GDPR erase in archives: the cost of rewriting archived objects, against archiving them.

    .venv/bin/python -m bench.gdpr [--quick] [--rows N] [--users U]

Starts an embedded Postgres (migrated) and Valkey under a temporary directory. N messages
older than 2 years, written by U users in turn (so every archived object holds rows of every
user), are archived by ``messages-archive`` (batches of 20,000, CSV + zstd, file://).

  baseline  the archive run itself: seconds per object (COPY (DELETE … RETURNING) through zstd
            into storage, sha256 read back, catalogue row, subject index);
  erase     ``gdpr.erase`` of one of the users: every object holding them is loaded, erased,
            rewritten, read back, scanned, re-catalogued, its manifest updated; seconds per
            rewritten object, and the database part of the erase.

Prints the ratio rewrite-per-object / archive-per-object; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from core.log import configure_logging
from core.proc import free_port
from db.embedded import EmbeddedPostgres, EmbeddedValkey
from db.migrate import upgrade

DEFAULT_ROWS = 400_000
QUICK_ROWS = 60_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gdpr", description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS:,} rows")
    parser.add_argument("--rows", type=int, help=f"messages (default {DEFAULT_ROWS:,})")
    parser.add_argument("--users", type=int, default=50, help="writers of the messages")
    args = parser.parse_args(argv)
    n = args.rows or (QUICK_ROWS if args.quick else DEFAULT_ROWS)
    configure_logging(env="production", level="warning")
    root = Path(tempfile.mkdtemp(prefix="tidemill-bench-gdpr-"))
    pg = EmbeddedPostgres(root / "pg", port=free_port())
    valkey = EmbeddedValkey(root / "valkey", port=free_port())
    try:
        url = pg.start()
        redis_url = valkey.start()
        upgrade(url)
        os.environ.update(
            DATABASE_URL=url,
            REDIS_URL=redis_url,
            BROKER_URL=redis_url,
            STORAGE_URL=f"file://{root / 'objects'}",
            TIDEMILL_ENV="production",
            LOG_LEVEL="warning",
            TIDEMILL_PIPELINE_STATEMENT_TIMEOUT_MS="600000",
        )
        from core.settings import reset_settings_cache

        reset_settings_cache()
        from pipelines.lifecycle.engine import run_pipeline
        from pipelines.lifecycle.gdpr import erase

        old = datetime.now(UTC) - timedelta(days=3 * 365)
        with psycopg.connect(url, autocommit=True) as conn:
            users = [
                r[0]
                for r in conn.execute(
                    "INSERT INTO users (email, full_name, phone, username, deleted_at) "
                    "SELECT 'writer' || g || '@example.org', 'Writer Number ' || g, "
                    "'+4900' || g, 'writer_' || g, now() - interval '40 days' "
                    "FROM generate_series(1, %s) g RETURNING id",
                    (args.users,),
                ).fetchall()
            ]
            conv = conn.execute(
                "INSERT INTO conversations (participant_ids) VALUES (%s) RETURNING id", (users,)
            ).fetchone()[0]  # type: ignore[index]
            conn.execute(
                "INSERT INTO messages (conversation_id, sender_id, content, created_at) "
                "SELECT %s, (%s::uuid[])[1 + g %% %s], 'message ' || g, "
                "%s + g * interval '1 second' FROM generate_series(1, %s) g",
                (conv, users, len(users), old, n),
            )
            conn.execute("VACUUM ANALYZE messages")
        t = time.monotonic()
        archived = run_pipeline("messages-archive")
        archive_s = time.monotonic() - t
        objects = archived.stats.objects
        t = time.monotonic()
        result = erase(users[0], by="bench")
        erase_s = time.monotonic() - t
        per_archive = archive_s / objects
        per_rewrite = erase_s / max(result.archives_rewritten, 1)
        print(f"archive: {n:,} rows, {objects} objects, {per_archive:.3f} s/object")
        print(
            f"erase:   {result.archives_rewritten} objects rewritten in {erase_s:.2f} s, "
            f"{per_rewrite:.3f} s/object"
        )
        print(f"ratio rewrite/archive per object: {per_rewrite / per_archive:.2f}")
        print(
            json.dumps(
                {
                    "rows": n,
                    "objects": objects,
                    "archive_s_per_object": round(per_archive, 3),
                    "rewrite_s_per_object": round(per_rewrite, 3),
                    "ratio": round(per_rewrite / per_archive, 2),
                }
            )
        )
    finally:
        valkey.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
