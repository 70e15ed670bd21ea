"""`tidemill up`: embedded servers (when no URL is set), migrations, then every process of the
system in the foreground. Ctrl-C or SIGTERM stops them all, in order, servers last."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from core.log import get_logger
from core.proc import ensure_port_free, signal_group, spawn, stop_process
from core.settings import Settings, redact_url
from db.embedded import EmbeddedPostgres, EmbeddedValkey
from db.health import require_services

log = get_logger("tidemill.up")

# Start order; shutdown goes in reverse: stop taking HTTP traffic first, workers after the
# relay has stopped feeding them, servers last. The relay process also runs the rescuer
# (workers.rescuer): jobs dispatched but not done within their deadline are sent again.
PROCESSES = ("worker", "relay", "scheduler", "web")


@dataclass
class Supervisor:
    settings: Settings
    servers: list[EmbeddedPostgres | EmbeddedValkey] = field(default_factory=list)
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)
    signals: int = 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("shutdown_requested", signal=signal.Signals(signum).name)
        self.stopping.set()

    def start_servers(self) -> Settings:
        s = self.settings
        db_url, redis_url = s.database_url, s.redis_url
        if s.embedded_postgres:
            pg = EmbeddedPostgres(s.data_dir, port=s.pg_port)
            self.servers.append(pg)
            db_url = pg.start()
        if s.embedded_redis:
            valkey = EmbeddedValkey(s.data_dir, port=s.redis_port)
            self.servers.append(valkey)
            redis_url = valkey.start()
        return s.with_urls(database_url=db_url, redis_url=redis_url)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            ensure_port_free(self.settings.web_port, "TIDEMILL_WEB_PORT", self.settings.web_host)
            self.settings = settings = self.start_servers()
            require_services(settings)
            from db.engine import direct_url
            from db.migrate import upgrade

            upgrade(direct_url(settings))
            log.info("migrations_applied")
            if self.stopping.is_set():
                return 0
            env = settings.child_env()
            self._write_run_env()
            for name in PROCESSES:
                self.children[name] = spawn([sys.executable, "-m", "cli.main", name], env=env)
            self._banner()
            return self._watch()
        finally:
            self.shutdown()

    def _watch(self) -> int:
        while not self.stopping.wait(0.5):
            for name, proc in self.children.items():
                code = proc.poll()
                if code is not None:
                    # Fail fast: a half-running system hides problems; the operator restarts.
                    log.error("process_exited", process=name, exit_code=code)
                    return 1
        return 0

    def shutdown(self) -> None:
        grace = self.settings.shutdown_grace_s
        for name in reversed(PROCESSES):
            proc = self.children.get(name)
            if proc is None:
                continue
            started = time.monotonic()
            # SIGTERM to the leader only: dramatiq's main process forwards it to its worker
            # processes, which drain; a second SIGTERM would make them abandon messages.
            code = stop_process(proc, sig=signal.SIGTERM, timeout=grace)
            signal_group(proc.pid, signal.SIGKILL)  # anything left in the group goes now
            log.info(
                "process_stopped",
                process=name,
                exit_code=code,
                seconds=round(time.monotonic() - started, 2),
            )
        self.children.clear()
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()
        run_env_path(self.settings).unlink(missing_ok=True)

    def _write_run_env(self) -> None:
        """Where the embedded servers are, for commands run from another terminal."""
        path = run_env_path(self.settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"DATABASE_URL={self.settings.database_url}\nREDIS_URL={self.settings.redis_url}\n"
        )

    def _banner(self) -> None:
        s = self.settings
        base = f"http://{s.web_host}:{s.web_port}"
        # `start_servers` filled the URLs in, so the settings alone no longer tell which
        # servers are embedded: the servers this supervisor started do.
        started = {type(server) for server in self.servers}
        pg_embedded, rd_embedded = EmbeddedPostgres in started, EmbeddedValkey in started
        pg_note = f"embedded, data in {s.data_dir / 'postgres'}" if pg_embedded else "external"
        rd_note = f"embedded, data in {s.data_dir / 'valkey'}" if rd_embedded else "external"
        lines = [
            "",
            "tidemill is up (Ctrl-C stops everything)",
            f"  dashboard  {base}/dashboard",
            f"  health     {base}/healthz",
            f"  metrics    {base}/metrics",
            f"  postgres   {redact_url(s.database_url or '')}  ({pg_note})",
            f"  redis      {redact_url(s.redis_url or '')}  ({rd_note})",
            f"  processes  relay (+ rescuer), scheduler, web, worker x{s.worker_processes} "
            f"({s.worker_threads} threads each)",
            "",
            "settings:",
            *(f"  {name:<30} {value}" for name, value in s.describe()),
            "",
        ]
        print("\n".join(lines), flush=True)


def run_env_path(settings: Settings) -> Path:
    return settings.data_dir / "up.env"


def load_run_env(settings: Settings) -> bool:
    """Adopt a running `tidemill up`'s server URLs when DATABASE_URL / REDIS_URL are unset."""
    path = run_env_path(settings)
    if not path.exists() or (settings.database_url and settings.redis_url):
        return False
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        if key in {"DATABASE_URL", "REDIS_URL"} and value:
            os.environ.setdefault(key, value)
    return True
