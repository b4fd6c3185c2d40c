"""Fair share of one worker (issue 9), on the real stack (Redis, one Celery worker, the reaper,
uvicorn) over SQLite and PostgreSQL: one user submits a 50-job experiment, another then submits
one job; that job starts within the next two job completions, not after the 50.

The jobs are tiny digits/mlp runs; only the first few ever run (the rest are cancelled).
"""

from __future__ import annotations

import time
from datetime import datetime

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TINY = {"dataset": "digits", "architecture": "mlp", "epochs": 1, "train_size": 64, "test_size": 64}
BACKLOG = 50


@pytest.fixture(scope="module")
def users(stack) -> dict[str, dict[str, str]]:
    """Two tokens: two owners, whose jobs take turns."""
    headers = {}
    for name in ("alice", "bob"):
        token = stack.run("-m", "api", "token", "create", "--name", name).stdout.strip()
        headers[name] = {"Authorization": f"Bearer {token}"}
    return headers


def when(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def wait_started(stack, job_id: str, headers: dict, timeout: float = 180.0) -> dict:
    return stack.wait_for(
        job_id, lambda job: job["started_at"] is not None, timeout=timeout, headers=headers
    )


def cancel_all(stack, job_ids: list[str], headers: dict) -> None:
    for job_id in job_ids:
        response = stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
        assert response.status_code in (202, 409), response.text


def assert_fair(stack, backlog: list[str], single: str, users) -> dict:
    """Bob's job started within two completions of alice's jobs after he submitted it."""
    bob = wait_started(stack, single, users["bob"])
    submitted, started = when(bob["created_at"]), when(bob["started_at"])
    alices = [stack.job(job_id, headers=users["alice"]) for job_id in backlog]
    completions = [
        job["id"]
        for job in alices
        if job["finished_at"] is not None and submitted < when(job["finished_at"]) <= started
    ]
    starts = [
        job["id"]
        for job in alices
        if job["started_at"] is not None and submitted < when(job["started_at"]) < started
    ]
    # How many of alice's jobs ran, by now (the worker goes on with them after bob's): for the
    # message only, the timestamps above are what is asserted.
    ran = sum(job["started_at"] is not None for job in alices)
    detail = f"{len(completions)} completions, {len(starts)} starts, {ran} of alice's ran"
    assert len(completions) <= 2, detail + "\n" + stack.diagnostics(single)
    # The worker may have been claiming alice's next job at the instant bob submitted; no more.
    assert len(starts) <= 1, detail
    print(f"\nFAIR SHARE: bob's job started after {detail}")
    return bob


def test_a_colleagues_job_starts_within_two_completions_of_a_50_job_backlog(stack, users):
    alice, bob = users["alice"], users["bob"]
    # The first holds the only worker for seconds, so that the backlog is still there, all of
    # it, when bob submits (49 tiny jobs could run while 50 submissions are made).
    first = {**TINY, "epochs": 100, "train_size": 1024}
    backlog = [stack.submit(headers=alice, **first)["id"]]
    backlog += [stack.submit(headers=alice, **TINY)["id"] for _ in range(BACKLOG - 1)]
    # The only worker is busy with alice's first job: the other 49 wait.
    wait_started(stack, backlog[0], alice)
    # The broker holds wake-up messages, not the 50 jobs.
    assert stack.redis.client().llen("jobs") <= 2

    single = stack.submit(headers=bob, **TINY)["id"]
    place = stack.job(single, headers=bob)
    if place["status"] == "queued":
        # Next in line, unless the worker was already claiming alice's next job.
        assert place["queue"]["position"] <= 2, place
    alices_last = stack.job(backlog[-1], headers=alice)
    if alices_last["status"] == "queued":
        assert alices_last["queue"]["ahead"] >= BACKLOG - 4, alices_last["queue"]
        assert "another owner" in alices_last["queue"]["reason"]
    try:
        done = assert_fair(stack, backlog, single, users)
        assert stack.wait_finished(single, headers=bob)["status"] == "succeeded"
        assert done["attempt"] == 1
    finally:
        cancel_all(stack, backlog, alice)


def test_an_experiments_jobs_take_turns_with_a_single_job(stack, users):
    alice, bob = users["alice"], users["bob"]
    request = {"base": TINY, "grid": {"lr": [0.05, 0.1]}, "seeds": BACKLOG // 2}
    response = stack.client.post("/v1/experiments", json=request, headers=alice)
    if response.status_code in (404, 405):
        pytest.skip("this build has no POST /v1/experiments")
    assert response.status_code == 201, response.text
    experiment = response.json()
    backlog = [
        job["id"]
        for job in stack.client.get("/v1/jobs", params={"limit": 100}, headers=alice).json()[
            "items"
        ]
        if job.get("experiment_id") == experiment["id"]
    ]
    assert len(backlog) == BACKLOG
    # Wait until one of them runs, then bob submits.
    deadline = time.monotonic() + 120
    while not any(stack.job(job_id)["started_at"] for job_id in backlog):
        assert time.monotonic() < deadline, stack.diagnostics()
        time.sleep(0.3)
    single = stack.submit(headers=bob, **TINY)["id"]
    try:
        assert_fair(stack, backlog, single, users)
    finally:
        cancel_all(stack, backlog, alice)
