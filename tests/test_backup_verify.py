"""WAL integrity and `tidemill backup verify`, against a real archiving Postgres 18.

One archive (a base backup and four closed segments after it) is copied once per damage:
a truncated segment, a flipped byte, a missing middle segment, a missing last segment. Each
must be named by `backup verify` (exit 1) and refused by `wal fetch` (exit 255, PostgreSQL's
abort); a real restore over a damaged archive must fail and leave no data directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from core.proc import free_port
from core.storage import open_storage
from db.embedded import pg_system_user
from pipelines.backups.logical import BackupError
from pipelines.backups.physical import run_base_backup, wal_key
from pipelines.backups.restore import restore_to_time
from tests.conftest import run_cli
from tests.support.pgcluster import ArchivedCluster, archived_cluster  # noqa: F401

pytestmark = pytest.mark.slow


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    user = pg_system_user()
    if user is not None:  # the restored server runs `wal fetch` as its own user
        for root, dirs, files in os.walk(dst):
            for name in dirs + files:
                os.chown(os.path.join(root, name), *user)
        os.chown(dst, *user)
        os.chmod(dst.parent, 0o755)
    return dst


def test_damaged_wal_is_named_by_verify_and_refused_by_fetch_and_restore(
    archived_cluster: ArchivedCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    c = archived_cluster
    storage = open_storage(c.storage_url, settings=c.settings)
    # Given a base backup and four segments archived after it
    c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    run_base_backup(c.settings, storage=storage)
    segments = []
    for i in range(3):
        c.execute(f"INSERT INTO t SELECT g, 'x' FROM generate_series({i * 100}, {i * 100 + 99}) g")
        segments.append(c.switch_and_wait())
    clean = run_cli("backup", "verify", "--storage", c.storage_url, env=c.env())
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "verify: OK" in clean.stdout
    middle, last = segments[1], segments[-1]

    damages: dict[str, tuple[str, Callable[[Path], None]]] = {
        "truncated": (middle, _truncate),
        "flipped": (middle, _flip),
        "missing-middle": (middle, lambda p: p.unlink()),
        "missing-last": (last, lambda p: p.unlink()),
    }
    copies = {}
    for label, (segment, damage) in damages.items():
        copy = _copy(c.objects, tmp_path / label / "objects")
        damage(copy / wal_key(segment))
        copies[label] = copy
        url = f"file://{copy}"
        # Then verify names the damaged or missing object and exits 1
        verified = run_cli("backup", "verify", "--storage", url, env=c.env())
        assert verified.returncode == 1, (label, verified.stdout, verified.stderr)
        bad_lines = [line for line in verified.stdout.splitlines() if "wal/" in line]
        assert any(wal_key(segment) in line for line in bad_lines), (label, verified.stdout)
        assert len(bad_lines) == 1, (label, verified.stdout)  # only the damaged one
        assert "Traceback" not in verified.stderr
        # and wal fetch refuses it with PostgreSQL's abort code, writing nothing
        dest = tmp_path / label / "RECOVERYXLOG"
        fetched = run_cli("wal", "fetch", segment, str(dest), "--storage", url, env=c.env())
        assert fetched.returncode == 255, (label, fetched.stderr)
        assert not dest.exists()
        assert len(fetched.stderr.strip().splitlines()[-1]) < 400
    # A segment after the newest pushed one is the end of the archive, not damage
    # (far past it: archive_timeout may close more segments while the test runs)
    after = f"{segments[-1][:16]}{int(segments[-1][16:], 16) + 0x1000:08X}"
    end = run_cli(
        "wal", "fetch", after, str(tmp_path / "x"), "--storage", c.storage_url, env=c.env()
    )
    assert end.returncode == 1, end.stderr

    # And a real restore over a flipped byte fails (recovery aborted) and leaves nothing
    for label in ("flipped", "missing-last"):
        data_dir = tmp_path / label / "restored"
        with pytest.raises(BackupError):
            restore_to_time(
                c.settings,
                target=None,
                data_dir=data_dir,
                port=free_port(),
                storage=open_storage(f"file://{copies[label]}", settings=c.settings),
                timeout=120,
            )
        assert not data_dir.exists(), f"{label}: the failed restore left its data directory"


def test_restore_checks_the_port_before_extracting(
    archived_cluster: ArchivedCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    import socket

    c = archived_cluster
    storage = open_storage(c.storage_url, settings=c.settings)
    run_base_backup(c.settings, storage=storage)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BackupError, match="already in use"):
            restore_to_time(
                c.settings, target=None, data_dir=tmp_path / "r", port=port, storage=storage
            )
    assert not (tmp_path / "r").exists()


def test_incremental_base_backup_works_on_the_default_embedded_server(
    db: str, tmp_path: Path
) -> None:
    """The suite's server is started like `tidemill up` without WAL archiving."""
    env = {**os.environ, "DATABASE_URL": db, "STORAGE_URL": f"file://{tmp_path / 'objects'}"}
    base = run_cli("backup", "base", env=env, timeout=180)
    assert base.returncode == 0, base.stderr
    incremental = run_cli("backup", "base", "--incremental", env=env, timeout=180)
    assert incremental.returncode == 0, incremental.stderr
    assert "backups/incremental/" in incremental.stdout
