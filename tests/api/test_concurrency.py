"""Concurrent writers (the API, a supervisor, a trainer) never see 'database is locked'."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from jobstore import db, jobs


def test_concurrent_writers_on_one_database(settings, make_job):
    job_ids = [make_job(epochs=20) for _ in range(4)]
    with db.session_scope() as session:
        for job_id in job_ids:
            jobs.claim_job(session, job_id, worker="w")

    def writer(job_id: str) -> int:
        with db.session_scope() as session:
            for epoch in range(1, 11):
                jobs.record_epoch(session, job_id, {"epoch": epoch, "test_accuracy": epoch / 20})
                assert jobs.heartbeat(session, job_id, attempt=1)
                jobs.cancel_requested(session, job_id)
            return len(jobs.list_metrics(session, job_id))

    def reader(_: int) -> int:
        with db.session_scope() as session:
            return sum(len(jobs.list_jobs(session, limit=10)[0]) for _ in range(10))

    with ThreadPoolExecutor(max_workers=8) as pool:
        written = list(pool.map(writer, job_ids))
        read = list(pool.map(reader, range(4)))
    assert written == [10] * 4
    assert read == [40] * 4
