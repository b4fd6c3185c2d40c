"""Failure and recovery paths of the worker, on the real stack: a deterministic failure (never
retried), a trainer crash, a worker's graceful shutdown, and a worker killed outright (the
reaper's case). Each recovery resumes from a checkpoint.

SQLite only (the state machine is the same on PostgreSQL, which ``test_service`` covers), to keep
the integration suite within a few minutes.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from jumpout import catalog

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.parametrize("stack", ["sqlite"], indirect=True),
]

LONG = {"dataset": "digits", "architecture": "mlp", "epochs": 300}


def trainer_log(stack, job_id: str) -> str:
    path = stack.home / "artifacts" / "jobs" / job_id / "trainer.log"
    return path.read_text() if path.exists() else ""


def wait_until(condition, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def cancel_and_wait(stack, job_id: str) -> dict:
    assert stack.client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    return stack.wait_finished(job_id, timeout=30)


def test_missing_dataset_fails_once_with_a_readable_reason(stack):
    # A submission without the files is refused (test_submit_refused.py); files that are there
    # at submission but unreadable when the job starts (corrupted, replaced) fail the job.
    for relative in catalog.entry("cifar10").files:
        (stack.home / "data" / relative).parent.mkdir(parents=True, exist_ok=True)
        (stack.home / "data" / relative).write_bytes(b"not the real file")
    job = stack.submit(dataset="cifar10", architecture="mlp", epochs=1)
    done = stack.wait_finished(job["id"])
    assert done["status"] == "failed"
    assert done["attempt"] == 1
    assert "cifar10" in done["error"].lower()
    assert "Traceback" not in done["error"]


@pytest.mark.slow  # about 20 s: in make test-slow, keeping make test under 15 minutes
def test_trainer_crash_is_retried_and_resumes_from_the_checkpoint(stack):
    # Long enough to be caught running: six epochs of digits took 0.4 s from a forked trainer.
    spec = {**LONG, "epochs": 150}
    job = stack.submit(**spec)
    stack.wait_running(job["id"], 2)
    for pid in stack.trainer_pids(job["id"]):
        os.kill(pid, signal.SIGKILL)
    done = stack.wait_finished(job["id"], timeout=120)
    assert done["status"] == "succeeded", stack.diagnostics(job["id"])
    assert done["attempt"] == 2
    assert stack.epochs(job["id"]) == list(range(1, spec["epochs"] + 1))
    log = trainer_log(stack, job["id"])
    assert "=== attempt 2 ===" in log and "resuming" in log


def test_worker_shutdown_checkpoints_and_requeues_without_using_an_attempt(stack):
    job = stack.submit(**LONG)
    stack.wait_running(job["id"], 1)
    stack.stop("worker", timeout=60)  # SIGTERM to the main process, as `docker stop` does
    assert stack.trainer_pids(job["id"]) == []
    requeued = stack.job(job["id"])
    assert requeued["status"] == "queued", stack.diagnostics(job["id"])
    assert requeued["attempt"] == 0
    assert "shutdown" in requeued["error"]
    checkpoints = stack.client.get(f"/v1/jobs/{job['id']}/checkpoints").json()["items"]
    assert checkpoints
    epoch_before = requeued["progress"]["epoch"]

    stack.start("worker")
    resumed = stack.wait_running(job["id"], epoch_before + 1, attempt=1)
    assert "resuming" in trainer_log(stack, job["id"])
    assert cancel_and_wait(stack, job["id"])["status"] == "cancelled"
    epochs = stack.epochs(job["id"])
    assert epochs == list(range(1, len(epochs) + 1))
    assert resumed["attempt"] == 1


def test_killed_worker_is_reaped_and_the_job_resumes_on_the_next_worker(stack):
    job = stack.submit(**LONG)
    stack.wait_running(job["id"], 1)
    stack.processes.pop("worker").kill()  # the Celery parent and its pool process, SIGKILL
    # The trainer notices its supervisor died (parent-death signal), checkpoints and exits.
    wait_until(lambda: not stack.trainer_pids(job["id"]), timeout=30, what="the trainer to exit")
    # The heartbeat stops; the reaper requeues the job (timeout 8 s in these tests) and sends it.
    requeued = stack.wait_for(job["id"], lambda job: job["status"] == "queued", timeout=60)
    assert requeued["attempt"] == 1
    epoch_before = requeued["progress"]["epoch"]

    stack.start("worker")
    stack.wait_running(job["id"], epoch_before + 1, attempt=2, timeout=90)
    assert "resuming" in trainer_log(stack, job["id"])
    assert cancel_and_wait(stack, job["id"])["status"] == "cancelled"
    epochs = stack.epochs(job["id"])
    assert epochs == list(range(1, len(epochs) + 1))
