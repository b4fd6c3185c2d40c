"""The worker side of the jumpout service.

``celery_app`` and ``tasks`` receive job ids from the broker; ``supervisor`` claims a job and runs
``python -m worker.trainer JOB_ID`` as a separate process that owns CUDA and reports to the
database; ``reaper`` requeues jobs whose heartbeat went stale and re-sends jobs the broker lost.
They reach the store through ``jobstore`` (``jobstore.db.call`` retries a briefly unavailable
database) and never import ``api``.

Nothing in this package imports torch in the Celery worker's parent process.
"""
