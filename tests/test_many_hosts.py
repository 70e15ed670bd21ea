"""Workers on separate network hosts, and one of them cut off mid-job.

Each "host" is a Linux network namespace with its own veth link to a bridge in the test's
namespace, on a test-made private subnet (10.231.18.0/24, nothing else is used). Postgres is
reached through a PgBouncer listening on the bridge address (transaction pooling for
DATABASE_URL, a session-mode alias for DATABASE_DIRECT_URL) and Valkey is told to listen on it
too. Real `tidemill worker` processes run inside the namespaces (`ip netns exec`).

The promise under attack: a host whose link goes down mid-job has its jobs done exactly once by
the others within the redelivery deadline, and when its link comes back its late commit changes
nothing. Redelivery is the Redis broker's: the cut host stops heart-beating, and a surviving
worker requeues its unacknowledged messages once TIDEMILL_HEARTBEAT_TIMEOUT_MS has passed (a
Postgres rescuer, when there is one, may also re-send; the assertions hold either way: every
job done, each effect once).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from core.proc import stop_process, wait_until
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

SUBNET = "10.231.18"
BRIDGE_ADDR = f"{SUBNET}.1"
HOSTS = 3
JOBS = 24
WORK_S = 1.0
HEARTBEAT_MS = 3000
# Generous: heartbeat timeout + a maintenance pass + the job itself, on a loaded 2-core box.
REDELIVERY_DEADLINE_S = 60.0


def _can_admin_network() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (make test installs it)"
    probe = f"tmprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace (no CAP_NET_ADMIN?): {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Network:
    """A bridge at BRIDGE_ADDR and one namespace per host; everything removed by close()."""

    tag: str = field(default_factory=lambda: str(os.getpid() % 100000))
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # host-side veth ends

    @property
    def bridge(self) -> str:
        return f"tmbr{self.tag}"

    def open(self, hosts: int) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{BRIDGE_ADDR}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i in range(hosts):
            ns, outer, inner = f"tidemill-h{i}-{self.tag}", f"tmh{i}{self.tag}", f"tmn{i}{self.tag}"
            ip("netns", "add", ns)
            self.namespaces.append(ns)
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            self.links.append(outer)
            ip("link", "set", outer, "master", self.bridge)
            ip("link", "set", outer, "up")
            ip("link", "set", inner, "netns", ns)
            ip("-n", ns, "addr", "add", f"{SUBNET}.{10 + i}/24", "dev", inner)
            ip("-n", ns, "link", "set", inner, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def cut(self, i: int) -> None:
        ip("link", "set", self.links[i], "down")

    def restore(self, i: int) -> None:
        ip("link", "set", self.links[i], "up")

    def close(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes its veth
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@contextlib.contextmanager
def network(hosts: int) -> Iterator[Network]:
    net = Network()
    try:
        net.open(hosts)
        yield net
    finally:
        net.close()


@contextlib.contextmanager
def valkey_also_on(redis_client: Any, address: str) -> Iterator[None]:
    before = redis_client.config_get("bind")["bind"]
    redis_client.config_set("bind", f"{before} {address}")
    try:
        yield
    finally:
        redis_client.config_set("bind", before)


def start_host_worker(ns: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = open(Path(env["TIDEMILL_DATA_DIR"]) / f"{ns}.log", "ab")  # noqa: SIM115
    try:
        # `ip netns exec` execs the command: the process group is the worker's own.
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "cli.main", "worker",
             "tests.support.actors", "--processes", "1", "--threads", "2", "--queue", "hosts"],
            env=env,
            cwd=ROOT,
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    finally:
        log.close()


def test_workers_on_separate_hosts_share_load_and_survive_a_cut_link(
    servers, db, sql, redis_client, tmp_path
) -> None:
    reason = _can_admin_network()
    if reason:
        pytest.skip(reason)
    from tests.support import actors
    from tests.support.pgbouncer import PgBouncer
    from workers.broker import broker

    broker.flush_all()
    sql.execute("CREATE TABLE host_jobs (key text PRIMARY KEY, host text NOT NULL)")
    sql.execute("CREATE TABLE host_job_totals (done int NOT NULL)")
    sql.execute("INSERT INTO host_job_totals VALUES (0)")
    procs: list[subprocess.Popen[bytes]] = []
    with network(HOSTS) as net, valkey_also_on(redis_client, BRIDGE_ADDR):
        # Postgres listens on 127.0.0.1 only: the hosts reach it through two PgBouncers on the
        # bridge, one pooling transactions (DATABASE_URL), one handing out whole sessions.
        pooler, sessions = (
            PgBouncer(
                # not tmp_path: a concurrent pytest run resets /tmp/pytest-of-root to 0700,
                # which PgBouncer's unprivileged user could then not enter
                servers.root,
                server_host="127.0.0.1",
                server_port=servers.pg.port,
                listen_addr=BRIDGE_ADDR,
                pool_mode=mode,
            )
            for mode in ("transaction", "session")
        )
        bouncers = [pooler, sessions]
        try:
            for bouncer in bouncers:
                bouncer.start()
            base = dict(
                os.environ,
                DATABASE_URL=pooler.url("tidemill_test"),
                DATABASE_DIRECT_URL=sessions.url("tidemill_test"),
                REDIS_URL=f"redis://{BRIDGE_ADDR}:{servers.valkey.port}/0",
                TIDEMILL_DATA_DIR=str(tmp_path / "data"),
                TIDEMILL_HEARTBEAT_TIMEOUT_MS=str(HEARTBEAT_MS),
                TIDEMILL_REDIS_MAINTENANCE_CHANCE="1000000",  # every fetch looks for the dead
                TIDEMILL_REDELIVER_AFTER_S="10",  # a Postgres rescuer, where there is one
                TIDEMILL_MAX_RETRIES="3",
            )
            Path(base["TIDEMILL_DATA_DIR"]).mkdir(parents=True, exist_ok=True)
            for i, ns in enumerate(net.namespaces):
                procs.append(start_host_worker(ns, dict(base, TIDEMILL_TEST_HOST=f"h{i}")))
            run_scenario(net, sql, redis_client, actors, tmp_path)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    stop_process(proc, sig=signal.SIGKILL, group=True)
            for bouncer in bouncers:
                bouncer.stop()


def started_by(redis_client: Any, host: str) -> list[str]:
    keys = [k.split(":", 2)[2] for k in redis_client.scan_iter("hosts:started:*")]
    return [k for k in keys if host in redis_client.lrange(f"hosts:started:{k}", 0, -1)]


def committed(redis_client: Any, key: str) -> list[str]:
    return list(redis_client.lrange(f"hosts:committed:{key}", 0, -1))


def failed(redis_client: Any, key: str) -> list[str]:
    return list(redis_client.lrange(f"hosts:failed:{key}", 0, -1))


def done_rows(sql: Any) -> dict[str, str]:
    return dict(sql.execute("SELECT key, host FROM host_jobs").fetchall())


def run_scenario(net: Network, sql: Any, redis_client: Any, actors: Any, tmp_path: Path) -> None:
    figures: dict[str, Any] = {}
    # Round 1, load sharing: every host processes some of the jobs
    t0 = time.monotonic()
    for n in range(JOBS):
        actors.host_job.send(f"a{n}", WORK_S)
    assert wait_until(lambda: len(done_rows(sql)) == JOBS, timeout=120, interval=0.2), (
        f"only {len(done_rows(sql))}/{JOBS} jobs done; worker logs in {tmp_path / 'data'}"
    )
    figures["round1_s"] = round(time.monotonic() - t0, 1)
    per_host = {f"h{i}": 0 for i in range(HOSTS)}
    for host in done_rows(sql).values():
        per_host[host] += 1
    figures["round1_per_host"] = per_host
    assert all(count > 0 for count in per_host.values()), per_host

    # Round 2: host h0 is cut off while it is in the middle of jobs
    for n in range(JOBS):
        actors.host_job.send(f"b{n}", WORK_S)
    assert wait_until(
        lambda: any(k.startswith("b") for k in started_by(redis_client, "h0")), timeout=60
    ), "h0 never started a round-2 job"
    net.cut(0)
    cut_at = time.monotonic()
    time.sleep(0.5)  # a commit already on the wire before the cut lands first
    before_cut = done_rows(sql)
    in_flight = [
        k for k in started_by(redis_client, "h0") if k.startswith("b") and k not in before_cut
    ]
    assert in_flight, "h0 finished its jobs before the cut"

    def round2_done() -> bool:
        return sum(1 for k in done_rows(sql) if k.startswith("b")) == JOBS

    # Then the others do all of round 2, h0's jobs included, within the redelivery deadline
    assert wait_until(round2_done, timeout=REDELIVERY_DEADLINE_S, interval=0.2), (
        f"{sum(1 for k in done_rows(sql) if k.startswith('b'))}/{JOBS} round-2 jobs done "
        f"{REDELIVERY_DEADLINE_S} s after the cut; h0 had {in_flight} in flight"
    )
    figures["recovered_s"] = round(time.monotonic() - cut_at, 1)
    rows = done_rows(sql)
    for key in in_flight:
        assert rows[key] != "h0", f"{key} was done by the cut-off host"
        assert "h0" not in [c.split(":")[0] for c in committed(redis_client, key)]

    # When the link comes back, h0 settles each job it was holding: it commits and the commit
    # changes nothing, or the connection the cut ended fails the attempt (PgBouncer may have
    # dropped the silent client; its retry is then done by whoever fetches it, also without
    # effect). Either way nothing doubles, and h0 is never stuck.
    net.restore(0)

    def h0_outcome(key: str) -> str | None:
        if any(c.startswith("h0:") for c in committed(redis_client, key)):
            return "committed"
        if any(f.startswith("h0:") for f in failed(redis_client, key)):
            return "failed"
        return None

    assert wait_until(lambda: all(h0_outcome(k) for k in in_flight), timeout=150, interval=0.2), (
        "h0 never settled its jobs after the link came back: "
        f"{[(k, h0_outcome(k)) for k in in_flight]}"
    )
    outcomes = {k: h0_outcome(k) for k in in_flight}
    for key, outcome in outcomes.items():
        if outcome == "committed":
            assert "h0:0" in committed(redis_client, key), committed(redis_client, key)
    # A failed attempt was retried: let every retry finish before the totals are read
    assert wait_until(
        lambda: all(
            len(committed(redis_client, k)) >= 1 + len(failed(redis_client, k)) for k in rows
        ),
        timeout=60,
    )
    assert done_rows(sql) == rows
    total = sql.execute("SELECT done FROM host_job_totals").fetchone()[0]
    assert total == 2 * JOBS, f"the effect ran {total} times for {2 * JOBS} jobs"
    # Every job has exactly one effecting commit
    for key in rows:
        assert [c for c in committed(redis_client, key) if c.endswith(":1")] == [
            f"{rows[key]}:1"
        ], (key, committed(redis_client, key))
    figures["h0_late_outcomes"] = sorted(outcomes.values())
    figures["h0_in_flight_at_cut"] = len(in_flight)
    print(f"\nmany hosts: {figures}")
    (tmp_path / "figures.txt").write_text(repr(figures))


def test_a_cut_off_host_loses_its_open_transaction_and_row_locks(
    servers, db, sql, redis_client
) -> None:
    """Through PgBouncer, Postgres's own keepalives watch PgBouncer, not the vanished client:
    PgBouncer's client keepalives must end the transaction (here shortened to ~4 s)."""
    reason = _can_admin_network()
    if reason:
        pytest.skip(reason)
    from tests.support.pgbouncer import PgBouncer

    sql.execute("CREATE TABLE host_locks (id int PRIMARY KEY, v int NOT NULL)")
    sql.execute("INSERT INTO host_locks VALUES (1, 0)")
    holder: subprocess.Popen[str] | None = None
    with network(1) as net:
        bouncer = PgBouncer(
            servers.root,
            server_host="127.0.0.1",
            server_port=servers.pg.port,
            listen_addr=BRIDGE_ADDR,
            keepalive=(2, 1, 2),
        )
        try:
            bouncer.start()
            # Given a client on the host that locked a row and went quiet inside its transaction
            script = (
                "import sys, time, psycopg\n"
                "conn = psycopg.connect(sys.argv[1])\n"
                "conn.execute('SELECT v FROM host_locks WHERE id = 1 FOR UPDATE')\n"
                "print('locked', flush=True)\n"
                "time.sleep(300)\n"
            )
            holder = subprocess.Popen(
                ["ip", "netns", "exec", net.namespaces[0], sys.executable, "-c", script,
                 bouncer.url("tidemill_test")],
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )  # fmt: skip
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            sql.execute("SET lock_timeout = '500ms'")
            with pytest.raises(Exception, match="lock timeout"):  # the control: it is held
                sql.execute("UPDATE host_locks SET v = 1 WHERE id = 1")
            # When its link goes down
            net.cut(0)
            cut_at = time.monotonic()

            def updated() -> bool:
                try:
                    sql.execute("UPDATE host_locks SET v = 2 WHERE id = 1")
                    return True
                except Exception:
                    return False

            # Then PgBouncer gives up on it, its server connection closes, and the lock is free
            assert wait_until(updated, timeout=60, interval=0.5), "the row stayed locked"
            print(f"\nrow lock of a cut-off client freed after {time.monotonic() - cut_at:.1f} s")
        finally:
            if holder is not None and holder.poll() is None:
                stop_process(holder, sig=signal.SIGKILL, group=True)  # type: ignore[arg-type]
            bouncer.stop()
