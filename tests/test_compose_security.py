"""The deployment files' security, read with yaml (no Docker needed). What
tests/integration/test_compose.py already asserts is not repeated here: only the API publishes a
port (on loopback), Redis needs a password and every broker URL carries it, both passwords are
required, the API has auth on, and the built images' last USER is not root.

Added here: no service escapes its container (privileged, host namespaces, capabilities, host
bind mounts, the Docker socket, a root `user:`), the API cannot write checkpoints (read-only
artifacts), no password is put on a command line or baked into an image, and the build context
leaves secrets and local state out. The upstream postgres and redis images start as root only to
drop to their own users in their entrypoints; they are not built here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
SECRET_WORDS = re.compile(r"PASSWORD|SECRET|TOKEN|PASSWD|API_KEY", re.IGNORECASE)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    lines, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    return lines


def test_no_service_escapes_its_container(compose):
    named_volumes = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        assert not service.get("privileged"), f"{name} is privileged"
        for key in ("network_mode", "pid", "ipc", "userns_mode", "uts"):
            assert service.get(key) != "host", f"{name} shares the host's {key}"
        assert not service.get("cap_add"), f"{name} adds capabilities"
        assert not service.get("devices"), f"{name} maps host devices"
        assert "security_opt" not in service or not any(
            "unconfined" in option for option in service["security_opt"]
        ), f"{name} disables a security profile"
        assert str(service.get("user", "")).split(":")[0] not in ("root", "0"), name
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            # The one host path: Prometheus' configuration file from deploy/, read-only.
            if volume == "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro":
                continue
            assert source in named_volumes, f"{name} bind-mounts the host path {source!r}"
            assert "docker.sock" not in str(volume)


def test_the_api_cannot_write_checkpoints(compose):
    # The API only serves downloads; the worker is the one writer of artifact files.
    mounts = compose["services"]["api"]["volumes"]
    artifacts = [m for m in mounts if m.split(":")[0] == "artifacts"]
    assert artifacts and all(m.endswith(":ro") for m in artifacts), mounts
    assert compose["services"]["api"]["environment"]["JUMPOUT_AUTH_REQUIRED"] == "true"


def test_no_password_on_a_command_line_or_in_a_default(compose):
    for name, service in compose["services"].items():
        health = service.get("healthcheck", {}).get("test", [])
        health = shlex.split(health) if isinstance(health, str) else health
        # Command lines are visible to every user of the host (ps); use the environment.
        assert "-a" not in health and "--pass" not in health, f"{name}: password in ps"
        for key, value in (service.get("environment") or {}).items():
            if SECRET_WORDS.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", str(value)), (
                    f"{name}.{key} must come from the environment, required, no default"
                )
    raw = (REPO / "docker-compose.yml").read_text()
    for password in re.findall(r"://[^:/@\s]*:([^@\s]+)@", raw):
        assert password.startswith("${") and ":?" in password, password


def test_images_bake_in_no_secret_and_run_as_an_unprivileged_uid(dockerfile):
    for line in dockerfile:
        keyword = line.split()[0].upper()
        if keyword in ("ENV", "ARG"):
            assert not SECRET_WORDS.search(line), f"secret in the image: {line}"
    commands = [part.strip() for line in dockerfile for part in line.split("&&")]
    created = [command for command in commands if "useradd " in command]
    assert len(created) == 1, "the Dockerfile must create its one user"
    uid = re.search(r"--uid\s+(\d+)", created[0])
    assert uid and int(uid.group(1)) >= 1000, created[0]
    user = created[0].split()[-1]
    stages = [i for i, line in enumerate(dockerfile) if line.upper().startswith("FROM ")]
    for start, end in zip(stages, [*stages[1:], len(dockerfile)], strict=True):
        body = dockerfile[start:end]
        if not any(line.upper().startswith(("CMD", "ENTRYPOINT")) for line in body):
            continue  # a base stage, not run
        users = [line.split()[1] for line in body if line.upper().startswith("USER ")]
        assert users and users[-1] in (user, uid.group(1)), f"{body[0]}: runs as {users}"


def test_the_build_context_leaves_secrets_and_local_state_out(dockerfile):
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for entry in (".env", "var", ".git", "*.pt"):
        assert entry in ignored, f".dockerignore must list {entry}"
    for line in dockerfile:
        if line.upper().startswith(("COPY ", "ADD ")):
            sources = line.split()[1:-1]
            assert "." not in sources and "./" not in sources, f"copies the whole context: {line}"


def test_the_monitoring_profile_is_optional_loopback_only_and_scrapes_with_a_token(compose):
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"], "Prometheus must not start by default"
    # The public image pinned by tag unless scripts/prepare-docker-host's stand-in is named.
    assert prometheus["image"].startswith("${JUMPOUT_PROMETHEUS_IMAGE:-prom/prometheus:")
    tag = prometheus["image"].rstrip("}").rpartition(":")[2]
    assert tag and tag != "latest", "pin the image by tag"
    # Literally loopback (no variable): Prometheus' UI has no login.
    assert all(str(port).startswith("127.0.0.1:") for port in prometheus["ports"])
    # Its configuration bind-mounted read-only (Compose 1.29 ignores `configs:` outside a swarm).
    (mount,) = [
        v for v in prometheus["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro")
    ]
    config_file = REPO / mount.split(":")[0]
    scrape = yaml.safe_load(config_file.read_text())["scrape_configs"]
    assert [job["static_configs"][0]["targets"] for job in scrape] == [["api:8000"]]
    (job,) = scrape
    assert job["metrics_path"] == "/metrics"
    # The API requires a token there: read from the secret's file, never written in the config.
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"] == "/run/secrets/prometheus_token"
    assert prometheus["secrets"] == ["prometheus_token"]
    token_file = Path(compose["secrets"]["prometheus_token"]["file"].split(":-")[-1].rstrip("}"))
    for ignore_file in (".dockerignore", ".gitignore"):
        patterns = (REPO / ignore_file).read_text().splitlines()
        assert any(token_file.match(pattern) for pattern in patterns if pattern), ignore_file
