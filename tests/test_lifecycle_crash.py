"""SIGKILL mid-run (a real `tidemill pipeline run` process), then another run: nothing lost,
nothing archived twice."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

from pipelines.lifecycle.engine import run_pipeline
from tests.conftest import start_cli
from tests.support import lifecycle as _lifecycle
from tests.support.lifecycle import (
    add_messages,
    archived_ids,
    make_conversation,
    make_user,
)

# fixtures from tests/support, registered by assignment (not an import) so that
# test parameters named like them do not shadow an import
file_storage = _lifecycle.file_storage


def test_sigkill_mid_archive_then_next_run_finishes_exactly_once(sql, file_storage) -> None:
    # Given 30,000 messages older than two years
    a, b = make_user(sql), make_user(sql)
    conv = make_conversation(sql, [a, b])
    start = datetime.now(UTC) - timedelta(days=3 * 365)
    add_messages(sql, conversation=conv, sender=a, n=30_000, start=start, step="1 second")
    ids = sorted(str(r[0]) for r in sql.execute("SELECT id FROM messages"))
    # When a real archive process is killed with SIGKILL after a few committed batches
    proc = start_cli(
        "pipeline",
        "run",
        "messages-archive",
        "--batch-size",
        "300",
        env={**os.environ, "STORAGE_URL": file_storage},
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = sql.execute("SELECT count(*) FROM archive_objects").fetchone()[0]
            if done >= 5 or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    remaining = sql.execute("SELECT count(*) FROM messages").fetchone()[0]
    assert 0 < remaining < 30_000
    assert (
        sql.execute("SELECT status FROM pipeline_runs ORDER BY id DESC LIMIT 1").fetchone()[0]
        == "running"
    )  # nobody could record the death
    # Then the next run closes the dead one and finishes the job
    result = run_pipeline("messages-archive")
    assert result.status == "succeeded"
    assert sql.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    statuses = [r[0] for r in sql.execute("SELECT status FROM pipeline_runs ORDER BY id")]
    assert statuses == ["interrupted", "succeeded"]
    # every row is in storage exactly once: none lost, none twice (orphans were removed)
    stored = archived_ids(file_storage, "messages/")
    assert [i for i, n in Counter(stored).items() if n > 1] == []
    assert sorted(stored) == ids
    recorded = sql.execute("SELECT sum(rows) FROM archive_objects").fetchone()[0]
    assert recorded == 30_000
