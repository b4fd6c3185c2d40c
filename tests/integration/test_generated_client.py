"""The OpenAPI document as a contract: a client generated from the running server's
`/openapi.json` by openapi-python-client has functions named after the clean operation ids and
drives a job end to end (submit, poll, metrics, checkpoints, download, a refused spec).

The generator runs once per distinct document (a few seconds); the stack starts once per backend.
"""

from __future__ import annotations

import enum
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

GENERATOR = Path(sys.executable).parent / "openapi-python-client"
PACKAGE = "jumpout_client"
OPERATIONS = {
    "jobs": {
        "submit_job",
        "list_jobs",
        "read_job",
        "cancel_job",
        "read_metrics",
        "list_checkpoints",
        "download_checkpoint",
        "download_latest_checkpoint",
        "download_best_checkpoint",
        "download_epoch_checkpoint",
        "retry_job",
        "job_events",
        "read_job_log",
    },
    "health": {"read_health"},
    "datasets": {"list_datasets"},
    "experiments": {
        "submit_experiment",
        "list_experiments",
        "read_experiment",
        "cancel_experiment",
        "read_experiment_report",
    },
}
# FastAPI's default ids end with the path and the method: submit_job_v1_jobs_post.
DEFAULT_ID = re.compile(r"_v1_\w*_(get|post|put|patch|delete)\b")
QUICK = {
    "dataset": "digits",
    "architecture": "mlp",
    "method": "jumpout",
    "epochs": 2,
    "train_size": 256,
    "test_size": 128,
}

# One generated package per distinct document: {sha256 of the document: its parent folder}.
_generated: dict[str, Path] = {}


def generate(document: dict, tmp_path_factory) -> Path:
    text = json.dumps(document, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest not in _generated:
        root = tmp_path_factory.mktemp("generated-client")
        spec_path = root / "openapi.json"
        spec_path.write_text(text)
        # The generator formats its output with ruff, which it looks up on PATH.
        env = {**os.environ, "PATH": f"{GENERATOR.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        argv = [
            str(GENERATOR), "generate", "--path", str(spec_path),
            "--output-path", str(root / PACKAGE), "--meta", "none", "--fail-on-warning",
        ]  # fmt: skip
        result = subprocess.run(
            argv, cwd=root, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        _generated[digest] = root
    return _generated[digest]


@pytest.fixture(scope="module")
def generated(stack, tmp_path_factory):
    """The generated package, imported; its modules leave sys.modules afterwards."""
    response = stack.client.get("/openapi.json")
    assert response.status_code == 200, response.text
    document = response.json()
    root = generate(document, tmp_path_factory)
    sys.path.insert(0, str(root))
    try:
        package = types.SimpleNamespace(
            root=root / PACKAGE,
            document=document,
            client=importlib.import_module(f"{PACKAGE}.client"),
            models=importlib.import_module(f"{PACKAGE}.models"),
            **{
                name: importlib.import_module(f"{PACKAGE}.api.{tag}.{name}")
                for tag, names in OPERATIONS.items()
                for name in names
            },
        )
        yield package
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


@pytest.fixture
def client(stack, generated):
    with generated.client.Client(
        base_url=str(stack.client.base_url), raise_on_unexpected_status=True
    ) as client:
        yield client


def test_operations_are_named_after_the_clean_operation_ids(generated):
    ids = {
        operation["operationId"]
        for path in generated.document["paths"].values()
        for operation in path.values()
    }
    assert ids == set().union(*OPERATIONS.values())
    api = generated.root / "api"
    modules = {
        tag.name: {p.stem for p in tag.glob("*.py") if p.stem != "__init__"}
        for tag in api.iterdir()
        if tag.is_dir() and tag.name != "__pycache__"
    }
    assert modules == OPERATIONS
    assert (api / "jobs" / "submit_job.py").is_file()
    for path in generated.root.rglob("*.py"):
        assert not DEFAULT_ID.search(path.name), path
        assert not DEFAULT_ID.search(path.read_text()), path


def _enum_values(node) -> set[str]:
    """Every string in an `enum` list anywhere in the document but in response headers (the
    generator makes no types of those: `Idempotent-Replayed: true` is documented, not parsed)."""
    found: set[str] = set()
    if isinstance(node, dict):
        found.update(v for v in node.get("enum", ()) if isinstance(v, str))
        for key, value in node.items():
            if key != "headers":
                found |= _enum_values(value)
    elif isinstance(node, list):
        for value in node:
            found |= _enum_values(value)
    return found


def test_generated_enums_keep_every_value(generated):
    # Every choice field's enum carries x-enum-varnames (api.schemas): without them the
    # generator named 'dropout+III' and 'dropout+I+II' both DROPOUTIII and dropped one.
    members = {
        member.value
        for value in vars(generated.models).values()
        if isinstance(value, type) and issubclass(value, enum.Enum)
        for member in value
    }
    assert _enum_values(generated.document) - members == set()


def test_generated_client_runs_a_job_end_to_end(stack, generated, client):
    models = generated.models
    body = models.JobCreate.from_dict(QUICK)
    assert body.to_dict() == QUICK
    response = generated.submit_job.sync_detailed(client=client, body=body)
    assert response.status_code == 201, response.content
    job = response.parsed
    assert isinstance(job, models.JobRead)
    assert job.status == models.JobStatus.QUEUED
    assert job.method == models.Method.JUMPOUT

    deadline = time.monotonic() + 120
    while True:
        job = generated.read_job.sync(job.id, client=client)
        assert isinstance(job, models.JobRead), job
        if job.status in (models.JobStatus.FAILED, models.JobStatus.CANCELLED):
            raise AssertionError(f"{job.status}: {job.error}\n{stack.diagnostics(job.id)}")
        if job.status == models.JobStatus.SUCCEEDED:
            break
        assert time.monotonic() < deadline, f"job stuck: {job}\n{stack.diagnostics(job.id)}"
        time.sleep(0.2)

    metrics = generated.read_metrics.sync(job.id, client=client)
    assert isinstance(metrics, models.MetricsPage), metrics
    assert [row.epoch for row in metrics.items] == [1, 2]
    assert all(0.0 <= row.test_accuracy <= 1.0 for row in metrics.items)

    listed = generated.list_jobs.sync(client=client, status=models.JobStatus.SUCCEEDED)
    assert isinstance(listed, models.JobsPage), listed
    assert job.id in {item.id for item in listed.items}

    checkpoints = generated.list_checkpoints.sync(job.id, client=client)
    assert isinstance(checkpoints, models.CheckpointsPage), checkpoints
    assert [c.epoch for c in checkpoints.items] == [1, 2]
    checkpoint = checkpoints.items[-1]
    response = generated.download_checkpoint.sync_detailed(job.id, checkpoint.id, client=client)
    assert response.status_code == 200
    data = response.parsed.payload.read()
    assert hashlib.sha256(data).hexdigest() == checkpoint.sha256
    assert len(data) == checkpoint.size_bytes

    health = generated.read_health.sync(client=client)
    assert isinstance(health, models.Health), health
    assert health.database == "ok" and health.broker == "ok"


def test_generated_client_gets_a_refused_spec_as_a_422_naming_the_field(generated, client):
    models = generated.models
    body = models.JobCreate.from_dict({**QUICK, "epochs": 0})
    response = generated.submit_job.sync_detailed(client=client, body=body)
    assert response.status_code == 422, response.content
    error = response.parsed
    assert isinstance(error, models.ErrorBody), error
    assert "epochs" in [field.field for field in error.error.fields]
