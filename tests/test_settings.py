"""Settings: one typed object from the environment; every variable documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.settings import FIELDS, Settings, SettingsError
from tests.conftest import ROOT


def test_defaults_with_nothing_set_mean_embedded_servers(tmp_path: Path) -> None:
    s = Settings.from_env({"TIDEMILL_DATA_DIR": str(tmp_path)})
    assert s.embedded_postgres and s.embedded_redis
    assert s.worker_processes == 2 and s.env == "development"
    assert s.storage_url == f"file://{tmp_path.resolve() / 'objects'}"
    assert s.mail_url == f"file://{tmp_path.resolve() / 'mail'}"


def test_broker_defaults_to_redis_url() -> None:
    s = Settings.from_env({"REDIS_URL": "redis://cache:6379/0"})
    assert s.effective_broker_url == "redis://cache:6379/0"
    s = Settings.from_env({"REDIS_URL": "redis://cache:6379/0", "BROKER_URL": "redis://mq:6379/1"})
    assert s.effective_broker_url == "redis://mq:6379/1"


@pytest.mark.parametrize("url", ["amqp://u:hunter2@mq:5672", "amqps://mq:5671/vhost"])
def test_rabbitmq_urls_are_refused_with_the_reason(url: str) -> None:
    # RabbitMQ was dropped (docs/scale-out.md): a leftover amqp:// URL fails at start-up,
    # naming the variable, instead of running workers the dashboard and rescue cannot see.
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"BROKER_URL": url})
    message = str(err.value)
    assert "BROKER_URL" in message and "RabbitMQ" in message and "redis://" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("BROKER_URL", "kafka://x:1", "kafka"),
        ("DATABASE_URL", "mysql://x/db", "mysql"),
        ("TIDEMILL_WEB_PORT", "70000", "TCP port"),
        ("TIDEMILL_WORKER_THREADS", "0", "at least 1"),
        ("TIDEMILL_ENV", "staging", "development, production, test"),
        ("TIDEMILL_RELAY_POLL_S", "-1", "greater than 0"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, needle: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({name: value})
    assert name in str(err.value) and needle in str(err.value)


def test_passwords_are_redacted_in_errors_and_banner() -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"BROKER_URL": "kafka://u:hunter2@x:1"})
    assert "hunter2" not in str(err.value)
    s = Settings.from_env({"DATABASE_URL": "postgresql://u:hunter2@db/x"})
    assert "hunter2" not in str(s.describe())


def test_the_configuration_reference_is_generated_from_the_settings() -> None:
    # docs/reference/configuration.md is written by docs/gen_reference.py from FIELDS; a
    # committed page that differs is stale (`make docs` regenerates it).
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs/gen_reference.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    page = gen.configuration_page()
    assert (ROOT / "docs/reference/configuration.md").read_text() == page, "run `make docs`"
    rows = {
        m.group(1): m.group(2) for m in re.finditer(r"^\| `([A-Z0-9_]+)` \| ([^|]*) \|", page, re.M)
    }
    for field in FIELDS:
        assert field.env in rows, f"{field.env} missing from the configuration reference"
        if field.default:
            assert field.default in rows[field.env], (field.env, rows[field.env])
