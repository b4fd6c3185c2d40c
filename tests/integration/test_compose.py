"""docker-compose.yml, checked without Docker: its structure (what is published, passwords,
users, the GPU worker's settings), and its services' own commands and environments run as local
processes against a local PostgreSQL and a password-protected Redis, through one authenticated
job. What is substituted: the compose hostnames and ports (postgres, redis, the API's port), the
PostgreSQL role (the local server trusts `postgres`), the container paths (a temporary home), and
the device (cuda -> cpu: no GPU here). Everything else is the file's.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
CONTAINER_HOME = "/var/lib/jumpout"
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value, variables: dict[str, str]):
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$``, recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        current = variables.get(name)
        if op in ("-", ":-"):
            return current if current else arg
        if op in ("?", ":?") and not current:
            raise KeyError(f"{name}: {arg}")
        return current or ""

    return _VARIABLE.sub(replace, value)


def load_compose(variables: dict[str, str]) -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), variables)


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    return {
        "POSTGRES_PASSWORD": secrets.token_urlsafe(12),
        "REDIS_PASSWORD": secrets.token_urlsafe(12),
    }


@pytest.fixture(scope="module")
def compose(passwords) -> dict:
    return load_compose(passwords)


def dockerfile_stages() -> dict[str, list[str]]:
    """Each stage's instructions, with those of the stage it starts FROM before them."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in DOCKERFILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            words = line.split()
            parent = stages.get(words[1], [])
            current = list(parent)
            name = words[3] if len(words) >= 4 and words[2].upper() == "AS" else words[1]
            stages[name] = current
        else:
            current.append(line)
    return stages


# --- the file's structure -----------------------------------------------------------------------


def test_passwords_are_required(passwords):
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        load_compose({"POSTGRES_PASSWORD": "x"})
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        load_compose({"REDIS_PASSWORD": "x"})


def test_only_the_api_publishes_a_port(compose):
    published = {name for name, service in compose["services"].items() if service.get("ports")}
    # Besides the API, only the optional `monitoring` profile's Prometheus (its UI), on loopback.
    assert published == {"api", "prometheus"}
    for port in compose["services"]["api"]["ports"]:
        assert str(port).startswith("127.0.0.1:"), "bind the API to loopback by default"
    assert compose["services"]["prometheus"]["profiles"] == ["monitoring"]
    for port in compose["services"]["prometheus"]["ports"]:
        assert str(port).startswith("127.0.0.1:"), "Prometheus has no login: loopback only"


def test_redis_requires_a_password(compose, passwords):
    redis = compose["services"]["redis"]
    command = redis["command"]
    command = shlex.split(command) if isinstance(command, str) else command
    assert command[command.index("--requirepass") + 1] == passwords["REDIS_PASSWORD"]
    for name in ("migrate", "api", "reaper", "worker"):
        broker = compose["services"][name]["environment"]["JUMPOUT_BROKER_URL"]
        assert f":{passwords['REDIS_PASSWORD']}@redis:" in broker


def test_health_checks_and_one_shot_migration_order_the_start(compose):
    services = compose["services"]
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert "ping" in services["redis"]["healthcheck"]["test"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "reaper", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"
    assert services["api"]["environment"]["JUMPOUT_AUTH_REQUIRED"] == "true"


def test_built_images_run_as_a_non_root_user(compose):
    stages = dockerfile_stages()
    targets = {}
    for service in compose["services"].values():
        build = service.get("build")
        if build is not None:
            target = build.get("target") if isinstance(build, dict) else None
            targets[service.get("image")] = target
    assert targets, "no service builds the Dockerfile"
    for name, service in compose["services"].items():
        image = service.get("image", "")
        if service.get("build") is None and image not in targets:
            continue  # an upstream image (postgres, redis)
        stage = stages[targets[image]]
        users = [line.split()[1] for line in stage if line.upper().startswith("USER ")]
        assert users, f"{name}: stage {targets[image]} has no USER"
        assert users[-1] not in ("root", "0"), f"{name} runs as root"


def test_worker_reserves_its_gpus_and_has_time_and_memory_to_checkpoint(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    # One worker per box, seeing all its GPUs: one device slot each (worker/devices.py).
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert any(volume.endswith(":/var/lib/jumpout/cache") for volume in worker["volumes"])
    assert worker["shm_size"]
    grace = worker["stop_grace_period"]
    seconds = int(grace[:-1]) * {"s": 1, "m": 60, "h": 3600}[grace[-1]]
    assert seconds >= 60
    assert f"{CONTAINER_HOME}/data" in " ".join(worker["volumes"])
    data_volume = next(v for v in worker["volumes"] if f"{CONTAINER_HOME}/data" in v)
    assert data_volume.endswith(":ro")


# --- the services, run as local processes -------------------------------------------------------


def local_command(command: list[str], *, port: int) -> list[str]:
    argv = list(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
    return argv


def local_environment(env: dict, *, home: Path, database_url: str, broker_url: str) -> dict:
    from sqlalchemy.engine import make_url

    local = {}
    for key, value in env.items():
        value = str(value)
        if key == "JUMPOUT_DATABASE_URL":
            url = make_url(value)
            assert url.host == "postgres"
            local_url = make_url(database_url)
            value = url.set(
                host=local_url.host, port=local_url.port, database=local_url.database,
                username=local_url.username, password=None,
            ).render_as_string(hide_password=False)  # fmt: skip
        elif key == "JUMPOUT_BROKER_URL":
            assert "@redis:6379/" in value
            value = value.replace("@redis:6379/", f"@{broker_url}/")
        elif key == "JUMPOUT_DEVICE":
            value = "cpu"
        else:
            value = value.replace(CONTAINER_HOME, str(home))
        local[key] = value
    return local


def test_compose_services_run_a_job_with_a_token(compose, passwords, tmp_path_factory, service_kit):
    kit = service_kit

    home = tmp_path_factory.mktemp("compose")
    services = compose["services"]
    redis_password = passwords["REDIS_PASSWORD"]
    with contextlib.ExitStack() as cleanup:
        redis = kit.RedisServer(home / "redis", password=redis_password)
        cleanup.callback(redis.stop)
        database_url = cleanup.enter_context(kit.postgres_database())
        stack = kit.Stack(home, database_url=database_url, redis=redis)
        cleanup.callback(stack.close)

        def start(name: str) -> dict:
            env = local_environment(
                services[name]["environment"], home=home, database_url=database_url,
                broker_url=f"127.0.0.1:{redis.port}",
            )  # fmt: skip
            full_env = {k: v for k, v in stack.env.items() if not k.startswith("JUMPOUT_")}
            full_env.update(env)
            # Faster than the defaults so that the test's job turns around quickly.
            full_env.update(JUMPOUT_HEARTBEAT_INTERVAL="1")
            argv = local_command(services[name]["command"], port=stack.port)
            if name == "migrate":
                subprocess.run(argv, env=full_env, cwd=REPO, check=True, timeout=120)
            else:
                stack.processes[name] = kit.Process(name, argv, env=full_env, log_dir=stack.logs)
            return full_env

        migrate_env = start("migrate")
        api_env = start("api")
        stack._wait_for_api(stack.processes["api"])
        start("reaper")
        start("worker")
        stack._wait_for_log(stack.processes["worker"], "ready.")
        assert api_env["JUMPOUT_AUTH_REQUIRED"] == "true"

        unauthenticated = stack.client.post(
            "/v1/jobs", json={"dataset": "digits", "architecture": "mlp", "epochs": 1}
        )
        assert unauthenticated.status_code == 401

        created = subprocess.run(
            [sys.executable, "-m", "api", "token", "create", "--name", "compose-test"],
            env=migrate_env, cwd=REPO, capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        headers = {"Authorization": f"Bearer {created.stdout.strip().splitlines()[0]}"}
        job = stack.submit(
            headers=headers, dataset="digits", architecture="mlp", epochs=2, train_size=256,
            test_size=128,
        )  # fmt: skip
        done = stack.wait_finished(job["id"], headers=headers, timeout=150)
        assert done["status"] == "succeeded", stack.diagnostics(job["id"])
        assert done["device"] == "cpu"
        metrics = stack.client.get(f"/v1/jobs/{job['id']}/metrics", headers=headers).json()
        assert [row["epoch"] for row in metrics["items"]] == [1, 2]
