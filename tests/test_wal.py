"""WAL archiving: the real archive_command of a real Postgres 18, and `tidemill wal push|fetch`
as the subprocesses Postgres runs."""

from __future__ import annotations

import os
from pathlib import Path

import zstandard

from core.storage import open_storage
from db.embedded import pg_system_user
from pipelines.backups.physical import lsn_to_segment, wal_key, wal_position
from tests.conftest import run_cli
from tests.support.pgcluster import ArchivedCluster, archived_cluster  # noqa: F401

SEGMENT = 16 * 1024 * 1024


def test_archive_command_stores_every_segment(archived_cluster: ArchivedCluster) -> None:  # noqa: F811
    c = archived_cluster
    # Given the server is configured with archive_command = tidemill wal push
    settings = {
        str(r[0]): str(r[1])
        for r in c.execute("SELECT name, setting FROM pg_settings WHERE name LIKE 'archive%'")
    }
    assert "wal push" in str(settings["archive_command"])
    assert int(str(settings["archive_timeout"])) <= 60  # RPO goal: 1 minute
    # When two segments are closed
    c.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
    first = c.switch_and_wait()
    c.execute("INSERT INTO t SELECT g FROM generate_series(1, 1000) g")
    second = c.switch_and_wait()
    # Then both are in storage, zstd-compressed, whole segments
    storage = open_storage(c.storage_url, settings=c.settings)
    for name in (first, second):
        with storage.open(wal_key(name)) as raw:
            data = zstandard.ZstdDecompressor().stream_reader(raw).read()
        assert len(data) == SEGMENT
    # written by the server's own user (the command runs as that user under root)
    user = pg_system_user()
    if user is not None:
        assert (c.objects / wal_key(first)).stat().st_uid == user[0]


def test_wal_push_is_idempotent_and_refuses_different_content(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'objects'}"
    name = "000000010000000000000007"
    segment = tmp_path / name
    segment.write_bytes(os.urandom(4096) * 16)
    first = run_cli("wal", "push", str(segment), name, "--storage", url)
    assert first.returncode == 0, first.stderr
    # the same bytes again (Postgres retries after a crash): success, nothing changes
    stored = (tmp_path / "objects" / wal_key(name)).read_bytes()
    again = run_cli("wal", "push", str(segment), name, "--storage", url)
    assert again.returncode == 0, again.stderr
    assert "wal_already_archived" in again.stderr
    # different bytes under the same name: refused, the archived segment is untouched
    segment.write_bytes(os.urandom(4096) * 16)
    clash = run_cli("wal", "push", str(segment), name, "--storage", url)
    assert clash.returncode == 1
    assert "refusing to overwrite" in clash.stderr and "wal_segment_conflict" in clash.stderr
    assert "Traceback" not in clash.stderr
    assert (tmp_path / "objects" / wal_key(name)).read_bytes() == stored


def test_wal_push_rejects_bad_input(tmp_path: Path) -> None:
    url = f"file://{tmp_path}"
    bad_name = run_cli("wal", "push", str(tmp_path), "../../etc/passwd", "--storage", url)
    assert bad_name.returncode == 1 and "is not a WAL file name" in bad_name.stderr
    missing = run_cli(
        "wal", "push", str(tmp_path / "nope"), "000000010000000000000001", "--storage", url
    )
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_wal_fetch_round_trip_missing_and_corrupt(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'objects'}"
    name = "000000010000000000000009"
    original = os.urandom(1 << 16)
    (tmp_path / name).write_bytes(original)
    assert run_cli("wal", "push", str(tmp_path / name), name, "--storage", url).returncode == 0
    out = tmp_path / "RECOVERYXLOG"
    fetched = run_cli("wal", "fetch", name, str(out), "--storage", url)
    assert fetched.returncode == 0, fetched.stderr
    assert out.read_bytes() == original
    # not archived: exit 1, which tells recovery "end of archive"
    absent = run_cli("wal", "fetch", "00000002.history", str(out), "--storage", url)
    assert absent.returncode == 1
    # corrupt: exit 255, which makes recovery stop instead of silently ending early
    stored = tmp_path / "objects" / wal_key(name)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    corrupt = run_cli("wal", "fetch", name, str(tmp_path / "other"), "--storage", url)
    assert corrupt.returncode == 255 and "corrupt" in corrupt.stderr
    assert not (tmp_path / "other").exists()


def test_wal_checksum_trailer_catches_every_cut(tmp_path: Path) -> None:
    """zstd alone misses a stream cut exactly after a frame, or a cut into the frame's own
    content checksum; the trailer recorded at push catches every cut and every flipped bit."""
    from pipelines.backups.physical import _TRAILER_LEN

    url = f"file://{tmp_path / 'objects'}"
    name = "00000001000000000000000A"
    original = os.urandom(1 << 15) * 8
    (tmp_path / name).write_bytes(original)
    assert run_cli("wal", "push", str(tmp_path / name), name, "--storage", url).returncode == 0
    stored = tmp_path / "objects" / wal_key(name)
    whole = stored.read_bytes()
    for cut in (_TRAILER_LEN, _TRAILER_LEN + 2, len(whole) // 2, len(whole) - 1):
        stored.write_bytes(whole[:-cut])
        out = tmp_path / f"cut-{cut}"
        fetched = run_cli("wal", "fetch", name, str(out), "--storage", url)
        assert fetched.returncode == 255, (cut, fetched.stderr)
        assert "truncated" in fetched.stderr or "corrupt" in fetched.stderr
        assert not out.exists()
    stored.write_bytes(whole)
    ok = run_cli("wal", "fetch", name, str(tmp_path / "ok"), "--storage", url)
    assert ok.returncode == 0 and (tmp_path / "ok").read_bytes() == original


def test_wal_fetch_aborts_recovery_when_storage_fails(tmp_path: Path) -> None:
    """Only "not archived" may exit 1 (PostgreSQL: end of archive, promote); an unreadable
    archive must exit > 125 so recovery aborts instead of silently losing the rest."""
    url = f"file://{tmp_path / 'objects'}"
    name = "000000010000000000000009"
    # a directory where the segment should be: an OSError that is not "not found"
    (tmp_path / "objects" / wal_key(name)).mkdir(parents=True)
    broken = run_cli("wal", "fetch", name, str(tmp_path / "RECOVERYXLOG"), "--storage", url)
    assert broken.returncode == 255, broken.stderr
    assert "Traceback" not in broken.stderr
    assert "tidemill: error: wal fetch" in broken.stderr
    assert not (tmp_path / "RECOVERYXLOG").exists()
    # the archive itself is missing (unmounted volume): not the end of the archive either
    gone = f"file://{tmp_path / 'never-created'}"
    missing = run_cli("wal", "fetch", name, str(tmp_path / "RECOVERYXLOG"), "--storage", gone)
    assert missing.returncode == 255, missing.stderr
    assert "does not exist" in missing.stderr


def test_wal_fetch_aborts_recovery_when_s3_is_unreachable(tmp_path: Path) -> None:
    from core.proc import free_port

    env = dict(os.environ)
    env.update(S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    env.update(AWS_DEFAULT_REGION="us-east-1")
    fetched = run_cli(
        "wal",
        "fetch",
        "000000010000000000000009",
        str(tmp_path / "RECOVERYXLOG"),
        "--storage",
        "s3://tidemill-nowhere/wal-test",
        env=env,
    )
    assert fetched.returncode == 255, fetched.stderr
    assert "Traceback" not in fetched.stderr
    assert "unreachable" in fetched.stderr


def test_wal_push_never_overwrites_a_segment_archived_after_its_check(tmp_path: Path) -> None:
    """Another archiver publishes the same name while our push is compressing (after its
    existence check): the publish is refused atomically and the difference reported."""
    import threading
    import time

    from pipelines.backups.physical import WalConflict, push_wal

    root = tmp_path / "objects"
    storage = open_storage(f"file://{root}")
    name = "000000010000000000000021"
    segment = tmp_path / name
    segment.write_bytes(os.urandom(1 << 20) * 48)  # long enough to be caught mid-upload
    other = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(4096))
    won: list[bool] = []

    def rival() -> None:
        while not any(".tmp-" in p.name for p in root.rglob(".*")):  # our upload has started
            time.sleep(0.001)
        try:
            with storage.writer(wal_key(name), exclusive=True) as w:
                w.write(other)
            won.append(True)
        except FileExistsError:
            won.append(False)

    thread = threading.Thread(target=rival, daemon=True)
    thread.start()
    try:
        push_wal(storage, segment, name)
        outcome = "stored"
    except WalConflict:
        outcome = "conflict"
    thread.join(timeout=30)
    assert won == [True], "the rival published while the push was in flight"
    assert outcome == "conflict"
    assert storage.get_bytes(wal_key(name)) == other  # the first publisher's bytes stay
    assert not [p for p in root.rglob(".*") if ".tmp-" in p.name]


def test_wal_names_and_positions() -> None:
    assert lsn_to_segment("0/3000028", 1, SEGMENT) == "000000010000000000000003"
    assert lsn_to_segment("1/FF000000", 2, SEGMENT) == "0000000200000001000000FF"
    assert wal_position("wal/000000020000000100000003.zst") == "0000000100000003"
    assert wal_position("wal/00000002.history.zst") is None
    assert wal_key("000000010000000000000003.00000028.backup").startswith("wal/")


def test_wal_push_to_s3_is_idempotent_too(tmp_path: Path, s3_url: str) -> None:  # noqa: F811
    name = "000000010000000000000011"
    segment = tmp_path / name
    segment.write_bytes(os.urandom(1 << 20))
    for _ in range(2):
        pushed = run_cli("wal", "push", str(segment), name, "--storage", s3_url)
        assert pushed.returncode == 0, pushed.stderr
    segment.write_bytes(os.urandom(1 << 20))
    clash = run_cli("wal", "push", str(segment), name, "--storage", s3_url)
    assert clash.returncode == 1 and "refusing to overwrite" in clash.stderr


def test_embedded_server_archives_when_the_setting_says_so(tmp_path: Path, monkeypatch) -> None:
    """The `tidemill up` path: TIDEMILL_WAL_ARCHIVE=true, a root-owned file:// storage."""
    import tempfile

    from core.proc import free_port
    from db.embedded import EmbeddedPostgres

    root = Path(tempfile.mkdtemp(prefix="tidemill-walsetting-"))
    objects = root / "objects"
    monkeypatch.setenv("TIDEMILL_WAL_ARCHIVE", "true")
    monkeypatch.setenv("TIDEMILL_ARCHIVE_TIMEOUT_S", "30")
    monkeypatch.setenv("STORAGE_URL", f"file://{objects}")
    pg = EmbeddedPostgres(root, port=free_port())
    assert pg.archive is not None and pg.archive.timeout_s == 30
    pg.start()
    try:
        import psycopg

        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("SELECT pg_logical_emit_message(false, 't', 'x')")
            row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
        assert row is not None
        name = row[0]
        from core.proc import wait_until

        assert wait_until((objects / wal_key(name)).exists, timeout=60, interval=0.1)
    finally:
        pg.stop()
        import shutil

        shutil.rmtree(root, ignore_errors=True)


from tests.support.s3 import moto_server, s3_url  # noqa: E402,F401
