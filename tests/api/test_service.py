"""The service functions the worker uses: claim, heartbeat, finish, requeue."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from jobstore import jobs
from jobstore.errors import JobNotFound
from jobstore.tables import Job


def age_heartbeat(session, job_id: str, seconds: float) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(heartbeat_at=datetime.now(UTC) - timedelta(seconds=seconds))
    )
    session.commit()


def test_claim_is_conditional(session, make_job):
    job_id = make_job()
    job = jobs.claim_job(session, job_id, worker="w1")
    assert job is not None and job.status == "running" and job.attempt == 1
    assert job.worker == "w1" and job.started_at is not None and job.heartbeat_at is not None
    assert job.started_at.tzinfo is not None
    # A redelivered message or a second worker: nothing to do.
    assert jobs.claim_job(session, job_id, worker="w2") is None
    assert jobs.get_job(session, job_id).worker == "w1"
    assert jobs.claim_job(session, "missing", worker="w1") is None


def test_a_cancelled_job_cannot_be_claimed(session, make_job):
    job_id = make_job()
    jobs.finish_job(session, job_id, status="cancelled")
    assert jobs.claim_job(session, job_id, worker="w1") is None


def test_heartbeat_belongs_to_the_current_attempt(session, make_job):
    job_id = make_job()
    jobs.claim_job(session, job_id, worker="w1")
    assert jobs.heartbeat(session, job_id, attempt=1) is True
    assert jobs.heartbeat(session, job_id, attempt=2) is False
    jobs.finish_job(session, job_id, status="succeeded")
    assert jobs.heartbeat(session, job_id, attempt=1) is False


def test_finish_is_conditional(session, make_job):
    job_id = make_job()
    assert jobs.finish_job(session, job_id, status="succeeded") is False  # still queued
    jobs.claim_job(session, job_id, worker="w1")
    assert jobs.finish_job(session, job_id, status="failed", error="boom", attempt=2) is False
    assert jobs.finish_job(session, job_id, status="failed", error="boom", attempt=1) is True
    assert jobs.finish_job(session, job_id, status="succeeded") is False  # already finished
    job = jobs.get_job(session, job_id)
    assert job.status == "failed" and job.error == "boom" and job.finished_at is not None
    with pytest.raises(ValueError, match="status"):
        jobs.finish_job(session, job_id, status="running")


def test_requeue_stale_jobs_bounds_attempts(session, make_job):
    job_id, fresh = make_job(), make_job()
    jobs.claim_job(session, job_id, worker="w1")
    jobs.claim_job(session, fresh, worker="w2")
    age_heartbeat(session, job_id, 120)

    assert jobs.requeue_stale_jobs(session, timeout_s=60, max_attempts=2) == [job_id]
    job = jobs.get_job(session, job_id)
    assert job.status == "queued" and job.attempt == 1 and job.worker is None
    assert jobs.get_job(session, fresh).status == "running"
    assert jobs.requeue_stale_jobs(session, timeout_s=60, max_attempts=2) == []

    assert jobs.claim_job(session, job_id, worker="w3").attempt == 2
    age_heartbeat(session, job_id, 120)
    assert jobs.requeue_stale_jobs(session, timeout_s=60, max_attempts=2) == []
    job = jobs.get_job(session, job_id)
    assert job.status == "failed" and job.finished_at is not None
    assert job.error == "worker lost 2 times (heartbeat timeout)"


def test_a_stale_job_whose_cancel_was_requested_is_cancelled(session, make_job):
    job_id = make_job()
    jobs.claim_job(session, job_id, worker="w1")
    jobs.request_cancel(session, job_id, token=type("Admin", (), {"id": 1, "is_admin": True}))
    age_heartbeat(session, job_id, 120)
    assert jobs.requeue_stale_jobs(session, timeout_s=60, max_attempts=3) == []
    assert jobs.get_job(session, job_id).status == "cancelled"


def test_a_requeue_after_a_cancel_request_cancels_instead(session, make_job):
    # The supervisor decided to requeue (its trainer crashed) and a cancel arrived meanwhile: a
    # queued job with the flag set is never claimed, so the requeue must end the job instead.
    job_id, other = make_job(), make_job()
    attempt = jobs.claim_job(session, job_id, worker="w1").attempt
    jobs.claim_job(session, other, worker="w2")
    jobs.request_cancel(session, job_id, token=type("Admin", (), {"id": 1, "is_admin": True}))

    assert jobs.requeue_job(session, job_id, attempt=attempt, error="crashed", count_attempt=True)
    job = jobs.get_job(session, job_id)
    assert job.status == "cancelled" and job.finished_at is not None
    assert job.finished_at.tzinfo is not None and job.finished_at <= datetime.now(UTC)
    # Without the flag the same call requeues.
    assert jobs.requeue_job(session, other, attempt=1, error="crashed", count_attempt=True)
    job = jobs.get_job(session, other)
    assert job.status == "queued" and job.finished_at is None


def test_get_job_raises_a_lookup_error(session):
    with pytest.raises(LookupError):
        jobs.get_job(session, "0" * 32)
    with pytest.raises(JobNotFound):
        jobs.list_metrics(session, "0" * 32)


def test_set_device_and_queued_ids(session, make_job):
    first, second = make_job(), make_job()
    jobs.set_device(session, first, device="cuda:0 (NVIDIA H100)")
    assert jobs.get_job(session, first).device == "cuda:0 (NVIDIA H100)"
    assert jobs.queued_job_ids(session) == [first, second]
