"""The API's side of a bad day (issue 12): a write on a full disk answers 507 `storage_full`,
the health reports free space, and a failed or cancelled job can be retried
(`POST /v1/jobs/{id}/retry`). On SQLite and PostgreSQL; the full disk itself is injected here
(tests/integration/test_bad_day.py fills a real one)."""

from __future__ import annotations

import errno
import sqlite3

import pytest
from sqlalchemy.exc import OperationalError

from api import auth
from jobstore import jobs, storage

SPEC = {"dataset": "synthetic", "architecture": "mlp"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class _DiskFull(Exception):
    """What psycopg raises for SQLSTATE 53100 (psycopg.errors.DiskFull), as far as the check
    looks."""

    sqlstate = storage.POSTGRES_DISK_FULL


def _sqlite_full() -> sqlite3.OperationalError:
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = storage.SQLITE_FULL
    return error


@pytest.mark.parametrize(
    "error",
    [
        OperationalError("INSERT ...", {}, _sqlite_full()),
        OperationalError("INSERT ...", {}, _DiskFull("could not extend file")),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
    ],
    ids=["sqlite", "postgresql", "enospc", "edquot"],
)
def test_a_write_on_a_full_disk_answers_507_naming_the_cause(client, monkeypatch, error):
    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(jobs, "create_job", full)
    response = client.post("/v1/jobs", json=SPEC)
    assert response.status_code == 507, response.text
    assert response.json() == {
        "error": {"code": "storage_full", "message": storage.STORAGE_FULL_MESSAGE, "fields": []}
    }


def test_other_database_errors_are_still_a_plain_500(client, monkeypatch):
    def broken(*args, **kwargs):
        raise OperationalError("INSERT ...", {}, sqlite3.OperationalError("disk I/O error"))

    monkeypatch.setattr(jobs, "create_job", broken)
    with pytest.raises(OperationalError):  # the TestClient re-raises what became a 500
        client.post("/v1/jobs", json=SPEC)


def test_the_routes_that_write_declare_507(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/jobs", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/retry"):
        assert "507" in paths[path]["post"]["responses"], path
    assert "507" in paths["/v1/experiments"]["post"]["responses"]


def test_health_reports_free_space_by_role_and_degrades_below_the_setting(
    client, configure, settings
):
    configure(health_ping_timeout=0.2)
    body = client.get("/v1/health").json()
    assert body["status"] == "ok"
    names = [volume["name"] for volume in body["storage"]]
    assert names and names[0] == "home"  # home, artifacts, the database share one filesystem
    assert all(volume["free_bytes"] > 0 and not volume["low"] for volume in body["storage"])
    assert str(settings.home) not in str(body)  # roles, not paths: the route is public

    configure(health_ping_timeout=0.2, min_free_bytes=2**62)
    response = client.get("/v1/health")
    assert response.status_code == 200  # reads still work: not a reason to take it out
    assert response.json()["status"] == "degraded"
    assert all(volume["low"] for volume in response.json()["storage"])


def test_a_failed_job_is_retried_with_a_fresh_budget_and_published(
    client, session, make_job, enqueued
):
    job_id = make_job()
    jobs.claim_job(session, job_id, worker="w")
    jobs.finish_job(session, job_id, status="failed", error="no space left", attempt=1)

    response = client.post(f"/v1/jobs/{job_id}/retry")
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["status"], job["attempt"], job["max_attempts"], job["error"]) == (
        "queued",
        1,
        1 + 3,
        None,
    )
    assert job["finished_at"] is None
    assert enqueued == [job_id]
    # The next claim is attempt 2 of 4: the attempt count goes on.
    assert jobs.claim_job(session, job_id, worker="w").attempt == 2
    assert jobs.attempt_budget(4, configured=3) == 4


def test_a_cancelled_job_is_retried_and_can_be_claimed(client, session, make_job):
    job_id = make_job()
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    response = client.post(f"/v1/jobs/{job_id}/retry")
    assert response.status_code == 202, response.text
    assert response.json()["cancel_requested"] is False
    assert jobs.claim_job(session, job_id, worker="w") is not None


@pytest.mark.parametrize("state", ["queued", "running", "succeeded"])
def test_only_a_failed_or_cancelled_job_can_be_retried(client, session, make_job, state):
    job_id = make_job()
    if state != "queued":
        jobs.claim_job(session, job_id, worker="w")
    if state == "succeeded":
        jobs.finish_job(session, job_id, status="succeeded", attempt=1)
    response = client.post(f"/v1/jobs/{job_id}/retry")
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "job_not_retryable"
    assert state in response.json()["error"]["message"]
    assert jobs.get_job(session, job_id).status == state


def test_retry_of_a_job_that_does_not_exist_is_404(client):
    response = client.post(f"/v1/jobs/{'0' * 32}/retry")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"


def test_only_the_owner_or_an_admin_may_retry(client, configure, session, make_job):
    configure(auth_required=True)
    alice = auth.create_token(session, name="alice")
    bob = auth.create_token(session, name="bob")
    root = auth.create_token(session, name="root", is_admin=True)
    job_id = make_job(owner_id=alice[0].id)
    jobs.finish_job(session, job_id, status="cancelled")

    refused = client.post(f"/v1/jobs/{job_id}/retry", headers=bearer(bob[1]))
    assert refused.status_code == 403, refused.text
    assert jobs.get_job(session, job_id).status == "cancelled"
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=bearer(alice[1])).status_code == 202
    jobs.finish_job(session, job_id, status="cancelled")
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=bearer(root[1])).status_code == 202


def test_a_retry_counts_against_the_owners_queued_limit(client, configure, session, make_job):
    configure(max_queued_per_token=1)
    failed = make_job()
    jobs.claim_job(session, failed, worker="w")
    jobs.finish_job(session, failed, status="failed", attempt=1)
    make_job()  # the one queued job allowed
    response = client.post(f"/v1/jobs/{failed}/retry")
    assert response.status_code == 429, response.text
    assert jobs.get_job(session, failed).status == "failed"


def test_the_reaper_honours_a_retried_jobs_budget(session, make_job, settings):
    from datetime import timedelta

    from sqlalchemy import update

    from jobstore.tables import Job, utcnow

    job_id = make_job()
    for attempt in (1, 2):  # two crashes, then a third attempt that failed: the budget is spent
        jobs.claim_job(session, job_id, worker="w")
        jobs.requeue_job(session, job_id, attempt=attempt, error="crash", count_attempt=True)
    jobs.claim_job(session, job_id, worker="w")
    jobs.finish_job(session, job_id, status="failed", attempt=3)
    jobs.retry_job(session, job_id, token=auth.ANONYMOUS)
    assert jobs.claim_job(session, job_id, worker="w").attempt == 4
    stale = utcnow() - timedelta(seconds=600)
    session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=stale))
    session.commit()
    # Attempt 4 of 3 + 3: its worker was lost, and it is requeued rather than failed.
    assert jobs.requeue_stale_jobs(session, timeout_s=60, max_attempts=3) == [job_id]
    assert jobs.get_job(session, job_id).status == "queued"
