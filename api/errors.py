"""Typed domain errors, and the handlers that turn every error into one JSON shape.

Body: `{"error": {"code": ..., "message": ..., "fields": [{"field": ..., "message": ...}]}}`.
Service functions raise `ApiError` subclasses; they never know about HTTP beyond a status code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


class ApiError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(
        self, message: str, *, fields: list[FieldError] | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.message = message
        self.fields = fields or []
        self.headers = headers


class InvalidSpec(ApiError):
    status_code = 422
    code = "invalid_spec"


class InvalidRequest(ApiError):
    status_code = 422
    code = "invalid_request"


class NotFound(ApiError):
    status_code = 404
    code = "not_found"


class JobNotFound(NotFound, LookupError):
    code = "job_not_found"

    def __init__(self, job_id: str):
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class CheckpointNotFound(NotFound, LookupError):
    code = "checkpoint_not_found"


class Unauthorized(ApiError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    status_code = 403
    code = "forbidden"


class Conflict(ApiError):
    status_code = 409
    code = "conflict"


class JobFinished(Conflict):
    code = "job_finished"


class ChecksumMismatch(Conflict):
    code = "checksum_mismatch"


class CheckpointRefused(Conflict):
    """The recorded path is not a file the service wrote (outside the artifact directory)."""

    code = "checkpoint_refused"


class CheckpointGone(ApiError):
    status_code = 410
    code = "checkpoint_missing"


class TooManyQueued(ApiError):
    status_code = 429
    code = "too_many_queued_jobs"


class ServerMisconfigured(ApiError):
    status_code = 500
    code = "server_misconfigured"


class TokenError(ApiError):
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


def _field_name(loc: tuple) -> str:
    # ("body", "epochs") -> "epochs"; ("query", "limit") -> "limit"; ("body",) -> "body"
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def _field_message(error: dict[str, Any], accepted_fields: list[str] | None) -> str:
    kind = error.get("type", "")
    message = str(error.get("msg", "invalid value"))
    if kind == "extra_forbidden":
        message = "unknown field"
        if accepted_fields:
            message += "; accepted fields: " + ", ".join(accepted_fields)
        return message
    if kind == "missing":
        return "field required"
    # Custom validators raise ValueError("..."); pydantic prefixes the text.
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    if kind == "finite_number":
        return "must be a finite number (not NaN or infinity)"
    value = error.get("input")
    if kind != "value_error" and isinstance(value, str | int | float | bool):
        shown = repr(value)
        message += f" (got {shown if len(shown) <= 40 else shown[:40] + '...'})"
    return message


def validation_error_response(errors: list[dict[str, Any]], accepted_fields: list[str] | None):
    """Status and body for a list of pydantic/FastAPI validation errors."""
    json_errors = [e for e in errors if e.get("type") == "json_invalid"]
    if json_errors:
        ctx = json_errors[0].get("ctx") or {}
        detail = ctx.get("error", "")
        loc = json_errors[0].get("loc") or ()
        if len(loc) > 1 and isinstance(loc[1], int):
            detail = f"{detail} at character {loc[1]}"
        return 400, error_body(
            "malformed_json",
            f"the request body is not valid JSON: {detail}".rstrip(": "),
            [FieldError("body", "expected a JSON object")],
        )
    fields = [
        FieldError(_field_name(tuple(e.get("loc", ()))), _field_message(e, accepted_fields))
        for e in errors
    ]
    names = ", ".join(dict.fromkeys(f.field for f in fields))
    in_body = all(tuple(e.get("loc", ()))[:1] == ("body",) for e in errors)
    # A refused job spec has the same code whether pydantic or the library's recipes refused it.
    code = InvalidSpec.code if in_body else InvalidRequest.code
    return 422, error_body(code, f"invalid value for: {names}", fields)


def install_error_handlers(app, *, accepted_fields: list[str] | None = None) -> None:
    """Map domain errors, FastAPI validation errors and HTTP errors to the uniform body."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def on_api_error(_request, exc: ApiError):
        return JSONResponse(
            error_body(exc.code, exc.message, exc.fields),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    async def on_validation_error(request, exc: RequestValidationError):
        status, body = validation_error_response(list(exc.errors()), accepted_fields)
        if (
            status == 422
            and body["error"]["fields"]
            and body["error"]["fields"][0]["field"] == "body"
        ):
            # The whole body was the wrong type (a list, a string...), or was not sent as JSON
            # at all (FastAPI does not parse a body of another content type).
            message = "the request body must be a JSON object (a job spec)"
            content_type = request.headers.get("content-type", "")
            if not _is_json(content_type):
                shown = repr(content_type[:40]) if content_type else "none"
                message += f" sent with Content-Type: application/json (got {shown})"
            body["error"]["message"] = message
        return JSONResponse(_jsonable(body), status_code=status)

    async def on_http_error(_request, exc: StarletteHTTPException):
        if exc.status_code == 400:
            # FastAPI's body parser failed on something json.loads refused other than a syntax
            # error: invalid UTF-8, an integer over Python's 4300-digit limit, nesting too deep.
            return JSONResponse(
                error_body(
                    "malformed_json",
                    "the request body could not be parsed: send a UTF-8 JSON object "
                    "(no integer over 4300 digits, no deep nesting)",
                    [FieldError("body", "expected a JSON object")],
                ),
                status_code=400,
            )
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        code = codes.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(code, str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def on_unexpected(_request, exc: Exception):
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
