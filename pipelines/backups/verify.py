"""`tidemill backup verify`: every backup object against its manifest, and the WAL chain.

What pgBackRest's ``verify`` and WAL-G's ``wal-verify`` check, for our layout:

- each complete backup: every object its manifest names exists, has the recorded size and
  sha256. The sha256 is of the *stored* bytes (ciphertext when encryption is on), so this
  reads each object once and decrypts nothing;
- each archived WAL object: decrypted (GCM tags) and decompressed once, its content checked
  against the sha256 and size its push recorded in the trailer;
- the chain: from each base backup's first WAL segment to the newest segment of its timeline
  (the newest archived, or the archive head's record of the newest *pushed*, whichever is
  later), every segment must be there; a gap makes every later point unreachable.

Each damaged or missing object is named; nothing is repaired or deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from core.log import get_logger
from core.storage import ObjectInfo, Storage
from pipelines.backups.logical import CatalogEntry, catalog, record_finish
from pipelines.backups.physical import (
    HEAD_KEY,
    WAL_PREFIX,
    WalCorrupt,
    read_head,
    read_wal_object,
)

log = get_logger(__name__)

# A folder without a manifest this old is a crashed backup, not one still running.
INCOMPLETE_GRACE = timedelta(hours=6)
_COLD = ("GLACIER", "DEEP_ARCHIVE")


@dataclass(frozen=True)
class Problem:
    key: str
    what: str

    def line(self) -> str:
        return f"{self.key}: {self.what}"


@dataclass
class VerifyReport:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    backups_checked: int = 0
    objects_checked: int = 0
    wal_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        verdict = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        return (
            f"verify: {verdict}: {self.backups_checked} backup(s), {self.objects_checked} "
            f"object(s), {self.wal_checked} WAL file(s) checked"
        )

    def describe(self) -> list[str]:
        return [p.line() for p in self.problems] + [f"note: {n}" for n in self.notes]


def _segno(name: str, per_log: int) -> int:
    return int(name[8:16], 16) * per_log + int(name[16:24], 16)


def _name(timeline: str, no: int, per_log: int) -> str:
    return f"{timeline}{no // per_log:08X}{no % per_log:08X}"


def check_backup(storage: Storage, entry: CatalogEntry, report: VerifyReport) -> None:
    assert entry.manifest is not None
    report.backups_checked += 1
    for obj in entry.manifest["objects"]:
        key = obj["key"]
        report.objects_checked += 1
        if obj.get("storage_class") in _COLD:
            report.notes.append(f"{key}: in {obj['storage_class']}, not readable to verify")
            continue
        try:
            info = storage.stat(key)
        except FileNotFoundError:
            report.problems.append(Problem(key, f"missing (named by {entry.folder} manifest)"))
            continue
        if "size" in obj and info.size != int(obj["size"]):
            report.problems.append(
                Problem(key, f"size {info.size} bytes, the manifest says {obj['size']}")
            )
            continue
        try:
            actual = storage.sha256(key)
        except FileNotFoundError:
            report.problems.append(Problem(key, "missing (deleted while verifying)"))
            continue
        if actual != obj["sha256"]:
            report.problems.append(
                Problem(
                    key,
                    f"sha256 {actual[:16]}… differs from the manifest's "
                    f"{obj['sha256'][:16]}… (damaged)",
                )
            )


def verify_storage(
    storage: Storage,
    *,
    now: datetime | None = None,
    check_wal: bool = True,
    database_url: str | None = None,
) -> VerifyReport:
    """Check every backup and (``check_wal``) the WAL archive; never raises for damage.
    With ``database_url``, backups whose objects all check out get ``verified_at`` in the
    catalogue (what `backup list` and the dashboard show)."""
    now = now or datetime.now(UTC)
    report = VerifyReport()
    entries = catalog(storage)
    for entry in entries:
        if entry.complete:
            before = len(report.problems)
            check_backup(storage, entry, report)
            backup_id = entry.manifest.get("backup_id") if entry.manifest else None
            if database_url and backup_id is not None and len(report.problems) == before:
                record_finish(database_url, backup_id, verified_at=now)
        elif entry.modified is not None and now - entry.modified < INCOMPLETE_GRACE:
            report.notes.append(f"{entry.folder}: no manifest yet (running?)")
        else:
            report.problems.append(
                Problem(entry.folder, "no manifest: an incomplete backup, not restorable")
            )
    if check_wal:
        check_wal_archive(storage, entries, report)
    for problem in report.problems:
        log.error("backup_verify_problem", key=problem.key, problem=problem.what)
    log.info(
        "backup_verify_done",
        ok=report.ok,
        problems=len(report.problems),
        backups=report.backups_checked,
        wal=report.wal_checked,
    )
    return report


def check_wal_archive(storage: Storage, entries: list[CatalogEntry], report: VerifyReport) -> None:
    wal: list[ObjectInfo] = [i for i in storage.list(WAL_PREFIX) if i.key != HEAD_KEY]
    present: dict[str, set[str]] = {}  # timeline -> segment names present
    for info in wal:
        report.wal_checked += 1
        try:
            read_wal_object(storage, info.key)
        except WalCorrupt as exc:
            report.problems.append(Problem(info.key, _strip_key(str(exc), info.key)))
        except FileNotFoundError:
            report.problems.append(Problem(info.key, "missing (deleted while verifying)"))
        name = info.key.removeprefix(WAL_PREFIX).removesuffix(".zst")
        if len(name) == 24:
            present.setdefault(name[:8], set()).add(name)
    try:
        head = read_head(storage)
    except WalCorrupt as exc:
        report.problems.append(Problem(HEAD_KEY, str(exc)))
        head = {}
    missing: dict[str, str] = {}  # segment -> the first backup that needs it
    for entry in entries:
        manifest = entry.manifest
        if manifest is None or entry.kind not in ("base", "incremental"):
            continue
        start = manifest.get("wal_start")
        if not start:
            continue
        per_log = 0x100000000 // int(manifest.get("wal_segment_size") or 16 * 1024 * 1024)
        timeline = start[:8]
        names = present.get(timeline, set())
        candidates = [n for n in names] + [head.get(timeline, {}).get("last", start)]
        newest = max(_segno(n, per_log) for n in candidates)
        for no in range(_segno(start, per_log), newest + 1):
            name = _name(timeline, no, per_log)
            if name not in names:
                missing.setdefault(name, entry.folder)
    for name, folder in sorted(missing.items()):
        report.problems.append(
            Problem(f"{WAL_PREFIX}{name}.zst", f"missing: a gap in the WAL chain of {folder}")
        )


def _strip_key(message: str, key: str) -> str:
    return message.removeprefix(f"{key} ").removeprefix(f"{key}: ")
