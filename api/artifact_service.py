"""The artifact service: where workers on other boxes send checkpoints and logs.

``uvicorn api.artifact_service:app --port 8001`` on the box that runs the API, with the API's
settings (the same ``artifact_dir``, database) and ``JUMPOUT_WORKER_SECRET``. A worker whose
``JUMPOUT_ARTIFACT_URL`` points here (`worker.artifacts`) uploads each checkpoint (sha256 checked
on arrival, renamed into place only when it matches), prunes the ones its job no longer keeps,
fetches one back to resume a job another box started, and appends its trainer's log by offset.
The files land where the API serves them from, so reading a job is the same wherever it ran.

A process of its own, not routes of the public API: the public API keeps its read-only view of
the artifacts (it never writes a checkpoint), these routes are not in its OpenAPI schema, and
this port need only be reachable from the workers' network. Every route but ``/v1/internal/
health`` needs ``Authorization: Bearer <JUMPOUT_WORKER_SECRET>``; a user's API token is refused
(it never equals the secret, which may not look like one). The logic is in
`jobstore.artifact_store`; the routes only authenticate, stream and answer.

=======================================================  =========================================
route                                                    answer
=======================================================  =========================================
``GET /v1/internal/health``                              ``{"status": "ok"}`` (no secret needed)
``GET /v1/internal/ping``                                200 when the secret is right (a worker
                                                         checks its settings with it)
``PUT /v1/internal/jobs/{id}/checkpoints/{name}``        201 ``{"path", "size_bytes", "sha256"}``;
  body: the file; ``X-Checksum-SHA256``: its sha256       409 ``checksum_mismatch`` (nothing
                                                         stored), 413 over ``max_artifact_bytes``
``GET /v1/internal/jobs/{id}/checkpoints/{name}``        the file (to resume elsewhere)
``DELETE /v1/internal/jobs/{id}/checkpoints/{name}``     204 (also when it was already gone)
``GET /v1/internal/jobs/{id}/log``                       ``{"size": n}``: where to append
``POST /v1/internal/jobs/{id}/log?offset=N``             ``{"size": n}``; 409 ``log_offset_ahead``
  body: the bytes at offset N                            with the size when N is beyond the end,
                                                         409 ``log_conflict`` when the bytes below
                                                         the end differ from the stored ones
=======================================================  =========================================
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response, status
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from api.errors import install_error_handlers
from jobstore import artifact_store, db, jobs
from jobstore.errors import CheckpointNotFound, FieldError, InvalidRequest, Unauthorized
from jobstore.settings import get_settings

log = logging.getLogger(__name__)

LOG_CHUNK_MAX = 4 << 20  # the most log bytes per append (the worker sends at most 1 MiB)

SECRET_MISSING = "this artifact service needs JUMPOUT_WORKER_SECRET (the workers' shared secret)"


def require_worker(authorization: Annotated[str | None, Header()] = None) -> None:
    """The caller presents the workers' secret (`Settings.worker_secret`), nothing else."""
    secret = get_settings().worker_secret
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise Unauthorized("workers only: send 'Authorization: Bearer <JUMPOUT_WORKER_SECRET>'")
    if not secrets.compare_digest(presented.strip().encode(), secret.encode()):
        # A user's token (jo_...) lands here too: the secret never starts with jo_.
        raise Unauthorized("workers only: this is not the workers' secret (JUMPOUT_WORKER_SECRET)")


WorkerDep = Depends(require_worker)
router = APIRouter(prefix="/v1/internal", dependencies=[WorkerDep])
public = APIRouter(prefix="/v1/internal")


@public.get("/health")
def health() -> dict:
    return {"status": "ok"}


@router.get("/ping")
def ping() -> dict:
    return {"status": "ok", "worker_secret": "accepted"}


def _existing_job_dir(job_id: str):
    """The job's directory, for a job the database knows (`JobNotFound` otherwise)."""
    directory = artifact_store.job_dir(job_id)
    with db.session_scope() as session:
        jobs.get_job(session, job_id)
    return directory


@router.put("/jobs/{job_id}/checkpoints/{name}", status_code=status.HTTP_201_CREATED)
async def upload_checkpoint(
    job_id: str,
    name: str,
    request: Request,
    x_checksum_sha256: Annotated[str | None, Header()] = None,
    content_length: Annotated[int | None, Header(ge=0)] = None,
) -> dict:
    artifact_store.checkpoint_path(job_id, name)  # the name's check, before the database's
    await run_in_threadpool(_existing_job_dir, job_id)
    incoming = await run_in_threadpool(
        artifact_store.IncomingCheckpoint,
        job_id,
        name,
        sha256=x_checksum_sha256,
        size_bytes=content_length,
    )
    try:
        async for chunk in request.stream():
            if chunk:
                await asyncio.to_thread(incoming.write, chunk)
        stored = await run_in_threadpool(incoming.commit)
    finally:
        await run_in_threadpool(incoming.discard)  # nothing left once committed
    log.info("job %s: stored %s (%d bytes)", job_id, name, stored["size_bytes"])
    return stored


@router.get("/jobs/{job_id}/checkpoints/{name}", response_class=FileResponse)
def download_checkpoint(job_id: str, name: str):
    path = artifact_store.checkpoint_path(job_id, name)
    if not path.is_file():
        raise CheckpointNotFound(f"job {job_id} has no checkpoint file {name}")
    return FileResponse(path, media_type="application/octet-stream", filename=name)


@router.delete("/jobs/{job_id}/checkpoints/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_checkpoint(job_id: str, name: str) -> Response:
    if artifact_store.delete_checkpoint(job_id, name):
        log.info("job %s: removed %s", job_id, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/jobs/{job_id}/log")
def log_size(job_id: str) -> dict:
    return {"size": artifact_store.log_size(job_id)}


@router.post("/jobs/{job_id}/log")
async def append_log(
    job_id: str,
    request: Request,
    offset: Annotated[int, Query(ge=0, le=2**62)],
) -> dict:
    await run_in_threadpool(_existing_job_dir, job_id)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > LOG_CHUNK_MAX:
            raise InvalidRequest(
                f"a log chunk is at most {LOG_CHUNK_MAX} bytes",
                fields=[FieldError("body", f"at most {LOG_CHUNK_MAX} bytes")],
            )
    size = await run_in_threadpool(artifact_store.append_log, job_id, offset, bytes(body))
    return {"size": size}


def create_app() -> FastAPI:
    if not get_settings().worker_secret:
        raise RuntimeError(SECRET_MISSING)
    app = FastAPI(
        title="jumpout artifact service (workers only)",
        version="0.1.0",
        # Not a public API: its routes are the workers' (`worker.artifacts`), documented above.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    app.include_router(public)
    app.include_router(router)
    return app


def __getattr__(name: str):
    # `uvicorn api.artifact_service:app`: built on first access, so that importing the module
    # (tests, the routes' documentation) does not need the secret.
    if name == "app":
        return create_app()
    raise AttributeError(name)
