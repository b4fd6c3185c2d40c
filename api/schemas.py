"""Request and response bodies, named by role (`JobCreate`, `JobRead`, `JobsPage`, ...).

None of the shapes is written out here field by field where another declaration exists:

* `JobCreate`, the only door for user input into a training run, is generated from the library's
  spec (`jumpout.spec.FIELDS`): one field per spec field that an API client may set (the
  `operator` fields, paths, device and loader processes, are the server's: `jobstore.jobs`),
  typed and bounded in the OpenAPI schema as the spec says, and each value checked by the spec's
  own `FieldSpec.check`, so the API, the command line and the library refuse the same values
  with the same message. Unknown fields are refused.
* `JobRead` is the job's read shape: the job columns marked `READ` (`jobstore.tables`) plus
  progress, result, owner and, for a queued job read by id, its place in the fair order
  (`queue`, `jobstore.fairshare.queue_position`), built by `jobstore.jobs.job_view`.
* `EpochMetricRead` has one field per metric column (`jobstore.tables.METRIC_FIELDS`).
"""

from __future__ import annotations

import re
import typing
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator

from jobstore.jobs import job_view
from jobstore.tables import LAYER_FIELDS, METRIC_FIELDS, READ_COLUMNS, Job, JobStatus
from jumpout.spec import (
    FIELDS,
    MAX_MILESTONES,
    REQUIRED,
    SOURCE_MAX_LENGTH,
    ConfigError,
    FieldSpec,
    Method,
    default,
)

CLIENT_FIELDS = tuple(name for name, spec in FIELDS.items() if not spec.operator)
"""The spec fields an API client may set, in the spec's order."""

PRIORITY_RANGE = (-100, 100)
"""A job's `priority` (POST /v1/jobs): orders it among its owner's queued jobs only."""

SUBMIT_FIELDS = (*CLIENT_FIELDS, "priority")
"""Every field of a job submission (`JobCreate`): the client's spec fields and `priority`."""


def _request_field(spec: FieldSpec) -> tuple[Any, Any]:
    """The annotation and `Field` of one spec field in `JobCreate` (bounds for the schema)."""
    constraints: dict[str, Any] = {}
    if spec.kind in ("int", "float"):
        annotation: Any = int if spec.kind == "int" else float
        constraints["gt" if spec.low_open else "ge"] = spec.low
        constraints["lt" if spec.high_open else "le"] = spec.high
    elif spec.kind == "bool":
        annotation = bool
    elif spec.kind == "choice":
        annotation = Literal[spec.choices]
    elif spec.kind == "epochs":
        annotation = list[int]
        constraints["max_length"] = MAX_MILESTONES
    elif spec.kind == "source":
        annotation = str
        constraints["max_length"] = SOURCE_MAX_LENGTH
    else:  # pragma: no cover - paths are operator fields
        annotation = str
    description = f"{spec.help}: {spec.accepted()}"
    if spec.name in REQUIRED:
        return annotation, Field(description=description, **constraints)
    if spec.recipe:
        description += "; omitted: the recipe's value for the (dataset, architecture) pair"
    elif not spec.nullable:
        description += f"; omitted: {default(spec.name)!r}"
    return annotation | None, Field(None, description=description, **constraints)


def _check_with_spec(cls, value: Any, info: ValidationInfo) -> Any:
    # null means "the recipe's value" for a field that has no null of its own.
    if value is None and info.field_name not in REQUIRED:
        return None
    try:
        return FIELDS[info.field_name].check(value)
    except ConfigError as error:
        raise ValueError(error.message) from None


def _name_enum_values(schema: dict[str, Any]) -> None:
    """Give each enum of the request a variable name per value (``x-enum-varnames``): client
    generators otherwise derive them by dropping punctuation, and ``dropout+III`` and
    ``dropout+I+II`` both became ``DROPOUTIII`` (one row of Table 1 silently lost)."""
    for field in schema.get("properties", {}).values():
        for option in [field, *field.get("anyOf", ())]:
            if "enum" in option:
                option["x-enum-varnames"] = [
                    re.sub(r"\W+", "_", str(value)).strip("_").upper() for value in option["enum"]
                ]


JobCreate = create_model(
    "JobCreate",
    __config__=ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, json_schema_extra=_name_enum_values
    ),
    __doc__="A job spec as submitted. Omitted fields take the recipe's defaults for the pair.",
    __validators__={
        "check_with_spec": field_validator(*CLIENT_FIELDS, mode="before")(_check_with_spec)
    },
    **{name: _request_field(FIELDS[name]) for name in CLIENT_FIELDS},
    # Not a training field: where the job stands among its owner's own queued jobs.
    priority=(
        int | None,
        Field(
            None,
            ge=PRIORITY_RANGE[0],
            le=PRIORITY_RANGE[1],
            description=(
                f"an integer in [{PRIORITY_RANGE[0]}, {PRIORITY_RANGE[1]}]: higher starts first "
                "among this owner's own queued jobs (owners take turns whatever their "
                "priorities); omitted: 0"
            ),
        ),
    ),
)


class Progress(BaseModel):
    epoch: int
    epochs: int
    fraction: float
    eta_seconds: float | None


class QueuePosition(BaseModel):
    """Where a queued job stands in the fair order (round-robin over the owners with queued
    jobs, priority within an owner): exact for the next start, an estimate beyond it, since new
    jobs of owners who have had fewer turns go ahead of those who have had many."""

    position: int = Field(description="1: the next job a free worker starts")
    ahead: int = Field(description="queued jobs that start before this one")
    reason: str = Field(description="why it waits, in words")


class JobResult(BaseModel):
    """The headline is the final test accuracy (as in the paper's tables), given once the job
    has succeeded; `latest_accuracy` follows a job while it runs. The best epoch is chosen on
    the validation split and is null without one; its test accuracy is given beside it, never a
    maximum over test accuracies."""

    final_accuracy: float | None = Field(
        description="the last epoch's test accuracy, once the job has succeeded; null before "
        "(and for a failed or cancelled job: see latest_accuracy)"
    )
    latest_accuracy: float | None = Field(
        description="the newest recorded epoch's test accuracy, whatever the status; null "
        "before the first epoch"
    )
    best_val_accuracy: float | None
    best_epoch: int | None
    test_accuracy_at_best: float | None


# The Python types the Job model declares (`Mapped[datetime]` -> datetime), with the two strings
# that have a closed set of values typed as their enums for the schema.
_JOB_TYPES = {
    name: typing.get_args(hint)[0] for name, hint in typing.get_type_hints(Job).items()
} | {"status": JobStatus, "method": Method}


_COLUMN_DESCRIPTIONS = {
    "spec": "the spec as resolved (recipe defaults filled), showing only the fields the job's "
    "method and model read (jumpout.spec.applicable_fields) and none of the server's paths",
}


def _column_field(column) -> tuple[Any, Any]:
    annotation = _JOB_TYPES[column.name]
    annotation = annotation | None if column.nullable else annotation
    return annotation, Field(description=_COLUMN_DESCRIPTIONS.get(column.name))


class _JobReadBase(BaseModel):
    @classmethod
    def from_job(cls, job) -> JobRead:
        """From a `Job` (its owner loaded with it)."""
        return cls.model_validate(job_view(job))


JobRead = create_model(
    "JobRead",
    __base__=_JobReadBase,
    __doc__="A job: its columns marked READ, progress (epoch, fraction, ETA), result, owner.",
    **{column.name: _column_field(column) for column in READ_COLUMNS},
    progress=(Progress, ...),
    result=(JobResult, ...),
    owner=(str | None, ...),
    queue=(
        QueuePosition | None,
        Field(
            description="for a queued job read by id (GET /v1/jobs/{id}): its place in line; "
            "null otherwise, and in lists"
        ),
    ),
)


class JobsPage(BaseModel):
    items: list[JobRead]
    next_cursor: str | None


LayerStats = create_model(
    "LayerStats",
    __doc__="One dropout slot in one epoch: its name and what it did (the paper's Figure 1).",
    name=(str, ...),
    **{name: (float | None, None) for name in LAYER_FIELDS},
)

EpochMetricRead = create_model(
    "EpochMetricRead",
    __config__=ConfigDict(from_attributes=True),
    __doc__="One finished epoch: every metric column, and the dropout slots.",
    epoch=(int, ...),
    **{name: (float | None, ...) for name in METRIC_FIELDS},
    layers=(list[LayerStats], ...),
)


class MetricsPage(BaseModel):
    items: list[EpochMetricRead]


class CheckpointRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    epoch: int
    size_bytes: int
    sha256: str
    created_at: datetime
    is_best: bool


class CheckpointsPage(BaseModel):
    items: list[CheckpointRead]


class FieldErrorRead(BaseModel):
    field: str
    message: str


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable (e.g. invalid_spec, job_not_found)")
    message: str
    fields: list[FieldErrorRead]


class ErrorBody(BaseModel):
    """Every error answer has this shape (see `api.errors`)."""

    error: ErrorDetail


ERROR_DESCRIPTIONS = {
    400: "The request body is not valid JSON",
    401: "Missing, invalid or revoked API token",
    403: "The token may not do this: only the job's owner or an admin may cancel or retry it, "
    "and a token of scope metrics may read GET /metrics only",
    404: "No such job or checkpoint",
    409: "Conflict: the job has already finished (or, for a retry, has not failed or been "
    "cancelled), or the checkpoint file is corrupted or refused",
    410: "The checkpoint file no longer exists",
    413: "The request body exceeds max_request_bytes",
    422: "A field is invalid, unknown or over a server limit; `fields` names each one",
    429: "The token already has max_queued_per_token queued jobs",
    507: "The server's disk is full (code storage_full): nothing was stored; the operator must "
    "free space (GET /v1/health shows it)",
}


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for these error statuses, all with the uniform `ErrorBody`. A route
    that authenticates (401) may also refuse a token's scope (403: a metrics token,
    `api.auth`), so 401 brings 403 with it."""
    codes = sorted({*status_codes, 403} if 401 in status_codes else set(status_codes))
    return {code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


class VolumeRead(BaseModel):
    """Free space of one filesystem the service writes to (`jobstore.storage.volumes`)."""

    name: str = Field(description="its role: home, artifacts or database (never a path)")
    free_bytes: int
    total_bytes: int
    low: bool = Field(description="below the server's min_free_bytes")


class UnusableWorkerRead(BaseModel):
    name: str = Field(description="the Celery worker's node name")
    reason: str = Field(description="why its device cannot run jobs, and what the operator can do")


class Health(BaseModel):
    status: Literal["ok", "degraded", "unavailable"] = Field(
        "ok",
        description="unavailable: the database or the broker does not answer (status code "
        "503); degraded: they do, but a filesystem the service writes to has less than "
        "min_free_bytes free (writes may soon fail with 507), or a worker cannot use its "
        "device; ok otherwise",
    )
    database: str
    broker: str
    workers: int = Field(description="workers that answer and can take jobs")
    device_slots: int = Field(
        0, description="device slots (GPUs, or simulated CPU slots) of those workers"
    )
    unusable_workers: list[UnusableWorkerRead] = Field(
        default_factory=list,
        description="workers that answer but take no jobs: their device is not usable",
    )
    storage: list[VolumeRead] = Field(default_factory=list)
