"""Request and response bodies, named by role (`JobCreate`, `JobRead`, `JobsPage`, ...).

`JobCreate` is the only door for user input into a training run: unknown fields are refused, every
number is bounded and finite, and names are checked against the library's registries (one source of
truth; the error lists what is accepted). Paths, the device and the output directory are never
accepted from the client: the server fills them in (`api.jobs.create_job`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from api.settings import get_settings

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Method = Literal["none", "dropout", "jumpout"]

MAX_NAME_LENGTH = 64


def _names(items: Any) -> list[str]:
    return sorted(str(getattr(item, "name", item)) for item in items)


def accepted_datasets() -> list[str]:
    from jumpout.data import list_datasets

    return _names(list_datasets())


def accepted_architectures() -> list[str]:
    from jumpout.models import list_models

    return _names(list_models())


def accepted_ablations() -> list[str]:
    from jumpout.layer import list_ablations

    return _names(list_ablations())


def _check_name(kind: str, value: str, accepted: list[str]) -> str:
    if value not in accepted:
        shown = value if len(value) <= MAX_NAME_LENGTH else value[:MAX_NAME_LENGTH] + "..."
        raise ValueError(f"unknown {kind} {shown!r}; accepted: {', '.join(accepted)}")
    return value


class JobCreate(BaseModel):
    """A job spec as submitted. Omitted fields take the recipe's defaults for the pair."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    # The accepted names are listed in the OpenAPI schema too (as an enum, filled in when the
    # schema is generated, so importing this module does not load the registries).
    dataset: str = Field(
        description="a dataset name from the library's registry",
        json_schema_extra=lambda schema: schema.update(enum=accepted_datasets()),
    )
    architecture: str = Field(
        description="a model name from the library's registry",
        json_schema_extra=lambda schema: schema.update(enum=accepted_architectures()),
    )
    method: Method | None = None
    sigma: float | None = Field(None, ge=0, le=10)
    p_min: float | None = Field(None, ge=0, lt=1)
    p_max: float | None = Field(None, ge=0, lt=1)
    dropout_rate: float | None = Field(None, ge=0, le=0.99)
    ablation: str | None = None
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0, le=10)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    momentum: float | None = Field(None, ge=0, lt=1)
    nesterov: bool | None = None
    weight_decay: float | None = Field(None, ge=0, le=1)
    schedule: str | None = Field(None, min_length=1, max_length=32, pattern=r"^[a-z][a-z0-9_]*$")
    milestones: list[int] | None = Field(None, max_length=64)
    gamma: float | None = Field(None, gt=0, le=1)
    augment: bool | None = None
    batch_norm: bool | None = None
    train_size: int | None = Field(None, ge=1, le=10_000_000)
    test_size: int | None = Field(None, ge=1, le=10_000_000)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        return _check_name("dataset", value, accepted_datasets())

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        return _check_name("architecture", value, accepted_architectures())

    @field_validator("ablation")
    @classmethod
    def _known_ablation(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # Table-1 rows are written with capital roman numerals; accept any case.
        accepted = accepted_ablations()
        canonical = {name.lower(): name for name in accepted}.get(value.lower(), value)
        return _check_name("ablation", canonical, accepted)

    @field_validator("epochs")
    @classmethod
    def _bounded_epochs(cls, value: int | None) -> int | None:
        limit = get_settings().max_epochs
        if value is not None and value > limit:
            raise ValueError(f"at most {limit} epochs on this server (max_epochs)")
        return value

    @field_validator("batch_size")
    @classmethod
    def _bounded_batch_size(cls, value: int | None) -> int | None:
        limit = get_settings().max_batch_size
        if value is not None and value > limit:
            raise ValueError(f"at most {limit} on this server (max_batch_size)")
        return value

    @field_validator("milestones")
    @classmethod
    def _bounded_milestones(cls, value: list[int] | None) -> list[int] | None:
        limit = get_settings().max_epochs
        if value is not None and any(not 1 <= m <= limit for m in value):
            raise ValueError(f"each milestone must be an epoch between 1 and {limit} (max_epochs)")
        return value

    @field_validator("p_max")
    @classmethod
    def _above_p_min(cls, value: float | None, info: ValidationInfo) -> float | None:
        p_min = info.data.get("p_min")
        if value is not None and p_min is not None and p_min >= value:
            raise ValueError(f"must be above p_min ({p_min:g})")
        return value

    def overrides(self) -> dict[str, Any]:
        """The fields the client set, minus the pair itself: what goes to resolve_config."""
        return self.model_dump(exclude_unset=True, exclude={"dataset", "architecture"})


def job_create_fields() -> list[str]:
    return list(JobCreate.model_fields)


class Progress(BaseModel):
    epoch: int
    epochs: int
    fraction: float
    eta_seconds: float | None


class JobResult(BaseModel):
    final_accuracy: float | None
    best_accuracy: float | None
    best_epoch: int | None


class JobRead(BaseModel):
    id: str
    status: JobStatus
    method: str
    dataset: str
    architecture: str
    spec: dict[str, Any]
    progress: Progress
    attempt: int
    max_attempts: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: JobResult
    device: str | None
    worker: str | None
    owner: str | None
    cancel_requested: bool

    @classmethod
    def from_job(cls, job) -> JobRead:
        epochs = job.epochs or 0
        fraction = min(1.0, job.epoch / epochs) if epochs else 0.0
        eta = None
        if job.status == "running" and job.epoch_seconds is not None:
            eta = max(0, epochs - job.epoch) * job.epoch_seconds
        elif job.status == "succeeded":
            eta = 0.0
        return cls(
            id=job.id,
            status=job.status,
            method=job.method,
            dataset=job.dataset,
            architecture=job.architecture,
            spec=job.spec,
            progress=Progress(epoch=job.epoch, epochs=epochs, fraction=fraction, eta_seconds=eta),
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            error=job.error,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            result=JobResult(
                final_accuracy=job.final_accuracy,
                best_accuracy=job.best_accuracy,
                best_epoch=job.best_epoch,
            ),
            device=job.device,
            worker=job.worker,
            owner=job.owner.name if job.owner is not None else None,
            cancel_requested=job.cancel_requested,
        )


class JobsPage(BaseModel):
    items: list[JobRead]
    next_cursor: str | None


class LayerStats(BaseModel):
    name: str
    active_fraction: float | None = None
    rate: float | None = None


class EpochMetricRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    epoch: int
    train_loss: float | None
    train_accuracy: float | None
    test_loss: float | None
    test_accuracy: float | None
    lr: float | None
    seconds: float | None
    images_per_second: float | None
    layers: list[LayerStats]


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
    403: "The token may not do this (only the job's owner or an admin may cancel it)",
    404: "No such job or checkpoint",
    409: "Conflict: the job has already finished, or the checkpoint file is corrupted or refused",
    410: "The checkpoint file no longer exists",
    413: "The request body exceeds max_request_bytes",
    422: "A field is invalid, unknown or over a server limit; `fields` names each one",
    429: "The token already has max_queued_per_token queued jobs",
}


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for these error statuses, all with the uniform `ErrorBody`."""
    return {
        code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[code]} for code in status_codes
    }


class Health(BaseModel):
    database: str
    broker: str
    workers: int
