"""A real PgBouncer (Debian's package) in transaction pooling mode in front of a Postgres.

The suite runs the system under test through it: every transaction may land on a different
server connection, so anything that leans on session state (LISTEN, session advisory locks,
server-side prepared statements, SET without LOCAL) fails here the way it would in production
behind PgBouncer.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import psycopg

from core.proc import free_port, spawn, stop_process, tail, wait_until

USER = "postgres"
PASSWORD = "tidemill-bouncer-test"


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
    )


class PgBouncer:
    def __init__(
        self,
        root: Path,
        *,
        server_host: str,
        server_port: int,
        listen_addr: str = "127.0.0.1",
        port: int | None = None,
        pool_size: int = 20,
        pool_mode: str = "transaction",
        keepalive: tuple[int, int, int] = (30, 10, 3),
    ) -> None:
        self.server_host = server_host
        self.server_port = server_port
        self.listen_addr = listen_addr
        self.port = port or free_port(listen_addr)
        self.root = root / f"pgbouncer-{listen_addr}-{self.port}"
        self.pool_size = pool_size
        # "session": one server connection per client for as long as it stays connected, a
        # direct URL for clients that can reach only this address (LISTEN, session locks).
        self.pool_mode = pool_mode
        self.keepalive = keepalive  # idle s, interval s, probes
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        return f"postgresql://{USER}:{PASSWORD}@{self.listen_addr}:{self.port}/{database}"

    def admin_url(self) -> str:
        return self.url("pgbouncer")

    def _write_config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        # Clients authenticate to PgBouncer with SCRAM against this file; PgBouncer then logs
        # in to Postgres as the same user (the embedded server trusts 127.0.0.1).
        (self.root / "userlist.txt").write_text(f'"{USER}" "{PASSWORD}"\n')
        config = self.root / "pgbouncer.ini"
        config.write_text(
            "\n".join(
                [
                    "[databases]",
                    # Any database name is routed to the same server: tests create and drop
                    # their databases freely.
                    f"* = host={self.server_host} port={self.server_port}",
                    "",
                    "[pgbouncer]",
                    f"listen_addr = {self.listen_addr}",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = scram-sha-256",
                    f"auth_file = {self.root / 'userlist.txt'}",
                    f"admin_users = {USER}",
                    f"pool_mode = {self.pool_mode}",
                    f"default_pool_size = {self.pool_size}",
                    "max_client_conn = 1000",
                    "max_db_connections = 100",
                    # psycopg sends no startup options on pooled URLs; other clients (e.g.
                    # psql's extra_float_digits) are tolerated.
                    "ignore_startup_parameters = extra_float_digits",
                    # As deploy/pgbouncer/pgbouncer.ini: a client on a vanished host is noticed
                    # within about a minute, which ends its transaction and frees its row locks
                    # (the server-side keepalives of db.engine.KEEPALIVES now reach only
                    # PgBouncer, so PgBouncer must do this for its clients).
                    "tcp_keepalive = 1",
                    f"tcp_keepidle = {self.keepalive[0]}",
                    f"tcp_keepintvl = {self.keepalive[1]}",
                    f"tcp_keepcnt = {self.keepalive[2]}",
                    "server_check_delay = 0",
                    "server_login_retry = 1",
                    f"logfile = {self.root / 'pgbouncer.log'}",
                    f"pidfile = {self.root / 'pgbouncer.pid'}",
                    "",
                ]
            )
        )
        return config

    def start(self, *, timeout: float = 20.0) -> None:
        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError("pgbouncer is not installed (make test installs Debian's package)")
        config = self._write_config()
        argv = [binary, str(config)]
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root: run it as the embedded Postgres's system user.
            from db.embedded import PG_SYSTEM_USER

            argv[1:1] = ["-u", PG_SYSTEM_USER]
            subprocess.run(["chown", "-R", PG_SYSTEM_USER, str(self.root)], check=True)
            self._traversable()
        logf = open(self.root / "stdout.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = spawn(argv, stdout=logf, stderr=logf, death_signal=signal.SIGTERM)
        logf.close()
        if not wait_until(self._ready, timeout=timeout, interval=0.05, alive=self._alive):
            self.stop()
            raise RuntimeError(
                f"pgbouncer did not start on {self.listen_addr}:{self.port}:\n"
                f"{tail(self.root / 'pgbouncer.log')}\n{tail(self.root / 'stdout.log')}"
            )

    def _traversable(self) -> None:
        for parent in [self.root, *self.root.parents]:
            if parent == Path("/"):
                break
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _ready(self) -> bool:
        try:
            with psycopg.connect(self.admin_url(), autocommit=True, connect_timeout=2) as conn:
                conn.execute("SHOW VERSION")
                return True
        except psycopg.OperationalError:
            return False

    def kill_database(self, database: str) -> None:
        """Drop every pooled connection to `database` (before it is dropped and re-created),
        then let clients in again."""
        with psycopg.connect(self.admin_url(), autocommit=True, connect_timeout=5) as conn:
            try:
                conn.execute(f"KILL {database}")
            except psycopg.Error:
                return  # PgBouncer has never seen this database
            conn.execute(f"RESUME {database}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, sig=signal.SIGINT, timeout=10)
            self.proc = None
