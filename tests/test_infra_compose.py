"""infra/clearml: the ClearML server stack, its settings template and its agent image.

`docker-compose config` (Compose 1.29, no Docker engine needed) validates and
interpolates the file the way `docker compose` will; the structural tests read the
committed YAML itself. Install the tool with scripts/ensure_test_tools.sh.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra" / "clearml"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"

REPORTED_SERVICES = {
    "mongo",
    "redis",
    "elasticsearch",
    "apiserver",
    "webserver",
    "fileserver",
    "async-delete",
    "clearml-agent",
}
DATABASES = {"mongo", "redis", "elasticsearch"}
AGENTS = {"clearml-agent": "agent", "clearml-agent-services": "services"}
ONE_SHOT = {"data-init"}
# Published container port -> service and the variable naming its host port.
PUBLISHED = {
    "apiserver": ("CLEARML_API_PORT", "8008", "8008"),
    "webserver": ("CLEARML_WEB_PORT", "8080", "80"),
    "fileserver": ("CLEARML_FILES_PORT", "8081", "8081"),
}
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


# --------------------------------------------------------------------------- helpers


def _compose_text() -> str:
    return COMPOSE.read_text(encoding="utf-8")


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(_compose_text())
    return data


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f".env.example: not KEY=VALUE: {raw!r}"
        assert key not in values, f".env.example: {key} listed twice"
        values[key] = value
    return values


def _resolve(text: str, env: dict[str, str]) -> str:
    """Interpolate ${VAR}, ${VAR:-default} and ${VAR-default} like Compose does."""

    def replace(match: re.Match[str]) -> str:
        name, op, default = match.group(1), match.group(2) or "", match.group(3) or ""
        value = env.get(name)
        if op == ":-":
            return value if value else default
        if op == "-":
            return value if value is not None else default
        return value or ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-|-)?([^}]*)\}", replace, text)


def _docker_compose() -> str:
    return require_tool(
        ["docker-compose"],
        "run scripts/ensure_test_tools.sh (Debian's docker-compose 1.29 via apt-get; root)",
    )


@pytest.fixture(scope="module")
def stack_copy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """infra/clearml as a user gets it after `cp .env.example .env` (without data/)."""
    target = tmp_path_factory.mktemp("infra") / "clearml"
    shutil.copytree(INFRA, target, ignore=shutil.ignore_patterns("data", ".env"))
    shutil.copy(target / ".env.example", target / ".env")
    yield target


def _run_compose(
    directory: Path, *args: str, env_file_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    if env_file_text is not None:
        (directory / ".env").write_text(env_file_text, encoding="utf-8")
    # Only PATH and HOME: no CLEARML_* or COMPOSE_* from the caller's shell.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(directory)}
    return subprocess.run(
        [_docker_compose(), *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --------------------------------------------------------------------------- docker-compose


@pytest.mark.integration
def test_compose_config_default_services(stack_copy: Path) -> None:
    result = _run_compose(stack_copy, "config")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]

    assert set(services) >= REPORTED_SERVICES
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} is not pinned"
    for name, (_, host_port, container_port) in PUBLISHED.items():
        assert services[name]["ports"] == [f"127.0.0.1:{host_port}:{container_port}/tcp"]
    for name in DATABASES:
        assert "ports" not in services[name]
        assert set(services[name]["networks"]) == {"backend"}
    assert config["networks"]["backend"]["internal"] is True
    api_env = services["apiserver"]["environment"]
    assert api_env["CLEARML_WEB_LOGIN"] == _env_example()["CLEARML_WEB_LOGIN"]
    for name in SERVER_IMAGE_USERS:
        assert services[name]["image"] == "allegroai/clearml:2.0.0-613", name
    # the async delete service removes files under the fileserver URL clients upload to
    files_host = _env_example()["CLEARML_FILES_HOST"]
    prefixes = f"[{files_host}]"
    assert api_env["CLEARML__services__async_urls_delete__enabled"] == "true"
    assert api_env["CLEARML__services__async_urls_delete__fileserver__url_prefixes"] == prefixes
    delete = services["async-delete"]
    assert delete["entrypoint"][:3] == ["python3", "-m", "jobs.async_urls_delete"]
    assert delete["entrypoint"][3:] == ["--fileserver-host", "http://fileserver:8081"]
    assert (
        delete["environment"]["CLEARML__services__async_urls_delete__fileserver__url_prefixes"]
        == prefixes
    )
    assert delete["environment"]["CLEARML_MONGODB_SERVICE_HOST"] == "mongo"
    assert set(delete["networks"]) == {"backend"} and "ports" not in delete


@pytest.mark.integration
@pytest.mark.parametrize("profile", sorted(set(AGENTS.values())))
def test_compose_config_with_profile(stack_copy: Path, profile: str) -> None:
    result = _run_compose(stack_copy, "--profile", profile, "config")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    agent = next(name for name, agent_profile in AGENTS.items() if agent_profile == profile)
    assert services[agent]["profiles"] == [profile]
    environment = services[agent]["environment"]
    # .env.example leaves the keys empty: the agent container itself refuses to start.
    assert environment["CLEARML_API_ACCESS_KEY"] == ""
    assert environment["CLEARML_API_SECRET_KEY"] == ""
    assert environment["CLEARML_API_HOST"] == "http://127.0.0.1:8008"


@pytest.mark.integration
def test_compose_refuses_to_run_without_web_password(stack_copy: Path, tmp_path: Path) -> None:
    copy = tmp_path / "clearml"
    shutil.copytree(stack_copy, copy)
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    without = "\n".join(line for line in lines if not line.startswith("CLEARML_WEB_PASSWORD="))
    result = _run_compose(copy, "config", env_file_text=without + "\n")
    assert result.returncode != 0
    assert "CLEARML_WEB_PASSWORD" in result.stderr


@pytest.mark.integration
def test_compose_names_missing_agent_key_variable(stack_copy: Path, tmp_path: Path) -> None:
    copy = tmp_path / "clearml"
    shutil.copytree(stack_copy, copy)
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    without = "\n".join(line for line in lines if not line.startswith("CLEARML_AGENT_SECRET_KEY="))
    result = _run_compose(copy, "--profile", "agent", "config", env_file_text=without + "\n")
    assert result.returncode != 0
    assert "CLEARML_AGENT_SECRET_KEY" in result.stderr


@pytest.mark.integration
def test_compose_override_of_bind_address_and_ports(stack_copy: Path, tmp_path: Path) -> None:
    copy = tmp_path / "clearml"
    shutil.copytree(stack_copy, copy)
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    text = text.replace("CLEARML_BIND_ADDRESS=127.0.0.1", "CLEARML_BIND_ADDRESS=0.0.0.0")
    text = text.replace("CLEARML_WEB_PORT=8080", "CLEARML_WEB_PORT=18080")
    result = _run_compose(copy, "config", env_file_text=text)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["webserver"]["ports"] == ["0.0.0.0:18080:80/tcp"]
    assert services["apiserver"]["ports"] == ["0.0.0.0:8008:8008/tcp"]


# --------------------------------------------------------------------------- structure


def test_every_reported_service_exists() -> None:
    services = _services()
    assert REPORTED_SERVICES | set(AGENTS) <= set(services)
    for agent, profile in AGENTS.items():
        assert services[agent]["profiles"] == [profile]
    # The default `docker compose up -d` starts the server only.
    for name in REPORTED_SERVICES - set(AGENTS):
        assert "profiles" not in services[name], name


def test_images_are_pinned() -> None:
    defaults = _env_example()
    for name, service in _services().items():
        for env in ({}, defaults):  # the compose default, and the .env.example value
            image = _resolve(service["image"], env)
            repository, _, tag = image.rpartition(":")
            assert repository, f"{name}: image {image!r} has no tag"
            assert "/" not in tag, f"{name}: image {image!r} has no tag"
            assert tag not in {"latest", "stable", "master", "main"}, f"{name}: {image!r}"
            assert re.search(r"\d", tag), f"{name}: tag of {image!r} names no version"


SERVER_IMAGE_USERS = ("apiserver", "webserver", "fileserver", "async-delete")
# The official compose files pin <version>-<build> (2.0.0-613); clearml/server from 2.1.
OFFICIAL_TAG = re.compile(r"(allegroai/clearml:\d+\.\d+\.\d+-\d+|clearml/server:\d+\.\d+\.\d+)")


def test_server_image_matches_the_layout() -> None:
    services = _services()
    images = {services[name]["image"] for name in SERVER_IMAGE_USERS}
    assert len(images) == 1  # one image, four commands
    default = _resolve(images.pop(), {})
    assert OFFICIAL_TAG.fullmatch(default), f"{default!r} is not an official server tag"
    assert _env_example()["CLEARML_SERVER_IMAGE"] == default
    assert "clearml/server:<version>" in _compose_text()  # how to move past 2.0
    for name in ("apiserver", "webserver", "fileserver"):
        assert services[name]["command"] == [name]


def test_databases_publish_nothing_and_stay_internal() -> None:
    compose = _compose()
    for name in DATABASES:
        service = compose["services"][name]
        assert "ports" not in service, name
        assert "expose" not in service, name
        assert service.get("network_mode") is None, name
        assert service["networks"] == ["backend"], name
    assert compose["networks"]["backend"]["internal"] is True


def test_published_ports_bind_to_configurable_loopback() -> None:
    services = _services()
    published = {name: service["ports"] for name, service in services.items() if "ports" in service}
    assert set(published) == set(PUBLISHED)
    for name, (variable, default, container) in PUBLISHED.items():
        assert published[name] == [
            f"${{CLEARML_BIND_ADDRESS:-127.0.0.1}}:${{{variable}:-{default}}}:{container}"
        ]
    for name in AGENTS:
        assert "ports" not in services[name]


def test_state_lives_in_bind_mounts_under_data() -> None:
    compose = _compose()
    assert "volumes" not in compose, "named volumes would keep state outside ./data"
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            assert isinstance(volume, str), f"{name}: use the short bind syntax"
            parts = volume.split(":")
            assert len(parts) in {2, 3}, f"{name}: anonymous volume {volume!r}"
            source, mode = parts[0], parts[2] if len(parts) == 3 else "rw"
            assert source.startswith("./"), f"{name}: {volume!r} is not a bind mount"
            if source.startswith("./config/"):
                assert mode == "ro", f"{name}: config mounts are read-only: {volume!r}"
                assert (INFRA / source).exists(), f"{name}: {source} is not committed"
            else:
                assert source == "./data" or source.startswith("./data/"), f"{name}: {volume!r}"
    for name in ("mongo", "redis", "elasticsearch", "fileserver"):
        sources = [v.split(":")[0] for v in compose["services"][name]["volumes"]]
        assert any(source.startswith(f"./data/{name}") for source in sources), name


def test_data_folder_and_env_are_git_ignored() -> None:
    for path in ("infra/clearml/data/mongo/db/x", "infra/clearml/.env"):
        result = subprocess.run(
            ["git", "check-ignore", "-q", path], cwd=ROOT, check=False, timeout=30
        )
        assert result.returncode == 0, f"{path} is not ignored"
    result = subprocess.run(
        ["git", "check-ignore", "-q", "infra/clearml/.env.example"],
        cwd=ROOT,
        check=False,
        timeout=30,
    )
    assert result.returncode == 1, ".env.example must be committed"


def test_restart_healthchecks_and_start_order() -> None:
    services = _services()
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service["restart"] == "no"
            continue
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"], name
    healthy = {"condition": "service_healthy"}
    assert services["apiserver"]["depends_on"] == {
        "mongo": healthy,
        "redis": healthy,
        "elasticsearch": healthy,
        "fileserver": healthy,
    }
    assert services["webserver"]["depends_on"] == {"apiserver": healthy}
    for agent in AGENTS:
        assert services[agent]["depends_on"] == {"apiserver": healthy}
    for name in ONE_SHOT:  # everything that waits for a one-shot waits for its success
        for service in services.values():
            condition = service.get("depends_on", {}).get(name)
            if condition is not None:
                assert condition == {"condition": "service_completed_successfully"}


def test_agents_take_keys_from_environment() -> None:
    services = _services()
    for agent in AGENTS:
        environment = services[agent]["environment"]
        assert re.fullmatch(
            r"\$\{CLEARML_AGENT_ACCESS_KEY\?[^}]+\}", environment["CLEARML_API_ACCESS_KEY"]
        )
        assert re.fullmatch(
            r"\$\{CLEARML_AGENT_SECRET_KEY\?[^}]+\}", environment["CLEARML_API_SECRET_KEY"]
        )
        assert environment["CLEARML_CONFIG_FILE"] == "/etc/clearml/clearml.conf"
        assert services[agent]["network_mode"] == "host"
    assert services["clearml-agent"]["command"] == ["daemon"]
    assert services["clearml-agent-services"]["command"] == ["services"]
    api_env = services["apiserver"]["environment"]
    for key, value in api_env.items():
        if re.search(r"PASSWORD|SECRET|user_key|user_secret", key):
            assert str(value).startswith("${"), f"apiserver {key} is a literal"


def test_env_example_documents_every_variable() -> None:
    used = set(VARIABLE.findall(_compose_text()))
    listed = set(_env_example())
    assert used - listed == set(), f"not in .env.example: {sorted(used - listed)}"
    assert listed - used == set(), f"in .env.example but unused: {sorted(listed - used)}"


def test_env_example_values_are_placeholders() -> None:
    values = _env_example()
    for key, value in values.items():
        if re.search(r"PASS|SECRET|KEY|TOKEN", key):
            assert value in {"", "change-me"}, f"{key} has a real-looking value"
    assert values["CLEARML_BIND_ADDRESS"] == "127.0.0.1"


# --------------------------------------------------------------------------- secrets


_SECRET_ASSIGNMENT = re.compile(
    r"""(?<![\w${])["']?(?P<key>[A-Za-z_]*(?:password|passwd|secret|token|access_key|secret_key|user_key)
        [A-Za-z_]*)["']?[ \t]*[:=][ \t]*(?P<value>"[^"\n]*"|'[^'\n]*'|[^\s#,]*)""",
    re.IGNORECASE | re.VERBOSE,
)
_HIGH_ENTROPY = re.compile(r"[A-Za-z0-9+/_\-]{24,}")


def _secret_findings(text: str) -> list[str]:
    findings = []
    for match in _SECRET_ASSIGNMENT.finditer(text):
        value = match.group("value").strip("\"'")
        if value in {"", "change-me", "{", "["} or value.startswith(("$", "<")):
            continue  # empty, placeholder, substitution or <placeholder>
        if value.lower() in {"true", "false", "null"}:
            continue
        findings.append(f"{match.group('key')}={value}")
    for token in _HIGH_ENTROPY.findall(text):
        classes = sum(bool(re.search(pattern, token)) for pattern in (r"[a-z]", r"[A-Z]", r"\d"))
        if classes == 3:
            findings.append(token)
    return findings


COMMITTED_SETTINGS = [
    COMPOSE,
    ENV_EXAMPLE,
    INFRA / "config" / "server" / "apiserver.conf",
    INFRA / "config" / "agent" / "clearml.conf",
    INFRA / "agent" / "Dockerfile",
    INFRA / "agent" / "entrypoint.sh",
    ROOT / "conf" / "clearml" / "clearml.conf.example",
]


@pytest.mark.parametrize("path", COMMITTED_SETTINGS, ids=lambda p: p.name)
def test_no_secret_literals_in_committed_files(path: Path) -> None:
    assert _secret_findings(path.read_text(encoding="utf-8")) == []


def test_secret_detector_catches_literals() -> None:
    samples = {
        'secret_key: "9fQ2xLr8TzV0pWm3"': 1,
        "CLEARML_WEB_PASSWORD=hunter2hunter2": 1,
        "user_secret: FhS8VZv_I4%6Mo": 1,
        "blob AKx9Qe7Zr2Lm0Tq5Wv8Yb3Nc6Pd": 1,
        'password: ""\naccess_key: ${?CLEARML_API_ACCESS_KEY}': 0,
        "CLEARML_AGENT_SECRET_KEY=": 0,
        "export CLEARML_API_SECRET_KEY=<secret>": 0,
        "${CLEARML_API_ACCESS_KEY:-}": 0,
    }
    for text, expected in samples.items():
        assert len(_secret_findings(text)) == expected, text


# --------------------------------------------------------------------------- server/agent settings


_PARSE_HOCON = textwrap.dedent(
    """
    import json, sys
    from clearml.utilities.pyhocon import ConfigFactory
    server = ConfigFactory.parse_file(sys.argv[1])
    agent = ConfigFactory.parse_file(sys.argv[2])
    print(json.dumps({
        "fixed_users": server.get("auth.fixed_users").as_plain_ordered_dict(),
        "updates": server.get("check_for_updates.enabled"),
        "package_manager": agent.get("agent.package_manager.type"),
        "uv_locked": agent.get("agent.package_manager.uv_sync_locked_if_lock_file"),
        "python": agent.get("agent.python_binary"),
        "report_use_subprocess": agent.get("sdk.development.report_use_subprocess"),
        "access_key": agent.get("api.credentials.access_key"),
    }))
    """
)


@pytest.mark.integration
def test_server_and_agent_settings_parse(tmp_path: Path) -> None:
    password = 'pa"ss word}#1'  # quotes and HOCON specials survive substitution
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CLEARML")},
        "CLEARML_WEB_LOGIN": "alice",
        "CLEARML_WEB_PASSWORD": password,
        "HOME": str(tmp_path),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _PARSE_HOCON,
            str(INFRA / "config" / "server" / "apiserver.conf"),
            str(INFRA / "config" / "agent" / "clearml.conf"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    assert parsed["fixed_users"] == {
        "enabled": True,
        "pass_hashed": False,
        "users": [{"username": "alice", "password": password, "name": "alice"}],
    }
    assert parsed["updates"] is False
    assert parsed["package_manager"] == "uv"
    assert parsed["uv_locked"] is True
    assert parsed["python"] == "/usr/local/bin/python3.11"
    assert parsed["report_use_subprocess"] is False
    assert parsed["access_key"] == ""


def test_dockerfile_pins_base_image_and_tools() -> None:
    text = (INFRA / "agent" / "Dockerfile").read_text(encoding="utf-8")
    base = re.search(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base.group(1))
    build_args = _services()["clearml-agent"]["build"]["args"]
    assert f"ARG CLEARML_AGENT_VERSION={build_args['CLEARML_AGENT_VERSION']}" in text
    assert f"ARG UV_VERSION={build_args['UV_VERSION']}" in text
    assert _services()["clearml-agent"]["image"].endswith(
        f":{build_args['CLEARML_AGENT_VERSION']}-py3.11"
    )


# --------------------------------------------------------------------------- agent entry point


@pytest.fixture
def fake_agent(tmp_path: Path) -> Path:
    """A clearml-agent stand-in that prints its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "clearml-agent"
    script.write_text('#!/bin/sh\necho "clearml-agent-args: $*"\n', encoding="utf-8")
    script.chmod(0o755)
    return bin_dir


def _entrypoint(bin_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(INFRA / "agent" / "entrypoint.sh"), *args],
        env={"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_agent_entrypoint_refuses_to_start_without_keys(fake_agent: Path) -> None:
    result = _entrypoint(
        fake_agent, "daemon", CLEARML_API_ACCESS_KEY="", CLEARML_API_SECRET_KEY="s3cr3t-value"
    )
    assert result.returncode == 78
    assert "CLEARML_AGENT_ACCESS_KEY" in result.stderr
    assert "clearml-agent-args" not in result.stdout
    assert "s3cr3t-value" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("mode", "queues", "expected"),
    [
        ("daemon", "default", "daemon --foreground --cpu-only --create-queue --queue default"),
        (
            "services",
            "services",
            "daemon --foreground --cpu-only --create-queue --services-mode --queue services",
        ),
        ("daemon", "default cpu", "--queue default cpu"),
    ],
)
def test_agent_entrypoint_starts_the_daemon(
    fake_agent: Path, mode: str, queues: str, expected: str
) -> None:
    result = _entrypoint(
        fake_agent,
        mode,
        CLEARML_API_ACCESS_KEY="AKEYVALUE123",
        CLEARML_API_SECRET_KEY="s3cr3t-value",
        CLEARML_AGENT_QUEUES=queues,
    )
    assert result.returncode == 0, result.stderr
    args_line = next(
        line for line in result.stdout.splitlines() if line.startswith("clearml-agent-args:")
    )
    assert args_line.endswith(expected)
    assert "AKEY..." in result.stdout
    assert "AKEYVALUE123" not in result.stdout
    assert "s3cr3t-value" not in result.stdout + result.stderr


def test_make_targets_drive_the_compose_stack() -> None:
    """`make server-up/agent-up/server-down` run the report's commands in infra/clearml."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        ["make", "-n", "server-up", "agent-up", "server-down"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "cd infra/clearml" in out
    assert "cp .env.example .env" in out
    assert "docker compose up -d" in out
    assert "docker compose --profile agent up -d clearml-agent" in out
    assert "docker compose down" in out


def test_readme_walks_through_the_server_path() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## With a ClearML server") :]
    for step in ("docker compose up -d", "Create new credentials", "housing doctor",
                 "clearml sync", "housing schedule", "dvc remote", "mlflow"):  # fmt: skip
        assert step in section, step
