"""`/v1/jobs`: submit, read, list, cancel; metrics and checkpoints of a job."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from api import queries
from api.deps import BearerDep, PageCursor, PageLimit, SessionDep, TokenDep, presented_token
from api.schemas import (
    CheckpointRead,
    CheckpointsPage,
    JobCreate,
    JobRead,
    JobsPage,
    JobStatus,
    Method,
    MetricsPage,
    error_responses,
)
from jobstore import db, jobs, queue

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _read(credentials, body_of, *args, **kwargs) -> Response:
    """Check the caller's token and build a body on one read connection (`api.queries`)."""

    def run(connection) -> bytes:
        queries.principal(connection, presented_token(credentials))
        return body_of(connection, *args, **kwargs)

    return queries.json_response(queries.read(run))


@router.post(
    "",
    operation_id="submit_job",
    status_code=status.HTTP_201_CREATED,
    response_model=JobRead,
    responses=error_responses(400, 401, 413, 422, 429),
)
async def submit_job(body: JobCreate, credentials: BearerDep):
    token = presented_token(credentials)
    spec = body.model_dump(exclude_unset=True)
    if db.is_sqlite():
        # A local write of about a millisecond behind the fair write lock (jobstore.db): done
        # on the event loop, as the reads are. A thread hop per request cost more CPU than the
        # write itself, and concurrent submissions queued for the GIL.
        job_id, content = _store(spec, token)
    else:
        # PostgreSQL is a network round trip that may hang: off the loop.
        job_id, content = await run_in_threadpool(_store, spec, token)
    # The row is committed first; if the broker is down the job stays queued for the reaper.
    # Shielded: a client that hangs up after the commit must not cancel the publish.
    await asyncio.shield(queue.try_enqueue(job_id))
    return queries.json_response(
        content, status.HTTP_201_CREATED, headers={"Location": f"/v1/jobs/{job_id}"}
    )


def _store(spec: dict, token: str | None) -> tuple[str, bytes]:
    # The token is checked on a read connection: a lookup takes no write lock.
    principal = queries.caller(token)
    priority = spec.pop("priority", None) or 0  # not a training field
    with db.session_scope() as session:
        job = jobs.create_job(session, spec=spec, owner_id=principal.id, priority=priority)
    return job.id, queries.job_body(job)


@router.get(
    "",
    operation_id="list_jobs",
    response_model=JobsPage,
    responses=error_responses(401, 422),
)
async def list_jobs(
    credentials: BearerDep,
    status: JobStatus | None = None,
    method: Method | None = None,
    dataset: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_.+-]+$")] = None,
    experiment_id: Annotated[
        str | None, Query(pattern=r"^[0-9a-f]{32}$", description="only this experiment's jobs")
    ] = None,
    limit: PageLimit = 50,
    cursor: PageCursor = None,
):
    # async and no threadpool hop: these reads take well under a millisecond (api.queries).
    return _read(
        credentials,
        queries.jobs_page_json,
        status=status,
        method=method,
        dataset=dataset,
        experiment_id=experiment_id,
        limit=limit,
        cursor=cursor,
    )


@router.get(
    "/{job_id}",
    operation_id="read_job",
    response_model=JobRead,
    responses=error_responses(401, 404, 422),
)
async def read_job(job_id: str, credentials: BearerDep):
    return _read(credentials, queries.job_json, job_id)


@router.post(
    "/{job_id}/cancel",
    operation_id="cancel_job",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRead,
    responses=error_responses(401, 403, 404, 409, 413, 422),
)
def cancel_job(job_id: str, session: SessionDep, token: TokenDep):
    return JobRead.from_job(jobs.request_cancel(session, job_id, token=token))


@router.get(
    "/{job_id}/metrics",
    operation_id="read_metrics",
    response_model=MetricsPage,
    responses=error_responses(401, 404, 422),
)
async def read_metrics(job_id: str, credentials: BearerDep):
    return _read(credentials, queries.metrics_json, job_id)


@router.get(
    "/{job_id}/checkpoints",
    operation_id="list_checkpoints",
    response_model=CheckpointsPage,
    responses=error_responses(401, 404, 422),
)
def read_checkpoints(job_id: str, session: SessionDep, _token: TokenDep):
    rows = jobs.list_checkpoints(session, job_id)
    return CheckpointsPage(items=[CheckpointRead.model_validate(row) for row in rows])


@router.get(
    "/{job_id}/checkpoints/{checkpoint_id}/file",
    operation_id="download_checkpoint",
    response_class=FileResponse,
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "description": "The checkpoint file (torch.save; load it with weights_only=True)",
        },
        **error_responses(401, 404, 409, 410, 422),
    },
)
def download_checkpoint(
    job_id: str,
    checkpoint_id: Annotated[int, Path(ge=1, le=2**31 - 1)],
    session: SessionDep,
    _token: TokenDep,
):
    checkpoint = jobs.get_checkpoint(session, job_id, checkpoint_id)
    # The path comes from the database record only; it is checked against its sha256 first.
    path = jobs.verify_checkpoint_file(checkpoint)
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{job_id}-epoch{checkpoint.epoch:04d}.pt",
        headers={"X-Checksum-SHA256": checkpoint.sha256, "ETag": f'"{checkpoint.sha256}"'},
    )
