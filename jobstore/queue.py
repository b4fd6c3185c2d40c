"""The API's side of the broker: enqueue a job by id, and check the broker and workers for health.

The API never imports `worker/`: it sends the task by name on a small Celery app configured from
the settings. Job state lives in the database, so the message carries only the job id and its
result is never read (Celery reports PENDING for ids it has never seen).
"""

from __future__ import annotations

import logging
from functools import lru_cache

from jobstore.settings import get_settings

logger = logging.getLogger(__name__)

# The names the API, the reaper and the Celery worker agree on, declared once.
QUEUE = "jobs"
RUN_JOB_TASK = "jumpout.run_job"
REAP_TASK = "jumpout.reap"
TASK_PATTERN = "jumpout.*"
# Fail fast when the broker is down: the job row is already committed and a reconciler (or a
# later re-submit) can enqueue it again, so the request must not hang on retries.
PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}


@lru_cache(maxsize=4)
def _celery_app(broker_url: str, visibility_timeout: float):
    from celery import Celery

    app = Celery("jumpout-api", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_timeout=2,
        broker_connection_retry_on_startup=False,
        broker_transport_options={"visibility_timeout": visibility_timeout},
    )
    return app


def celery_app():
    settings = get_settings()
    return _celery_app(settings.broker_url, settings.visibility_timeout)


def enqueue_job(job_id: str) -> None:
    """Send `jumpout.run_job(job_id)` to the `jobs` queue. Raises when the broker is unreachable."""
    celery_app().send_task(
        RUN_JOB_TASK, args=[job_id], queue=QUEUE, retry=True, retry_policy=PUBLISH_RETRY_POLICY
    )


def try_enqueue(job_id: str) -> bool:
    """Enqueue, logging (not raising) a broker failure: the job stays queued in the database."""
    try:
        enqueue_job(job_id)
    except Exception as exc:  # any broker/transport error; the row is the source of truth
        logger.warning("job %s stays queued: could not reach the broker (%s)", job_id, exc)
        return False
    return True


def broker_ping(timeout: float = 1.0) -> bool:
    """True when the broker's Redis answers PING."""
    import redis

    url = get_settings().broker_url
    if url.startswith("redis+socket://"):  # Celery's spelling of a unix-socket Redis URL
        url = "unix://" + url.removeprefix("redis+socket://")
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception as exc:
        logger.warning("broker health check failed: %s", exc)
        return False


def count_workers(timeout: float | None = None) -> int:
    """How many Celery workers answer a broadcast ping within `timeout` seconds (the call always
    waits the whole timeout, since the number of workers is not known in advance)."""
    settings = get_settings()
    try:
        replies = celery_app().control.ping(timeout=timeout or settings.health_ping_timeout)
    except Exception as exc:
        logger.warning("worker ping failed: %s", exc)
        return 0
    return len(replies or [])
