"""App profiles against live databases: `tidemill app list | check` (issue 14)."""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg
import pytest

from apps import NAMES, all_profiles, get_profile
from apps.install import check
from apps.profile import Mail
from tests.conftest import Servers, run_cli
from tests.support.apps import create_app_database

SEEDS = ("bilten", "perfect_match", "saltbitter", "pomi")


@pytest.fixture(scope="module")
def seed_dbs(servers: Servers) -> dict[str, str]:
    """Each seed's schema.sql, loaded once into a database of its own (read-only here)."""
    urls = {}
    for app in SEEDS:
        name = f"seed_{app}"
        urls[app] = servers.pg.url(name)
        create_app_database(servers.admin_url, urls[app], name, app)
    return urls


def test_every_profile_is_declared_and_lovendo_is_the_default() -> None:
    assert [p.name for p in all_profiles()] == list(NAMES)
    from core.settings import Settings

    assert Settings.from_env({}).app == "lovendo"
    for p in all_profiles():
        # a profile that names a mail has its templates, in English at least
        for mail in p.mails:
            for part in ("subject.txt", "body.txt", "body.html"):
                assert (p.templates / mail.kind / "en" / part).is_file(), (p.name, mail.kind)
        for rule in p.rules:
            assert rule.on in ("insert", "update")


@pytest.mark.parametrize("app", SEEDS)
def test_each_profile_matches_its_seed_schema(seed_dbs: dict[str, str], app: str) -> None:
    with psycopg.connect(seed_dbs[app]) as conn:
        report = check(get_profile(app), conn)
    assert report.problems == []


def test_lovendo_profile_matches_tidemills_migrated_database(sql: Any) -> None:
    assert check(get_profile("lovendo"), sql).problems == []


def test_check_names_every_missing_table_and_column_and_exits_2(servers: Servers) -> None:
    url = servers.pg.url("seed_pomi_damaged")
    create_app_database(servers.admin_url, url, "seed_pomi_damaged", "pomi")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE users DROP COLUMN username")
        conn.execute("ALTER TABLE events DROP COLUMN deleted_at")
        conn.execute("DROP TABLE businesses")
    out = run_cli("app", "check", "pomi", env=servers.env(DATABASE_URL=url))
    assert out.returncode == 2, out.stdout + out.stderr
    lines = set(out.stdout.splitlines())
    assert "pomi: missing column public.users.username" in lines
    assert "pomi: missing column public.events.deleted_at" in lines
    assert "pomi: missing table public.businesses" in lines
    assert "pomi: policy deleted-events-purge: missing column public.events.deleted_at" in lines
    assert "problem(s)" in out.stderr
    # and attach refuses the same database, installing nothing
    out = run_cli("app", "attach", "pomi", env=servers.env(DATABASE_URL=url))
    assert out.returncode == 2
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'tidemill'")
        assert row.fetchone() == (0,)


def test_check_compiles_the_profiles_sql(seed_dbs: dict[str, str]) -> None:
    """A mail whose SQL names a column the app lacks is caught before any mail is due."""
    profile = get_profile("bilten")
    broken = dataclasses.replace(
        profile,
        mails=(Mail("ticket_confirmation", "SELECT u.nickname FROM users u WHERE u.id = %(key)s"),),
    )
    with psycopg.connect(seed_dbs["bilten"]) as conn:
        problems = check(broken, conn).problems
    assert len(problems) == 1 and "nickname" in problems[0], problems


def test_check_refuses_an_app_table_that_would_shadow_tidemills(servers: Servers) -> None:
    url = servers.pg.url("seed_bilten_outbox")
    create_app_database(servers.admin_url, url, "seed_bilten_outbox", "bilten")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE outbox (id int)")
        problems = check(get_profile("bilten"), conn).problems
    assert problems == ["app table public.outbox would shadow tidemill's tidemill.outbox"]


def test_unknown_app_is_a_clear_error(servers: Servers) -> None:
    out = run_cli("app", "check", "myspace")
    assert out.returncode == 2 and "no app profile 'myspace'" in out.stderr


def test_app_list_marks_the_served_app(servers: Servers) -> None:
    out = run_cli("app", "list", env=servers.env(TIDEMILL_APP="pomi"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(NAMES)
    assert [line.split()[1] for line in lines if line.startswith("*")] == ["pomi"]


@pytest.mark.slow
def test_lovendo_attach_runs_tidemills_migrations_and_detach_keeps_its_rows(
    servers: Servers,
) -> None:
    """Lovendo is a profile like the others: attach on an empty database migrates it (its
    tables are tidemill's migrations'), twice is a no-op, detach leaves its rows."""
    with psycopg.connect(servers.admin_url, autocommit=True) as conn:
        conn.execute('DROP DATABASE IF EXISTS "app_lovendo" WITH (FORCE)')
        conn.execute('CREATE DATABASE "app_lovendo"')
    url = servers.pg.url("app_lovendo")
    env = servers.env(DATABASE_URL=url, TIDEMILL_APP="lovendo")
    for _ in range(2):
        out = run_cli("app", "attach", "lovendo", env=env)
        assert out.returncode == 0, out.stdout + out.stderr
    with psycopg.connect(url, autocommit=True) as conn:
        assert check(get_profile("lovendo"), conn).problems == []
        conn.execute("INSERT INTO users (email, full_name) VALUES ('l@lovendo.test', 'L')")
        pending = conn.execute("SELECT actor FROM tidemill.outbox ORDER BY id").fetchall()
        assert ("send_welcome_email",) in pending
    for _ in range(2):  # a second detach finds nothing to remove and succeeds
        out = run_cli("app", "detach", "lovendo", env=env)
        assert out.returncode == 0, out.stdout + out.stderr
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (1,)
        assert conn.execute("SELECT to_regnamespace('tidemill')").fetchone() == (None,)
        # no trigger is left to write into a schema that is gone
        conn.execute("INSERT INTO users (email, full_name) VALUES ('m@lovendo.test', 'M')")


def test_migrate_refuses_an_app_that_tidemills_migrations_do_not_own(servers: Servers) -> None:
    out = run_cli("migrate", env=servers.env(TIDEMILL_APP="bilten"))
    assert out.returncode == 2
    assert "use `tidemill app attach bilten`" in out.stderr


@pytest.mark.slow
def test_two_attaches_at_once_end_in_one_installation(servers: Servers) -> None:
    """Two deploys attaching at the same moment: both succeed, one set of triggers results."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    url = servers.pg.url("seed_bilten_race")
    create_app_database(servers.admin_url, url, "seed_bilten_race", "bilten")
    env = servers.env(DATABASE_URL=url)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cli.main", "app", "attach", "bilten"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
    with psycopg.connect(url) as conn:
        triggers = conn.execute(
            "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "WHERE NOT t.tgisinternal ORDER BY 1, 2"
        ).fetchall()
    assert triggers == [
        ("events", "events_cache_delete"),
        ("events", "events_cache_insert"),
        ("events", "events_cache_update"),
        ("events", "tidemill_bilten_event_created"),
        ("outbox", "outbox_wakeup"),
        ("payments", "tidemill_bilten_payment_completed"),
    ]
