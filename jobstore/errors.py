"""Typed domain errors of the job service, and the one JSON body every error is answered with.

Body: `{"error": {"code": ..., "message": ..., "fields": [{"field": ..., "message": ...}]}}`.
Service functions raise `ServiceError` subclasses; they know nothing of HTTP beyond a status code,
which `api.errors` turns into the response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


class ServiceError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(
        self, message: str, *, fields: list[FieldError] | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.message = message
        self.fields = fields or []
        self.headers = headers


class InvalidSpec(ServiceError):
    status_code = 422
    code = "invalid_spec"


class InvalidRequest(ServiceError):
    status_code = 422
    code = "invalid_request"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class JobNotFound(NotFound, LookupError):
    code = "job_not_found"

    def __init__(self, job_id: str):
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class CheckpointNotFound(NotFound, LookupError):
    code = "checkpoint_not_found"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    status_code = 403
    code = "forbidden"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class JobFinished(Conflict):
    code = "job_finished"


class ChecksumMismatch(Conflict):
    code = "checksum_mismatch"


class CheckpointRefused(Conflict):
    """The recorded path is not a file the service wrote (outside the artifact directory)."""

    code = "checkpoint_refused"


class CheckpointGone(ServiceError):
    status_code = 410
    code = "checkpoint_missing"


class TooManyQueued(ServiceError):
    status_code = 429
    code = "too_many_queued_jobs"


class JobNotRetryable(Conflict):
    """Only a failed or cancelled job can be retried."""

    code = "job_not_retryable"


class StorageFull(ServiceError):
    """A write failed because the server's disk (or the database's storage) is full: 507, and
    nothing was stored (`jobstore.storage.is_disk_full`)."""

    status_code = 507
    code = "storage_full"


class TokenError(ServiceError):
    """A token-management error (the CLI prints these)."""

    code = "token_error"


def error_body(code: str, message: str, fields: list[FieldError] | None = None) -> dict[str, Any]:
    return {
        "error": {
            "code": code,
            "message": message,
            "fields": [{"field": f.field, "message": f.message} for f in fields or []],
        }
    }
