"""The reaper: `python -m worker.reaper`, a loop running `reap_once` every `reaper_interval`.

Each pass

1. requeues running jobs whose heartbeat is older than ``heartbeat_timeout`` (their worker or
   supervisor died; ``jobstore.jobs.requeue_stale_jobs`` fails those out of attempts); the next
   attempt resumes from the newest valid checkpoint;
2. tops up the dispatch messages: the database is the queue and the broker only wakes workers
   (`jobstore.queue`), so what must hold is a count, not a message per job: while jobs are
   claimable, min(claimable, ``dispatch_depth``) messages wait in the broker. A pass publishes
   the shortfall (the publish after a submission failed, Redis lost its data, a worker died
   between receiving a message and claiming). Queued jobs younger than ``reconcile_after``
   are not counted (the API publishes right after its commit); those this pass requeued are.
   A spare message is harmless: the worker that receives it finds nothing to claim and acks it.

Messages delivered to a worker and not acknowledged are not counted: a live worker's is the job it
runs, a dead worker's would come back only after the visibility timeout (days).

Why a process and not a Celery beat entry: the GPU workers run one task at a time, so a scheduled
``reap`` task would wait behind the very training job it is meant to rescue. Run exactly one
reaper per deployment (the compose ``reaper`` service; the embedded launcher starts one).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, or_, select

from jobstore import db, events, jobs, queue
from jobstore.fairshare import CLAIMABLE
from jobstore.settings import get_settings
from jobstore.tables import Job

log = logging.getLogger("worker.reaper")


def reap_once(
    *,
    top_up: Callable[..., int] = queue.top_up,
    due_after: timedelta | None = None,
) -> dict[str, object]:
    """One pass; returns the ids requeued as stale and how many dispatch messages it published
    (`top_up(claimable, requeued=ids)` publishes them; tests pass their own)."""
    settings = get_settings()
    if due_after is None:
        due_after = timedelta(seconds=settings.reconcile_after)
    stale = db.call(
        jobs.requeue_stale_jobs,
        timeout_s=settings.heartbeat_timeout,
        max_attempts=settings.max_attempts,
    )
    events.publish_changed(*stale)  # back to queued: the event streams' `status`
    for job_id in stale:
        log.warning(
            "job %s: heartbeat older than %.0fs, requeued", job_id, settings.heartbeat_timeout
        )
    due = db.call(_claimable_due, datetime.now(UTC) - due_after, stale)
    published = 0
    if due or stale:
        try:
            published = top_up(due, requeued=stale)
        except Exception as error:  # noqa: BLE001 - the broker is down: the next pass tries again
            log.warning("cannot publish dispatch messages (%d queued jobs): %s", due, error)
        if published:
            log.warning(
                "%d queued jobs but too few dispatch messages in the broker: published %d",
                due,
                published,
            )
    return {"stale": list(stale), "published": published}


def _claimable_due(session, cutoff: datetime, requeued: Sequence[str]) -> int:
    """Claimable queued jobs created before `cutoff`, or among `requeued`."""
    due = Job.created_at < cutoff
    if requeued:
        due = or_(due, Job.id.in_(list(requeued)))
    return int(session.scalar(select(func.count()).select_from(Job).where(*CLAIMABLE, due)))


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
