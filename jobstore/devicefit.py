"""Which queued job a worker box takes when its jobs need different numbers of devices.

A job asks for ``devices`` (the spec's field; 1 when absent) and holds that many of a box's device
slots while it trains (`worker.devices`). A box with ``free`` of its ``total`` slots free claims
with `claim_fitting`:

1. **Reservation (no starvation).** The oldest claimable job that needs more than one slot, at
   most ``total``, and has been queued longer than ``device_reserve_after`` seconds, reserves the
   box: if it fits the free slots it is claimed, whatever the fair order says; otherwise the box
   claims nothing and waits for its running jobs to end until it fits. Without this, 1-device
   jobs would keep taking each slot as soon as it frees and a 2-device job could wait for ever.
2. **Fair order with backfill.** Otherwise the fair order (`jobstore.fairshare`: round-robin over
   owners, priority within an owner) is walked, and the first job that fits the free slots is
   claimed: a job that does not fit yet is passed over (it keeps its owner's turn), so free slots
   do not idle while it is young. When every job needs one device this is exactly
   `jobstore.jobs.claim_next`.

A job asking for more devices than the box has is never claimed there (another box may have
them). The claim itself is `jobstore.jobs.claim_job`'s conditional update, so two boxes (or two
pool processes, which `worker.devices` already serialises per box) never both get a job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Integer, func, select
from sqlalchemy.orm import Session

from jobstore import fairshare, jobs
from jobstore.tables import Job, utcnow

logger = logging.getLogger(__name__)

# The job's device count from its spec (a JSON column on SQLite and PostgreSQL); absent: 1.
DEVICES = func.coalesce(Job.spec["devices"].as_integer(), 1).cast(Integer)


def devices_of(spec: dict[str, Any] | None) -> int:
    """How many device slots a job with ``spec`` needs (the ``devices`` field, default 1)."""
    try:
        return max(1, int((spec or {}).get("devices", 1) or 1))
    except (TypeError, ValueError):
        return 1


@dataclass
class Pick:
    """What `pick` decided: a job id to claim, or why nothing (``reserved_for``: the big job the
    box is holding its slots for)."""

    job_id: str | None = None
    reserved_for: str | None = None


def pick(session: Session, *, free: int, total: int, reserve_after_s: float) -> Pick:
    """The job a box with ``free`` of ``total`` slots should claim now (see the module)."""
    if free <= 0:
        return Pick()
    cutoff = utcnow() - timedelta(seconds=reserve_after_s)
    starving = session.execute(
        select(Job.id, DEVICES.label("devices"))
        .where(*fairshare.CLAIMABLE, DEVICES > 1, total >= DEVICES, Job.created_at <= cutoff)
        .order_by(Job.created_at, Job.id)
        .limit(1)
    ).first()
    if starving is not None:
        if starving.devices <= free:
            return Pick(job_id=starving.id)
        return Pick(reserved_for=starving.id)
    # The common case first: the head of the fair order (one query less per owner).
    head = fairshare.next_job_id(session)
    if head is None:
        return Pick()
    head_devices = session.execute(select(DEVICES).where(Job.id == head)).scalar_one_or_none()
    if head_devices is not None and head_devices <= free:
        return Pick(job_id=head)
    for turn in fairshare.owner_turns(session):
        fitting = session.execute(
            select(Job.id)
            .where(*fairshare.CLAIMABLE, fairshare._of_owner(turn.owner_id), free >= DEVICES)
            .order_by(*fairshare.WITHIN_OWNER)
            .limit(1)
        ).scalar_one_or_none()
        if fitting is not None:
            return Pick(job_id=fitting)
    return Pick()


def claim_fitting(
    session: Session,
    *,
    worker: str,
    free: int,
    total: int,
    reserve_after_s: float,
    tries: int = 20,
) -> tuple[Job | None, int]:
    """Claim the job `pick` chooses (`queued -> running`, attempt + 1); returns it and how many
    slots it needs, or ``(None, 0)``. A lost race (PostgreSQL: another box claimed it between the
    pick and the update) picks again, ``tries`` times."""
    for _ in range(tries):
        choice = pick(session, free=free, total=total, reserve_after_s=reserve_after_s)
        if choice.job_id is None:
            session.commit()
            if choice.reserved_for is not None:
                logger.info(
                    "%d of %d slots free: holding them for job %s (queued longer than %.0f s)",
                    free,
                    total,
                    choice.reserved_for,
                    reserve_after_s,
                )
            return None, 0
        job = jobs.claim_job(session, choice.job_id, worker=worker)
        if job is not None:
            return job, devices_of(job.spec)
    logger.warning("claim_fitting: lost the race for a queued job %d times; giving up", tries)
    return None, 0
