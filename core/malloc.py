"""glibc malloc settings for the dramatiq worker processes (issue 18's soak: RSS in steps).

A worker child runs jobs on a pool of threads, and glibc gives threads their own malloc arenas
(up to 8 per core). glibc also raises its mmap threshold, by default, to the size of any mmapped
block that is freed (up to 32 MiB): after the first 1 MiB chunk a backup's pump frees
(``pipelines/backups/logical.py: pump``), the next ones come from the arena of the thread that
allocates them (the pump's reader, zstd's workers, the pool thread) instead of from ``mmap``.
Freed, they stay in that arena as free space (``malloc_trim(0)`` after each job gave none of it
back). So the process steps up at each backup that lands on arenas not yet used for one, until
the arenas run out: measured with an 8-thread pool and 10 backups, RSS 96 -> 204 MiB while
glibc's bytes in use stayed at 22 MiB and its free-but-kept bytes went 0 -> 103 MiB. In a
2-hour soak with an hourly backup that looked like two steps and a plateau.

The measure, set once in the worker's parent before it forks its children and before any
thread starts (dramatiq forks; children inherit the settings):

- ``M_MMAP_THRESHOLD`` fixed (256 KiB): blocks of that size or more always come from ``mmap``
  and go back to the kernel when freed. Setting it also turns off the dynamic raise, and with
  it the matching raise of the trim threshold, so the top of a heap is trimmed again.
- ``M_ARENA_MAX`` (2): the process's threads share two arenas instead of up to 8 per core, so
  what an arena keeps below the threshold is kept at most twice.

Measured (the same 10 backups): RSS 96 -> 108.7 MiB with both (the first backup's imports and
buffers included), flat from the second backup; the threshold alone 96 -> 114.2 MiB, the arena
limit alone 96 -> 136 MiB.

Only glibc has these knobs; elsewhere (musl, macOS) nothing is done. An operator's own
``MALLOC_ARENA_MAX`` / ``MALLOC_MMAP_THRESHOLD_`` environment variables win: glibc has read
them already, and we leave them be.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

from core.log import get_logger

log = get_logger(__name__)

# mallopt(3) parameter numbers, from glibc's malloc.h.
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

# The environment variable through which an operator sets each parameter for glibc itself.
_ENV = {M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_", M_ARENA_MAX: "MALLOC_ARENA_MAX"}
_NAMES = {M_MMAP_THRESHOLD: "mmap_threshold", M_ARENA_MAX: "arena_max"}


def is_glibc() -> bool:
    return platform.libc_ver()[0] == "glibc"


def tune_worker_malloc(
    *, arena_max: int, mmap_threshold: int, environ: Mapping[str, str] | None = None
) -> dict[str, int]:
    """Apply the worker's malloc settings to this process (and the children it forks later).

    A value of 0 leaves that parameter at glibc's default. Returns what was applied, by name;
    an empty dict when nothing was (not glibc, all 0, or set by the environment). Call it
    before any thread starts: an arena limit does not shrink arenas already made.
    """
    if not is_glibc():
        return {}
    environ = os.environ if environ is None else environ
    libc = ctypes.CDLL(None)
    applied: dict[str, int] = {}
    for param, value in ((M_MMAP_THRESHOLD, mmap_threshold), (M_ARENA_MAX, arena_max)):
        if value <= 0 or _ENV[param] in environ:
            continue
        # mallopt returns 1 on success, 0 on a value glibc refuses (e.g. a threshold > 32 MiB).
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
            applied[_NAMES[param]] = value
        else:
            log.warning("malloc_setting_refused", setting=_NAMES[param], value=value)
    return applied
