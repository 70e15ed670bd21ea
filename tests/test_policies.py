"""Policies as data: the default file, the other seeds' files, and clear rejections."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipelines.lifecycle.policies import (
    DEFAULT_FILE,
    EXAMPLES_DIR,
    PolicyError,
    check_against_database,
    load_policies,
    load_policy_file,
    parse_policies,
)
from tests.conftest import run_cli

LOVENDO = {
    # Lovendo's retention table: name -> (table, age, action)
    "deleted-users-erase": ("users", "30 days", "erase-users"),
    "messages-archive": ("messages", "2 years", "archive"),
    "notifications-purge": ("notifications", "90 days", "delete"),
    "transactions-archive": ("transactions", "7 years", "archive"),
    "audit-logs-archive": ("audit_logs", "1 year", "archive"),
    "sessions-expire": ("auth_tokens", "7 days", "expire"),
    # SaltBitter and Pomi additions
    "refresh-tokens-expire": ("refresh_tokens", "7 days", "expire"),
    "compliance-logs-archive": ("compliance_logs", "7 years", "archive"),
    "email-verifications-expire": ("email_verifications", "1 day", "expire"),
}


def test_default_file_reproduces_lovendos_retention_table() -> None:
    policies = {p.name: p for p in load_policies()}
    for name, (table, age, action) in LOVENDO.items():
        p = policies[name]
        assert (p.table, p.age.text, p.action) == (table, age, action), name
        assert p.schedule and p.batch_size > 0
    assert policies["messages-archive"].storage_class == "GLACIER"
    # ages are calendar ages: 2 years before 2026-02-28 is 2024-02-28
    cutoff = policies["messages-archive"].cutoff(datetime(2026, 2, 28, tzinfo=UTC))
    assert cutoff == datetime(2024, 2, 28, tzinfo=UTC)


def test_default_policies_match_the_database(sql) -> None:
    check_against_database(load_policies(), sql)


@pytest.mark.parametrize(
    ("seed", "expected"),
    [
        (
            "saltbitter",
            {
                "application-logs-purge",
                "compliance-logs-archive",
                "refresh-tokens-expire",
            },
        ),
        (
            "pomi",
            {
                "email-verifications-expire",
                "auth-tokens-expire",
                "deleted-users-purge",
                "deleted-listings-purge",
                "deleted-events-purge",
                "deleted-businesses-purge",
            },
        ),
        ("perfect_match", {"messages-archive", "activity-logs-purge"}),
        ("bilten", {"backups-expire"}),
    ],
)
def test_each_seed_systems_policy_file_validates(seed: str, expected: set[str]) -> None:
    policies = load_policy_file(EXAMPLES_DIR / f"{seed}.toml")
    assert {p.name for p in policies} == expected


def test_a_policy_file_path_in_settings_overrides_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import reset_settings_cache

    custom = tmp_path / "mine.toml"
    custom.write_text(
        '[[policy]]\nname = "only-one"\ntable = "notifications"\nage_column = "created_at"\n'
        'age = "30 days"\naction = "delete"\nschedule = "0 3 * * *"\n'
    )
    monkeypatch.setenv("TIDEMILL_POLICY_FILE", str(custom))
    reset_settings_cache()
    try:
        assert [p.name for p in load_policies()] == ["only-one"]
    finally:
        monkeypatch.delenv("TIDEMILL_POLICY_FILE")
        reset_settings_cache()
    assert len(load_policies()) > 1


BASE = {
    "name": '"p"',
    "table": '"notifications"',
    "age_column": '"created_at"',
    "age": '"90 days"',
    "action": '"delete"',
    "schedule": '"0 3 * * *"',
}


def _doc(**changes: str | None) -> str:
    fields = {**BASE, **changes}
    body = "\n".join(f"{k} = {v}" for k, v in fields.items() if v is not None)
    return f"[[policy]]\n{body}\n"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"action": '"shred"'}, "action 'shred' is not one of"),
        ({"age": '"ninety days"'}, "age 'ninety days' is not"),
        ({"schedule": '"every night"'}, "is not a crontab"),
        ({"table": '"users; drop"'}, "not a plain lower-case identifier"),
        ({"batch_size": "0"}, "batch_size must be"),
        ({"storage_class": '"FREEZER"'}, "storage_class 'FREEZER'"),
        ({"colour": '"blue"'}, "unknown keys ['colour']"),
        ({"age": None}, "age is required"),
        ({"timezone": '"Mars/Olympus"'}, "unknown timezone"),
        ({"filter": '"true; delete from users"'}, "one SQL expression"),
        ({"action": '"erase-users"'}, "erase-users works on table 'users'"),
    ],
)
def test_bad_policies_are_rejected_with_a_clear_error(
    changes: dict[str, str | None], message: str
) -> None:
    with pytest.raises(PolicyError, match=None) as err:
        parse_policies(_doc(**changes), source="x.toml")
    assert message in str(err.value)
    assert "x.toml" in str(err.value)


def test_duplicate_names_and_bad_toml_are_rejected() -> None:
    with pytest.raises(PolicyError, match="used twice"):
        parse_policies(_doc() + _doc())
    with pytest.raises(PolicyError, match="not valid TOML"):
        parse_policies("[[policy]\nname=")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"table": '"no_such_table"'}, "table 'no_such_table' does not exist"),
        ({"age_column": '"born_at"'}, "age_column 'born_at' does not exist in table"),
        ({"age_column": '"title"'}, "is text, not a timestamp"),
        ({"filter": '"nonsense_col > 1"'}, "filter 'nonsense_col > 1' is not valid"),
        ({"key_column": '"nope"'}, "key_column 'nope' does not exist"),
    ],
)
def test_a_policy_naming_a_missing_table_or_column_is_rejected(
    sql, changes: dict[str, str], message: str
) -> None:
    policies = parse_policies(_doc(**changes))
    with pytest.raises(PolicyError) as err:
        check_against_database(policies, sql)
    assert message in str(err.value)


def test_the_cli_refuses_to_run_a_policy_on_a_missing_table(sql, tmp_path: Path) -> None:
    import os

    custom = tmp_path / "bad.toml"
    custom.write_text(_doc(table='"no_such_table"'))
    env = {**os.environ, "TIDEMILL_POLICY_FILE": str(custom)}
    result = run_cli("pipeline", "run", "p", env=env)
    assert result.returncode == 2
    assert "table 'no_such_table' does not exist" in result.stderr
    listed = run_cli("pipeline", "list", env=env)
    assert listed.returncode == 1 and "does not exist" in listed.stdout
    assert sql.execute("SELECT count(*) FROM pipeline_runs").fetchone()[0] == 0


def test_default_file_is_the_packaged_one() -> None:
    assert DEFAULT_FILE.name == "policies.toml" and DEFAULT_FILE.exists()
