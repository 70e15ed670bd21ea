"""Object storage: the same behaviour on file:// and on S3 spoken over HTTP (moto's server)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from core.proc import free_port
from core.settings import reset_settings_cache
from core.storage import PART_SIZE, Storage, StorageError, open_storage
from tests.support.s3 import moto_server, s3_client, s3_url

__all__ = ["moto_server", "s3_url"]


@pytest.fixture(params=["file", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "file":
        return open_storage(f"file://{tmp_path / 'objects'}")
    return open_storage(request.getfixturevalue("s3_url"))


def test_round_trip(storage: Storage) -> None:
    put = storage.put_bytes("messages/2024/01/1-100.csv.zst", b"hello")
    assert put.size == 5
    assert put.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert storage.get_bytes("messages/2024/01/1-100.csv.zst") == b"hello"
    assert storage.sha256("messages/2024/01/1-100.csv.zst") == put.sha256
    assert storage.stat("messages/2024/01/1-100.csv.zst").size == 5
    assert storage.exists("messages/2024/01/1-100.csv.zst")
    storage.put_bytes("messages/2024/02/x", b"2")
    storage.put_bytes("audit/x", b"3")
    assert [o.key for o in storage.list("messages/")] == [
        "messages/2024/01/1-100.csv.zst",
        "messages/2024/02/x",
    ]
    storage.delete("messages/2024/02/x")
    storage.delete("messages/2024/02/x")  # deleting a missing object is fine
    assert not storage.exists("messages/2024/02/x")


def test_streamed_write_larger_than_a_part(storage: Storage) -> None:
    # Given more than one multipart part, written in uneven chunks
    chunk = os.urandom(1024 * 1024 + 7)
    digest = hashlib.sha256()
    with storage.writer("backups/big.bin") as w:
        for _ in range(9):
            w.write(chunk)
            digest.update(chunk)
    assert w.result is not None
    assert w.result.size == 9 * len(chunk) > PART_SIZE
    assert w.result.sha256 == digest.hexdigest() == storage.sha256("backups/big.bin")


def test_failed_write_leaves_nothing(storage: Storage) -> None:
    # Given a write that fails after a full part went up
    with pytest.raises(RuntimeError), storage.writer("backups/broken.bin") as w:
        w.write(b"x" * (PART_SIZE + 10))
        raise RuntimeError("source died")
    # Then no object exists under the key, nor any leftover
    assert not storage.exists("backups/broken.bin")
    assert list(storage.list()) == []


def test_failed_s3_write_aborts_the_multipart_upload(s3_url: str, moto_server: str) -> None:
    storage = open_storage(s3_url)
    with pytest.raises(RuntimeError), storage.writer("b.bin") as w:
        w.write(b"x" * (PART_SIZE + 10))
        raise RuntimeError("source died")
    bucket = s3_url.split("/")[2]
    assert s3_client(moto_server).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_missing_objects_and_bad_keys(storage: Storage) -> None:
    with pytest.raises(FileNotFoundError), storage.open("nope"):
        pass
    with pytest.raises(FileNotFoundError):
        storage.stat("nope")
    for bad in ("", "/abs", "a/../b", "a//b"):
        with pytest.raises(ValueError, match="bad object key"):
            storage.put_bytes(bad, b"")


def test_storage_class_is_passed_to_s3(s3_url: str, moto_server: str) -> None:
    open_storage(s3_url).put_bytes("cold/x", b"1", storage_class="GLACIER")
    bucket, prefix = s3_url.split("/")[2], s3_url.split("/")[3]
    head = s3_client(moto_server).head_object(Bucket=bucket, Key=f"{prefix}/cold/x")
    assert head["StorageClass"] == "GLACIER"


def test_unreachable_s3_is_a_storage_error(monkeypatch: pytest.MonkeyPatch, s3_url: str) -> None:
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    reset_settings_cache()
    storage = open_storage(s3_url)
    with pytest.raises(StorageError, match="unreachable"):
        storage.put_bytes("x", b"1")
    reset_settings_cache()


def test_missing_bucket_is_a_storage_error(s3_url: str) -> None:
    storage = open_storage("s3://no-such-bucket-here/p")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        storage.put_bytes("x", b"1")


def test_bad_urls() -> None:
    with pytest.raises(StorageError, match="needs a bucket"):
        open_storage("s3:///x")
    with pytest.raises(StorageError, match="file://PATH or s3://"):
        open_storage("ftp://x/y")


def test_file_listing_skips_uploads_in_progress(tmp_path: Path) -> None:
    storage = open_storage(f"file://{tmp_path}")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ".x.tmp-123").write_bytes(b"partial")
    storage.put_bytes("a/y", b"1")
    assert [o.key for o in storage.list()] == ["a/y"]


def test_set_storage_class(storage: Storage) -> None:
    storage.put_bytes("cold/y", b"payload")
    storage.set_storage_class("cold/y", "GLACIER")
    assert storage.stat("cold/y").size == 7
    with pytest.raises(FileNotFoundError):
        storage.set_storage_class("cold/missing", "GLACIER")


def test_set_storage_class_moves_an_s3_object(s3_url: str, moto_server: str) -> None:
    storage = open_storage(s3_url)
    storage.put_bytes("cold/z", b"payload")
    storage.set_storage_class("cold/z", "GLACIER")
    bucket, prefix = s3_url.split("/")[2], s3_url.split("/")[3]
    head = s3_client(moto_server).head_object(Bucket=bucket, Key=f"{prefix}/cold/z")
    assert head["StorageClass"] == "GLACIER"


def test_file_sweep_removes_uploads_abandoned_by_a_crash(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time
    from datetime import timedelta

    root = tmp_path / "objects"
    url = f"file://{root}"
    # a writer process that dies mid-upload: no exception handler runs, the temp file stays
    crash = (
        "import os; from core.storage import open_storage\n"
        f"s = open_storage({url!r})\n"
        "with s.writer('backups/full/x/dump.pgc.zst') as w:\n"
        "    w.write(b'x' * 100_000); w._fh.flush(); os._exit(9)\n"
    )
    died = subprocess.run([sys.executable, "-c", crash], cwd=Path(__file__).parent.parent)
    assert died.returncode == 9
    storage = open_storage(url)
    storage.put_bytes("backups/full/y/dump.pgc.zst", b"kept")
    leftovers = [p for p in root.rglob(".*") if ".tmp-" in p.name]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 100_000
    assert [o.key for o in storage.list()] == ["backups/full/y/dump.pgc.zst"]
    # a recent temp file may be a live upload: left alone
    assert storage.sweep_incomplete(timedelta(days=1)) == 0
    assert leftovers[0].exists()
    old = time.time() - 2 * 86400
    os.utime(leftovers[0], (old, old))
    assert storage.sweep_incomplete(timedelta(days=1)) == 1
    assert not leftovers[0].exists()
    assert storage.get_bytes("backups/full/y/dump.pgc.zst") == b"kept"
    assert open_storage(f"file://{tmp_path / 'nowhere'}").sweep_incomplete(timedelta(0)) == 0


def test_s3_sweep_aborts_abandoned_multipart_uploads(s3_url: str, moto_server: str) -> None:
    from datetime import timedelta

    storage = open_storage(s3_url)
    bucket, prefix = s3_url.split("/")[2], s3_url.split("/")[3]
    client = s3_client(moto_server)
    # a writer that crashed after its first part: the upload is never completed nor aborted
    upload = client.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/backups/x/dump")
    client.upload_part(
        Bucket=bucket,
        Key=f"{prefix}/backups/x/dump",
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"x" * 1024,
    )
    other = client.create_multipart_upload(Bucket=bucket, Key="elsewhere/dump")
    # (moto reports every upload as initiated in 2010, so the age cut is not testable here)
    assert storage.sweep_incomplete(timedelta(days=1)) == 1
    assert storage.sweep_incomplete(timedelta(days=1)) == 0
    left = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["UploadId"] for u in left] == [other["UploadId"]]  # outside our prefix: kept


def test_exclusive_write_never_replaces_an_existing_object(storage: Storage) -> None:
    """exclusive=True publishes atomically only if the key is free (link on file://,
    If-None-Match on s3): a writer that lost the race is told, and the winner's bytes stay."""
    first = storage.put_bytes("wal/seg", b"first")
    assert first.size == 5
    with pytest.raises(FileExistsError), storage.writer("wal/seg", exclusive=True) as w:
        w.write(b"second")
    assert storage.get_bytes("wal/seg") == b"first"
    # the race itself: the name is taken after the writer started, before it publishes
    with pytest.raises(FileExistsError), storage.writer("wal/race", exclusive=True) as w:
        w.write(b"loser " * (PART_SIZE // 4))  # multipart on s3
        storage.put_bytes("wal/race", b"winner")
    assert storage.get_bytes("wal/race") == b"winner"
    with storage.writer("wal/free", exclusive=True) as w:
        w.write(b"ok")
    assert w.result is not None and storage.get_bytes("wal/free") == b"ok"
    assert [o.key for o in storage.list("wal/")] == ["wal/free", "wal/race", "wal/seg"]
