"""The service end to end over real HTTP, a real Celery worker and Redis, on SQLite and PostgreSQL.

Jobs are digits/mlp runs of a few seconds on the CPU. The stack starts once per backend.
"""

from __future__ import annotations

import hashlib
import io
import time

import pytest
import torch
from celery import Celery

from jobstore.queue import QUEUE, RUN_JOB_TASK

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

QUICK = {
    "dataset": "digits",
    "architecture": "mlp",
    "epochs": 2,
    "train_size": 256,
    "test_size": 128,
}
# Long enough to be caught running (hundreds of epochs), small enough to stop at once.
LONG = {"dataset": "digits", "architecture": "mlp", "epochs": 300}


def send_duplicate(stack, job_id: str) -> None:
    """What Redis does after a visibility timeout or a lost ack: deliver the same task again."""
    app = Celery("it", broker=stack.redis.url(), set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=QUEUE)


def queue_drained(stack) -> bool:
    client = stack.redis.client()
    return client.llen(QUEUE) == 0 and client.hlen("unacked") == 0


@pytest.fixture(scope="module")
def quick_job(stack) -> dict:
    """One short job, delivered three times (what Redis does after a visibility timeout or a
    lost ack), run to the end; shared by the tests that only read it."""
    job = stack.submit(**QUICK)
    assert job["status"] == "queued"
    send_duplicate(stack, job["id"])
    send_duplicate(stack, job["id"])
    done = stack.wait_finished(job["id"])
    deadline = time.monotonic() + 30
    while not queue_drained(stack) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # the last duplicate's claim
    return done


def test_job_runs_to_success_with_each_epoch_once(stack, quick_job):
    assert quick_job["status"] == "succeeded", stack.diagnostics(quick_job["id"])
    assert quick_job["device"] == "cpu"
    assert quick_job["error"] is None
    metrics = stack.client.get(f"/v1/jobs/{quick_job['id']}/metrics").json()["items"]
    assert [row["epoch"] for row in metrics] == [1, 2]
    assert all(0.0 <= row["test_accuracy"] <= 1.0 for row in metrics)


def test_duplicate_delivery_runs_the_job_once(stack, quick_job):
    again = stack.job(quick_job["id"])
    assert again["status"] == "succeeded"
    assert again["attempt"] == 1
    log = (stack.home / "artifacts" / "jobs" / quick_job["id"] / "trainer.log").read_text()
    assert log.count("=== attempt") == 1


def test_checkpoints_download_with_matching_sha256_and_load_weights_only(stack, quick_job):
    job_id = quick_job["id"]
    checkpoints = stack.client.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"]
    assert [c["epoch"] for c in checkpoints] == [1, 2]
    for checkpoint in checkpoints:
        response = stack.client.get(f"/v1/jobs/{job_id}/checkpoints/{checkpoint['id']}/file")
        assert response.status_code == 200
        assert hashlib.sha256(response.content).hexdigest() == checkpoint["sha256"]
        assert len(response.content) == checkpoint["size_bytes"]
        state = torch.load(io.BytesIO(response.content), weights_only=True)
        assert state["epoch"] == checkpoint["epoch"]
        assert set(state) >= {"model", "optimizer", "config", "metrics"}


def test_cancel_queued_and_running_jobs(stack):
    running = stack.submit(**LONG)
    stack.wait_for(
        running["id"], lambda job: job["status"] == "running" and job["progress"]["epoch"] >= 1
    )
    # The only worker is busy: this one waits in the queue.
    queued = stack.submit(**QUICK)
    response = stack.client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"

    asked = time.monotonic()
    response = stack.client.post(f"/v1/jobs/{running['id']}/cancel")
    assert response.status_code == 202
    done = stack.wait_finished(running["id"], timeout=30)
    assert done["status"] == "cancelled", stack.diagnostics(running["id"])
    assert time.monotonic() - asked < 15
    assert done["progress"]["epoch"] < LONG["epochs"]
    assert stack.client.get(f"/v1/jobs/{running['id']}/checkpoints").json()["items"]
    # The trainer reports its end just before it exits: give the exit a moment.
    deadline = time.monotonic() + 10
    while stack.trainer_pids(running["id"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stack.trainer_pids(running["id"]) == []

    # The cancelled queued job's message is consumed without running it.
    deadline = time.monotonic() + 30
    while not queue_drained(stack) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    never_ran = stack.job(queued["id"])
    assert never_ran["status"] == "cancelled" and never_ran["attempt"] == 0


def test_invalid_spec_is_422_naming_the_field(stack):
    response = stack.client.post("/v1/jobs", json={**QUICK, "epochs": 0})
    assert response.status_code == 422
    assert "epochs" in response.text
    response = stack.client.post("/v1/jobs", json={**QUICK, "learning_rate": 0.1})
    assert response.status_code == 422
    assert "learning_rate" in response.text
