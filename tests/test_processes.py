"""Real subprocesses: a worker killed mid-message, `tidemill up` stopping with no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import cast

import psutil
import pytest
from dramatiq.brokers.redis import RedisBroker

from core.proc import stop_process, wait_until
from tests.conftest import healthy, start_cli, up_env

pytestmark = pytest.mark.slow


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return start_cli(
        "worker",
        "tests.support.actors",
        "--processes",
        "1",
        "--threads",
        "2",
        "--queue",
        "tests-slow",
        env=env,
    )


def test_worker_killed_mid_message_is_redelivered_and_applied_once(db, sql, redis_client) -> None:
    from tests.support import actors
    from workers.broker import broker

    rb = cast(RedisBroker, broker)

    broker.flush_all()
    env = dict(
        os.environ,
        TIDEMILL_HEARTBEAT_TIMEOUT_MS="2000",  # a dead worker is noticed fast
        TIDEMILL_REDIS_MAINTENANCE_CHANCE="1000000",
    )  # and requeued on the next fetch
    # Given a worker process busy with a message that has not committed yet
    actors.hold_then_write.send("kill1")
    first = start_worker(env)
    try:
        assert wait_until(lambda: redis_client.exists("started:kill1"), timeout=60)
        # When the whole worker (main and child processes) is killed with SIGKILL
        stop_process(first, sig=signal.SIGKILL, group=True)
    finally:
        if first.poll() is None:
            stop_process(first, sig=signal.SIGKILL, group=True)
    assert (
        sql.execute("SELECT count(*) FROM audit_logs WHERE entity_id = 'kill1'").fetchone()[0] == 0
    )
    redis_client.delete("started:kill1")
    redis_client.set("release:kill1", "1")
    # Then a new worker gets the message again once the dead one's heartbeat expires
    second = start_worker(env)
    try:
        assert wait_until(
            lambda: (
                sql.execute("SELECT count(*) FROM audit_logs WHERE entity_id = 'kill1'").fetchone()[
                    0
                ]
                > 0
            ),
            timeout=90,
            interval=0.2,
        )
        assert wait_until(lambda: rb.client.hlen("dramatiq:tests-slow.msgs") == 0, timeout=30)
    finally:
        stop_process(second, sig=signal.SIGTERM, group=True)
    # and it was applied exactly once, on the second attempt
    assert redis_client.get("attempts:kill1") == "2"
    assert (
        sql.execute("SELECT count(*) FROM audit_logs WHERE entity_id = 'kill1'").fetchone()[0] == 1
    )


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_up_runs_everything_embedded_and_stops_with_no_orphans(tmp_path, stop_signal) -> None:
    env, web = up_env(tmp_path)
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = start_cli("up", env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: healthy(web), timeout=120, interval=0.25), (
            tmp_path / "up.log"
        ).read_text()[-3000:]
        # every process of the system is running under the supervisor
        assert wait_until(
            lambda: (
                len([p for p in _descendants(up.pid) if "worker" in " ".join(p.cmdline())]) >= 3
            ),
            timeout=60,
        )
        tree = _descendants(up.pid)
        cmdlines = [" ".join(p.cmdline()) for p in tree]
        for name in ("cli.main relay", "cli.main scheduler", "cli.main web", "cli.main worker"):
            assert any(name in c for c in cmdlines), (name, cmdlines)
        assert any("postgres" in c for c in cmdlines)
        assert any("valkey-server" in c for c in cmdlines)
        # When the supervisor gets the signal
        up.send_signal(stop_signal)
        up.wait(timeout=90)
    finally:
        if up.poll() is None:
            up.kill()
        log.close()
    # Then it exits cleanly and nothing it started survives it
    assert up.returncode == 0, (tmp_path / "up.log").read_text()[-3000:]
    assert wait_until(
        lambda: not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
        timeout=20,
    )
    output = (tmp_path / "up.log").read_text()
    assert f"http://127.0.0.1:{web}/dashboard" in output
    assert "TIDEMILL_WORKER_PROCESSES" in output
    # the banner says which servers it started itself
    assert f"(embedded, data in {tmp_path / 'data' / 'postgres'})" in output
    assert f"(embedded, data in {tmp_path / 'data' / 'valkey'})" in output
    assert "(external)" not in output
    # data lives under the data dir and is kept for the next start
    assert (tmp_path / "data" / "postgres" / "PG_VERSION").exists()


def test_up_uses_external_servers_when_urls_are_set(tmp_path, servers, db) -> None:
    env, web = up_env(tmp_path, DATABASE_URL=servers.database_url, REDIS_URL=servers.redis_url)
    up = start_cli("up", "--workers", "1", env=env)
    try:
        assert wait_until(lambda: healthy(web), timeout=120, interval=0.25)
        cmdlines = [" ".join(p.cmdline()) for p in _descendants(up.pid)]
        assert not any("postgres" in c or "valkey-server" in c for c in cmdlines), cmdlines
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=90)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 0
    assert not (tmp_path / "data" / "postgres").exists()
