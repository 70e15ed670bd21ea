"""tidemill.enqueue: any language enqueues a job inside its own transaction (issue 14).

The Node test drives a real Node 20 process with `pg` from npm: a transaction that commits and
one that rolls back each enqueue a job; exactly the committed one runs on a real worker.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import actors  # noqa: F401  (declares write_row, the job the app enqueues)
from workers.broker import broker
from workers.outbox import drain

NODE_DIR = Path(__file__).resolve().parent / "node"


def node_client() -> Path:
    """tests/node with `pg` installed (npm install once, when node_modules is missing)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm are not installed: the TypeScript client path cannot be run")
    if not (NODE_DIR / "node_modules" / "pg").is_dir():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
            capture_output=True,
        )
    return NODE_DIR


def run_node(db_url: str, mode: str, actor: str, args: Any, queue: str) -> dict[str, Any]:
    out = subprocess.run(
        ["node", "enqueue.mjs", mode, actor, json.dumps(args), queue],
        cwd=node_client(),
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def one(conn: Any, query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def probes(sql: Any, prefix: str) -> list[str]:
    return [
        r[0]
        for r in sql.execute(
            "SELECT entity_id FROM audit_logs WHERE action = 'test' AND entity_id LIKE %s "
            "ORDER BY entity_id",
            (prefix + "%",),
        ).fetchall()
    ]


@pytest.mark.slow
def test_node_enqueue_in_committed_transaction_runs_rolled_back_does_not(
    inproc_worker: Any, sql: Any, db: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    # Given an app that enqueues from its own transactions, one committed, one rolled back
    committed = run_node(db, "commit", "write_row", [f"{tag}-committed"], "tests")
    rolled = run_node(db, "rollback", "write_row", [f"{tag}-rolled-back"], "tests")
    # Then the outbox holds only the committed job (the rolled-back id was never visible)
    rows = sql.execute("SELECT id, actor, args, queue_name FROM outbox ORDER BY id").fetchall()
    assert [(str(r[0]), r[1], r[2], r[3]) for r in rows] == [
        (committed["outbox_id"], "write_row", [f"{tag}-committed"], "tests")
    ]
    assert rolled["outbox_id"] != committed["outbox_id"]
    # When the relay and a real worker run
    assert drain(broker, batch=10) == 1
    broker.join("tests", timeout=30_000)
    inproc_worker.join()
    # Then exactly the committed job ran, once
    assert probes(sql, tag) == [f"{tag}-committed"]
    assert drain(broker, batch=10) == 0


def test_enqueue_object_args_become_keyword_args(sql: Any, inproc_worker: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    oid = sql.execute(
        "SELECT tidemill.enqueue('write_row', %s::jsonb, 'tests')", (json.dumps({"key": tag}),)
    ).fetchone()[0]
    row = sql.execute("SELECT args, kwargs FROM outbox WHERE id = %s", (oid,)).fetchone()
    assert row == ([], {"key": tag})
    assert drain(broker, batch=10) == 1
    broker.join("tests", timeout=30_000)
    inproc_worker.join()
    assert probes(sql, tag) == [tag]


@pytest.mark.parametrize(
    ("actor", "args", "queue"),
    [
        ("write_row; DROP TABLE users", "[]", "tests"),
        ("", "[]", "tests"),
        (None, "[]", "tests"),
        ("write_row", '"a string"', "tests"),
        ("write_row", "42", "tests"),
        ("write_row", "[]", "bad queue name"),
        ("x" * 200, "[]", "tests"),
    ],
)
def test_enqueue_refuses_bad_input_with_a_clear_error(
    sql: Any, actor: str | None, args: str, queue: str
) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"tidemill\.enqueue"):
        sql.execute("SELECT tidemill.enqueue(%s, %s::jsonb, %s)", (actor, args, queue))
    assert sql.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0


def test_app_session_without_tidemill_on_its_search_path_still_feeds_the_outbox(
    sql: Any,
) -> None:
    """An app's own role keeps search_path = public; tidemill's trigger functions carry theirs."""
    sql.execute("SET search_path = public")
    sql.execute("INSERT INTO users (email, full_name) VALUES ('app@example.com', 'App')")
    sql.execute("SELECT tidemill.enqueue('write_row', '[\"x\"]', 'tests')")
    actors_seen = [r[0] for r in sql.execute("SELECT actor FROM tidemill.outbox")]
    assert sorted(actors_seen) == ["invalidate", "send_welcome_email", "write_row"]
    with pytest.raises(psycopg.errors.UndefinedTable):
        sql.execute("SELECT 1 FROM outbox")  # the app really does not see tidemill's tables


def test_tidemill_sessions_resolve_their_tables_through_the_role_search_path(db: str) -> None:
    with psycopg.connect(db) as conn:
        path = one(conn, "SHOW search_path")
        where = one(
            conn,
            "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.oid = 'outbox'::regclass",
        )
    assert path.split(", ")[:2] == ["public", "tidemill"]
    assert where == "tidemill"


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(args=_json, actor=st.text(max_size=40), queue=st.text(max_size=20))
def test_enqueue_stores_exactly_what_it_accepts_or_refuses_cleanly(
    sql: Any, args: Any, actor: str, queue: str
) -> None:
    """Whatever an app passes: either the row holds exactly those arguments, or the call fails
    with invalid_parameter_value and leaves nothing."""
    before = one(sql, "SELECT count(*) FROM outbox")
    try:
        with sql.transaction():
            oid = sql.execute(
                "SELECT tidemill.enqueue(%s, %s::jsonb, %s)",
                (actor.replace("\x00", ""), json.dumps(args), queue.replace("\x00", "")),
            ).fetchone()[0]
    except (psycopg.errors.InvalidParameterValue, psycopg.errors.UntranslatableCharacter):
        # (jsonb itself refuses \u0000 before enqueue sees it)
        assert one(sql, "SELECT count(*) FROM outbox") == before
        return
    row = sql.execute("SELECT actor, queue_name, args, kwargs FROM outbox WHERE id = %s", (oid,))
    stored = row.fetchone()
    assert stored is not None
    assert stored[0] == actor and stored[1] == queue
    if isinstance(args, dict):
        assert (stored[2], stored[3]) == ([], args)
    else:
        assert isinstance(args, list) and (stored[2], stored[3]) == (args, {})
