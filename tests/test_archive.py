"""Archive: rows leave Postgres only once their object is stored and verified; restore."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from core.storage import StorageError, open_storage
from pipelines.lifecycle.engine import run_pipeline
from pipelines.lifecycle.policies import Policy, get_policy
from tests.conftest import run_cli
from tests.support import lifecycle as _lifecycle
from tests.support import s3 as _s3
from tests.support.lifecycle import (
    add_messages,
    archived_ids,
    make_conversation,
    make_user,
    read_archive,
    table_rows,
    use_storage,
)
from tests.support.s3 import s3_client

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
OLD = NOW - timedelta(days=3 * 365)  # well past the 2-year cutoff

# fixtures from tests/support, registered by assignment (not an import) so that
# test parameters named like them do not shadow an import
file_storage = _lifecycle.file_storage
moto_server = _s3.moto_server
s3_url = _s3.s3_url


def _policy(name: str, **changes: Any) -> Policy:
    return dataclasses.replace(get_policy(name), **changes)


def _messages(sql, n_old: int, n_new: int) -> None:
    a, b = make_user(sql), make_user(sql)
    conv = make_conversation(sql, [a, b])
    add_messages(sql, conversation=conv, sender=a, n=n_old, start=OLD, step="7 minutes")
    add_messages(sql, conversation=conv, sender=b, n=n_new, start=NOW - timedelta(days=30))


def test_archive_round_trip_through_file_storage(sql, file_storage) -> None:
    # Given 500 messages older than 2 years and 20 recent ones
    _messages(sql, 500, 20)
    before = table_rows(sql, "messages")
    old_rows = [r for r in before if r[-1] < NOW - timedelta(days=730)]
    # When the archive runs in batches of 120
    result = run_pipeline(
        "messages-archive", now=NOW, policy=_policy("messages-archive", batch_size=120)
    )
    # Then the old rows left Postgres, in 5 objects under deterministic keys
    assert sql.execute("SELECT count(*) FROM messages").fetchone()[0] == 20
    assert result.stats.objects == 5 and result.stats.rows_affected == 500
    objects = sql.execute(
        "SELECT key, rows, sha256, size_bytes FROM archive_objects ORDER BY id"
    ).fetchall()
    assert sum(o[1] for o in objects) == 500
    storage = open_storage()
    for key, _rows, sha, size in objects:
        assert key.startswith(f"messages/{OLD:%Y}/{OLD:%m}/") or key.startswith("messages/")
        assert key.endswith(".csv.zst")
        assert hashlib.sha256(storage.get_bytes(key)).hexdigest() == sha
        assert storage.stat(key).size == size
    first = objects[0][0]
    assert first.startswith(f"messages/{OLD + timedelta(minutes=7):%Y/%m}/")
    # and a manifest lists every object with its counts, ranges and checksums
    assert result.manifest_key is not None
    manifest = json.loads(storage.get_bytes(result.manifest_key))
    assert manifest["rows"] == 500 and manifest["table"] == "messages"
    assert manifest["schema_version"] and manifest["columns"][0]["name"] == "id"
    assert [o["key"] for o in manifest["objects"]] == [o[0] for o in objects]
    assert all(o["first"] and o["last"] and o["sha256"] for o in manifest["objects"])
    # When restored with the CLI
    restored = run_cli("archive", "restore", "--run", str(result.run_id))
    assert restored.returncode == 0, restored.stderr
    assert "restored 500 row(s)" in restored.stdout
    # Then every row is back, identical (content with quotes, commas, backslashes, json)
    assert table_rows(sql, "messages") == before
    assert len(old_rows) == 500
    # and restoring again inserts nothing more
    again = run_cli("archive", "restore", first)
    assert again.returncode == 0 and "0 inserted" in again.stdout


def test_jsonl_archive_of_transactions_round_trips(sql, file_storage) -> None:
    user = make_user(sql)
    sql.execute(
        "INSERT INTO transactions (user_id, type, amount, description, metadata, created_at) "
        "SELECT %s, 'payment', g, 'line ' || g || E'\\nnext \"q\" \\\\ ,', "
        "jsonb_build_object('g', g, 'note', E'tab\\there'), %s + g * interval '1 day' "
        "FROM generate_series(1, 50) g",
        (user, NOW - timedelta(days=8 * 365)),
    )
    before = table_rows(sql, "transactions")
    result = run_pipeline(
        "transactions-archive", now=NOW, policy=_policy("transactions-archive", batch_size=20)
    )
    assert result.stats.objects == 3
    assert sql.execute("SELECT count(*) FROM transactions").fetchone()[0] == 0
    keys = [r[0] for r in sql.execute("SELECT key FROM archive_objects ORDER BY id")]
    assert all(k.endswith(".jsonl.zst") for k in keys)
    first_line = read_archive(file_storage, keys[0]).decode().splitlines()[0]
    assert json.loads(first_line)["type"] == "payment"
    from pipelines.lifecycle.archive import restore_object

    assert sum(restore_object(k).rows_inserted for k in keys) == 50
    assert table_rows(sql, "transactions") == before


def test_dry_run_archives_nothing(sql, file_storage) -> None:
    _messages(sql, 30, 0)
    result = run_pipeline("messages-archive", now=NOW, dry_run=True)
    assert sql.execute("SELECT count(*) FROM messages").fetchone()[0] == 30
    assert list(open_storage().list()) == []
    assert result.plan.eligible_rows == 30
    assert result.plan.first_key.startswith("messages/")


def test_archive_to_s3_with_storage_class(sql, s3_url, moto_server, monkeypatch) -> None:
    use_storage(monkeypatch, s3_url)
    _messages(sql, 100, 0)
    ids = sorted(str(r[0]) for r in sql.execute("SELECT id FROM messages"))
    result = run_pipeline(
        "messages-archive", now=NOW, policy=_policy("messages-archive", batch_size=40)
    )
    assert result.stats.objects == 3
    bucket, prefix = s3_url[5:].split("/", 1)
    listed = s3_client(moto_server).list_objects_v2(Bucket=bucket, Prefix=prefix)
    classes = {o["Key"]: o.get("StorageClass") for o in listed["Contents"]}
    data_keys = [k for k in classes if k.endswith(".csv.zst")]
    assert len(data_keys) == 3
    assert {classes[k] for k in data_keys} == {"GLACIER"}
    # GLACIER objects are read only after a restore request (moto completes it at once)
    for k in data_keys:
        s3_client(moto_server).restore_object(Bucket=bucket, Key=k, RestoreRequest={"Days": 1})
    assert sorted(archived_ids(s3_url, "messages/")) == ids


def test_s3_failing_mid_run_deletes_nothing_and_the_next_run_retries(
    sql, s3_url, moto_server, monkeypatch
) -> None:
    # Given 200 old messages and an archive to S3 in batches of 50
    use_storage(monkeypatch, s3_url)
    _messages(sql, 200, 0)
    ids_before = {str(r[0]) for r in sql.execute("SELECT id FROM messages")}
    bucket = s3_url[5:].split("/", 1)[0]
    client = s3_client(moto_server)

    def lose_bucket_after_first_batch(ctx) -> None:
        if ctx.stats.objects == 1:
            # S3 goes away mid-run: the bucket (and the first object with it) disappears
            for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
            client.delete_bucket(Bucket=bucket)

    policy = _policy("messages-archive", batch_size=50, storage_class=None)
    # When the second batch cannot be stored
    with pytest.raises(StorageError, match="NoSuchBucket"):
        run_pipeline(
            "messages-archive", now=NOW, policy=policy, after_batch=lose_bucket_after_first_batch
        )
    # Then only the committed first batch left Postgres; the failing batch deleted nothing
    left = {str(r[0]) for r in sql.execute("SELECT id FROM messages")}
    committed = sql.execute("SELECT coalesce(sum(rows), 0) FROM archive_objects").fetchone()[0]
    assert committed == 50 and len(left) == 150 and left < ids_before
    run = sql.execute("SELECT status, error FROM pipeline_runs ORDER BY id DESC LIMIT 1").fetchone()
    assert run[0] == "failed" and "NoSuchBucket" in run[1]
    # When the bucket is back and the next run retries
    client.create_bucket(Bucket=bucket)
    result = run_pipeline("messages-archive", now=NOW, policy=policy)
    # Then everything left is archived exactly once
    assert result.status == "succeeded" and result.stats.rows_affected == 150
    # and the failed run got its manifest too, for the batch it did commit
    manifests = sql.execute(
        "SELECT status, manifest_key IS NOT NULL FROM pipeline_runs ORDER BY id"
    ).fetchall()
    assert manifests == [("failed", True), ("succeeded", True)]
    assert sql.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    again = archived_ids(s3_url, "messages/")
    assert sorted(again) == sorted(left)


def test_orphan_of_a_killed_run_is_removed_before_its_rows_are_archived_again(
    sql, file_storage
) -> None:

    # Given a run that died after uploading a batch but before its DELETE committed
    _messages(sql, 10, 0)
    storage = open_storage()
    orphan = "messages/2023/06/orphan.csv.zst"
    storage.put_bytes(orphan, b"rows that are still in Postgres")
    sql.execute(
        "INSERT INTO pipeline_runs (pipeline, status, progress) "
        "VALUES ('messages-archive', 'running', %s)",
        (json.dumps({"pending": orphan}),),
    )
    # When the next run starts
    result = run_pipeline("messages-archive", now=NOW)
    # Then the dead run is marked interrupted, its orphan is gone, and the rows archived once
    assert not storage.exists(orphan)
    assert (
        sql.execute("SELECT count(*) FROM pipeline_runs WHERE status = 'interrupted'").fetchone()[0]
        == 1
    )
    assert result.stats.rows_affected == 10
    assert len(archived_ids(file_storage, "messages/")) == 10


def test_restore_rejects_a_tampered_object(sql, file_storage) -> None:
    _messages(sql, 10, 0)
    run_pipeline("messages-archive", now=NOW)
    key = sql.execute("SELECT key FROM archive_objects").fetchone()[0]
    storage = open_storage()
    import zstandard

    storage.put_bytes(key, zstandard.ZstdCompressor().compress(b"id,content\n"))
    bad = run_cli("archive", "restore", key)
    assert bad.returncode == 1
    assert "differs from the recorded" in bad.stderr
    assert sql.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def test_failure_after_upload_removes_the_object_and_the_next_run_archives_once(
    sql, s3_url, moto_server, monkeypatch
) -> None:
    # Given 60 old messages and an archive to S3 whose storage class S3 rejects: the object is
    # uploaded and verified, then moving it to the class fails before the DELETE commits
    use_storage(monkeypatch, s3_url)
    _messages(sql, 60, 0)
    ids = sorted(str(r[0]) for r in sql.execute("SELECT id FROM messages"))
    bad = _policy("messages-archive", batch_size=25, storage_class="NOT_A_STORAGE_CLASS")
    with pytest.raises(StorageError):
        run_pipeline("messages-archive", now=NOW, policy=bad)
    # Then the failed run left no object behind, and every row is still in Postgres
    bucket, prefix = s3_url[5:].split("/", 1)
    listed = s3_client(moto_server).list_objects_v2(Bucket=bucket, Prefix=prefix)
    assert [o["Key"] for o in listed.get("Contents", [])] == []
    assert sql.execute("SELECT count(*) FROM messages").fetchone()[0] == 60
    run = sql.execute("SELECT status, progress ? 'pending' FROM pipeline_runs").fetchone()
    assert run == ("failed", False)
    # When a later run archives with other bounds (batches of 40, not 25)
    result = run_pipeline(
        "messages-archive", now=NOW, policy=_policy("messages-archive", batch_size=40)
    )
    # Then every row is archived exactly once
    assert result.status == "succeeded" and result.stats.rows_affected == 60
    for k in [o["Key"] for o in s3_client(moto_server).list_objects_v2(Bucket=bucket)["Contents"]]:
        if k.endswith(".csv.zst"):
            s3_client(moto_server).restore_object(Bucket=bucket, Key=k, RestoreRequest={"Days": 1})
    assert sorted(archived_ids(s3_url, "messages/")) == ids


def test_orphan_a_failed_run_could_not_remove_goes_before_the_next_run(sql, file_storage) -> None:
    # Given a run that failed after uploading a batch and could not remove it (storage was down)
    _messages(sql, 10, 0)
    storage = open_storage()
    orphan = "messages/2019/06/1_a--2_b.csv.zst"
    storage.put_bytes(orphan, b"rows that are still in Postgres")
    kept = "messages/2019/05/committed.csv.zst"
    storage.put_bytes(kept, b"a committed batch")
    failed = sql.execute(
        "INSERT INTO pipeline_runs (pipeline, status, progress) "
        "VALUES ('messages-archive', 'failed', %s), ('messages-archive', 'failed', %s) "
        "RETURNING id",
        (json.dumps({"pending": orphan}), json.dumps({"pending": kept})),
    ).fetchall()
    sql.execute(
        "INSERT INTO archive_objects (run_id, pipeline, table_name, key, format, rows, "
        "size_bytes, sha256, first_key, last_key, storage_url) "
        "VALUES (%s, 'messages-archive', 'messages', %s, 'csv', 1, 1, 'x', '{}', '{}', %s)",
        (failed[1][0], kept, file_storage),
    )
    # When the next run starts
    result = run_pipeline("messages-archive", now=NOW)
    # Then the uncommitted object is gone, the committed one (in the catalogue) is kept,
    # and the rows are archived once
    assert not storage.exists(orphan) and storage.exists(kept)
    assert result.stats.rows_affected == 10
    assert len(archived_ids(file_storage, f"messages/{OLD:%Y}/")) == 10
    assert (
        sql.execute("SELECT count(*) FROM pipeline_runs WHERE progress ? 'pending'").fetchone()[0]
        == 0
    )


def test_restore_without_a_catalogue_row_verifies_against_the_run_manifest(
    sql, file_storage
) -> None:
    import zstandard

    # Given an archived run, restored into a database whose catalogue lost its rows
    _messages(sql, 10, 0)
    result = run_pipeline("messages-archive", now=NOW)
    key = sql.execute("SELECT key FROM archive_objects").fetchone()[0]
    sql.execute("DELETE FROM archive_objects")
    storage = open_storage()
    original = storage.get_bytes(key)
    # When the object was tampered with, the manifest's checksum catches it
    storage.put_bytes(key, zstandard.ZstdCompressor().compress(b"id,content\n"))
    bad = run_cli("archive", "restore", key)
    assert bad.returncode == 1 and "differs from the recorded" in bad.stderr
    assert "run manifest" in bad.stderr
    # and the intact object restores, found by its run too
    storage.put_bytes(key, original)
    good = run_cli("archive", "restore", "--run", str(result.run_id))
    assert good.returncode == 0, good.stderr
    assert "restored 10 row(s)" in good.stdout
    # When neither the catalogue nor a manifest has its checksum, restore refuses
    sql.execute("DELETE FROM messages")
    assert result.manifest_key is not None
    storage.delete(result.manifest_key)
    refused = run_cli("archive", "restore", key)
    assert refused.returncode == 1 and "--no-verify" in refused.stderr
    assert sql.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    # unless told not to verify
    forced = run_cli("archive", "restore", "--no-verify", key)
    assert forced.returncode == 0, forced.stderr
    assert sql.execute("SELECT count(*) FROM messages").fetchone()[0] == 10


def test_objects_of_a_date_age_column_are_filed_under_their_rows_month(sql, file_storage) -> None:
    from datetime import date

    from pipelines.lifecycle.archive import object_key

    # Given a table aged by a `date` column, with rows from March and April 2019
    sql.execute("CREATE TABLE day_totals (id bigint PRIMARY KEY, day date NOT NULL, n int)")
    sql.execute(
        "INSERT INTO day_totals SELECT g, date '2019-03-20' + g, g FROM generate_series(1, 30) g"
    )
    policy = dataclasses.replace(
        get_policy("messages-archive"),
        name="day-totals-archive",
        table="day_totals",
        age_column="day",
        key_column="id",
        batch_size=20,
        storage_class=None,
        filter=None,
    )
    # When archived
    result = run_pipeline("day-totals-archive", now=NOW, policy=policy)
    # Then each object's yyyy/mm is its first row's month, not the month of the run
    assert result.stats.rows_affected == 30
    keys = [r[0] for r in sql.execute("SELECT key FROM archive_objects ORDER BY id")]
    assert keys[0].startswith("day_totals/2019/03/2019-03-21_1--2019-04-09_20.")
    assert keys[1].startswith("day_totals/2019/04/2019-04-10_21--")
    assert object_key("t", (date(2020, 12, 31), 1), (date(2021, 1, 2), 9), "csv") == (
        "t/2020/12/2020-12-31_1--2021-01-02_9.csv.zst"
    )


def test_erase_refuses_to_rewrite_a_damaged_archive_and_changes_nothing(
    sql, redis_client, file_storage
) -> None:
    """A flipped byte in an archived object that holds the user: the erase fails whole (the
    user, the catalogue and the object untouched, to be retried), never writes a rewrite of
    damaged data; with the object repaired the retry succeeds."""
    from pathlib import Path

    from core.storage import open_storage
    from pipelines.lifecycle.archive import ArchiveError
    from pipelines.lifecycle.gdpr import erase
    from tests.test_gdpr import _old_rows, _person

    p = _person(sql, redis_client, deleted_days_ago=31)
    _old_rows(sql, p)
    run_pipeline("messages-archive")
    storage = open_storage()
    (key, sha) = sql.execute("SELECT key, sha256 FROM archive_objects").fetchone()
    path = Path(file_storage.removeprefix("file://")) / key
    good = path.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    path.write_bytes(bytes(bad))
    with pytest.raises(ArchiveError, match="damaged"):
        erase(p["id"], by="test")
    assert sql.execute("SELECT count(*) FROM users WHERE id = %s", (p["id"],)).fetchone()[0] == 1
    assert sql.execute("SELECT key, sha256 FROM archive_objects").fetchone() == (key, sha)
    assert [i.key for i in storage.list("messages/")] == [key]  # no half-made rewrite
    path.write_bytes(good)
    assert erase(p["id"], by="test").archives_rewritten == 1
    assert not storage.exists(key)


def test_an_old_object_left_by_a_crash_after_the_rewrite_is_swept(sql, file_storage) -> None:
    """Killed between the catalogue commit and the delete of the replaced object: the key is
    queued in archive_superseded, and the next archive run deletes it."""
    from core.storage import open_storage

    storage = open_storage()
    storage.put_bytes("messages/2020/01/old.csv.zst", b"personal data")
    sql.execute(
        "INSERT INTO archive_superseded (storage_url, key) VALUES (%s, %s)",
        (storage.url, "messages/2020/01/old.csv.zst"),
    )
    run_pipeline("messages-archive")
    assert not storage.exists("messages/2020/01/old.csv.zst")
    assert sql.execute("SELECT count(*) FROM archive_superseded").fetchone()[0] == 0
