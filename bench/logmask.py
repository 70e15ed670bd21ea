"""Log masking: cost per byte at 1 MB against the same at 1 KB, measured in the same run.

    .venv/bin/python -m bench.logmask [--quick]

``core.log.mask_personal`` runs on every string field of every log line, over text a client
may control (a request path, a header, an error message). Linear time means the cost per
byte does not grow with the input: the goal is per-byte cost at 1 MB within 2x of 1 KB, for
each input shape below, including the shapes that made the earlier regular expression
quadratic (long runs of address characters with no '@', many '@'). The processor also cuts
every field to ``MAX_FIELD_CHARS`` first; this bench measures the masking itself, uncut.

For comparison, the earlier e-mail expression is timed on the worst shape at growing sizes
(it is quadratic, so it stops at 64 KB). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable

from core.log import mask_personal

SMALL = 1024
LARGE = 1024 * 1024
GOAL_RATIO = 2.0

SHAPES: dict[str, Callable[[int], str]] = {
    "prose with addresses": lambda n: _fill("write to alice.smith@example.com or call. ", n),
    "address characters, no @": lambda n: _fill("a", n),
    "local part then @, no domain": lambda n: _fill("a" * 63 + "@", n),
    "only @": lambda n: _fill("@", n),
    "dotted names around @": lambda n: _fill("a.b@c.d.", n),
    "push tokens, unclosed": lambda n: _fill("ExponentPushToken[abc", n),
}
# The expression core.log used before: nested repetition over attacker-controlled text.
_OLD_EMAIL = re.compile(r"([A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]*@([A-Za-z0-9.\-]+\.[A-Za-z]{2,})")


def _fill(unit: str, n: int) -> str:
    return (unit * (n // len(unit) + 1))[:n]


def ns_per_byte(fn: Callable[[str], object], text: str, *, total_bytes: int) -> float:
    """One timing of `fn` over `text` repeated until `total_bytes` were masked, in ns/B."""
    reps = max(1, total_bytes // len(text))
    started = time.perf_counter()
    for _ in range(reps):
        fn(text)
    return (time.perf_counter() - started) / (reps * len(text)) * 1e9


def compare(
    fn: Callable[[str], object], small: str, large: str, rounds: int
) -> tuple[float, float]:
    """Per-byte cost of `small` and `large`, each timed over the same number of bytes, in
    alternating rounds; the minimum of each (the run least disturbed by other processes on
    the machine: the work itself is deterministic)."""
    smalls, larges = [], []
    for _ in range(rounds):
        smalls.append(ns_per_byte(fn, small, total_bytes=len(large)))
        larges.append(ns_per_byte(fn, large, total_bytes=len(large)))
    return min(smalls), min(larges)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.logmask", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter timing budget")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 7
    print(f"log masking (core.log.mask_personal): ns per byte, {SMALL:,} B vs {LARGE:,} B")
    print(f"{'input shape':<30} {'1 KB':>10} {'1 MB':>10} {'ratio':>7}")
    ratios: dict[str, float] = {}
    for name, make in SHAPES.items():
        small, large = compare(mask_personal, make(SMALL), make(LARGE), rounds)
        ratios[name] = large / small
        print(f"{name:<30} {small:>10.1f} {large:>10.1f} {large / small:>7.2f}")
    worst = max(ratios.values())
    verdict = "met" if worst <= GOAL_RATIO else "NOT met"
    print(f"worst 1 MB / 1 KB per-byte ratio: {worst:.2f} (goal <= {GOAL_RATIO}: {verdict})")

    print("earlier expression on 'address characters, no @' (quadratic):")
    old: dict[str, float] = {}
    for size in (1024, 8 * 1024, 64 * 1024):
        text = _fill("a", size)
        per_byte = ns_per_byte(lambda t: _OLD_EMAIL.sub(r"\1***@\2", t), text, total_bytes=size)
        new = ns_per_byte(mask_personal, text, total_bytes=size)
        old[str(size)] = round(per_byte, 1)
        print(f"  {size:>7,} B: earlier {per_byte:>10.1f} ns/B, now {new:>6.1f} ns/B")
    summary = {
        "bench": "logmask",
        "figures": {
            "worst_ratio_1mb_vs_1kb": round(worst, 3),
            "ratios": {k: round(v, 3) for k, v in ratios.items()},
            "earlier_ns_per_byte": old,
        },
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
