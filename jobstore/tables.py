"""The store: SQLAlchemy 2 typed models for jobs, their per-epoch metrics, checkpoints and tokens.

The database is the source of truth for job state (never Celery results). Summary values (epoch,
best/final accuracy) live on the job row so listing stays one query.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class JobStatus(StrEnum):
    """Where a job is in its life: queued -> running -> one of the three final states (a running
    job goes back to queued when its attempt is lost; a queued one may be cancelled)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

# Columns with this `info` are part of the job's read shape as they are (`jobstore.jobs.job_view`,
# `api.schemas.JobRead`): adding such a column adds the field to the API.
READ = {"read": True}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONValue = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ApiToken(Base):
    """A bearer token; only its sha256 is stored. Revoked tokens stay for job ownership."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # "full": every route; "metrics": GET /metrics only (a scraper's; `api.auth`).
    scope: Mapped[str] = mapped_column(String(16), default="full", server_default="full")


class Experiment(Base):
    """A set of jobs that answers one question: rows (labelled parameter overrides) x seeds.

    `spec` is the request as normalised by `jumpout.experiment` (base, rows with their labels and
    parameters, seeds, baseline, preset, metric); every job of the experiment is an ordinary job
    that points back here (`Job.experiment_id`, `Job.row_label`).
    """

    __tablename__ = "experiments"
    __table_args__ = (Index("ix_experiments_created_at_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    name: Mapped[str | None] = mapped_column(String(128))
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id", ondelete="SET NULL"))
    spec: Mapped[dict[str, Any]] = mapped_column(JSONValue)
    baseline: Mapped[str | None] = mapped_column(String(128))
    job_count: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    owner: Mapped[ApiToken | None] = relationship(lazy="joined")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(
            "status IN (" + ", ".join(f"'{status}'" for status in JobStatus) + ")", name="status"
        ),
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_owner_id_status", "owner_id", "status"),
        Index("ix_jobs_experiment_id", "experiment_id"),
        # The fair share's last start per owner (`jobstore.fairshare.owner_turns`): a seek.
        Index("ix_jobs_owner_id_started_at", "owner_id", "started_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id, info=READ)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, info=READ)
    # The TrainConfig as resolved at submit time (recipe defaults filled), as JSON.
    spec: Mapped[dict[str, Any]] = mapped_column(JSONValue, info=READ)
    method: Mapped[str] = mapped_column(String(16), index=True, info=READ)
    dataset: Mapped[str] = mapped_column(String(64), index=True, info=READ)
    architecture: Mapped[str] = mapped_column(String(64), info=READ)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id", ondelete="SET NULL"))
    attempt: Mapped[int] = mapped_column(Integer, default=0, info=READ)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3, info=READ)
    error: Mapped[str | None] = mapped_column(Text, info=READ)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, info=READ)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, info=READ)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, info=READ)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, info=READ)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    epochs: Mapped[int] = mapped_column(Integer)
    # Mean wall time of the recorded epochs, for the ETA.
    epoch_seconds: Mapped[float | None] = mapped_column(Float)
    # Model selection is on the validation split, never on the test set: the epoch with the best
    # validation accuracy (None without a validation split), and that epoch's test accuracy.
    # The headline is final_accuracy (the last epoch's test accuracy), as in the paper's tables.
    best_val_accuracy: Mapped[float | None] = mapped_column(Float)
    best_epoch: Mapped[int | None] = mapped_column(Integer)
    test_accuracy_at_best: Mapped[float | None] = mapped_column(Float)
    final_accuracy: Mapped[float | None] = mapped_column(Float)
    device: Mapped[str | None] = mapped_column(String(64), info=READ)
    worker: Mapped[str | None] = mapped_column(String(255), info=READ)
    # Fair share: queued jobs are claimed round-robin over owners, higher priority first within
    # an owner (`jobstore.jobs.claim_next`).
    priority: Mapped[int] = mapped_column(Integer, default=0, info=READ)
    experiment_id: Mapped[str | None] = mapped_column(
        ForeignKey("experiments.id", ondelete="SET NULL"), info=READ
    )
    row_label: Mapped[str | None] = mapped_column(String(128), info=READ)
    # What reproducing the run needs, written by the trainer when it starts: library, Python,
    # torch/torchvision/CUDA/cuDNN versions, git commit, device, host, what it started from.
    environment: Mapped[dict[str, Any] | None] = mapped_column(JSONValue, info=READ)

    owner: Mapped[ApiToken | None] = relationship(lazy="joined")

    @property
    def owner_name(self) -> str | None:
        """The owner's token name (what the fast reads select as the column `owner_name`)."""
        return self.owner.name if self.owner is not None else None


class IdempotencyKey(Base):
    """An `Idempotency-Key` a client sent with a POST that creates something, and what it created
    (`jobstore.idempotency`). Written in the transaction that creates the job or experiment, so
    a crash leaves both or neither; (owner, route, key) is unique, so two concurrent requests with
    one key create one resource. `owner_id` is 0 for the anonymous owner (a NULL would defeat the
    unique constraint), without a foreign key: tokens are never deleted, the row only scopes the
    key. Rows older than `Settings.idempotency_retention_s` are forgotten."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("owner_id", "route", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(Integer)
    route: Mapped[str] = mapped_column(String(64))  # "POST /v1/jobs"
    key: Mapped[str] = mapped_column(String(255))
    # sha256 of the route and the request body as canonical JSON: same key, other body -> 422.
    request_sha256: Mapped[str] = mapped_column(String(64))
    resource_kind: Mapped[str] = mapped_column(String(16))  # "job" | "experiment"
    resource_id: Mapped[str] = mapped_column(String(32))
    response_status: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class EpochMetric(Base):
    """One row per finished epoch; (job_id, epoch) is unique so a resumed run upserts.

    Every float column below `epoch` is a metric: `METRIC_FIELDS` is read off this table, so a
    new metric is one column here (and its migration); the engine's epoch dict fills it by name
    and the API serves it. `layers` holds one dict per dropout slot with `LAYER_FIELDS`.
    """

    __tablename__ = "epoch_metrics"
    __table_args__ = (UniqueConstraint("job_id", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float)
    train_accuracy: Mapped[float | None] = mapped_column(Float)
    test_loss: Mapped[float | None] = mapped_column(Float)
    test_accuracy: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    val_accuracy: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float | None] = mapped_column(Float)
    images_per_second: Mapped[float | None] = mapped_column(Float)
    layers: Mapped[list[dict[str, Any]]] = mapped_column(JSONValue, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Checkpoint(Base):
    """A checkpoint file the worker wrote; files are addressed by this id, never by a user path."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    is_best: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


METRIC_FIELDS: tuple[str, ...] = tuple(
    column.name for column in EpochMetric.__table__.columns if isinstance(column.type, Float)
)
"""The per-epoch metrics, in column order (train_loss, train_accuracy, ...)."""

LAYER_FIELDS = ("active_fraction", "rate", "capped_fraction", "mean_drift", "var_drift")
"""What is stored per dropout slot and epoch (besides its name): the paper's Figure 1 (the mean
active fraction and realised rate p' over the epoch's steps), how often p' sat at the layer's cap,
and the paper's Figure 3 (the ratio of the slot output's mean, and of its variance, in training
mode to evaluation mode on a fixed probe batch). A value the engine did not measure is None."""

READ_COLUMNS = tuple(column for column in Job.__table__.columns if column.info.get("read"))
"""The job columns served as they are (marked `READ`)."""
