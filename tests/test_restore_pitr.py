"""Point-in-time restore, for real: a private Postgres 18 archiving WAL through `tidemill wal
push`, base + incremental backups in file:// storage, then `tidemill restore --to TIME` as a
subprocess into a new data directory, started, and queried."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from core.proc import free_port
from core.storage import open_storage
from pipelines.backups.logical import catalog
from pipelines.backups.physical import run_base_backup
from pipelines.backups.restore import stop_restored
from tests.conftest import run_cli
from tests.support.pgcluster import ArchivedCluster, archived_cluster  # noqa: F401


@pytest.fixture
def restored_dirs() -> Iterator[list[Path]]:
    """Data directories of restored servers: stopped after the test, whatever happened."""
    dirs: list[Path] = []
    yield dirs
    for d in dirs:
        if (d / "postmaster.pid").exists():
            stop_restored(d)


def rows(url: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT v, count(*) FROM t GROUP BY v ORDER BY v").fetchall()


def test_restore_to_a_time_before_the_change(
    archived_cluster: ArchivedCluster,  # noqa: F811
    restored_dirs: list[Path],
) -> None:
    c = archived_cluster
    storage = open_storage(c.storage_url, settings=c.settings)
    # Given a full base backup, more data, an incremental, and more data again
    c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    c.execute("INSERT INTO t SELECT g, 'base' FROM generate_series(1, 1000) g")
    run_base_backup(c.settings, storage=storage)
    c.execute("INSERT INTO t SELECT g, 'incremental' FROM generate_series(1001, 1100) g")
    run_base_backup(c.settings, storage=storage, incremental=True)
    c.execute("INSERT INTO t SELECT g, 'wal' FROM generate_series(1101, 1150) g")
    time.sleep(0.3)
    before_change = datetime.now(UTC)
    time.sleep(0.3)
    # When the data is damaged, and the WAL holding the damage is archived
    c.execute("DELETE FROM t WHERE id <= 500")
    c.execute("UPDATE t SET v = 'damaged'")
    c.switch_and_wait()
    assert rows(c.url) == [("damaged", 650)]
    # Then `tidemill restore --to` a time before the change brings the data back as it was
    target_dir = c.root / "restored"
    restored_dirs.append(target_dir)
    port = free_port()
    done = run_cli(
        "restore",
        "--to",
        before_change.isoformat(),
        "--data-dir",
        str(target_dir),
        "--port",
        str(port),
        env=c.env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "+ backups/incremental/" in done.stdout  # base + incremental, combined
    url = f"postgresql://postgres@127.0.0.1:{port}/tidemill"
    assert rows(url) == [("base", 1000), ("incremental", 100), ("wal", 50)]
    with psycopg.connect(url) as conn:  # promoted: a normal read-write server
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
    # the restored copy does not archive into the original's archive
    with psycopg.connect(url) as conn:
        assert conn.execute("SHOW archive_mode").fetchone() == ("off",)


def test_restore_refuses_a_corrupt_base_backup(
    archived_cluster: ArchivedCluster,  # noqa: F811
) -> None:
    c = archived_cluster
    storage = open_storage(c.storage_url, settings=c.settings)
    c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    backup = run_base_backup(c.settings, storage=storage)
    c.switch_and_wait()
    stored = c.objects / backup.key
    data = bytearray(stored.read_bytes())
    data[len(data) // 3] ^= 0x01
    stored.write_bytes(bytes(data))
    target_dir = c.root / "restored"
    refused = run_cli(
        "restore", "--data-dir", str(target_dir), "--port", str(free_port()), env=c.env()
    )
    assert refused.returncode == 1
    assert "will not be restored" in refused.stderr and "Traceback" not in refused.stderr
    assert not target_dir.exists() or not any(target_dir.iterdir())


def test_restore_needs_a_complete_base_backup_before_the_target(
    archived_cluster: ArchivedCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    c = archived_cluster
    storage = open_storage(c.storage_url, settings=c.settings)
    backup = run_base_backup(c.settings, storage=storage)
    env = c.env()
    # a time before the only backup
    early = run_cli(
        "restore", "--to", "2020-01-01T00:00:00Z", "--data-dir", str(tmp_path / "a"), env=env
    )
    assert early.returncode == 1 and "no complete base backup" in early.stderr
    # a backup without its manifest does not count
    storage.delete(backup.manifest_key)
    assert not catalog(storage)[0].complete
    gone = run_cli("restore", "--data-dir", str(tmp_path / "b"), env=env)
    assert gone.returncode == 1 and "no complete base backup" in gone.stderr
    # a bad time is a clear error
    bad = run_cli("restore", "--to", "yesterday-ish", env=env)
    assert bad.returncode == 2 and "is not a time" in bad.stderr
    # a non-empty data directory is refused
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "precious").write_text("x")
    busy = run_cli("restore", "--data-dir", str(tmp_path / "c"), env=env)
    assert busy.returncode == 1 and "not empty" in busy.stderr


def test_restore_refuses_a_base_whose_wal_was_pruned_before_extracting(
    archived_cluster: ArchivedCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A base older than the kept WAL (retention prunes WAL after 7 days): the gap after the
    base is found in the storage listing, before a byte is extracted, with a clear error."""
    c = archived_cluster
    storage = open_storage(c.storage_url, settings=c.settings)
    c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    backup = run_base_backup(c.settings, storage=storage)
    for i in range(3):
        c.execute("INSERT INTO t VALUES (%s, 'later')", (i,))
        c.switch_and_wait()
    wal_end = backup.manifest["wal_end"]
    # the segment right after the base's own WAL is gone, as if pruned
    after = sorted(
        info.key
        for info in storage.list("wal/")
        if len(info.key) == len("wal/") + 24 + len(".zst") and info.key[12:28] > wal_end[8:24]
    )
    assert after, "segments after the base were archived"
    storage.delete(after[0])
    target_dir = tmp_path / "restored"
    refused = run_cli(
        "restore", "--data-dir", str(target_dir), "--port", str(free_port()), env=c.env()
    )
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "WAL segment(s) after the backup are missing" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not target_dir.exists()  # refused before extracting anything


def test_physical_drill_restores_the_latest_base_into_a_scratch_cluster(
    archived_cluster: ArchivedCluster,  # noqa: F811
    db: str,
    sql,
) -> None:
    """`tidemill backup drill --physical`: the latest base backup, restored to its own end into
    a scratch cluster that starts and promotes; every table counted; recorded in
    backup_drills (as physical) and the scratch cluster gone afterwards."""
    c = archived_cluster
    storage = open_storage(c.storage_url, settings=c.settings)
    c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    c.execute("INSERT INTO t SELECT g, 'base' FROM generate_series(1, 300) g")
    backup = run_base_backup(c.settings, storage=storage)
    c.execute("INSERT INTO t SELECT g, 'after' FROM generate_series(301, 400) g")
    c.switch_and_wait()
    env = {**c.env(), "DATABASE_URL": db}  # the drill is recorded in the app's database
    drilled = run_cli("backup", "drill", "--physical", env=env, timeout=300)
    assert drilled.returncode == 0, drilled.stdout + drilled.stderr
    assert f"physical drill passed: {backup.folder}" in drilled.stdout
    drill_id, status, tables, mismatches, restore_s = sql.execute(
        "SELECT id, status, tables_checked, mismatches, restore_seconds FROM backup_drills"
    ).fetchone()
    assert status == "passed" and tables >= 1 and restore_s > 0
    assert mismatches == {"drill": "physical"}
    assert not list(Path(tempfile.gettempdir()).glob(f"tidemill-drill-{drill_id}-*"))
    # a base that cannot be restored is a failed drill, recorded, exit 1
    stored = c.objects / backup.key
    data = bytearray(stored.read_bytes())
    data[len(data) // 3] ^= 0x01
    stored.write_bytes(bytes(data))
    failed = run_cli("backup", "drill", "--physical", env=env, timeout=300)
    assert failed.returncode == 1 and "drill FAILED" in failed.stdout
    statuses = [r[0] for r in sql.execute("SELECT status FROM backup_drills ORDER BY id")]
    assert statuses == ["passed", "failed"]


def test_encrypted_archive_restores_and_the_printed_stop_command_works(
    monkeypatch: pytest.MonkeyPatch,
    restored_dirs: list[Path],
) -> None:
    """Base backup and every WAL segment envelope-encrypted at rest (the archive_command
    inherits TIDEMILL_ENCRYPTION_KEY from the server's environment); restore to the end."""
    import base64
    import os
    import shutil
    import subprocess

    from core.envelope import MAGIC
    from pipelines.backups.physical import wal_key
    from tests.support.pgcluster import start_archived_cluster

    monkeypatch.setenv("TIDEMILL_ENCRYPTION_KEY", base64.b64encode(os.urandom(32)).decode())
    c = start_archived_cluster()
    try:
        storage = open_storage(c.storage_url, settings=c.settings)
        assert storage.keyring is not None
        c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        c.execute("INSERT INTO t SELECT g, 'base' FROM generate_series(1, 500) g")
        backup = run_base_backup(c.settings, storage=storage)
        c.execute("INSERT INTO t SELECT g, 'wal' FROM generate_series(501, 600) g")
        segment = c.switch_and_wait()
        # at rest: ciphertext only
        assert (c.objects / backup.key).read_bytes()[:6] == MAGIC
        assert (c.objects / wal_key(segment)).read_bytes()[:6] == MAGIC
        target_dir = c.root / "restored"
        restored_dirs.append(target_dir)
        port = free_port()
        done = run_cli(
            "restore", "--data-dir", str(target_dir), "--port", str(port),
            env=c.env(), timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        url = f"postgresql://postgres@127.0.0.1:{port}/tidemill"
        assert rows(url) == [("base", 500), ("wal", 100)]
        # the printed stop instruction works as printed (under root too)
        (stop_line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("stop it with:")]
        stopped = subprocess.run(
            stop_line.removeprefix("stop it with:").strip(),
            shell=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert stopped.returncode == 0, stopped.stderr
        assert not (target_dir / "postmaster.pid").exists()
    finally:
        c.pg.stop()
        shutil.rmtree(c.root, ignore_errors=True)
