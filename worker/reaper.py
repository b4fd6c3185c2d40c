"""The reaper: `python -m worker.reaper`, a loop running `reap_once` every `reaper_interval`.

Each pass

1. requeues running jobs whose heartbeat is older than ``heartbeat_timeout`` (their worker or
   supervisor died; ``jobstore.jobs.requeue_stale_jobs`` fails those out of attempts) and sends each
   requeued id to the broker; the next attempt resumes from the newest valid checkpoint;
2. reconciles: a job that has been ``queued`` for over a minute but whose message is in neither
   the broker's queue nor its unacknowledged set (the enqueue after the commit failed, Redis lost
   its data) is sent again. A duplicate delivery would be harmless anyway: ``claim_job`` lets only
   one delivery run a job.

Why a process and not a Celery beat entry: the GPU workers run one task at a time, so a scheduled
``reap`` task would wait behind the very training job it is meant to rescue. Run exactly one
reaper per deployment (the compose ``reaper`` service; the embedded launcher starts one).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from jobstore import db, jobs
from jobstore.queue import QUEUE, enqueue_job, job_ids, redis_address
from jobstore.settings import get_settings
from jobstore.tables import Job, JobStatus

log = logging.getLogger("worker.reaper")

# A delivered, unacknowledged message younger than this belongs to a live worker about to claim
# its job (a loaded machine can take seconds to fork the pool process and claim); an older one,
# of a job still queued, to a dead worker. Not tied to settings.reconcile_after: a short reconcile
# delay must not make a slow claim look lost.
UNACKED_RECENT = timedelta(seconds=60)


def reap_once(
    *,
    enqueue: Callable[[str], None] = enqueue_job,
    ids_in_broker: Callable[[], set[str] | None] | None = None,
    lost_after: timedelta | None = None,
) -> dict[str, list[str]]:
    """One pass; returns the ids requeued as stale and those re-sent as lost."""
    settings = get_settings()
    if lost_after is None:
        lost_after = timedelta(seconds=settings.reconcile_after)
    stale = db.call(
        jobs.requeue_stale_jobs,
        timeout_s=settings.heartbeat_timeout,
        max_attempts=settings.max_attempts,
    )
    for job_id in stale:
        log.warning(
            "job %s: heartbeat older than %.0fs, requeued", job_id, settings.heartbeat_timeout
        )
        enqueue(job_id)
    lost: list[str] = []
    waiting = db.call(_queued_before, datetime.now(UTC) - lost_after)
    if waiting:
        known = (ids_in_broker or _ids_in_broker)()
        if known is not None:
            lost = [job_id for job_id in waiting if job_id not in known and job_id not in stale]
            for job_id in lost:
                log.warning("job %s: queued but not in the broker, sent again", job_id)
                enqueue(job_id)
    return {"stale": list(stale), "lost": lost}


def _queued_before(session, cutoff: datetime) -> list[str]:
    query = select(Job.id).where(Job.status == JobStatus.QUEUED, Job.created_at < cutoff)
    return list(session.scalars(query))


def _ids_in_broker(recent_s: float = UNACKED_RECENT.total_seconds()) -> set[str] | None:
    """Job ids of the ``run_job`` messages waiting in Redis, or delivered in the last
    ``recent_s`` seconds and not yet acknowledged (a worker is about to claim them).

    An older unacknowledged message of a queued job belongs to a worker that died: it would only
    come back after the visibility timeout (days), so it does not count. None when the broker
    cannot be read (then nothing is re-sent: better late than doubled).
    """
    import redis

    address = redis_address(get_settings().broker_url)
    if address is None:
        return None
    try:
        client = redis.Redis.from_url(address, socket_timeout=5)
        # kombu keeps a queue's messages of priority 0 in a list named after the queue, other
        # priorities in "<queue>\x06\x16<priority>"; delivered, unacknowledged ones in the hash
        # "unacked", with their delivery times in the sorted set "unacked_index".
        raw: list[bytes] = []
        for key in [QUEUE, *(f"{QUEUE}\x06\x16{p}" for p in range(1, 10))]:
            raw.extend(client.lrange(key, 0, -1))
        tags = client.zrangebyscore("unacked_index", time.time() - recent_s, "+inf")
        unacked = client.hmget("unacked", tags) if tags else []
    except redis.RedisError as error:
        log.warning("cannot read the broker's queue: %s", error)
        return None
    ids = set(job_ids(raw))
    for value in unacked:
        try:
            message = json.loads(value)[0]
        except (ValueError, IndexError, TypeError):
            continue
        ids.update(job_ids([json.dumps(message)]))
    return ids


def run_forever(stop: threading.Event) -> None:
    settings = get_settings()
    log.info(
        "reaper: every %.0fs, heartbeat timeout %.0fs",
        settings.reaper_interval,
        settings.heartbeat_timeout,
    )
    while not stop.is_set():
        try:
            reap_once()
        except Exception:  # noqa: BLE001 - a database or broker outage: try again next time
            log.exception("reaper pass failed")
        stop.wait(settings.reaper_interval)


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    run_forever(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
