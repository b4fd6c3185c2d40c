"""The worker's devices, as processes (issue 11 §0 and §3): a worker whose device is unusable
starts, says why and claims nothing (the job stays queued, /v1/health names the worker); a worker
with two (simulated CPU) device slots runs two 1-slot jobs at once, never on the same slot."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import running_stack

pytestmark = pytest.mark.timeout(240)


def health_once(stack, answered) -> dict:
    """/v1/health once `answered(health)` (15 s at most): it lists the workers that answer its
    broadcast within 0.5 s, and a loaded machine's worker can answer one of them late."""
    deadline = time.monotonic() + 15
    while True:
        health = stack.client.get("/v1/health").json()
        if answered(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="JUMPOUT_DEVICE=cuda must be unusable")
def test_a_worker_without_a_usable_device_takes_no_job(tmp_path):
    with running_stack(tmp_path, names=("api",), JUMPOUT_DEVICE="cuda") as stack:
        worker = stack.start("worker")  # ready after its probe
        assert "THIS WORKER TAKES NO JOBS" in worker.output()
        assert "no CUDA device is available" in worker.output()
        job = stack.submit(dataset="digits", architecture="mlp", epochs=1)
        time.sleep(3)
        assert stack.job(job["id"])["status"] == "queued"
        assert stack.redis.client().llen("jobs") == 1  # the wake-up message was not consumed
        health = health_once(stack, lambda h: h["unusable_workers"])
        assert (health["status"], health["workers"], health["device_slots"]) == ("degraded", 0, 0)
        [unusable] = health["unusable_workers"]
        assert unusable["name"].startswith("it@")
        assert "no CUDA device is available" in unusable["reason"]


@pytest.mark.slow  # two trainers at once: about 50 s on a loaded 2-core machine
def test_two_slots_run_two_jobs_at_once_on_different_slots(tmp_path):
    with running_stack(tmp_path, JUMPOUT_DEVICE_SLOTS="2") as stack:
        health = health_once(stack, lambda h: h["workers"])
        assert (health["workers"], health["device_slots"], health["unusable_workers"]) == (
            1,
            2,
            [],
        )
        ids = [
            stack.submit(dataset="digits", architecture="mlp", epochs=200)["id"] for _ in range(2)
        ]
        deadline = time.monotonic() + 90
        jobs = []
        while time.monotonic() < deadline:
            jobs = [stack.job(job_id) for job_id in ids]
            if all(
                job["status"] == "running" and (job.get("environment") or {}).get("device_slots")
                for job in jobs
            ):
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"the two jobs never ran at once: {jobs}\n{stack.diagnostics()}")
        slots = sorted(tuple(job["environment"]["device_slots"]) for job in jobs)
        assert slots == [("0",), ("1",)]
        for job_id in ids:
            stack.client.post(f"/v1/jobs/{job_id}/cancel")
        for job_id in ids:
            assert stack.wait_finished(job_id)["status"] == "cancelled"
