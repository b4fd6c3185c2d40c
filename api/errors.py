"""The API's error answers: domain errors (`jobstore.errors`), FastAPI validation errors and HTTP
errors all become the one JSON body of `jobstore.errors.error_body`."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from jobstore.errors import (
    FieldError,
    InvalidRequest,
    InvalidSpec,
    ServiceError,
    StorageFull,
    error_body,
)
from jobstore.storage import STORAGE_FULL_MESSAGE, is_disk_full

logger = logging.getLogger(__name__)


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
    # A refused job spec has the same code whether the request model or resolve_config refused it.
    code = InvalidSpec.code if in_body else InvalidRequest.code
    return 422, error_body(code, f"invalid value for: {names}", fields)


def install_error_handlers(
    app, *, accepted_fields: list[str] | Mapping[str, list[str]] | None = None
) -> None:
    """Map domain errors, FastAPI validation errors and HTTP errors to the uniform body.

    `accepted_fields`: the body fields an unknown field's message lists; a mapping gives them
    per path prefix (a job spec's fields under /v1/jobs, an experiment's under /v1/experiments).
    """
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def on_api_error(_request, exc: ServiceError):
        return JSONResponse(
            error_body(exc.code, exc.message, exc.fields),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    async def on_validation_error(request, exc: RequestValidationError):
        accepted = accepted_fields
        if isinstance(accepted_fields, Mapping):
            path = request.url.path
            accepted = next(
                (fields for prefix, fields in accepted_fields.items() if path.startswith(prefix)),
                None,
            )
        status, body = validation_error_response(list(exc.errors()), accepted)
        if (
            status == 422
            and body["error"]["fields"]
            and body["error"]["fields"][0]["field"] == "body"
        ):
            # The whole body was the wrong type (a list, a string...), or was not sent as JSON
            # at all (FastAPI does not parse a body of another content type).
            what = (
                "an experiment" if request.url.path.startswith("/v1/experiments") else "a job spec"
            )
            message = f"the request body must be a JSON object ({what})"
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

    app.add_exception_handler(ServiceError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
    # A write on a full disk (SQLite's SQLITE_FULL, PostgreSQL's disk_full, ENOSPC): 507 naming
    # the cause, which only the operator can fix; anything else goes on to `on_unexpected`.
    from sqlalchemy.exc import SQLAlchemyError

    app.add_exception_handler(OSError, on_storage_error)
    app.add_exception_handler(SQLAlchemyError, on_storage_error)


async def on_storage_error(_request, exc: Exception):
    from fastapi.responses import JSONResponse

    if not is_disk_full(exc):
        raise exc
    logger.error("a request's write failed on a full disk: %s", exc)
    return JSONResponse(
        error_body(StorageFull.code, STORAGE_FULL_MESSAGE), status_code=StorageFull.status_code
    )


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
