"""Celery tasks: deserialise the id, delegate to a plain function. No results are stored."""

from __future__ import annotations

from jobstore.queue import REAP_TASK, RUN_JOB_TASK

# Imported in the worker's parent, before the pool forks, so that a pool process (re)started by
# Celery does not pay about 0.6 s re-importing SQLAlchemy and the API modules. Safe:
# nothing here imports torch or jumpout (test_the_worker_parent_never_imports_torch), and the
# store opens its database engine lazily, per process.
from worker import supervisor
from worker.celery_app import app


@app.task(name=RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str = "") -> None:
    """Claim and run the next job in the fair order (not necessarily `job_id`, the job whose
    submission sent this message: see `jobstore.queue`); a message that finds nothing queued
    returns quietly."""
    supervisor.run(job_id)


@app.task(name=REAP_TASK, ignore_result=True)
def reap() -> None:
    """One reaper pass, for an operator (``celery -A worker.celery_app call jumpout.reap``).

    The periodic reaper is ``python -m worker.reaper``, not a beat schedule: a scheduled task on
    a concurrency-1 GPU worker would wait behind the very job it should rescue.
    """
    from worker import reaper

    reaper.reap_once()
