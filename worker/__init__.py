"""The worker side of the jumpout service.

``celery_app`` and ``tasks`` receive job ids from the broker; ``supervisor`` claims a job and runs
``python -m worker.trainer JOB_ID`` as a separate process that owns CUDA and reports to the
database; ``reaper`` requeues jobs whose heartbeat went stale and re-sends jobs the broker lost;
``store`` runs ``api.jobs`` functions with retries on a per-process engine; ``launcher``
(``python -m worker``) starts the whole embedded stack for ``make run``.

Nothing in this package imports torch in the Celery worker's parent process.
"""
