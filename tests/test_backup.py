"""Logical backups end to end: real pg_dump 18, real zstd, real file:// and S3 (moto) storage,
the restore drill into a scratch database on the suite's server, and the CLI as subprocesses."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import structlog
import zstandard
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from core.settings import Settings
from core.storage import open_storage
from pipelines.backups.drill import compare_counts, run_drill
from pipelines.backups.logical import (
    ChecksumMismatch,
    IncompleteBackup,
    catalog,
    restore_logical,
    run_full_backup,
    verify,
)
from tests.conftest import run_cli
from tests.support.s3 import moto_server, s3_client, s3_url  # noqa: F401

USERS = 250


def seed(sql: Any, n: int = USERS) -> None:
    sql.execute(
        """INSERT INTO users (email, full_name)
           SELECT 'user' || g || '@example.com', 'User ' || g FROM generate_series(1, %s) g""",
        (n,),
    )


def settings_for(db: str, storage_url: str) -> Settings:
    return dataclasses.replace(Settings.from_env(), database_url=db, storage_url=storage_url)


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'objects'}"


def flip_one_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_full_backup_streams_dump_and_writes_manifest_last(sql, db, store_url) -> None:
    # Given some users
    seed(sql)
    # When `tidemill backup full` runs as a real process
    env = {**os.environ, "STORAGE_URL": store_url}
    done = run_cli("backup", "full", env=env)
    assert done.returncode == 0, done.stderr
    # Then the folder holds the zstd dump and its manifest
    storage = open_storage(store_url, settings=settings_for(db, store_url))
    (entry,) = catalog(storage)
    assert entry.kind == "full" and entry.complete
    manifest = entry.manifest
    assert manifest is not None
    dump, roles = manifest["objects"]
    assert (dump["role"], roles["role"]) == ("dump", "globals")
    assert storage.sha256(dump["key"]) == dump["sha256"]
    assert storage.sha256(roles["key"]) == roles["sha256"]
    assert set(manifest["checksums"]) == set(manifest["tables"])
    assert storage.stat(dump["key"]).size == dump["size"]
    # the object is pg_dump's custom format inside a zstd frame (with content checksum)
    with storage.open(dump["key"]) as raw:
        head = zstandard.ZstdDecompressor().stream_reader(raw).read(5)
    assert head == b"PGDMP"
    assert manifest["tables"]["public.users"] == USERS
    assert "pg_dump (PostgreSQL) 18" in manifest["tools"]["pg_dump"]
    assert manifest["database_size_bytes"] > 0 and manifest["duration_s"] >= 0
    # the manifest is newer than the dump: written last
    manifest_time = storage.stat(f"{entry.folder}/manifest.json").modified
    dump_time = storage.stat(dump["key"]).modified
    assert manifest_time is not None and dump_time is not None and manifest_time >= dump_time
    # and the catalogue row is complete with the same figures
    row = sql.execute(
        "SELECT status, size_bytes, sha256, manifest_key, data_at FROM backups WHERE key = %s",
        (dump["key"],),
    ).fetchone()
    assert row[:4] == ("complete", dump["size"], dump["sha256"], f"{entry.folder}/manifest.json")
    assert row[4] is not None

    listed = run_cli("backup", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert entry.folder.removeprefix("backups/") in listed.stdout
    assert "1 complete, 0 incomplete" in listed.stdout


def test_drill_restores_into_scratch_db_and_records_rto_rpo(sql, db, store_url) -> None:
    seed(sql)
    settings = settings_for(db, store_url)
    backup = run_full_backup(settings)
    with structlog.testing.capture_logs() as logs:
        result = run_drill(settings)
    assert result.status == "passed", result.error
    assert result.mismatches == {}
    assert result.tables_checked == len(backup.manifest["tables"]) > 20
    row = sql.execute(
        """SELECT status, backup_id, restore_seconds, data_age_seconds, tables_checked,
                  finished_at IS NOT NULL FROM backup_drills WHERE id = %s""",
        (result.drill_id,),
    ).fetchone()
    assert row[0] == "passed" and row[1] == backup.backup_id
    assert row[2] > 0 and row[3] >= 0 and row[4] == result.tables_checked and row[5]
    # the drill hashed the backup: it is verified now
    assert sql.execute(
        "SELECT verified_at IS NOT NULL FROM backups WHERE id = %s", (backup.backup_id,)
    ).fetchone()[0]
    # the scratch database is gone
    assert not sql.execute(
        "SELECT 1 FROM pg_database WHERE datname LIKE 'tidemill_drill_%%'"
    ).fetchall()
    assert any(e["event"] == "backup_drill_passed" for e in logs)


def test_drill_fails_loudly_when_row_counts_differ(sql, db, store_url) -> None:
    seed(sql)
    settings = settings_for(db, store_url)
    backup = run_full_backup(settings)
    # Given a manifest that claims one more user than the dump holds
    storage = open_storage(store_url, settings=settings)
    manifest = json.loads(storage.get_bytes(backup.manifest_key))
    manifest["tables"]["public.users"] += 1
    storage.put_bytes(backup.manifest_key, json.dumps(manifest).encode())
    with structlog.testing.capture_logs() as logs:
        result = run_drill(settings)
    assert result.status == "failed"
    assert result.mismatches == {"public.users": {"expected": USERS + 1, "actual": USERS}}
    row = sql.execute(
        "SELECT status, mismatches, error FROM backup_drills WHERE id = %s", (result.drill_id,)
    ).fetchone()
    assert row[0] == "failed" and row[1]["public.users"]["actual"] == USERS
    assert "row counts differ" in row[2]
    failed = [e for e in logs if e["event"] == "backup_drill_failed"]
    assert failed and failed[0]["log_level"] == "error"


def test_one_flipped_byte_is_detected_and_the_restore_refused(sql, db, store_url) -> None:
    seed(sql)
    settings = settings_for(db, store_url)
    backup = run_full_backup(settings)
    storage = open_storage(store_url, settings=settings)
    # Given one flipped byte in the stored dump
    flip_one_byte(Path(store_url.removeprefix("file://")) / backup.key)
    (entry,) = catalog(storage)
    with pytest.raises(ChecksumMismatch, match="does not match the manifest"):
        verify(storage, entry.manifest or {})
    # the restore refuses before touching the target database
    sql.execute("CREATE DATABASE corrupt_target")
    try:
        with pytest.raises(ChecksumMismatch):
            restore_logical(storage, entry, db.rsplit("/", 1)[0] + "/corrupt_target")
        import psycopg

        with psycopg.connect(db.rsplit("/", 1)[0] + "/corrupt_target") as conn:
            tables = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            ).fetchone()
        assert tables == (0,)
    finally:
        sql.execute("DROP DATABASE corrupt_target WITH (FORCE)")
    # the drill records the failure, and `backup list --verify` exits 1 naming the object
    result = run_drill(settings)
    assert result.status == "failed" and "sha256" in (result.error or "")
    env = {**os.environ, "STORAGE_URL": store_url}
    listed = run_cli("backup", "list", "--verify", env=env)
    assert listed.returncode == 1
    assert "BAD" in listed.stdout and "Traceback" not in listed.stderr


def test_backup_without_manifest_is_incomplete_everywhere(sql, db, store_url) -> None:
    seed(sql)
    settings = settings_for(db, store_url)
    good = run_full_backup(settings)
    crashed = run_full_backup(settings)
    storage = open_storage(store_url, settings=settings)
    # Given the newer backup lost its manifest (as if the process died before writing it)
    storage.delete(crashed.manifest_key)
    entries = catalog(storage)
    assert [e.complete for e in entries] == [True, False]
    # never restored
    with pytest.raises(IncompleteBackup):
        restore_logical(storage, entries[1], db)
    # never listed as good
    env = {**os.environ, "STORAGE_URL": store_url}
    listed = run_cli("backup", "list", env=env)
    assert "1 complete, 1 incomplete" in listed.stdout and "INCOMPLETE" in listed.stdout
    # the drill takes the newest *complete* backup
    assert run_drill(settings).backup == good.folder
    drill = run_cli("backup", "drill", "--backup", crashed.folder, env=env)
    assert drill.returncode == 1 and "no manifest" in drill.stdout


def test_failed_backup_is_recorded_with_a_clear_error(sql, db, tmp_path) -> None:
    # Given a storage URL whose directory is a regular file
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    env = {**os.environ, "STORAGE_URL": f"file://{blocker}"}
    failed = run_cli("backup", "full", env=env)
    assert failed.returncode == 1
    assert "tidemill: error:" in failed.stderr and "Traceback" not in failed.stderr
    assert "backup_failed" in failed.stderr  # the structured log line
    row = sql.execute("SELECT status, error, manifest_key FROM backups").fetchone()
    assert row[0] == "failed" and row[1] and row[2] is None


def test_migrate_takes_a_backup_first_when_configured(sql, db, store_url, tmp_path) -> None:
    env = {**os.environ, "STORAGE_URL": store_url, "TIDEMILL_BACKUP_BEFORE_MIGRATE": "true"}
    done = run_cli("migrate", env=env)
    assert done.returncode == 0, done.stderr
    assert "backup before migrate: backups/full/" in done.stdout
    storage = open_storage(store_url, settings=settings_for(db, store_url))
    (entry,) = catalog(storage)
    assert entry.manifest and entry.manifest["reason"] == "before migrate to head"
    # no backup, no migration: a broken storage stops migrate with exit 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused = run_cli("migrate", env={**env, "STORAGE_URL": f"file://{blocker}"})
    assert refused.returncode == 1 and "database at revision" not in refused.stdout
    # and without the setting, no backup is taken
    plain = run_cli("migrate", env={**os.environ, "STORAGE_URL": store_url})
    assert plain.returncode == 0 and "backup before migrate" not in plain.stdout
    assert len(catalog(storage)) == 1


def test_s3_backup_is_multipart_and_drills_from_s3(sql, db, s3_url, moto_server) -> None:  # noqa: F811
    # ~20 MB of hex text compresses to more than one 8 MiB part
    sql.execute("CREATE TABLE blobs (id int, body text)")
    sql.execute(
        """INSERT INTO blobs SELECT g, string_agg(md5(random()::text || g || i), '')
           FROM generate_series(1, 40) g, generate_series(1, 16000) i GROUP BY g"""
    )
    settings = settings_for(db, s3_url)
    backup = run_full_backup(settings)
    assert backup.size > 8 * 1024 * 1024
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    head = s3_client(moto_server).head_object(Bucket=bucket, Key=f"{prefix}/{backup.key}")
    assert "-" in head["ETag"]  # a multipart ETag: streamed in parts, not one PUT
    body = s3_client(moto_server).get_object(Bucket=bucket, Key=f"{prefix}/{backup.key}")
    assert hashlib.sha256(body["Body"].read()).hexdigest() == backup.sha256
    result = run_drill(settings)
    assert result.status == "passed", result.error
    assert "public.blobs" in backup.manifest["tables"]


def test_list_verify_reports_a_glacier_backup_and_keeps_going(sql, db, s3_url) -> None:  # noqa: F811
    """A GLACIER object cannot be read back (InvalidObjectState): `backup list --verify` says so
    for that backup and still verifies the others, without a traceback."""
    seed(sql, 20)
    settings = settings_for(db, s3_url)
    cold = run_full_backup(settings)
    warm = run_full_backup(settings)
    storage = open_storage(s3_url, settings=settings)
    storage.set_storage_class(cold.key, "GLACIER")  # not recorded in the manifest
    listed = run_cli("backup", "list", "--verify", "--storage", s3_url)
    assert "Traceback" not in listed.stderr, listed.stderr
    assert listed.returncode == 0, listed.stdout + listed.stderr
    lines = {line.split()[1]: line for line in listed.stdout.splitlines() if "full/" in line}
    name = lambda folder: folder.removeprefix("backups/")  # noqa: E731
    assert "cold, not verifiable" in lines[name(cold.folder)]
    assert "verified now" in lines[name(warm.folder)]
    assert "2 complete, 0 incomplete" in listed.stdout


def test_compare_counts_reports_missing_and_extra_tables() -> None:
    assert compare_counts({"a": 1, "b": 2}, {"a": 1, "b": 2}) == {}
    assert compare_counts({"a": 1, "b": 2}, {"a": 1, "c": 0}) == {
        "b": {"expected": 2, "actual": None},
        "c": {"expected": None, "actual": 0},
    }


@given(st.lists(st.integers(1, 3000), min_size=1, max_size=40), st.integers(0, 5000))
@hsettings(max_examples=50, deadline=None)
def test_tar_member_catcher_finds_the_manifest_in_any_chunking(
    cuts: list[int], manifest_size: int
) -> None:
    import io
    import tarfile

    from pipelines.backups.physical import TarMemberCatcher

    manifest = bytes(i % 251 for i in range(manifest_size))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (
            ("base/1/1259", b"x" * 1000),
            ("deep/" + "d" * 90 + "/file", b"y" * 513),  # uses the ustar prefix field
            ("backup_manifest", manifest),
            ("pg_wal/000000010000000000000002", b"z" * 7),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = buf.getvalue()
    catcher = TarMemberCatcher("backup_manifest")
    at = 0
    for cut in cuts * (len(stream) // max(sum(cuts), 1) + 1):
        catcher.feed(stream[at : at + cut])
        at += cut
        if at >= len(stream):
            break
    catcher.feed(stream[at:])
    assert catcher.found == manifest
