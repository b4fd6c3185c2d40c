"""`/v1/health`: is the service able to take and run jobs?

`workers` counts the Celery workers that answer a broadcast (`jobstore.queue.worker_devices`)
within `settings.health_ping_timeout` (0.5 s) and can take jobs: exact, and it needs no extra state
in the database, at the price of that wait on every call. A worker that answers but whose device
is not usable (`worker.devices`: it probes at start and consumes nothing then) is listed in
`unusable_workers` with the reason, and makes the status "degraded"; `device_slots` adds up the
usable workers' slots. DB and broker decide the status code; zero workers is still 200
(jobs queue up until one starts).

`storage` gives the free space of each filesystem the service writes to (`jobstore.storage`,
named by role, never by path: this route is public); one below `settings.min_free_bytes` makes the
`status` "degraded", still 200: reads work, and a write that meets a full disk answers 507
`storage_full`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SessionDep
from api.schemas import Health, UnusableWorkerRead, VolumeRead
from jobstore import queue, storage

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["health"])


@router.get(
    "/health",
    operation_id="read_health",
    response_model=Health,
    responses={503: {"model": Health}},
)
def health(session: SessionDep):
    try:
        session.execute(text("SELECT 1"))
        session.commit()
        database = "ok"
    except Exception as exc:
        logger.warning("database health check failed: %s", exc)
        database = "unavailable"
    broker_ok = queue.broker_ping()
    plans = queue.worker_devices() if broker_ok else {}
    usable = [plan for plan in plans.values() if plan.get("usable", True)]
    unusable = [
        UnusableWorkerRead(name=name, reason=str(plan.get("reason") or "device not usable"))
        for name, plan in sorted(plans.items())
        if not plan.get("usable", True)
    ]
    volumes = storage.volumes()
    low = storage.low_volumes(volumes)
    ok = database == "ok" and broker_ok
    body = Health(
        status="unavailable" if not ok else "degraded" if low or unusable else "ok",
        database=database,
        broker="ok" if broker_ok else "unavailable",
        workers=len(usable),
        device_slots=sum(len(plan.get("slots") or []) for plan in usable),
        unusable_workers=unusable,
        storage=[VolumeRead(**asdict(volume), low=volume in low) for volume in volumes],
    )
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
