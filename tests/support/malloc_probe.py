"""Run base backups on a pool of threads, one per thread in turn, as a worker child does, and
print the process's RSS and glibc's own figures after each: one JSON object per line.

    python -m tests.support.malloc_probe --jobs N --threads T --storage URL [--untuned]

Without ``--untuned`` the process first applies the worker's malloc settings exactly as
``tidemill worker`` does (core/malloc.py, from the settings in the environment). A process of
its own: malloc settings are per process and must be set before the pool's threads start.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import queue
import threading
from typing import Any

import psutil


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def figures() -> dict[str, float]:
    """RSS, and glibc's heap bytes in use and free (kept) in its arenas, in MiB."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    mib = 2**20
    return {
        "rss": psutil.Process().memory_info().rss / mib,
        "in_use": info.uordblks / mib,
        "free_in_arenas": info.fordblks / mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--untuned", action="store_true")
    args = parser.parse_args()

    from core.settings import Settings

    settings = Settings.from_env()
    applied: dict[str, int] = {}
    if not args.untuned:
        from core.malloc import tune_worker_malloc

        applied = tune_worker_malloc(
            arena_max=settings.worker_malloc_arena_max,
            mmap_threshold=settings.worker_mmap_threshold,
        )
    print(json.dumps({"applied": applied, **figures()}), flush=True)

    from core.storage import open_storage
    from pipelines.backups.physical import run_base_backup

    storage = open_storage(args.storage, settings=settings)
    done: queue.Queue[str | None] = queue.Queue()
    inboxes: list[queue.Queue[int]] = [queue.Queue() for _ in range(args.threads)]

    def serve(inbox: queue.Queue[int]) -> None:
        while True:
            inbox.get()
            try:
                run_base_backup(settings, storage=storage, reason="malloc probe")
                done.put(None)
            except Exception as exc:  # reported, so the test fails with the reason
                done.put(f"{type(exc).__name__}: {exc}")

    for inbox in inboxes:
        threading.Thread(target=serve, args=(inbox,), daemon=True).start()
    for job in range(args.jobs):
        inboxes[job % args.threads].put(job)  # the next job on the next thread, in turn
        error = done.get()
        out: dict[str, Any] = {"job": job, **figures()}
        if error:
            out["error"] = error
        print(json.dumps(out), flush=True)
        if error:
            raise SystemExit(1)
    os._exit(0)  # the pool's threads block on their inboxes


if __name__ == "__main__":
    main()
