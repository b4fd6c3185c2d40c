"""The files with which a second box joins (read with yaml, no Docker needed): the worker's box
is given URLs and the workers' secret only, each required and without a default; the API's box
publishes PostgreSQL, Redis and the artifact service on its private address only, and the public
API still cannot write checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
REQUIRED = re.compile(r"\$\{[A-Z_]+:\?[^}]*\}")


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def test_a_second_box_runs_only_a_worker_given_urls_and_the_secret():
    services = load("docker-compose.worker.yml")["services"]
    assert list(services) == ["worker"]
    worker = services["worker"]
    env = worker["environment"]
    for key in ("JUMPOUT_DATABASE_URL", "JUMPOUT_BROKER_URL", "JUMPOUT_ARTIFACT_URL"):
        assert "${JUMPOUT_MAIN_ADDRESS:?" in env[key], key
    assert env["JUMPOUT_ARTIFACT_URL"].endswith(":8001")
    assert REQUIRED.fullmatch(env["JUMPOUT_WORKER_SECRET"])
    assert REQUIRED.search(env["JUMPOUT_DATABASE_URL"].split("@")[0])  # the password
    assert "ports" not in worker
    assert worker["command"][:5] == ["python", "-m", "celery", "-A", "worker.celery_app"]


def test_the_api_box_publishes_only_on_its_private_address_and_its_api_stays_read_only():
    override = load("docker-compose.remote-workers.yml")["services"]
    assert set(override) == {"postgres", "redis", "artifacts"}
    for name, service in override.items():
        for port in service["ports"]:
            assert port.startswith("${JUMPOUT_PRIVATE_ADDRESS:?"), (name, port)
    artifacts = override["artifacts"]
    assert "api.artifact_service:app" in artifacts["command"]
    assert REQUIRED.fullmatch(artifacts["environment"]["JUMPOUT_WORKER_SECRET"])
    assert "artifacts:/var/lib/jumpout/artifacts" in artifacts["volumes"]
    api_mounts = load("docker-compose.yml")["services"]["api"]["volumes"]
    assert all(m.endswith(":ro") for m in api_mounts if m.startswith("artifacts:"))
