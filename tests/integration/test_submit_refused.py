"""Issue 12 with the real processes (uvicorn, a Celery worker, the reaper, Redis; SQLite and
PostgreSQL): a cifar10 job sent to a server without cifar10's files is answered 422 at once,
saying what the server's operator must do, instead of being accepted with 201 to fail in the
worker seconds later with advice (``download=True``) an API client cannot follow; a digits job
with ``train_size`` beyond the data set likewise. Nothing is stored, the same server still runs
what it can, and `GET /v1/datasets` says which data sets it can train on, seeing files an
operator adds without a restart."""

from __future__ import annotations

import pytest

from jumpout import catalog

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CIFAR10 = {"dataset": "cifar10", "architecture": "mlp", "epochs": 1}


def refused_fields(response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_spec"
    return {field["field"]: field["message"] for field in error["fields"]}


def availability(stack) -> dict[str, dict]:
    response = stack.client.get("/v1/datasets")
    assert response.status_code == 200, response.text
    return {item["name"]: item for item in response.json()["items"]}


def test_a_job_this_server_cannot_run_is_refused_at_submission(stack):
    assert not availability(stack)["cifar10"]["available"]

    message = refused_fields(stack.client.post("/v1/jobs", json=CIFAR10))["dataset"]
    assert "cifar10" in message and "JUMPOUT_DATA_DIR" in message and "operator" in message
    assert "download=True" not in message and str(stack.home) not in message
    too_many = {"dataset": "digits", "architecture": "mlp", "train_size": 10_000_000}
    assert (
        "at most 1437" in refused_fields(stack.client.post("/v1/jobs", json=too_many))["train_size"]
    )
    experiment = {"base": CIFAR10, "preset": "table2", "seeds": 1}
    assert "base.dataset" in refused_fields(stack.client.post("/v1/experiments", json=experiment))
    assert stack.client.get("/v1/jobs").json()["items"] == []

    # The same server runs what it can.
    job = stack.submit(dataset="digits", architecture="mlp", epochs=1, train_size=64, test_size=64)
    assert stack.wait_finished(job["id"], timeout=120)["status"] == "succeeded"
    assert [item["id"] for item in stack.client.get("/v1/jobs").json()["items"]] == [job["id"]]

    # Files the operator adds are seen without a restart (only their presence is checked here).
    for relative in catalog.entry("cifar10").files:
        path = stack.home / "data" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"placeholder")
    listed = availability(stack)["cifar10"]
    assert listed["available"] and listed["reason"] is None
