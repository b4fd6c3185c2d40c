"""`GET /v1/jobs/{id}/log`: the trainer's output (stdout and stderr) by byte offset, or followed.

The file is `<artifact_dir>/jobs/<id>/trainer.log`, its path built from the validated job id and
the settings only (`jobstore.joblog`, which also explains how it is bounded on disk). Offsets
are byte positions in everything the job's trainers wrote (attempts are separated by a
`=== attempt N ===` line); a range dropped to bound the file is skipped, and the body then
starts with a marker line where the dropped range ended.

Headers: `X-Log-Offset` (where this body starts: the offset asked for, or the end of a dropped
range it fell in), `X-Log-Next-Offset` (the offset to ask for next), `X-Log-Complete` (`true`
when the job is final and everything was sent). At most `READ_LIMIT` bytes per response: page
with `X-Log-Next-Offset`. `follow=true` streams new output as it is written until the job is
final, then closes; its body is contiguous from `X-Log-Offset` (the next offset is that plus the
bytes received), so it also closes before skipping a range dropped meanwhile, or after
`stream_max_s`, and the client asks again from its next offset (the headers of a plain read say
whether everything has been sent).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import bindparam, select

from api import access, queries
from api.deps import BearerDep, presented_token
from api.schemas import error_responses
from jobstore.errors import FieldError, InvalidRequest, JobNotFound
from jobstore.joblog import LogChunk, log_path, read_log
from jobstore.jobs import is_job_id
from jobstore.settings import get_settings
from jobstore.tables import FINAL_STATUSES, Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

READ_LIMIT = 1 << 20  # bytes per plain read
FOLLOW_CHUNK = 64 * 1024
FOLLOW_POLL_S = 0.5  # how often a follower looks for new output
STATUS_POLL_S = 1.0  # how often an idle follower asks the database whether the job ended
MEDIA_TYPE = "text/plain; charset=utf-8"
_JOB_STATUS = select(Job.id, Job.owner_id, Job.status).where(Job.id == bindparam("job_id"))

_HEADERS = {
    "X-Log-Offset": "where this body starts (after a dropped range the offset fell in)",
    "X-Log-Next-Offset": "the offset to ask for next (plain reads)",
    "X-Log-Complete": "`true` when the job is final and everything was sent (plain reads)",
}


def job_is_final(job_id: str) -> bool:
    row = queries.read(
        lambda connection: connection.execute(_JOB_STATUS, {"job_id": job_id}).first()
    )
    return row is None or row.status in FINAL_STATUSES


def _checked_job(credentials, job_id: str):
    """The job's status row for a caller that may read it; raises `JobNotFound`."""

    def run(connection):
        principal = queries.principal(connection, presented_token(credentials))
        if not is_job_id(job_id):
            raise JobNotFound(job_id[:64])
        row = connection.execute(_JOB_STATUS, {"job_id": job_id}).first()
        if row is None:
            raise JobNotFound(job_id)
        access.check_job_row(principal, row)
        return row

    return queries.read(run)


def _first_chunk(job_id: str, offset: int, limit: int) -> LogChunk:
    chunk = read_log(log_path(job_id), offset, limit)
    if offset > chunk.size:
        raise InvalidRequest(
            f"offset {offset} is beyond the end of the log ({chunk.size} bytes)",
            fields=[FieldError("offset", f"at most {chunk.size}")],
        )
    return chunk


async def follow_log(job_id: str, first: LogChunk) -> AsyncIterator[bytes]:
    """The log from `first` on, as it grows, until the job is final and all was sent."""
    settings = get_settings()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.stream_max_s if settings.stream_max_s else None
    path = log_path(job_id)
    position, status_checked = first.next_offset, float("-inf")
    if first.data:
        yield first.data
    while deadline is None or loop.time() < deadline:
        chunk = await asyncio.to_thread(read_log, path, position, FOLLOW_CHUNK)
        if chunk.start != position:
            return  # a range was dropped under us: the client resumes past it
        if chunk.data:
            position = chunk.next_offset
            yield chunk.data
            continue
        if loop.time() - status_checked >= STATUS_POLL_S:
            status_checked = loop.time()
            # Final means the last trainer has exited: read once more, then the log is whole.
            if await asyncio.to_thread(job_is_final, job_id):
                chunk = await asyncio.to_thread(read_log, path, position, 1 << 62)
                if chunk.data and chunk.start == position:
                    yield chunk.data
                return
        await asyncio.sleep(FOLLOW_POLL_S)


@router.get(
    "/{job_id}/log",
    operation_id="read_job_log",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "The trainer's output from the offset (UTF-8; a traceback included)",
            "headers": {
                name: {"description": text, "schema": {"type": "string"}}
                for name, text in _HEADERS.items()
            },
        },
        **error_responses(401, 404, 422),
    },
)
async def read_job_log(
    job_id: str,
    credentials: BearerDep,
    offset: Annotated[int, Query(ge=0, le=2**62, description="byte offset to read from")] = 0,
    follow: Annotated[bool, Query(description="stream new output until the job ends")] = False,
):
    row = _checked_job(credentials, job_id)
    final = row.status in FINAL_STATUSES  # read before the file: a final job's log is whole
    limit = FOLLOW_CHUNK if follow else READ_LIMIT
    chunk = await asyncio.to_thread(_first_chunk, job_id, offset, limit)
    headers = {"X-Log-Offset": str(chunk.start)}
    if follow:
        return StreamingResponse(follow_log(job_id, chunk), media_type=MEDIA_TYPE, headers=headers)
    complete = final and chunk.next_offset >= chunk.size
    headers["X-Log-Next-Offset"] = str(chunk.next_offset)
    headers["X-Log-Complete"] = "true" if complete else "false"
    return Response(chunk.data, media_type=MEDIA_TYPE, headers=headers)
