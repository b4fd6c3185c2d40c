"""`/v1/jobs`: submit, read, list, cancel; metrics and checkpoints of a job."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Path, Query, Response, status
from fastapi.responses import FileResponse
from pydantic import StringConstraints
from starlette.concurrency import run_in_threadpool

from api import access, queries
from api.deps import BearerDep, PageCursor, PageLimit, SessionDep, TokenDep, presented_token
from api.idempotency import (
    REPLAYED_RESPONSE_HEADERS,
    IdempotencyKeyHeader,
    create_once,
    replay_headers,
)
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
from jobstore import db, events, jobs, queue
from jobstore.idempotency import JOBS_ROUTE, IdempotentRequest, StoredAnswer
from jumpout.spec import FIELDS

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _read_jobs_page(credentials, **filters) -> Response:
    """A page of the jobs the caller may read (`api.access`), on one read connection
    (`api.queries`)."""

    def run(connection) -> bytes:
        principal = queries.principal(connection, presented_token(credentials))
        visible = access.job_filter(principal)
        return queries.jobs_page_json(connection, **filters, visible=visible)

    return queries.json_response(queries.read(run))


def _read_job(credentials, body_of, job_id: str, *args, **kwargs) -> Response:
    """One job's data, for a caller that may read the job (`api.access`), on one read
    connection (`api.queries`)."""

    def run(connection) -> bytes:
        principal = queries.principal(connection, presented_token(credentials))
        access.check_job(connection, principal, job_id)
        return body_of(connection, job_id, *args, **kwargs)

    return queries.json_response(queries.read(run))


@router.post(
    "",
    operation_id="submit_job",
    status_code=status.HTTP_201_CREATED,
    response_model=JobRead,
    responses={
        201: {"description": "The job, queued", "headers": REPLAYED_RESPONSE_HEADERS},
        **error_responses(400, 401, 413, 422, 429, 507),
    },
)
async def submit_job(
    body: JobCreate,
    credentials: BearerDep,
    background: BackgroundTasks,
    idempotency_key: IdempotencyKeyHeader = None,
):
    token = presented_token(credentials)
    spec = body.model_dump(exclude_unset=True)
    if idempotency_key is not None:
        # Not the tuned path below: a key costs a lookup and an insert (jobstore.idempotency).
        job_id, content, replayed = await run_in_threadpool(
            _store_once, spec, token, idempotency_key
        )
        if replayed:
            # Nothing new was stored, so nothing is enqueued: the first request did (or, if it
            # died before that, the reaper does for a job left queued).
            return queries.json_response(
                content, status.HTTP_201_CREATED, headers=replay_headers(f"/v1/jobs/{job_id}")
            )
    elif db.is_sqlite():
        # A local write of about a millisecond behind the fair write lock (jobstore.db): done
        # on the event loop, as the reads are. A thread hop per request cost more CPU than the
        # write itself, and concurrent submissions queued for the GIL.
        job_id, content = _store(spec, token)
    else:
        # PostgreSQL is a network round trip that may hang: off the loop.
        job_id, content = await run_in_threadpool(_store, spec, token)
    # The row is committed first; the publish runs once the answer is sent, so the client never
    # waits for the broker (a hung one costs the publish at most PUBLISH_DEADLINE_S), and if it
    # fails or is skipped the job stays queued for the reaper (jobstore.queue.try_enqueue).
    background.add_task(queue.try_enqueue, job_id)
    return queries.json_response(
        content, status.HTTP_201_CREATED, headers={"Location": f"/v1/jobs/{job_id}"}
    )


def _store(
    spec: dict, token: str | None, idempotency: IdempotentRequest | None = None, principal=None
) -> tuple[str, bytes]:
    # The token is checked on a read connection: a lookup takes no write lock.
    principal = principal or queries.caller(token)
    spec = dict(spec)
    priority = spec.pop("priority", None) or 0  # not a training field
    with db.session_scope() as session:
        job = jobs.create_job(
            session, spec=spec, owner_id=principal.id, priority=priority, idempotency=idempotency
        )
    return job.id, queries.job_body(job)


def _store_once(spec: dict, token: str | None, key: str) -> tuple[str, bytes, bool]:
    """`_store` with an Idempotency-Key: (job id, body, whether it is a replay)."""
    principal = queries.caller(token)
    request = IdempotentRequest.of(owner_id=principal.id, route=JOBS_ROUTE, key=key, body=spec)

    def replay(answer: StoredAnswer) -> tuple[str, bytes]:
        return answer.resource_id, queries.read(queries.job_json, answer.resource_id)

    (job_id, content), replayed = create_once(
        request, lambda once: _store(spec, token, once, principal), replay
    )
    return job_id, content, replayed


MAX_FILTER_VALUES = 20
"""The most values one list filter takes (`?status=queued&status=running...`)."""

_DatasetName = Annotated[str, StringConstraints(max_length=64, pattern=r"^[A-Za-z0-9_.+-]+$")]
_OwnerName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
_ExperimentId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]


def _filter(item: Any, what: str) -> Any:
    """A repeatable list filter: `?status=queued&status=running` keeps the jobs with any of the
    values (OR within a field, AND across fields); each value validated, at most
    `MAX_FILTER_VALUES`."""
    description = (
        f"only jobs with this {what}; repeat the parameter for any of several "
        f"(at most {MAX_FILTER_VALUES})"
    )
    return Annotated[
        list[item] | None, Query(max_length=MAX_FILTER_VALUES, description=description)
    ]


@router.get(
    "",
    operation_id="list_jobs",
    response_model=JobsPage,
    responses=error_responses(401, 422),
)
async def list_jobs(
    credentials: BearerDep,
    status: _filter(JobStatus, "status") = None,
    method: _filter(Method, "method") = None,
    dataset: _filter(_DatasetName, "dataset name") = None,
    owner: _filter(_OwnerName, "owner (token name)") = None,
    experiment_id: _filter(_ExperimentId, "experiment id") = None,
    limit: PageLimit = 50,
    cursor: PageCursor = None,
):
    # async and no threadpool hop: these reads take well under a millisecond (api.queries).
    return _read_jobs_page(
        credentials,
        status=status,
        method=method,
        dataset=dataset,
        owner=owner,
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
    return _read_job(credentials, queries.job_json, job_id)


@router.post(
    "/{job_id}/cancel",
    operation_id="cancel_job",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRead,
    responses=error_responses(401, 403, 404, 409, 413, 422, 507),
)
def cancel_job(job_id: str, session: SessionDep, token: TokenDep):
    # A job the caller may not read does not exist for it (404); one it may read but does not
    # own is 403 in request_cancel.
    access.check_job(session, token, job_id)
    job = jobs.request_cancel(session, job_id, token=token)
    events.publish_changed(job_id)  # the event streams' `status` (flag set, or cancelled)
    return JobRead.from_job(job)


@router.post(
    "/{job_id}/retry",
    operation_id="retry_job",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRead,
    summary="Retry a failed or cancelled job",
    description="Puts the job back in the queue with a fresh budget of attempts (max_attempts "
    "grows by the server's setting; the attempt count goes on). It keeps its checkpoints and "
    "metrics, so it resumes from its newest valid checkpoint, or starts over without one. For "
    "the job's owner or an admin; 409 unless the job is failed or cancelled. What a job that "
    "failed on a full disk says to do once space is freed.",
    responses=error_responses(401, 403, 404, 409, 413, 422, 429, 507),
)
async def retry_job(job_id: str, credentials: BearerDep, background: BackgroundTasks):
    job = await run_in_threadpool(_retry, job_id, presented_token(credentials))
    background.add_task(queue.try_enqueue, job_id)  # as after a submission
    return job


def _retry(job_id: str, token: str | None) -> JobRead:
    principal = queries.caller(token)
    with db.session_scope() as session:
        access.check_job(session, principal, job_id)  # one it may not read does not exist
        job = JobRead.from_job(jobs.retry_job(session, job_id, token=principal))
    events.publish_changed(job_id)  # the event streams' `status`: queued again
    return job


@router.get(
    "/{job_id}/metrics",
    operation_id="read_metrics",
    response_model=MetricsPage,
    responses=error_responses(401, 404, 422),
)
async def read_metrics(job_id: str, credentials: BearerDep):
    return _read_job(credentials, queries.metrics_json, job_id)


@router.get(
    "/{job_id}/checkpoints",
    operation_id="list_checkpoints",
    response_model=CheckpointsPage,
    responses=error_responses(401, 404, 422),
)
def read_checkpoints(job_id: str, session: SessionDep, principal: TokenDep):
    access.check_job(session, principal, job_id)
    rows = jobs.list_checkpoints(session, job_id)
    return CheckpointsPage(items=[CheckpointRead.model_validate(row) for row in rows])


_FILE_RESPONSES: dict[int | str, dict] = {
    200: {
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "The checkpoint file (torch.save; rebuild the model with "
        "jumpout.load_model(path), or torch.load it with weights_only=True); its sha256 in "
        "X-Checksum-SHA256, its name <job>-epochNNNN.pt in Content-Disposition",
    },
    **error_responses(401, 404, 409, 410, 422),
}


def _checkpoint_file(job_id: str, checkpoint) -> FileResponse:
    """The checkpoint's file, once it matches its recorded sha256 and lies in the artifact
    directory (`jobs.verify_checkpoint_file`); the path comes from the database record only."""
    path = jobs.verify_checkpoint_file(checkpoint)
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{job_id}-epoch{checkpoint.epoch:04d}.pt",
        headers={"X-Checksum-SHA256": checkpoint.sha256, "ETag": f'"{checkpoint.sha256}"'},
    )


# The named routes come before `/{checkpoint_id}/file`, which would take "latest" for an id.
@router.get(
    "/{job_id}/checkpoints/latest/file",
    operation_id="download_latest_checkpoint",
    response_class=FileResponse,
    summary="Download the job's newest checkpoint",
    description="The newest checkpoint the job has (after its last checkpointed epoch). 404 "
    "when it has none yet.",
    responses=_FILE_RESPONSES,
)
def download_latest_checkpoint(job_id: str, session: SessionDep, principal: TokenDep):
    access.check_job(session, principal, job_id)
    return _checkpoint_file(job_id, jobs.latest_checkpoint(session, job_id))


@router.get(
    "/{job_id}/checkpoints/best/file",
    operation_id="download_best_checkpoint",
    response_class=FileResponse,
    summary="Download the checkpoint of the job's validation-best epoch",
    description="The checkpoint marked is_best: the epoch with the best validation accuracy. "
    "Only a job with a validation split (val_fraction > 0) has a best epoch; otherwise 404 "
    "saying so (the best epoch is never chosen on the test set).",
    responses=_FILE_RESPONSES,
)
def download_best_checkpoint(job_id: str, session: SessionDep, principal: TokenDep):
    access.check_job(session, principal, job_id)
    return _checkpoint_file(job_id, jobs.best_checkpoint(session, job_id))


@router.get(
    "/{job_id}/checkpoints/epoch/{epoch}/file",
    operation_id="download_epoch_checkpoint",
    response_class=FileResponse,
    summary="Download the checkpoint written after an epoch",
    description="The checkpoint written after epoch `epoch`. Only the newest keep_last "
    "checkpoints (and the best, with keep_best) are kept: a pruned or never-written epoch is "
    "a 404 naming the epochs that have one.",
    responses=_FILE_RESPONSES,
)
def download_epoch_checkpoint(
    job_id: str,
    epoch: Annotated[int, Path(ge=0, le=FIELDS["epochs"].high)],
    session: SessionDep,
    principal: TokenDep,
):
    access.check_job(session, principal, job_id)
    return _checkpoint_file(job_id, jobs.checkpoint_of_epoch(session, job_id, epoch))


@router.get(
    "/{job_id}/checkpoints/{checkpoint_id}/file",
    operation_id="download_checkpoint",
    response_class=FileResponse,
    summary="Download a checkpoint by its id",
    description="The checkpoint with this id (from GET /v1/jobs/{job_id}/checkpoints; ids "
    "count across all jobs). By name: .../checkpoints/latest/file, .../best/file, "
    ".../epoch/{epoch}/file.",
    responses=_FILE_RESPONSES,
)
def download_checkpoint(
    job_id: str,
    checkpoint_id: Annotated[int, Path(ge=1, le=2**31 - 1)],
    session: SessionDep,
    principal: TokenDep,
):
    access.check_job(session, principal, job_id)
    return _checkpoint_file(job_id, jobs.get_checkpoint(session, job_id, checkpoint_id))
