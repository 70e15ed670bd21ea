"""docker-compose.yml and the Dockerfile agree with the code.

Docker does not run here, so the files are parsed: every app service runs a real `tidemill`
command, sets only variables tidemill declares (plus boto3's own AWS_* names) with values
`Settings.from_env` accepts, keeps its data in named volumes, and can be scaled.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from cli.main import app
from core.settings import FIELDS, Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

# boto3's standard variables: not tidemill settings, so not in FIELDS, but allowed on services.
VENDOR_ENV = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"})
REQUIRED_SERVICES = ("postgres", "redis", "minio", "migrate", "worker", "relay", "scheduler", "web")
AFTER_MIGRATE = ("worker", "relay", "scheduler", "web")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    assert COMPOSE_FILE.is_file(), f"{COMPOSE_FILE} is missing"
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    assert isinstance(data.get("services"), dict), "docker-compose.yml has no services"
    return data


# Helpers: pure functions over the parsed file, so a broken copy can be checked too.


def cli_commands() -> set[str]:
    # A group's `commands` dict (typer may vendor click, so no isinstance on click.Group).
    commands = getattr(typer.main.get_command(app), "commands", None)
    assert isinstance(commands, dict) and commands, "cli.main.app registers no commands"
    return set(commands)


def app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services built from this repository (the ones running tidemill)."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as strings, from either the mapping or the KEY=VALUE list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {pair[0]: pair[1] if len(pair) == 2 else "" for pair in pairs}
    return {key: "" if value is None else str(value) for key, value in env.items()}


def words(command: str | list[str] | None) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def unknown_commands(compose: dict[str, Any]) -> list[str]:
    known = cli_commands()
    problems = []
    for name, svc in app_services(compose).items():
        argv = words(svc.get("command"))
        if not argv:
            problems.append(f"{name}: no command (the image's default would run)")
        elif argv[0] not in known:
            problems.append(f"{name}: {argv[0]!r} is not a tidemill command ({sorted(known)})")
    return problems


def unknown_env_vars(compose: dict[str, Any]) -> list[str]:
    declared = {field.env for field in FIELDS}
    return [
        f"{name}: {var}"
        for name, svc in app_services(compose).items()
        for var in environment(svc)
        if var not in declared and var not in VENDOR_ENV
    ]


def settings_errors(compose: dict[str, Any]) -> list[str]:
    problems = []
    for name, svc in app_services(compose).items():
        try:
            Settings.from_env(environment(svc))
        except SettingsError as exc:
            problems.append(f"{name}: {exc}")
    return problems


def named_volume_for(compose: dict[str, Any], service: str, target: str) -> str | None:
    """The named volume mounted at `target` in `service`, if it is one declared at top level."""
    declared = compose.get("volumes") or {}
    for mount in compose["services"][service].get("volumes") or []:
        if isinstance(mount, str):
            source, _, rest = mount.partition(":")
            mount_target = rest.split(":")[0]
        else:
            source, mount_target = mount.get("source", ""), mount.get("target", "")
        if mount_target == target and source in declared:
            return source
    return None


def host_ports(service: dict[str, Any]) -> list[str]:
    """Port entries that bind a fixed host port (`8000:8000`); a bare `8000` does not."""
    bound = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published"):
                bound.append(str(port))
        elif ":" in str(port):
            bound.append(str(port))
    return bound


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [
        line
        for line in DOCKERFILE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    joined = "\n".join(lines).replace("\\\n", " ")
    result = []
    for line in joined.splitlines():
        instruction, _, args = line.strip().partition(" ")
        result.append((instruction.upper(), args.strip()))
    return result


def exec_form(args: str) -> list[str]:
    """An ENTRYPOINT/CMD argument as a word list (JSON exec form or shell form)."""
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list)
        return [str(v) for v in value]
    return shlex.split(args)


# Tests


def test_every_service_exists(compose: dict[str, Any]) -> None:
    services = compose["services"]
    missing = [name for name in REQUIRED_SERVICES if name not in services]
    assert not missing, f"docker-compose.yml lacks services: {missing}"
    assert str(services["postgres"].get("image", "")).startswith("postgres:15"), (
        f"postgres must run PostgreSQL 15, image is {services['postgres'].get('image')!r}"
    )
    assert str(services["redis"].get("image", "")).startswith("redis:7"), (
        f"redis must run Redis 7, image is {services['redis'].get('image')!r}"
    )
    redis_cmd = " ".join(words(services["redis"].get("command")))
    assert "--appendonly yes" in redis_cmd, f"redis must keep an AOF, command is {redis_cmd!r}"
    assert str(services["minio"].get("image", "")).startswith("minio/minio"), (
        f"minio image is {services['minio'].get('image')!r}"
    )


def test_app_services_run_real_cli_commands(compose: dict[str, Any]) -> None:
    apps = app_services(compose)
    not_built = [name for name in ("migrate", *AFTER_MIGRATE) if name not in apps]
    assert not not_built, f"services not built from this repository (no `build`): {not_built}"
    problems = unknown_commands(compose)
    assert not problems, "app services run commands cli.main.app does not have:\n" + "\n".join(
        problems
    )


def test_app_services_set_only_declared_variables(compose: dict[str, Any]) -> None:
    problems = unknown_env_vars(compose)
    assert not problems, (
        "variables neither in core.settings.FIELDS nor boto3's AWS_* names "
        f"({sorted(VENDOR_ENV)}):\n" + "\n".join(problems)
    )


def test_app_services_share_one_environment(compose: dict[str, Any]) -> None:
    envs = {name: environment(svc) for name, svc in app_services(compose).items()}
    first_name, first = next(iter(envs.items()))
    differ = [name for name, env in envs.items() if env != first]
    assert not differ, f"app services whose environment differs from {first_name}'s: {differ}"


def test_environment_values_parse_as_settings(compose: dict[str, Any]) -> None:
    problems = settings_errors(compose)
    assert not problems, "Settings.from_env rejects the compose environment:\n" + "\n".join(
        problems
    )
    for name, svc in app_services(compose).items():
        settings = Settings.from_env(environment(svc))
        # Unset would mean "start embedded servers", which a container must never do.
        assert settings.database_url, f"{name}: DATABASE_URL is unset"
        assert settings.redis_url, f"{name}: REDIS_URL is unset"
        assert settings.env == "production", f"{name}: TIDEMILL_ENV is {settings.env!r}"


def test_urls_name_compose_services(compose: dict[str, Any]) -> None:
    services = set(compose["services"])
    for name, svc in app_services(compose).items():
        env = environment(svc)
        for var in ("DATABASE_URL", "REDIS_URL", "BROKER_URL", "S3_ENDPOINT_URL"):
            if env.get(var):
                hostname = urlsplit(env[var]).hostname
                assert hostname in services, (
                    f"{name}: {var} points at {hostname!r}, which is not a compose service"
                )


def test_data_lives_in_named_volumes(compose: dict[str, Any]) -> None:
    for service, target in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data")):
        volume = named_volume_for(compose, service, target)
        assert volume, (
            f"{service}: {target} must be a named volume declared under top-level `volumes`"
        )


def test_worker_can_scale(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert "container_name" not in worker, "worker has container_name; --scale needs unique names"
    bound = host_ports(worker)
    assert not bound, f"worker binds host ports {bound}; a second replica could not start"


def test_migrate_runs_once_before_the_app(compose: dict[str, Any]) -> None:
    services = compose["services"]
    restart = services["migrate"].get("restart")
    assert restart == "no", (
        f'migrate must have restart: "no" (quoted: bare no is YAML false), got {restart!r}'
    )
    for name in AFTER_MIGRATE:
        depends = services[name].get("depends_on") or {}
        condition = (
            depends.get("migrate", {}).get("condition") if isinstance(depends, dict) else None
        )
        assert condition == "service_completed_successfully", (
            f"{name} must depend on migrate with condition service_completed_successfully, "
            f"got depends_on={depends!r}"
        )


def test_dockerfile_runs_tidemill_as_non_root() -> None:
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    instructions = dockerfile_instructions()
    entrypoints = [args for instr, args in instructions if instr == "ENTRYPOINT"]
    assert entrypoints, "Dockerfile has no ENTRYPOINT"
    entry = exec_form(entrypoints[-1])
    assert entry[:1] == ["tidemill"], f"ENTRYPOINT must run tidemill, got {entry}"
    users = [args for instr, args in instructions if instr == "USER"]
    assert users, "Dockerfile has no USER line, so it runs as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"Dockerfile's final USER is {users[-1]!r}"
    cmds = [args for instr, args in instructions if instr == "CMD"]
    assert cmds and exec_form(cmds[-1])[:1] == ["web"], f"default CMD should be web, got {cmds}"
