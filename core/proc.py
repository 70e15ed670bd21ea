"""Child-process plumbing shared by `tidemill up` and the embedded servers."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

PR_SET_PDEATHSIG = 1


class PortInUse(RuntimeError):
    def __init__(self, port: int, setting: str, host: str = "127.0.0.1") -> None:
        super().__init__(f"port {port} on {host} is already in use (set {setting} to another port)")
        self.port = port


def ensure_port_free(port: int, setting: str, host: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise PortInUse(port, setting, host) from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent(sig: int) -> Callable[[], None]:
    """preexec_fn: the kernel sends `sig` to the child if the parent dies, even by SIGKILL,
    so a crashed supervisor leaves no orphaned servers behind."""

    def preexec() -> None:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, sig)
        except OSError:  # not Linux: the supervisor's own shutdown path still stops children
            pass

    return preexec


def spawn(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
    death_signal: int = signal.SIGTERM,
    user: tuple[int, int] | None = None,
    new_session: bool = True,
) -> subprocess.Popen[bytes]:
    """Start a child in its own session (a terminal's Ctrl-C reaches only the supervisor, which
    stops children in order), tied to the parent's life by a death signal."""
    pdeath = _die_with_parent(death_signal)

    def preexec() -> None:
        if user is not None:
            uid, gid = user
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        pdeath()  # after setuid: a credential change clears the death signal

    return subprocess.Popen(
        list(argv),
        env=env,
        cwd=cwd,
        stdout=stdout,
        stderr=stderr,
        preexec_fn=preexec,
        start_new_session=new_session,
    )


def signal_group(pgid: int, sig: int) -> None:
    """Signal a whole process group; a group that is already gone is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_process(
    proc: subprocess.Popen[bytes],
    *,
    sig: int = signal.SIGTERM,
    timeout: float = 30.0,
    group: bool = False,
) -> int | None:
    """Send `sig` (to its whole group when `group`), wait up to `timeout`, then SIGKILL."""
    if proc.poll() is not None:
        return proc.returncode
    if group:
        signal_group(proc.pid, sig)
    else:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if group:
            signal_group(proc.pid, signal.SIGKILL)
        else:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        return proc.wait(timeout=10)


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.05,
    alive: Callable[[], bool] | None = None,
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        if alive is not None and not alive():
            return False
        time.sleep(interval)
    return check()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
