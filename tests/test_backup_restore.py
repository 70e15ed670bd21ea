"""`tidemill restore --logical`: a database with roles, owners, grants, functions, triggers and
a materialized view comes back equal (per-table checksums and catalog definitions), after
the database *and its roles* are gone; encrypted backups restore, a wrong key fails clearly,
and the drill compares contents."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql as pgsql

from core.envelope import MAGIC
from core.settings import Settings
from core.storage import open_storage
from pipelines.backups.drill import run_drill
from pipelines.backups.logical import catalog, run_full_backup, table_checksums
from tests.conftest import run_cli
from tests.support import lifecycle as _lifecycle
from tests.support import s3 as _s3

pytestmark = pytest.mark.slow
file_storage = _lifecycle.file_storage  # fixtures, registered by assignment
moto_server = _s3.moto_server
s3_url = _s3.s3_url

SCHEMA = """
CREATE SCHEMA app AUTHORIZATION {owner};
SET ROLE {owner};
CREATE TYPE app.mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN app.positive AS int CHECK (VALUE > 0);
CREATE TABLE app.items (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL, mood app.mood, qty app.positive, price numeric(12, 2),
    blob bytea, at timestamptz DEFAULT now(), tags text[], doc jsonb, touched int DEFAULT 0
);
CREATE TABLE app.audit (id serial PRIMARY KEY, item_id bigint, what text);
CREATE FUNCTION app.touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.touched := NEW.touched + 1;
  INSERT INTO app.audit (item_id, what) VALUES (NEW.id, TG_OP);
  RETURN NEW;
END $$;
CREATE TRIGGER items_touch BEFORE UPDATE ON app.items FOR EACH ROW EXECUTE FUNCTION app.touch();
CREATE FUNCTION app.total(m app.mood) RETURNS numeric LANGUAGE sql STABLE
  AS $$ SELECT coalesce(sum(price * qty), 0) FROM app.items WHERE mood = m $$;
CREATE VIEW app.cheap AS SELECT id, name FROM app.items WHERE price < 10;
CREATE MATERIALIZED VIEW app.by_mood AS
  SELECT mood, count(*) AS n, sum(price) AS total FROM app.items GROUP BY mood;
CREATE INDEX items_name ON app.items (lower(name));
INSERT INTO app.items (name, mood, qty, price, blob, tags, doc)
  SELECT 'item ' || g, (ARRAY['sad','ok','happy'])[1 + g % 3]::app.mood, 1 + g % 7,
         (g % 1000) / 7.0, decode(md5(g::text), 'hex'), ARRAY['t' || g % 5, 'x'],
         jsonb_build_object('g', g, 'f', g / 3.0)
  FROM generate_series(1, 3000) g;
UPDATE app.items SET name = name || '!' WHERE id % 10 = 0;
REFRESH MATERIALIZED VIEW app.by_mood;
RESET ROLE;
REVOKE ALL ON SCHEMA app FROM PUBLIC;
GRANT USAGE ON SCHEMA app TO {reader};
GRANT SELECT ON app.items, app.cheap, app.by_mood TO {reader};
GRANT EXECUTE ON FUNCTION app.total(app.mood) TO {reader};
REVOKE EXECUTE ON FUNCTION app.total(app.mood) FROM PUBLIC;
"""

CATALOG = {
    "relations": """SELECT c.relname, c.relkind, pg_get_userbyid(c.relowner), c.relacl::text
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'app' ORDER BY 1""",
    "functions": """SELECT p.proname, pg_get_functiondef(p.oid), pg_get_userbyid(p.proowner),
        p.proacl::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'app' ORDER BY 1""",
    "triggers": """SELECT tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t
        JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'app' AND NOT tgisinternal ORDER BY 1""",
    "views": """SELECT c.relname, pg_get_viewdef(c.oid) FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'app' AND c.relkind IN ('v', 'm') ORDER BY 1""",
    "indexes": """SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'app'
        ORDER BY 1""",
    "schema": """SELECT nspname, pg_get_userbyid(nspowner), nspacl::text FROM pg_namespace
        WHERE nspname = 'app'""",
    "types": """SELECT t.typname, t.typtype, pg_get_userbyid(t.typowner) FROM pg_type t
        JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = 'app' AND t.typtype IN ('e', 'd') ORDER BY 1""",
}


def _url(server: str, database: str) -> str:
    return urlsplit(server)._replace(path=f"/{database}").geturl()


def snapshot(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        catalog_rows = {k: conn.execute(q).fetchall() for k, q in CATALOG.items()}
        conn.rollback()
        sums = table_checksums(conn)
        conn.rollback()
        matview = conn.execute("SELECT * FROM app.by_mood ORDER BY mood").fetchall()
    return {"catalog": catalog_rows, "sums": sums, "matview": matview}


@dataclasses.dataclass
class Source:
    server: str  # admin URL (the suite's database)
    name: str
    owner: str
    reader: str
    url: str


@pytest.fixture
def source(db: str) -> Iterator[Source]:
    tag = secrets.token_hex(3)
    src = Source(
        db, f"shop_{tag}", f"shop_owner_{tag}", f"shop_reader_{tag}", _url(db, f"shop_{tag}")
    )
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE ROLE {} LOGIN").format(pgsql.Identifier(src.owner)))
        conn.execute(pgsql.SQL("CREATE ROLE {} NOLOGIN").format(pgsql.Identifier(src.reader)))
        conn.execute(
            pgsql.SQL("CREATE DATABASE {} OWNER {}").format(
                pgsql.Identifier(src.name), pgsql.Identifier(src.owner)
            )
        )
    with psycopg.connect(src.url, autocommit=True) as conn:
        conn.execute(SCHEMA.format(owner=src.owner, reader=src.reader))
    yield src
    with psycopg.connect(db, autocommit=True) as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"%{tag}%",)
            ).fetchall()
        ]
        for name in names:
            conn.execute(
                pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name))
            )
        for role in (src.reader, src.owner):
            conn.execute(pgsql.SQL("DROP ROLE IF EXISTS {}").format(pgsql.Identifier(role)))


def _drop_database_and_roles(src: Source) -> None:
    with psycopg.connect(src.server, autocommit=True) as conn:
        conn.execute(pgsql.SQL("DROP DATABASE {} WITH (FORCE)").format(pgsql.Identifier(src.name)))
        for role in (src.reader, src.owner):
            conn.execute(pgsql.SQL("DROP ROLE {}").format(pgsql.Identifier(role)))


def test_logical_restore_keeps_roles_owners_grants_and_contents(
    source: Source, db: str, tmp_path: Path
) -> None:
    store_url = f"file://{tmp_path / 'objects'}"
    settings = dataclasses.replace(
        Settings.from_env(), database_url=source.url, storage_url=store_url
    )
    before = snapshot(source.url)
    assert before["sums"]["app.items"]["rows"] == 3000
    # Given a logical backup of the database
    result = run_full_backup(settings)
    # (checksums cover ~1 in 16 rows by primary key unless TIDEMILL_BACKUP_CHECKSUM_SAMPLE=1)
    assert result.manifest["checksum_sample"] == settings.backup_checksum_sample == 16
    with psycopg.connect(source.url) as conn:
        sampled = table_checksums(conn, sample=16)
    assert result.manifest["checksums"] == {t: c["sum"] for t, c in sampled.items()}
    assert sampled["app.items"]["sum"] != before["sums"]["app.items"]["sum"]
    # When the database and its roles are gone
    _drop_database_and_roles(source)
    # Then `tidemill restore --logical -j 2` brings it back under its own name
    env = {**os.environ, "DATABASE_URL": db, "STORAGE_URL": store_url}
    done = run_cli(
        "restore", "--logical", "--database", source.name, "--jobs", "2", env=env, timeout=180
    )
    assert done.returncode == 0, done.stderr
    after = snapshot(source.url)
    assert after["catalog"] == before["catalog"]  # owners, grants, definitions
    assert after["sums"] == before["sums"]  # every row of every table
    assert after["matview"] == before["matview"]
    with psycopg.connect(db) as conn:
        owner = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (source.name,)
        ).fetchone()
    assert owner == (source.owner,)
    # the trigger still works, as its owner
    with psycopg.connect(source.url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("SET ROLE {}").format(pgsql.Identifier(source.owner)))
        conn.execute("UPDATE app.items SET price = price + 1 WHERE id = 1")
        row = conn.execute("SELECT touched FROM app.items WHERE id = 1").fetchone()
    assert row == (1,)

    # An existing database is refused without --replace, and kept
    again = run_cli("restore", "--logical", "--database", source.name, env=env, timeout=180)
    assert again.returncode == 1 and "--replace" in again.stderr
    replaced = run_cli(
        "restore", "--logical", "--database", source.name, "--replace", env=env, timeout=180
    )
    assert replaced.returncode == 0, replaced.stderr
    assert snapshot(source.url) == before  # the trigger's effect is gone: the backup's state

    # And the drill compares contents: equal checksums pass and are recorded
    drill = run_drill(dataclasses.replace(settings, database_url=db), ref=result.folder)
    assert drill.status == "passed", drill.error
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "SELECT checksums, verify_problems FROM backup_drills WHERE id = %s",
            (drill.drill_id,),
        ).fetchone()
    assert row is not None and row[0] == result.manifest["checksums"]
    assert row[1] == []
    # a manifest whose checksum disagrees with what the dump restores fails the drill
    storage = open_storage(store_url, settings=settings)
    manifest_key = f"{result.folder}/manifest.json"
    manifest = json.loads(storage.get_bytes(manifest_key))
    manifest["checksums"]["app.audit"] = "12345"
    storage.put_bytes(manifest_key, json.dumps(manifest).encode())
    bad = run_drill(dataclasses.replace(settings, database_url=db), ref=result.folder)
    assert bad.status == "failed" and "contents differ" in (bad.error or "")
    assert "app.audit" in bad.mismatches


def test_encrypted_backup_restores_and_a_wrong_key_fails_clearly(
    source: Source, db: str, tmp_path: Path
) -> None:
    old_key = base64.b64encode(os.urandom(32)).decode()
    new_key = base64.b64encode(os.urandom(32)).decode()
    store_url = f"file://{tmp_path / 'objects'}"
    env = {**os.environ, "DATABASE_URL": source.url, "STORAGE_URL": store_url}
    # Given a backup taken with encryption on
    done = run_cli("backup", "full", env={**env, "TIDEMILL_ENCRYPTION_KEY": old_key})
    assert done.returncode == 0, done.stderr
    settings = dataclasses.replace(
        Settings.from_env(), database_url=source.url, storage_url=store_url, encryption_key=old_key
    )
    (entry,) = catalog(open_storage(settings=settings))
    assert entry.manifest is not None and entry.manifest["encryption"]["cipher"] == "AES-256-GCM"
    for obj in entry.manifest["objects"]:  # every object is ciphertext at rest
        assert (tmp_path / "objects" / obj["key"]).read_bytes()[:6] == MAGIC
    dump = (tmp_path / "objects" / entry.manifest["objects"][0]["key"]).read_bytes()
    assert b"PGDMP" not in dump and b"shop" not in dump
    # and verify checks the stored ciphertext against the manifest
    verified = run_cli("backup", "verify", env={**env, "TIDEMILL_ENCRYPTION_KEY": old_key})
    assert verified.returncode == 0, verified.stdout + verified.stderr
    target = f"{source.name}_copy"
    restore_env = {**env, "DATABASE_URL": db}
    # When it is restored with a wrong key: one clear line, exit 1, no database left behind
    wrong = run_cli(
        "restore", "--logical", "--database", target,
        env={**restore_env, "TIDEMILL_ENCRYPTION_KEY": new_key},
    )  # fmt: skip
    assert wrong.returncode == 1
    assert "not configured" in wrong.stderr and "Traceback" not in wrong.stderr
    # without any key
    nokey = run_cli("restore", "--logical", "--database", target, env=restore_env)
    assert nokey.returncode == 1 and "TIDEMILL_ENCRYPTION_KEY" in nokey.stderr
    # Then after a key rotation (new key current, old key kept for reading) it restores
    rotated = {
        **restore_env,
        "TIDEMILL_ENCRYPTION_KEY": new_key,
        "TIDEMILL_ENCRYPTION_OLD_KEYS": old_key,
    }
    ok = run_cli("restore", "--logical", "--database", target, "-j", "2", env=rotated)
    assert ok.returncode == 0, ok.stderr
    assert snapshot(_url(db, target))["sums"] == snapshot(source.url)["sums"]


def test_encrypted_archive_object_restores_and_a_flipped_byte_is_one_clear_line(
    sql: Any, file_storage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Encryption at rest covers archives too (they go through the same storage layer); a
    damaged object is refused on its checksum before a byte is parsed."""
    from core.settings import reset_settings_cache
    from pipelines.lifecycle.engine import run_pipeline
    from tests.support.lifecycle import add_messages, make_conversation, make_user

    monkeypatch.setenv("TIDEMILL_ENCRYPTION_KEY", base64.b64encode(os.urandom(32)).decode())
    reset_settings_cache()
    now = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
    a, b = make_user(sql), make_user(sql)
    conv = make_conversation(sql, [a, b])
    add_messages(sql, conversation=conv, sender=a, n=10, start=now - timedelta(days=3 * 365))
    run_pipeline("messages-archive", now=now)
    key = sql.execute("SELECT key FROM archive_objects").fetchone()[0]
    path = Path(file_storage.removeprefix("file://")) / key
    assert path.read_bytes()[:6] == MAGIC
    assert sql.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    intact = path.read_bytes()
    damaged = bytearray(intact)
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    bad = run_cli("archive", "restore", key)
    assert bad.returncode == 1
    assert "differs from the recorded" in bad.stderr and "Traceback" not in bad.stderr
    assert len([ln for ln in bad.stderr.splitlines() if "error" in ln.lower()]) <= 2
    path.write_bytes(intact)
    good = run_cli("archive", "restore", key)
    assert good.returncode == 0, good.stderr
    assert sql.execute("SELECT count(*) FROM messages").fetchone()[0] == 10


def test_s3_server_side_encryption_on_top_of_client_side(s3_url: str, moto_server: str) -> None:
    """TIDEMILL_S3_SSE is sent on single puts and multipart uploads; the stored bytes are
    ciphertext either way; damage is refused on read."""
    from core.envelope import EnvelopeError
    from tests.support.s3 import s3_client

    settings = dataclasses.replace(
        Settings.from_env(),
        storage_url=s3_url,
        s3_sse="AES256",
        encryption_key=base64.b64encode(os.urandom(32)).decode(),
    )
    storage = open_storage(settings=settings)
    small, large = b"small" * 100, os.urandom(9 * 1024 * 1024)  # one PUT; two parts
    storage.put_bytes("t/small", small)
    storage.put_bytes("t/large", large)
    client = s3_client(moto_server)
    bucket, prefix = s3_url.removeprefix("s3://").split("/", 1)
    for name, plain in (("small", small), ("large", large)):
        head = client.head_object(Bucket=bucket, Key=f"{prefix}/t/{name}")
        assert head["ServerSideEncryption"] == "AES256"
        stored = client.get_object(Bucket=bucket, Key=f"{prefix}/t/{name}")["Body"].read()
        assert stored[:6] == MAGIC and plain[:64] not in stored
        assert storage.get_bytes(f"t/{name}") == plain
    # a flipped byte in the middle of the large object fails authentication
    stored = bytearray(client.get_object(Bucket=bucket, Key=f"{prefix}/t/large")["Body"].read())
    stored[len(stored) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=f"{prefix}/t/large", Body=bytes(stored))
    with pytest.raises(EnvelopeError, match="fails authentication"):
        storage.get_bytes("t/large")
    with pytest.raises(Exception, match="AES256 or aws:kms"):
        open_storage(settings=dataclasses.replace(settings, s3_sse="rot13"))
