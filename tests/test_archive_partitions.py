"""Whole-month archive: a monthly partition wholly before the cutoff leaves Postgres by COPY +
TRUNCATE in the transaction that catalogues its objects, then is dropped; the boundary month
and the DEFAULT partition keep the batched DELETE path. Adversaries: SIGKILL before and after
that commit, a month straddling the cutoff, erased users, restore byte for byte."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest

from core.storage import open_storage
from pipelines.lifecycle import partitions as parts
from pipelines.lifecycle.engine import run_pipeline
from pipelines.lifecycle.gdpr import erase
from pipelines.lifecycle.policies import Policy, get_policy
from tests.conftest import run_cli, start_cli
from tests.support import lifecycle as _lifecycle
from tests.support import s3 as _s3
from tests.support.lifecycle import (
    add_messages,
    archived_ids,
    make_conversation,
    make_user,
    scan_storage,
    table_rows,
)

file_storage = _lifecycle.file_storage
moto_server = _s3.moto_server
s3_url = _s3.s3_url

_today = datetime.now(UTC)
# mid-month, so the boundary month has rows on both sides of the cutoff whatever the date
NOW = datetime(_today.year, _today.month, 15, 12, tzinfo=UTC)
CUTOFF = get_policy("messages-archive").cutoff(NOW)
BOUNDARY = parts.month_start(CUTOFF)
OLD_A, OLD_B = parts.add_months(BOUNDARY, -7), parts.add_months(BOUNDARY, -6)
NO_PARTITION = parts.add_months(BOUNDARY, -12)  # its rows sit in the DEFAULT partition
# CSV's hard cases: a newline, quotes, a comma, a backslash
CONTENT = 'line one\nline "two", with a comma \\ and a backslash'


def _policy(**changes: Any) -> Policy:
    return dataclasses.replace(get_policy("messages-archive"), **changes)


def _at(month: date, **delta: Any) -> datetime:
    return datetime(month.year, month.month, month.day, tzinfo=UTC) + timedelta(**delta)


def _create(db: str, *months: date) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        for m in months:
            parts.create_month(conn, "messages", m)


def _names(sql: Any) -> set[str]:
    return {p.name for p in parts.list_partitions(sql, "messages")}


def _pname(month: date) -> str:
    return parts.partition_name("messages", month)


def _fill(sql: Any, db: str, *, a: int, b: int) -> tuple[Any, Any]:
    """``a`` and ``b`` messages in two old months (partitions made as maintenance makes them)."""
    _create(db, OLD_A, OLD_B)
    x, y = make_user(sql), make_user(sql)
    conv = make_conversation(sql, [x, y])
    add_messages(
        sql, conversation=conv, sender=x, n=a, start=_at(OLD_A, hours=1), step="20 minutes"
    )
    add_messages(
        sql, conversation=conv, sender=y, n=b, start=_at(OLD_B, hours=1), step="30 minutes"
    )
    return x, y


def test_whole_months_go_without_delete_boundary_and_default_by_batches_restore_equal(
    sql, db, file_storage
) -> None:
    # Given two old months (partitions), the month holding the cutoff with rows on both sides
    # of it, and rows of an unprepared month in DEFAULT; contents with CSV's hard cases
    _create(db, OLD_A, OLD_B, BOUNDARY)
    x, y = make_user(sql), make_user(sql)
    conv = make_conversation(sql, [x, y])
    for sender, n, start, step in (
        (x, 700, _at(OLD_A, hours=1), "20 minutes"),
        (y, 450, _at(OLD_B, hours=2), "30 minutes"),
        (x, 200, CUTOFF - timedelta(seconds=101), "1 second"),  # 100 expired, 100 not
        (y, 40, _at(NO_PARTITION, days=3), "1 hour"),
    ):
        add_messages(
            sql, conversation=conv, sender=sender, n=n, start=start, step=step, content=CONTENT
        )
    before = table_rows(sql, "messages")
    expired = sorted(str(r[0]) for r in before if r[-1] < CUTOFF)
    assert len(expired) == 700 + 450 + 100 + 40
    # When the archive plans (a dry run names both months, its first object the first month's)
    dry = run_pipeline("messages-archive", now=NOW, dry_run=True, policy=_policy(batch_size=200))
    assert dry.plan.whole_months == (f"partitions.{_pname(OLD_A)}", f"partitions.{_pname(OLD_B)}")
    assert dry.plan.rows_in_whole_months == 1150
    assert dry.plan.first_key == f"messages/{OLD_A:%Y/%m}/{_pname(OLD_A)}.0000.csv.zst"
    # and runs with objects of about 200 rows
    result = run_pipeline("messages-archive", now=NOW, policy=_policy(batch_size=200))
    # Then the two old months are dropped whole; the boundary month stays with its new rows
    assert result.status == "succeeded"
    names = _names(sql)
    assert _pname(OLD_A) not in names and _pname(OLD_B) not in names
    assert _pname(BOUNDARY) in names
    left = sql.execute(
        f"SELECT count(*), min(created_at) FROM partitions.{_pname(BOUNDARY)}"
    ).fetchone()
    assert left[0] == 100 and left[1] >= CUTOFF
    assert sql.execute("SELECT count(*) FROM messages").fetchone()[0] == 100
    # each path archived what it should: months whole, boundary + DEFAULT rows by batches
    paths = sql.execute(
        "SELECT progress->'paths' FROM pipeline_runs WHERE id = %s", (result.run_id,)
    ).fetchone()[0]
    assert paths["partitions"]["rows"] == 1150 and paths["batches"]["rows"] == 140
    whole = sql.execute(
        "SELECT rows, first_key->>'partition' FROM archive_objects "
        "WHERE first_key ? 'partition' ORDER BY id"
    ).fetchall()
    assert {p for _, p in whole} == {_pname(OLD_A), _pname(OLD_B)}
    assert sum(r for r, _ in whole) == 1150 and len(whole) >= 5  # sliced, not one per month
    assert max(r for r, _ in whole) < 2 * 200
    # every expired row is in storage exactly once, and the manifest lists every object
    stored = archived_ids(file_storage, "messages/")
    assert [i for i, n in Counter(stored).items() if n > 1] == []
    assert sorted(stored) == expired
    assert result.manifest_key is not None
    # When the run is restored with the CLI
    out = run_cli("archive", "restore", "--run", str(result.run_id), "--by", "ops:test")
    # Then the table is what it was, every column of every row
    assert out.returncode == 0, out.stderr
    assert table_rows(sql, "messages") == before


def test_a_month_straddling_the_cutoff_is_not_archived_whole_nor_dropped(
    sql, db, file_storage
) -> None:
    # Given only the boundary month, its rows on both sides of the cutoff
    _create(db, BOUNDARY)
    x, y = make_user(sql), make_user(sql)
    conv = make_conversation(sql, [x, y])
    # (minute 1 to 60 before it, then the cutoff itself and 59 minutes after)
    add_messages(sql, conversation=conv, sender=x, n=120, start=CUTOFF - timedelta(minutes=61))
    # When the archive runs (a dry run first: it plans no whole month)
    assert run_pipeline("messages-archive", now=NOW, dry_run=True).plan.whole_months == ()
    result = run_pipeline("messages-archive", now=NOW)
    # Then only the 60 expired rows went, by batches, and the month is still attached
    assert result.stats.rows_affected == 60
    assert _pname(BOUNDARY) in _names(sql)
    assert (
        sql.execute(
            "SELECT count(*) FROM archive_objects WHERE first_key ? 'partition'"
        ).fetchone()[0]
        == 0
    )
    left = sql.execute(f"SELECT count(*), min(created_at) FROM partitions.{_pname(BOUNDARY)}")
    assert left.fetchone() == (60, CUTOFF)


def _wait_for_lock(sql: Any, relation: str, proc: Any, deadline_s: float = 60) -> None:
    """Until the pipeline process waits for an AccessExclusiveLock on ``relation``."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it reached the lock"
        waiting = sql.execute(
            "SELECT 1 FROM pg_locks WHERE relation = to_regclass(%s) AND NOT granted "
            "AND mode = 'AccessExclusiveLock'",
            (relation,),
        ).fetchone()
        if waiting:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run never waited for {relation}")


def _start_archive(file_storage: str, batch_size: int) -> Any:
    return start_cli(
        "pipeline",
        "run",
        "messages-archive",
        "--batch-size",
        str(batch_size),
        env={
            **os.environ,
            "STORAGE_URL": file_storage,
            # so it waits on the test's lock instead of giving up
            "TIDEMILL_PIPELINE_LOCK_TIMEOUT_MS": "120000",
        },
    )


def _kill(proc: Any) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.slow
def test_sigkill_after_objects_are_written_before_the_commit_then_rerun_exactly_once(
    sql, db, file_storage
) -> None:
    # Given two old months of messages
    _fill(sql, db, a=2000, b=500)
    ids = sorted(str(r[0]) for r in sql.execute("SELECT id FROM messages"))
    # and a reader holding the first month, so the archive's TRUNCATE (after every object of
    # that month is written and verified) waits behind it
    blocker = psycopg.connect(db)
    blocker.execute(f"LOCK TABLE partitions.{_pname(OLD_A)} IN ACCESS SHARE MODE")
    proc = _start_archive(file_storage, 300)
    try:
        _wait_for_lock(sql, f"partitions.{_pname(OLD_A)}", proc)
        orphans = [i.key for i in open_storage(file_storage).list("messages/")]
        # When the process is killed there
        _kill(proc)
    finally:
        _kill(proc)
        blocker.rollback()
        blocker.close()
    # Then the month is whole, its objects are stored but catalogued nowhere
    assert len(orphans) >= 6
    assert sql.execute("SELECT count(*) FROM messages").fetchone()[0] == 2500
    assert sql.execute("SELECT count(*) FROM archive_objects").fetchone()[0] == 0
    # When the next run comes, with another object size (other keys than the orphans')
    result = run_pipeline("messages-archive")
    # Then the orphans went first and every row is stored exactly once
    assert result.status == "succeeded"
    storage = open_storage(file_storage)
    catalogued = {r[0] for r in sql.execute("SELECT key FROM archive_objects")}
    assert [k for k in orphans if storage.exists(k) and k not in catalogued] == []
    stored = archived_ids(file_storage, "messages/")
    assert [i for i, n in Counter(stored).items() if n > 1] == []
    assert sorted(stored) == ids
    assert sql.execute("SELECT sum(rows) FROM archive_objects").fetchone()[0] == 2500
    assert _pname(OLD_A) not in _names(sql) and _pname(OLD_B) not in _names(sql)


@pytest.mark.slow
def test_sigkill_after_the_commit_before_the_drop_then_rerun_drops_and_adds_nothing(
    sql, db, file_storage
) -> None:
    # Given two old months, and a reader of the parent table, so the DETACH that follows the
    # months' commit waits behind it
    _fill(sql, db, a=900, b=400)
    ids = sorted(str(r[0]) for r in sql.execute("SELECT id FROM messages"))
    blocker = psycopg.connect(db)
    blocker.execute("LOCK TABLE ONLY messages IN ACCESS SHARE MODE")
    proc = _start_archive(file_storage, 300)
    try:
        _wait_for_lock(sql, "messages", proc)
        # When the process is killed there
        _kill(proc)
    finally:
        _kill(proc)
        blocker.rollback()
        blocker.close()
    # Then both months are catalogued and empty, but still attached
    assert {_pname(OLD_A), _pname(OLD_B)} <= _names(sql)
    assert sql.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    catalogued = sql.execute("SELECT key, sha256 FROM archive_objects ORDER BY key").fetchall()
    assert sum(r[0] for r in sql.execute("SELECT rows FROM archive_objects").fetchall()) == 1300
    # When the next run comes
    result = run_pipeline("messages-archive")
    # Then it drops the empty months and archives nothing more
    assert result.status == "succeeded" and result.stats.rows_affected == 0
    assert _pname(OLD_A) not in _names(sql) and _pname(OLD_B) not in _names(sql)
    assert sql.execute("SELECT key, sha256 FROM archive_objects ORDER BY key").fetchall() == (
        catalogued
    )
    stored = archived_ids(file_storage, "messages/")
    assert sorted(stored) == ids


def test_erased_users_rows_never_reach_a_months_archive_and_an_erase_rewrites_one(
    sql, db, file_storage
) -> None:
    # Given a month with messages of an erased user and of another user
    _create(db, OLD_A, OLD_B)
    gone = make_user(sql, email="gone.user@example.org", full_name="Gone Person")
    later = make_user(sql, email="later.user@example.org", full_name="Later Person")
    other = make_user(sql)
    conv = make_conversation(sql, [gone, later, other])
    for sender, month, content in (
        (gone, OLD_A, "secret of gone.user@example.org"),
        (other, OLD_A, "hello"),
        (later, OLD_B, "secret of later.user@example.org"),
        (other, OLD_B, "hello"),
    ):
        add_messages(
            sql,
            conversation=conv,
            sender=sender,
            n=50,
            start=_at(month, hours=3),
            content=content,
        )
    sql.execute(
        "UPDATE users SET deleted_at = now() - interval '31 days' WHERE id = ANY(%s)",
        ([gone, later],),
    )
    erase(gone, by="test")
    # When the archive takes both months whole
    result = run_pipeline("messages-archive", now=NOW, policy=_policy(batch_size=30))
    assert result.status == "succeeded" and result.stats.rows_affected == 200
    # Then nothing of the erased user is in any object, nor in the subjects index
    assert scan_storage(file_storage, [str(gone), "gone.user@example.org"]) == []
    subjects = {r[0] for r in sql.execute("SELECT subject FROM archive_subjects")}
    assert str(gone) not in subjects and {str(later), str(other)} <= subjects
    # When a user whose rows are in a month's objects is erased afterwards
    rewritten = erase(later, by="test").archives_rewritten
    # Then exactly the objects holding them were rewritten, and nothing of theirs is stored
    holding = sql.execute(
        "SELECT count(*) FROM archive_objects WHERE key LIKE %s", ("%.e-%",)
    ).fetchone()[0]
    assert rewritten == holding >= 1
    assert scan_storage(file_storage, [str(later), "later.user@example.org"]) == []
    assert Counter(archived_ids(file_storage, "messages/")).most_common(1)[0][1] == 1


def test_an_archive_committing_in_the_middle_of_an_erase_gets_rewritten_too(
    sql, db, file_storage, monkeypatch
) -> None:
    import threading

    from core.settings import get_settings, reset_settings_cache

    # Given a month holding messages of a user due for erasure
    monkeypatch.setenv("TIDEMILL_PIPELINE_LOCK_TIMEOUT_MS", "60000")
    reset_settings_cache()
    _create(db, OLD_A)
    late = make_user(sql, email="late.user@example.org")
    other = make_user(sql)
    conv = make_conversation(sql, [late, other])
    for sender in (late, other):
        add_messages(
            sql,
            conversation=conv,
            sender=sender,
            n=40,
            start=_at(OLD_A, hours=5),
            content=f"from {sender}",
        )
    sql.execute("UPDATE users SET deleted_at = now() - interval '31 days' WHERE id = %s", (late,))
    # and an erase held, after its archive rewrite (nothing archived yet), at its transaction
    blocker = psycopg.connect(db)
    # (NO KEY UPDATE: the erase's earlier inserts referencing the user still pass)
    blocker.execute("SELECT 1 FROM users WHERE id = %s FOR NO KEY UPDATE", (late,))
    outcome: list[Any] = []

    def run_erase() -> None:
        try:
            outcome.append(erase(late, by="test"))
        except BaseException as exc:  # handed to the test below
            outcome.append(exc)

    thread = threading.Thread(target=run_erase)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not sql.execute(
            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE 'SELECT * FROM users WHERE id = % FOR UPDATE'"
        ).fetchone():
            assert time.monotonic() < deadline and thread.is_alive(), outcome
            time.sleep(0.05)
        # When the archive takes the month (the user's rows with it) meanwhile
        # (its drop of the emptied month waits for no one: the held erase locks `users`,
        # which the drop needs briefly for the foreign key, so it leaves the month for later)
        quick = dataclasses.replace(get_settings(), pipeline_lock_timeout_ms=300)
        archived = run_pipeline("messages-archive", now=NOW, settings=quick)
        assert archived.status == "succeeded" and archived.stats.rows_affected == 80
        assert _pname(OLD_A) in _names(sql)  # empty, dropped by a later run
    finally:
        blocker.rollback()
        blocker.close()
        thread.join(timeout=60)
    # Then the erase saw the new objects, rewrote them, and nothing of the user is stored
    assert len(outcome) == 1 and not isinstance(outcome[0], BaseException), outcome
    assert outcome[0].erased and outcome[0].archives_rewritten >= 1
    assert scan_storage(file_storage, [str(late), "late.user@example.org"]) == []
    assert str(late) not in {r[0] for r in sql.execute("SELECT subject FROM archive_subjects")}
    assert run_pipeline("messages-archive", now=NOW).stats.rows_affected == 0
    assert _pname(OLD_A) not in _names(sql)


def test_a_month_archived_whole_as_json_lines_restores_equal(sql, db, file_storage) -> None:
    # Given an old month and a policy writing JSON lines
    _fill(sql, db, a=130, b=0)
    before = table_rows(sql, "messages")
    # When it is archived whole in objects of about 50 rows
    result = run_pipeline(
        "messages-archive", now=NOW, policy=_policy(format="jsonl", batch_size=50)
    )
    # Then it went whole, as JSON lines, every row once
    assert result.stats.rows_affected == 130 and _pname(OLD_A) not in _names(sql)
    keys = [
        r[0] for r in sql.execute("SELECT key FROM archive_objects WHERE first_key ? 'partition'")
    ]
    assert len(keys) >= 2 and all(k.endswith(".jsonl.zst") for k in keys)
    assert sorted(archived_ids(file_storage, "messages/")) == sorted(str(r[0]) for r in before)
    # and restoring the run brings back every column of every row
    out = run_cli("archive", "restore", "--run", str(result.run_id))
    assert out.returncode == 0, out.stderr
    assert table_rows(sql, "messages") == before


def test_dropping_emptied_months_together_keeps_one_a_row_reached(sql, db) -> None:
    # Given two emptied months, one of which got a row after it was found empty
    _create(db, OLD_A, OLD_B)
    x = make_user(sql)
    conv = make_conversation(sql, [x])
    add_messages(sql, conversation=conv, sender=x, n=1, start=_at(OLD_B, days=2))
    months = [
        p
        for p in parts.list_partitions(sql, "messages")
        if p.name in (_pname(OLD_A), _pname(OLD_B))
    ]
    # When both are dropped in one transaction, each re-checked under its DETACH's lock
    with psycopg.connect(db, autocommit=True) as conn:
        dropped = parts.drop_partitions(conn, "messages", months, require_empty=True)
    # Then the empty one is gone and the other stays attached with its row
    assert dropped == [_pname(OLD_A)]
    assert _pname(OLD_A) not in _names(sql) and _pname(OLD_B) in _names(sql)
    assert sql.execute(f"SELECT count(*) FROM partitions.{_pname(OLD_B)}").fetchone()[0] == 1


def test_a_month_failing_after_its_uploads_leaves_no_object_then_goes_once_to_s3(
    sql, db, s3_url, moto_server, monkeypatch
) -> None:
    from core.storage import StorageError
    from tests.support.lifecycle import use_storage
    from tests.support.s3 import s3_client

    # Given an old month and an archive to S3 whose storage class S3 rejects: every object of
    # the month is uploaded and verified, then moving the first to the class fails
    use_storage(monkeypatch, s3_url)
    _fill(sql, db, a=120, b=0)
    ids = sorted(str(r[0]) for r in sql.execute("SELECT id FROM messages"))
    bad = _policy(batch_size=40, storage_class="NOT_A_STORAGE_CLASS")
    with pytest.raises(StorageError):
        run_pipeline("messages-archive", now=NOW, policy=bad)
    # Then the failure handler removed all of the month's objects; the month is whole
    bucket, prefix = s3_url[5:].split("/", 1)
    client = s3_client(moto_server)
    assert client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []) == []
    assert sql.execute("SELECT count(*) FROM messages").fetchone()[0] == 120
    assert sql.execute(
        "SELECT status, progress ? 'pending_keys' FROM pipeline_runs"
    ).fetchone() == ("failed", False)
    # When the next run has a class S3 knows
    result = run_pipeline("messages-archive", now=NOW, policy=_policy(batch_size=40))
    # Then the month went whole, in GLACIER, every row exactly once
    assert result.stats.rows_affected == 120 and _pname(OLD_A) not in _names(sql)
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    data = {o["Key"]: o.get("StorageClass") for o in listed if o["Key"].endswith(".csv.zst")}
    assert len(data) >= 2 and set(data.values()) == {"GLACIER"}
    for key in data:
        client.restore_object(Bucket=bucket, Key=key, RestoreRequest={"Days": 1})
    assert sorted(archived_ids(s3_url, "messages/")) == ids
