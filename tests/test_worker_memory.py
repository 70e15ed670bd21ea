"""A worker's RSS does not step up as it runs backups and pipelines (issue 18's soak).

The cause (core/malloc.py): glibc raises its mmap threshold after the first big block is freed,
so a backup's 1 MiB chunks then come from the running thread's own arena and stay there, free
but kept: one ~11 MiB step per pool thread. The worker's malloc settings keep big blocks on
mmap. Real base backups of the suite's Postgres, in a process of its own, one per pool thread
in turn; untuned, the same run must show the steps, or this test proves nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.malloc import is_glibc, tune_worker_malloc
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(not is_glibc(), reason="glibc's allocator only")

THREADS = 3
JOBS = 1 + THREADS  # the first job pays the imports; then each other thread runs one, in turn


def probe(storage: Path, *, untuned: bool, db: str) -> list[dict[str, Any]]:
    argv = [sys.executable, "-m", "tests.support.malloc_probe", "--jobs", str(JOBS)]
    argv += ["--threads", str(THREADS), "--storage", f"file://{storage}"]
    if untuned:
        argv.append("--untuned")
    env = dict(os.environ, DATABASE_DIRECT_URL=db)
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_backups_on_every_pool_thread_leave_no_steps(db: str, tmp_path: Path) -> None:
    # Given the worker's malloc settings, when each pool thread in turn runs a base backup
    tuned = probe(tmp_path / "tuned", untuned=False, db=db)
    assert tuned[0]["applied"] == {"mmap_threshold": 262144, "arena_max": 2}
    warm, last = tuned[1], tuned[-1]
    # Then after the first one (imports, buffers) the process stays where it was: the freed
    # chunks went back to the kernel, not into a thread's arena
    assert last["rss"] - warm["rss"] < 4, tuned
    assert last["free_in_arenas"] < 8, tuned

    # And without them the same run keeps one chunk pile per thread: the steps the soak saw
    untuned = probe(tmp_path / "untuned", untuned=True, db=db)
    warm, last = untuned[1], untuned[-1]
    assert last["rss"] - warm["rss"] > 12, untuned
    assert last["free_in_arenas"] > 16, untuned


def test_operator_environment_and_zero_leave_glibc_alone() -> None:
    # An operator's MALLOC_* variable wins (glibc read it at start); 0 means glibc's default
    assert tune_worker_malloc(arena_max=0, mmap_threshold=0) == {}
    env = {"MALLOC_ARENA_MAX": "4", "MALLOC_MMAP_THRESHOLD_": "131072"}
    assert tune_worker_malloc(arena_max=2, mmap_threshold=262144, environ=env) == {}


PRELOAD_PROBE = """
import json, sys
import dramatiq
import workers.actors
from workers.broker import broker
from workers.middleware import PRELOAD_BY_QUEUE
wanted = [m for ms in PRELOAD_BY_QUEUE.values() for m in ms]
before = [m for m in wanted if m in sys.modules]
worker = dramatiq.Worker(broker, queues=QUEUES, worker_threads=1, worker_timeout=100)
worker.start()
worker.stop()
print(json.dumps({"before": before, "after": [m for m in wanted if m in sys.modules]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("queues", "loaded"),
    [
        (None, {"pipelines", "backups"}),
        ({"backups"}, {"backups"}),
        ({"default", "cache"}, set()),
    ],
)
def test_worker_boot_imports_what_its_queues_jobs_import(
    queues: set[str] | None, loaded: set[str]
) -> None:
    from workers.middleware import PRELOAD_BY_QUEUE

    # Given a fresh process that imported every actor (the jobs' modules are still unloaded)
    code = PRELOAD_PROBE.replace("QUEUES", repr(queues))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["before"] == [], seen
    # When a worker for those queues boots, then it has imported theirs and nobody else's
    expected = sorted(m for q in loaded for m in PRELOAD_BY_QUEUE[q])
    assert sorted(seen["after"]) == expected
