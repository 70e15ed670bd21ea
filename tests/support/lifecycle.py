"""Fixtures and data builders for the lifecycle tests (pipelines, archive, partitions, GDPR).

Import into a test module: ``from tests.support.lifecycle import file_storage``.
Rows are made with ``INSERT … SELECT generate_series`` so thousands cost milliseconds.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def file_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """STORAGE_URL=file://<tmp>/objects for this test; yields the URL."""
    from core.settings import reset_settings_cache

    url = f"file://{tmp_path / 'objects'}"
    monkeypatch.setenv("STORAGE_URL", url)
    reset_settings_cache()
    yield url
    reset_settings_cache()


def use_storage(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    from core.settings import reset_settings_cache

    monkeypatch.setenv("STORAGE_URL", url)
    reset_settings_cache()


def make_user(sql: Any, *, email: str | None = None, **cols: Any) -> uuid.UUID:
    email = email or f"u{uuid.uuid4().hex[:10]}@example.com"
    names = ["email", *cols]
    values = [email, *cols.values()]
    row = sql.execute(
        f"INSERT INTO users ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))}) "
        "RETURNING id",
        values,
    ).fetchone()
    return uuid.UUID(str(row[0]))


def make_conversation(sql: Any, participants: list[uuid.UUID]) -> uuid.UUID:
    row = sql.execute(
        "INSERT INTO conversations (participant_ids) VALUES (%s) RETURNING id", (participants,)
    ).fetchone()
    return uuid.UUID(str(row[0]))


def add_messages(
    sql: Any,
    *,
    conversation: uuid.UUID,
    sender: uuid.UUID,
    n: int,
    start: datetime,
    step: str = "1 minute",
    content: str = "hello",
) -> None:
    sql.execute(
        "INSERT INTO messages (conversation_id, sender_id, content, metadata, created_at) "
        "SELECT %s, %s, %s || ' ' || g, jsonb_build_object('n', g, 'quote', 'a \"q\", b\\c'), "
        "%s + (g * %s::interval) FROM generate_series(1, %s) g",
        (conversation, sender, content, start, step, n),
    )


def add_notifications(
    sql: Any, *, user: uuid.UUID, n: int, start: datetime, step: str = "1 minute"
) -> None:
    sql.execute(
        "INSERT INTO notifications (user_id, type, title, body, data, created_at) "
        "SELECT %s, 'message', 'New message ' || g, 'body', jsonb_build_object('n', g), "
        "%s + (g * %s::interval) FROM generate_series(1, %s) g",
        (user, start, step, n),
    )


def table_rows(sql: Any, table: str, order: str = "id") -> list[tuple[Any, ...]]:
    return [tuple(r) for r in sql.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()]


def read_archive(url: str, key: str) -> bytes:
    """The decompressed bytes of an archived object."""
    import zstandard

    from core.storage import open_storage

    raw = open_storage(url).get_bytes(key)
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()


def archived_ids(url: str, prefix: str) -> list[str]:
    """Every row id found in archived objects under ``prefix`` (CSV with header or JSONL)."""
    import csv
    import json

    from core.storage import open_storage

    ids: list[str] = []
    for info in open_storage(url).list(prefix):
        if not info.key.endswith(".zst"):
            continue
        text = read_archive(url, info.key).decode()
        if info.key.endswith(".jsonl.zst"):
            ids += [json.loads(line)["id"] for line in text.splitlines() if line]
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
            ids += [r["id"] for r in rows]
    return ids


def stored_texts(url: str, *, skip_prefixes: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every object in storage, decompressed when it is zstd (archives, backups): key -> bytes."""
    import zstandard

    from core.storage import open_storage

    storage = open_storage(url)
    out: dict[str, bytes] = {}
    for info in storage.list(""):
        if info.key.startswith(skip_prefixes):
            continue
        raw = storage.get_bytes(info.key)
        if info.key.endswith(".zst"):
            raw = (
                zstandard.ZstdDecompressor()
                .stream_reader(io.BytesIO(raw), read_across_frames=True)
                .read()
            )
        out[info.key] = raw
    return out


def scan_storage(url: str, needles: list[str], **kwargs: Any) -> list[str]:
    """Which stored objects (decompressed) hold which needle, case-insensitive."""
    found = []
    for key, data in stored_texts(url, **kwargs).items():
        low = data.lower()
        found += [f"{key} holds {n!r}" for n in needles if n.lower().encode() in low]
    return found


def db_fingerprint(sql: Any) -> dict[str, str]:
    """Every table's rows (md5 of their text, in a stable order) and every sequence's
    position: equal fingerprints mean nothing in the database changed."""
    tables = sql.execute(
        "SELECT schemaname, tablename FROM pg_tables "
        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
    ).fetchall()
    out = {}
    for schema, table in tables:
        row = sql.execute(
            f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) "
            f'FROM "{schema}"."{table}" t'
        ).fetchone()
        out[f"{schema}.{table}"] = f"{row[0]}:{row[1]}"
    for schema, name, last in sql.execute(
        "SELECT schemaname, sequencename, last_value FROM pg_sequences ORDER BY 1, 2"
    ).fetchall():
        out[f"seq {schema}.{name}"] = str(last)
    return out
