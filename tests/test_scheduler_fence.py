"""The fence fences: a leader frozen (SIGSTOP) inside its fire transaction, with the tick row
already written and only the rest of the transaction and its COMMIT to go, cannot stall the
standby and cannot commit when it thaws. Two real `tidemill scheduler` processes.

The freeze lands inside the fire: the test holds a table lock on ``outbox`` so the leader's
next fire waits at its outbox insert (its tick row inserted), stops the leader's process
there, then releases the table lock. The leader's backend finishes the insert and sits idle in
the transaction, its client frozen: exactly a leader frozen at its commit point.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core.proc import signal_group, stop_process, tail, wait_until
from tests.conftest import start_cli
from tests.support.scheduler import extra_json, outbox_ticks, tick_rows
from tests.test_scheduler_failover import FAST, events

pytestmark = pytest.mark.slow

RETRY_S = 1.0  # idle timeouts max(5 s, 5 x retry) = 5 s; lock timeout 2.5 s
# the frozen session's idle-in-transaction timeout (5 s), a standby retry, the next tick (2 s),
# and room for a loaded machine
TAKEOVER_BOUND_S = 15.0


def waiting_fire(sql: Any) -> tuple[int, str] | None:
    """(backend pid, scheduler identity) of a scheduler session waiting on a lock."""
    row = sql.execute(
        "SELECT pid, application_name FROM pg_stat_activity "
        "WHERE application_name LIKE 'tidemill-scheduler %%' AND wait_event_type = 'Lock'"
    ).fetchone()
    return None if row is None else (int(row[0]), str(row[1]).split(" ", 1)[1])


def test_a_leader_frozen_at_its_commit_point_is_refused_and_the_standby_fires(
    db, sql, tmp_path: Path
) -> None:
    env = dict(
        os.environ,
        TIDEMILL_SCHEDULES_EXTRA=extra_json(FAST),
        TIDEMILL_SCHEDULER_LEADER_RETRY_S=str(RETRY_S),
        TIDEMILL_ENV="production",  # JSON log lines
    )
    procs = {}
    logs = {}
    for label in ("a", "b"):
        logs[label] = tmp_path / f"{label}.log"
        proc = start_cli("scheduler", env=env, stderr=logs[label].open("wb"))
        procs[proc.pid] = (label, proc)
    try:
        # Given two schedulers, one leading and firing every two seconds
        assert wait_until(lambda: len(tick_rows(sql, FAST.name)) >= 3, timeout=60), {
            label: tail(path) for label, path in logs.items()
        }
        # When the leader's next fire is held at its outbox insert and the leader frozen there
        with psycopg.connect(db, autocommit=True) as blocker:
            blocker.execute("BEGIN")
            blocker.execute("LOCK TABLE outbox IN EXCLUSIVE MODE")
            assert wait_until(lambda: waiting_fire(sql) is not None, timeout=10, interval=0.02)
            waiting = waiting_fire(sql)
            assert waiting is not None
            backend, identity = waiting
            leader_pid = int(identity.rsplit(":", 1)[1])
            signal_group(leader_pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            blocker.execute("COMMIT")
        old_label, _ = procs[leader_pid]
        (standby_pid,) = set(procs) - {leader_pid}
        standby_label, _ = procs[standby_pid]

        def fired_by(pid: int) -> list[tuple[Any, ...]]:
            return [r for r in tick_rows(sql, FAST.name) if r[3].endswith(f":{pid}")]

        # Then the frozen leader's session ends (its fire rolled back, its lock freed together)
        assert wait_until(
            lambda: (
                sql.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (backend,)
                ).fetchone()[0]
                == 0
            ),
            timeout=TAKEOVER_BOUND_S,
        )
        # and the standby leads and fires within the bound, not blocked behind the frozen fire
        assert wait_until(lambda: len(fired_by(standby_pid)) >= 1, timeout=TAKEOVER_BOUND_S), tail(
            logs[standby_label]
        )
        takeover_s = time.monotonic() - frozen_at
        # When the old leader thaws
        signal_group(leader_pid, signal.SIGCONT)
        # Then its fire is refused (its connection went with the lock) and it stands by
        assert wait_until(lambda: events(logs[old_label], "tick_fenced") != [], timeout=20), tail(
            logs[old_label]
        )
        (refused,) = events(logs[old_label], "tick_fenced")
        target = len(fired_by(standby_pid)) + 2
        assert wait_until(lambda: len(fired_by(standby_pid)) >= target, timeout=30)
        # before the teardown (stopping the new leader first hands the lock back to the old one)
        rows = tick_rows(sql, FAST.name)
    finally:
        for _, proc in procs.values():
            signal_group(proc.pid, signal.SIGCONT)
            stop_process(proc, sig=signal.SIGTERM, group=True)

    old = [r for r in rows if r[3].endswith(f":{leader_pid}")]
    new = [r for r in rows if r[3].endswith(f":{standby_pid}")]
    assert len(old) + len(new) == len(rows)
    # nothing the old leader fired landed after the standby took over; the refused tick, if it
    # is recorded at all, was recorded by the new leader
    assert max(r[0] for r in old) < min(r[0] for r in new)
    assert all(r[0].isoformat() != refused["tick"] for r in old)
    # each tick recorded once, with one message each
    ticks = [r[0] for r in rows]
    assert len(ticks) == len(set(ticks))
    last = ticks[-1].isoformat()
    assert sorted(t for t in outbox_ticks(sql, FAST.actor, FAST.queue_name) if t <= last) == sorted(
        t.isoformat() for t in ticks
    )
    print(f"\nstandby fired {takeover_s:.1f} s after the leader froze inside its fire")
