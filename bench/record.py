"""Run benchmarks and write their figures, with the machine and the date, to the docs.

    python -m bench.record [--quick] BENCH [BENCH ...]

Each benchmark runs as ``python -m bench.NAME [--quick]`` with its output passed through; its
last line is one JSON object of figures (every bench ends that way). The page
``docs/benchmarks-results.md`` is rewritten with one table per benchmark, so the docs always
show what the last ``make bench`` (or ``make bench-quick``) measured, where and when. A bench
that fails stops the run with its exit status, as ``make bench`` always did.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks-results.md"
# Every bench's latest figures, with how and where they were measured: a run of some benches
# replaces theirs and keeps the others'.
DATA = ROOT / "docs" / "benchmarks-results.json"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def run(name: str, quick: bool) -> dict[str, Any]:
    argv = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if quick else [])]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    last = ""
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.strip():
            last = line.strip()
    if proc.wait() != 0:
        raise SystemExit(proc.returncode)
    try:
        figures = json.loads(last)
    except json.JSONDecodeError:
        return {"output": last}
    return figures if isinstance(figures, dict) else {"result": figures}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, dict | list):
        return "`" + json.dumps(value, separators=(",", ":"))[:120] + "`"
    return str(value).replace("|", "\\|")


def flatten(figures: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested figures as dotted keys (``figures.ratios.csv``), so every number gets a row."""
    flat: dict[str, Any] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def page(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# Latest benchmark figures",
        "",
        "Written by `make bench` / `make bench-quick` (`bench/record.py`): each benchmark's",
        "figures from its latest run, with the machine and the date of that run. Every ratio is",
        "against a baseline measured in the same run; what each figure means is in the bench's",
        "own docstring and in [benchmarks](benchmarks.md).",
        "",
    ]
    for name in sorted(results):
        run = results[name]
        lines += [
            f"## `bench.{name}`",
            "",
            f"{run['mode']}, {run['date']} UTC, on {run['machine']}.",
            "",
            "| figure | value |",
            "|---|---|",
        ]
        rows = flatten(run["figures"])
        lines += [f"| {key} | {_cell(value)} |" for key, value in rows.items() if key != "bench"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes")
    parser.add_argument("benches", nargs="+", metavar="BENCH")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, Any]] = json.loads(DATA.read_text()) if DATA.exists() else {}
    where = machine()
    for name in args.benches:
        print(f"== bench.{name}{' --quick' if args.quick else ''}", flush=True)
        started = datetime.now(UTC)
        results[name] = {
            "mode": "`--quick`" if args.quick else "full size",
            "date": f"{started:%Y-%m-%d %H:%M}",
            "machine": where,
            "figures": run(name, args.quick),
        }
        DATA.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        PAGE.write_text(page(results))  # after each bench: a later failure keeps these
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
