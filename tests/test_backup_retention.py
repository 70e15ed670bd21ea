"""Retention: the plan is a pure function of (backups, WAL, now); applying it on real file://
storage deletes exactly what it said. Time is a parameter: literal timestamps, no clock."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from core.storage import ObjectInfo, open_storage
from pipelines.backups.logical import CatalogEntry, catalog, stamp
from pipelines.backups.physical import wal_position
from pipelines.backups.retention import RetentionPolicy, plan_retention, run_retention

NOW = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
POLICY = RetentionPolicy()
SEG = 2  # segments per day in these fixtures


def seg(n: int, tli: int = 1) -> str:
    return f"{tli:08X}{n // 256:08X}{n % 256:08X}"


def entry(
    kind: str, age: timedelta, *, wal: int | None = None, parent: str | None = None, ok: bool = True
) -> CatalogEntry:
    started = NOW - age
    folder = f"backups/{kind}/{stamp(started)}"
    manifest = None
    if ok:
        manifest = {
            "kind": kind,
            "started_at": started.isoformat(),
            "data_at": (started + timedelta(minutes=5)).isoformat(),
            "objects": [{"key": f"{folder}/x", "sha256": "0", "size": 1}],
            "parent": parent,
        }
        if wal is not None:
            manifest.update(wal_start=seg(wal), wal_end=seg(wal))
    return CatalogEntry(kind, folder, (f"{folder}/x",), 1, started, manifest)


def wal_objects(days: int) -> list[ObjectInfo]:
    """SEG segments a day for `days` days, oldest first, plus a timeline history file."""
    out = [
        ObjectInfo(f"wal/{seg(i)}.zst", 1, NOW - timedelta(days=days) + timedelta(hours=12 * i))
        for i in range(days * SEG)
    ]
    return [*out, ObjectInfo("wal/00000002.history.zst", 1, NOW - timedelta(days=days))]


def days(n: float) -> timedelta:
    return timedelta(days=n)


def test_fulls_30_days_incrementals_7_days_newest_always_kept() -> None:
    fulls = [entry("full", days(d)) for d in (40, 31, 29, 1)]
    bases = [entry("base", days(d), wal=(40 - d) * SEG) for d in (35, 20, 2)]
    incr_old = entry("incremental", days(8), wal=64, parent=bases[1].folder)
    incr_new = entry("incremental", days(1), wal=78, parent=bases[2].folder)
    orphan = entry("incremental", days(1.5), wal=76, parent="backups/base/gone")
    plan = plan_retention([*fulls, *bases, incr_old, incr_new, orphan], [], now=NOW, policy=POLICY)
    expired = {e.folder for e in plan.expire}
    assert expired == {
        fulls[0].folder,
        fulls[1].folder,
        bases[0].folder,
        incr_old.folder,
        orphan.folder,  # useless without its parent
    }
    # a stalled schedule never prunes the last backup of a kind
    lonely = plan_retention([entry("full", days(90))], [], now=NOW, policy=POLICY)
    assert lonely.expire == [] and len(lonely.keep) == 1


def test_incomplete_backups_never_count_and_are_cleaned_after_a_day() -> None:
    old_good = entry("full", days(45))
    crashed = entry("full", days(2), ok=False)
    running = entry("full", timedelta(hours=1), ok=False)
    plan = plan_retention([old_good, crashed, running], [], now=NOW, policy=POLICY)
    # the newest *complete* full is kept even though it is past 30 days
    assert [e.folder for e in plan.keep] == [old_good.folder]
    assert [e.folder for e in plan.incomplete] == [crashed.folder]


def test_wal_is_kept_7_days_and_as_far_back_as_the_window_anchor_needs() -> None:
    # bases at day -20 (wal 40) and day -5 (wal 50); WAL for 30 days, 2 segments a day
    bases = [entry("base", days(20), wal=20 * SEG), entry("base", days(5), wal=25 * SEG)]
    wal = wal_objects(30)
    plan = plan_retention(bases, wal, now=NOW, policy=POLICY)
    deleted = {wal_position(k) for k in plan.delete_wal}
    # the anchor is the newest base at or before now - 7 d: day -20; WAL from it is kept
    assert plan.wal_kept_from == seg(40)
    assert deleted == {wal_position(f"wal/{seg(i)}.zst") for i in range(40)}
    # .history files are never deleted
    assert all("history" not in k for k in plan.delete_wal)


def test_no_base_backup_means_no_wal_is_deleted() -> None:
    plan = plan_retention([entry("full", days(1))], wal_objects(30), now=NOW, policy=POLICY)
    assert plan.delete_wal == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["full", "base", "incremental"]),
            st.integers(0, 60 * 24),  # age in hours
            st.booleans(),  # complete
        ),
        max_size=12,
    )
)
def test_invariants_hold_for_any_backup_history(specs: list[tuple[str, int, bool]]) -> None:
    entries: list[CatalogEntry] = []
    base_folders: list[str] = []
    for kind, hours, ok in specs:
        age = timedelta(hours=hours, seconds=len(entries))  # distinct folders
        wal = (60 * 24 - hours) // 12
        parent = base_folders[-1] if kind == "incremental" and base_folders else None
        e = entry(kind, age, wal=wal if kind != "full" else None, parent=parent, ok=ok)
        if kind == "base":
            base_folders.append(e.folder)
        entries.append(e)
    wal_list = wal_objects(60)
    plan = plan_retention(entries, wal_list, now=NOW, policy=POLICY)
    kept = {e.folder for e in plan.keep}
    # only complete backups are kept or expired; incomplete ones are never counted
    assert all(e.complete for e in plan.keep + plan.expire)
    for kind in ("full", "base"):
        complete = [e for e in entries if e.kind == kind and e.complete]
        if complete:  # the newest complete backup of each kind survives
            assert max(complete, key=lambda e: e.started_at).folder in kept
    deleted = {wal_position(k) for k in plan.delete_wal}
    for e in plan.keep:
        if e.kind != "full" and e.manifest:
            # no kept base or incremental loses the WAL of its own range
            assert e.manifest["wal_start"][8:] not in deleted
            if e.kind == "incremental":  # nor its parent
                assert e.manifest["parent"] in kept
    for key in plan.delete_wal:  # nothing younger than 7 days is deleted
        info = next(i for i in wal_list if i.key == key)
        assert info.modified is not None and info.modified < NOW - days(7)


def _put_backup(storage, kind: str, started: datetime, *, complete: bool = True) -> str:
    folder = f"backups/{kind}/{stamp(started)}"
    storage.put_bytes(f"{folder}/dump.pgc.zst", b"dump")
    if complete:
        manifest = {
            "kind": kind,
            "started_at": started.isoformat(),
            "data_at": started.isoformat(),
            "objects": [{"key": f"{folder}/dump.pgc.zst", "sha256": "x", "size": 4}],
        }
        storage.put_bytes(f"{folder}/manifest.json", json.dumps(manifest).encode())
    return folder


def _age(root: Path, prefix: str, moment: datetime) -> None:
    for path in (root / prefix).rglob("*"):
        os.utime(path, (moment.timestamp(), moment.timestamp()))


def test_prune_applies_the_plan_on_real_storage(tmp_path: Path, db, sql) -> None:
    import dataclasses

    from core.settings import Settings

    root = tmp_path / "objects"
    url = f"file://{root}"
    settings = dataclasses.replace(Settings.from_env(), database_url=db, storage_url=url)
    storage = open_storage(url, settings=settings)
    old = _put_backup(storage, "full", NOW - days(40))
    new = _put_backup(storage, "full", NOW - days(1))
    crashed = _put_backup(storage, "full", NOW - days(3), complete=False)
    _age(root, crashed, NOW - days(3))
    sql.execute(
        "INSERT INTO backups (kind, status, key, storage_url) VALUES "
        "('full', 'complete', %s, %s), ('full', 'running', %s, %s)",
        (f"{old}/dump.pgc.zst", url, f"{crashed}/dump.pgc.zst", url),
    )
    dry = run_retention(settings, storage=storage, dry_run=True, now=NOW)
    assert [e.folder for e in dry.expire] == [old]
    assert len(catalog(storage)) == 3  # a dry run changes nothing
    run_retention(settings, storage=storage, now=NOW)
    assert [e.folder for e in catalog(storage)] == [new]
    statuses = dict(sql.execute("SELECT key, status FROM backups").fetchall())
    assert statuses == {f"{old}/dump.pgc.zst": "expired", f"{crashed}/dump.pgc.zst": "failed"}


def test_prune_moves_old_fulls_to_glacier_on_s3(s3_url, moto_server, db) -> None:  # noqa: F811
    import dataclasses

    from core.settings import Settings, reset_settings_cache

    reset_settings_cache()
    settings = dataclasses.replace(Settings.from_env(), database_url=db, storage_url=s3_url)
    storage = open_storage(s3_url, settings=settings)
    old = _put_backup(storage, "full", NOW - days(3))
    fresh = _put_backup(storage, "full", NOW - timedelta(hours=2))
    plan = run_retention(settings, storage=storage, now=NOW)
    assert [e.folder for e in plan.to_cold] == [old]
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    client = s3_client(moto_server)
    head_old = client.head_object(Bucket=bucket, Key=f"{prefix}/{old}/dump.pgc.zst")
    head_new = client.head_object(Bucket=bucket, Key=f"{prefix}/{fresh}/dump.pgc.zst")
    assert head_old.get("StorageClass") == "GLACIER"
    assert head_new.get("StorageClass", "STANDARD") == "STANDARD"
    # recorded in the manifest, so the next prune does not copy it again
    assert run_retention(settings, storage=storage, now=NOW).to_cold == []


def test_cli_base_backup_then_prune_dry_run(db, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    env = {**os.environ, "STORAGE_URL": f"file://{tmp_path / 'objects'}"}
    base = run_cli("backup", "base", env=env, timeout=120)
    assert base.returncode == 0, base.stderr
    assert "backups/base/" in base.stdout and "WAL from 0000000" in base.stdout
    dry = run_cli("backup", "prune", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "keep 1 backup(s)" in dry.stdout and "WAL kept from segment 0000000" in dry.stdout
    assert "(dry run: nothing changed)" in dry.stdout


from tests.support.s3 import moto_server, s3_client, s3_url  # noqa: E402,F401


def test_prune_sweeps_crashed_uploads_and_marks_interrupted_backups(
    tmp_path: Path, db, sql
) -> None:
    import dataclasses

    from core.settings import Settings

    root = tmp_path / "objects"
    url = f"file://{root}"
    settings = dataclasses.replace(Settings.from_env(), database_url=db, storage_url=url)
    storage = open_storage(url, settings=settings)
    kept = _put_backup(storage, "full", NOW - days(1))
    # what a crashed upload leaves: a temp file beside the object, invisible to list()
    crashed_tmp = root / "backups/full/x" / ".dump.pgc.zst.tmp-abc123"
    crashed_tmp.parent.mkdir(parents=True)
    crashed_tmp.write_bytes(b"z" * 4096)
    two_days_ago = datetime.now(UTC).timestamp() - 2 * 86400
    os.utime(crashed_tmp, (two_days_ago, two_days_ago))
    live_tmp = root / "wal" / ".000000010000000000000001.zst.tmp-live"
    live_tmp.parent.mkdir(parents=True, exist_ok=True)
    live_tmp.write_bytes(b"w")
    # catalogue rows whose process died: 'running' for days; a fresh one is left alone
    sql.execute(
        "INSERT INTO backups (kind, status, key, storage_url, started_at) VALUES "
        "('full', 'running', 'backups/full/x/dump.pgc.zst', %s, %s), "
        "('base', 'running', 'backups/base/y/base.tar.zst', %s, %s)",
        (url, NOW - days(2), url, NOW - timedelta(hours=2)),
    )
    dry = run_retention(settings, storage=storage, dry_run=True, now=NOW)
    assert dry.swept_uploads == 0 and crashed_tmp.exists()
    plan = run_retention(settings, storage=storage, now=NOW)
    assert plan.swept_uploads == 1 and plan.interrupted == 1
    assert "removed 1 abandoned upload(s)" in plan.describe()
    assert not crashed_tmp.exists() and live_tmp.exists()
    assert [e.folder for e in catalog(storage)] == [kept]
    rows = dict(
        (key, (status, error))
        for key, status, error in sql.execute("SELECT key, status, error FROM backups").fetchall()
    )
    assert rows["backups/full/x/dump.pgc.zst"] == ("failed", "interrupted")
    assert rows["backups/base/y/base.tar.zst"] == ("running", None)


def test_full_retention_follows_the_served_apps_profile_unless_set() -> None:
    """SaltBitter's seed keeps daily backups 7 days, the others 30; the setting overrides."""
    from core.settings import Settings

    base = {
        "DATABASE_URL": "postgresql://u@127.0.0.1:5432/d",
        "REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    fulls = [entry("full", days(d)) for d in (0.5, 10, 20)]

    def expired(environ: dict[str, str]) -> list[float]:
        policy = RetentionPolicy.from_settings(Settings.from_env({**base, **environ}))
        plan = plan_retention(fulls, [], now=NOW, policy=policy)
        return sorted(round((NOW - e.started_at).total_seconds() / 86400, 1) for e in plan.expire)

    assert expired({"TIDEMILL_APP": "saltbitter"}) == [10, 20]
    assert expired({"TIDEMILL_APP": "bilten"}) == []
    assert expired({"TIDEMILL_APP": "lovendo"}) == []
    over = {"TIDEMILL_APP": "saltbitter", "TIDEMILL_BACKUP_FULL_RETENTION_DAYS": "15"}
    assert expired(over) == [20]
