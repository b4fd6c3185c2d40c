"""`GET /v1/jobs/{id}/events`: a job's live events as Server-Sent Events (`api.events`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse

from api import events, queries
from api.deps import BearerDep, presented_token
from api.schemas import error_responses
from jobstore.errors import JobNotFound
from jobstore.jobs import is_job_id

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "event": {"enum": ["snapshot", "status", "epoch", "progress", "end"]},
        "data": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.get(
    "/{job_id}/events",
    operation_id="job_events",
    response_class=StreamingResponse,
    responses={
        200: {
            # Each event (schemathesis validates them one by one): `data` is JSON text.
            "content": {"text/event-stream": {"schema": EVENT_SCHEMA}},
            "description": (
                "Server-Sent Events: `snapshot` {job, metrics} first (not on a resume), then "
                "`status` (JobRead), `epoch` (EpochMetricRead), `progress` {epoch, step, steps, "
                "loss, fraction, eta_seconds}, `: ping` comments, and `end` (JobRead) when the "
                "job is final; then the stream closes. Reconnect with `Last-Event-ID`."
            ),
        },
        **error_responses(401, 404, 422),
    },
)
async def job_events(
    job_id: str,
    credentials: BearerDep,
    last_event_id: Annotated[
        str | None,
        Header(
            pattern=events.EVENT_ID_PATTERN,
            max_length=64,
            description="the id of the last event received: resume after it, no snapshot",
        ),
    ] = None,
):
    principal = queries.caller(presented_token(credentials))
    if not is_job_id(job_id):
        raise JobNotFound(job_id[:64])
    stream = await events.open_stream(principal, job_id, last_event_id)
    return StreamingResponse(stream, media_type="text/event-stream", headers=STREAM_HEADERS)
