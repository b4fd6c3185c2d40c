"""The job's state transitions and read shapes: plain service functions over the store, used by the
routes and by the worker.

Every function takes the session first and keyword-only arguments after the ids, and commits its
own short transaction (on SQLite each transaction holds the write lock, see `jobstore.db`). State
changes that can race (claim, cancel, finish, requeue) are conditional UPDATEs: the loser of a race
sees no row changed and backs off, so a redelivered Celery message never runs a job twice.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Select,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from jobstore import datasets, fairshare
from jobstore.errors import (
    CheckpointGone,
    CheckpointNotFound,
    CheckpointRefused,
    ChecksumMismatch,
    FieldError,
    Forbidden,
    InvalidRequest,
    InvalidSpec,
    JobFinished,
    JobNotFound,
    JobNotRetryable,
    TooManyQueued,
)
from jobstore.idempotency import IdempotentRequest, remember
from jobstore.settings import get_settings
from jobstore.tables import (
    FINAL_STATUSES,
    LAYER_FIELDS,
    METRIC_FIELDS,
    READ_COLUMNS,
    ApiToken,
    Checkpoint,
    EpochMetric,
    Job,
    JobStatus,
    new_job_id,
    utcnow,
)
from jumpout.spec import (
    REQUIRED,
    SERVER_PATH_FIELDS,
    ConfigError,
    TrainConfig,
    applicable_fields,
    resolve_config,
)

logger = logging.getLogger(__name__)

JOB_ID_PATTERN = re.compile(r"[0-9a-f]{32}")


# --- submitting and reading ------------------------------------------------------------------


def create_job(
    session: Session,
    *,
    spec: dict[str, Any],
    owner_id: int | None,
    priority: int = 0,
    idempotency: IdempotentRequest | None = None,
) -> Job:
    """Resolve `spec` (dataset, architecture and overrides) with the recipe defaults and store a
    queued job owned by `owner_id` (None: anonymous). The caller enqueues it after this commits.
    `priority` orders the job among its owner's queued jobs only (`jobstore.fairshare`).

    The server, not the client, decides where data and outputs live and which device to use (the
    spec's `operator` fields). Raises `InvalidSpec` naming the field when the spec refuses a
    value or a value is over this server's limits, `TooManyQueued` when the owner already has
    `max_queued_per_token` queued jobs (of its own: an experiment's jobs are bounded by
    `max_experiment_jobs` instead and do not count here).

    `idempotency`: the request's `Idempotency-Key`, stored in the same transaction as the job
    (`jobstore.idempotency.remember`); a concurrent request that stored it first makes this raise
    `sqlalchemy.exc.IntegrityError`, with nothing written.
    """
    settings = get_settings()
    job_id = new_job_id()
    config = resolve_job_spec(spec, job_id=job_id)

    owner = None
    if owner_id is not None:
        # Serialise submissions per token (row lock on PostgreSQL; SQLite's BEGIN IMMEDIATE
        # already serialises writers) so the queued-job limit cannot be overrun by a race. The row
        # is kept as job.owner: reading the job's owner later would take another transaction.
        owner = session.scalars(
            select(ApiToken).where(ApiToken.id == owner_id).with_for_update()
        ).one_or_none()
    check_init_from(session, config, owner_id=owner_id, is_admin=bool(owner and owner.is_admin))
    limit = settings.max_queued_per_token
    # Core statements on the session's connection (the ORM's execution layer cost more CPU than
    # the database for these two); queued jobs are counted up to the limit only, so the work
    # under the write lock is bounded however many are queued.
    connection = session.connection()
    queued = connection.execute(
        _QUEUED_OF_ANONYMOUS if owner_id is None else _QUEUED_OF_OWNER,
        {"owner_id": owner_id, "limit": limit},
    ).scalar_one()
    if queued >= limit:
        session.rollback()
        raise TooManyQueued(
            f"this token already has {queued} queued jobs; the limit is {limit} "
            "(max_queued_per_token): wait for some to start or cancel them"
        )
    values = job_values(job_id, config, owner_id=owner_id, priority=priority)
    if idempotency is not None:
        remember(connection, idempotency, resource_kind="job", resource_id=job_id)
    # A Core INSERT: the ORM's unit of work cost 2 ms of the submit route's CPU for one row.
    connection.execute(INSERT_JOB, values)
    session.commit()
    # The caller's copy of what was stored (not attached to the session).
    return Job(**values, owner=owner)


def check_init_from(
    session: Session, config: TrainConfig, *, owner_id: int | None, is_admin: bool
) -> None:
    """A job that starts from another job's weights (``init_from: job:<id>``) may name only a
    job its caller owns (or any, for an admin), as cancelling does; `InvalidSpec` naming
    `init_from` otherwise, with one message for "no such job" and "not yours" so that job ids
    cannot be probed. The trainer resolves the job to its newest valid checkpoint when it
    starts: the job need not have one yet. A path source is checked by the trainer, which sees
    the data directory."""
    source = config.init_from
    if source is None or not source.startswith("job:"):
        return
    source_id = source.removeprefix("job:")
    row = session.execute(select(Job.owner_id).where(Job.id == source_id)).one_or_none()
    if row is None or not (is_admin or row.owner_id == owner_id):
        session.rollback()
        message = (
            f"no job {source_id} that this token can start from; accepted: job:<id> of one of "
            "its own jobs (any job for an admin token), or a weights file under the data "
            "directory"
        )
        raise InvalidSpec("invalid value for: init_from", fields=[FieldError("init_from", message)])


def resolve_job_spec(spec: dict[str, Any], *, job_id: str) -> TrainConfig:
    """The training config of a client's job spec (dataset, architecture and overrides) as this
    server runs it: the recipe's defaults filled, the server's `operator` fields set for
    `job_id`, every value checked by the spec and against this server's limits. Raises
    `InvalidSpec` naming each field at fault. Touches no database: call it before a transaction
    starts (on SQLite, before the write lock is taken)."""
    overrides = {k: v for k, v in spec.items() if k not in REQUIRED} | server_fields(job_id)
    try:
        config = resolve_config(spec["dataset"], spec["architecture"], **overrides)
    except ConfigError as exc:
        # The operator fields (server_fields) cannot be at fault: the settings that fill them are
        # checked against the same spec when they load.
        raise InvalidSpec(
            f"invalid value for: {exc.field}", fields=[FieldError(exc.field, exc.message)]
        ) from None
    _check_server_limits(config, given=spec)
    # The data set's files on this server and the size caps: refused now, not 5 s into the job.
    datasets.check_trainable(config)
    return config


def job_values(
    job_id: str,
    config: TrainConfig,
    *,
    owner_id: int | None,
    priority: int = 0,
    experiment_id: str | None = None,
    row_label: str | None = None,
) -> dict[str, Any]:
    """The columns of a new queued job running `config` (from `resolve_job_spec`), for
    `INSERT_JOB`."""
    return {
        "id": job_id,
        "status": JobStatus.QUEUED.value,
        "spec": config.to_dict(),
        "method": config.method,
        "dataset": config.dataset,
        "architecture": config.architecture,
        "owner_id": owner_id,
        "attempt": 0,
        "max_attempts": get_settings().max_attempts,
        "epochs": config.epochs,
        "epoch": 0,
        "device": config.device,
        "cancel_requested": False,
        "created_at": utcnow(),
        "priority": priority,
        "experiment_id": experiment_id,
        "row_label": row_label,
    }


def _queued_count(owner: Any) -> Select:
    # An experiment's jobs are not counted: `max_experiment_jobs` bounds each experiment, and
    # one experiment would otherwise block its owner's single submissions until it had started.
    queued = (
        select(Job.status)
        .where(owner, Job.status == JobStatus.QUEUED, Job.experiment_id.is_(None))
        .limit(bindparam("limit"))
        .subquery()
    )
    return select(func.count()).select_from(queued)


_QUEUED_OF_ANONYMOUS = _queued_count(Job.owner_id.is_(None))
_QUEUED_OF_OWNER = _queued_count(Job.owner_id == bindparam("owner_id"))
INSERT_JOB = insert(Job.__table__)


def server_fields(job_id: str) -> dict[str, Any]:
    """The spec's `operator` fields as this server sets them for a job: where the data sets are,
    where the job's checkpoints go, which device trains, how many loader processes."""
    settings = get_settings()
    return {
        "data_dir": str(settings.data_dir),
        "out_dir": str(job_directory(job_id)),
        "device": settings.device,
        "num_workers": settings.num_workers,
    }


def job_directory(job_id: str) -> Path:
    """Where a job's checkpoints, log and result file live."""
    return Path(get_settings().artifact_dir) / "jobs" / job_id


def _check_server_limits(config: TrainConfig, *, given: dict[str, Any]) -> None:
    """This server may allow less than the spec (`max_epochs`, `max_batch_size`,
    `max_devices`); the limit
    applies to the recipe's default as much as to a value the client sent. Every field over a
    limit is named at once."""
    settings = get_settings()
    errors = []
    limits = (("epochs", "max_epochs"), ("batch_size", "max_batch_size"))
    for field, setting in (*limits, ("devices", "max_devices")):
        value, limit = getattr(config, field), getattr(settings, setting)
        if value <= limit:
            continue
        if field in given:
            message = f"at most {limit} on this server ({setting}), got {value}"
        else:
            message = (
                f"the recipe's default {field} ({value}) is over this server's limit "
                f"of {limit} ({setting}): set {field} to at most {limit}"
            )
        errors.append(FieldError(field, message))
    if any(milestone > settings.max_epochs for milestone in config.milestones):
        message = f"each milestone must be an epoch of at most {settings.max_epochs} (max_epochs)"
        errors.append(FieldError("milestones", message))
    if errors:
        names = ", ".join(error.field for error in errors)
        raise InvalidSpec(f"invalid value for: {names}", fields=errors)


def is_job_id(value: str) -> bool:
    # Job ids are uuid4 hex; anything else (a NUL byte, a 5 kB string) is unknown without a query.
    return isinstance(value, str) and JOB_ID_PATTERN.fullmatch(value) is not None


def get_job(session: Session, job_id: str) -> Job:
    """The job with this id; raises `JobNotFound` (a `LookupError`) when there is none."""
    if not is_job_id(job_id):
        session.commit()
        raise JobNotFound(job_id[:64])
    job = session.get(Job, job_id, populate_existing=True)
    session.commit()
    if job is None:
        raise JobNotFound(job_id)
    return job


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        when = datetime.fromisoformat(created)
        if when.tzinfo is None or not is_job_id(job_id):
            raise ValueError
        return when, job_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest(
            "invalid cursor",
            fields=[FieldError("cursor", "pass back the next_cursor of a previous page")],
        ) from None


Filter = str | Sequence[str] | None
"""A list filter: one value, several (any of them matches) or None (no filter)."""


def _values(value: Filter) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def filter_jobs(
    query: Select,
    *,
    status: Filter = None,
    method: Filter = None,
    dataset: Filter = None,
    owner_id: int | None = None,
    owner: Filter = None,
    experiment_id: Filter = None,
    cursor: str | None = None,
) -> Select:
    """Newest first, filtered, from the cursor on: keyset pagination on (created_at, id), so
    pages stay stable while jobs are being submitted. Shared by the ORM and the fast read path.

    Each filter takes one value or several: a job matches when its field has any of a filter's
    values, and every filter given (OR within a field, AND across fields). `owner` is token
    names; `owner_id` one token's id."""
    query = query.order_by(Job.created_at.desc(), Job.id.desc())
    for column, value in (
        (Job.experiment_id, experiment_id),
        (Job.status, status),
        (Job.method, method),
        (Job.dataset, dataset),
    ):
        values = _values(value)
        if values is not None:
            query = query.where(column.in_(values))
    if owner_id is not None:
        query = query.where(Job.owner_id == owner_id)
    owners = _values(owner)
    if owners is not None:
        query = query.where(Job.owner_id.in_(select(ApiToken.id).where(ApiToken.name.in_(owners))))
    if cursor:
        created, last_id = _decode_cursor(cursor)
        query = query.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id))
        )
    return query


def list_jobs(
    session: Session,
    *,
    status: Filter = None,
    method: Filter = None,
    dataset: Filter = None,
    owner_id: int | None = None,
    owner: Filter = None,
    experiment_id: Filter = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Job], str | None]:
    """Jobs newest first, filtered (`filter_jobs`); returns (page, next_cursor or None). Keyset
    pagination on (created_at, id), so pages stay stable while jobs are being submitted."""
    query = filter_jobs(
        select(Job),
        status=status,
        method=method,
        dataset=dataset,
        owner_id=owner_id,
        owner=owner,
        experiment_id=experiment_id,
        cursor=cursor,
    )
    jobs = list(session.scalars(query.limit(limit + 1)).unique())
    session.commit()
    next_cursor = encode_cursor(jobs[limit - 1]) if len(jobs) > limit else None
    return jobs[:limit], next_cursor


def list_metrics(session: Session, job_id: str) -> list[EpochMetric]:
    get_job(session, job_id)
    rows = list(
        session.scalars(
            select(EpochMetric).where(EpochMetric.job_id == job_id).order_by(EpochMetric.epoch)
        )
    )
    session.commit()
    return rows


def list_checkpoints(session: Session, job_id: str) -> list[Checkpoint]:
    get_job(session, job_id)
    rows = list(
        session.scalars(
            select(Checkpoint)
            .where(Checkpoint.job_id == job_id)
            .order_by(Checkpoint.epoch, Checkpoint.id)
        )
    )
    session.commit()
    return rows


def get_checkpoint(session: Session, job_id: str, checkpoint_id: int) -> Checkpoint:
    get_job(session, job_id)
    row = session.get(Checkpoint, checkpoint_id)
    session.commit()
    if row is None or row.job_id != job_id:
        raise CheckpointNotFound(f"job {job_id!r} has no checkpoint with id {checkpoint_id}")
    return row


# Checkpoints by a name a person can guess (`latest`, `best`, `epoch/<n>`), besides their ids,
# which count across all jobs and are pruned with their files.


def _job_checkpoints(session: Session, job_id: str) -> tuple[Job, list[Checkpoint]]:
    """The job and its checkpoints, newest first (epoch, then write time, then id)."""
    job = get_job(session, job_id)
    return job, _checkpoints_newest_first(session, job_id)


def _checkpoints_newest_first(session: Session, job_id: str) -> list[Checkpoint]:
    """The job's checkpoint records, newest first (epoch, then write time, then id)."""
    rows = list(
        session.scalars(
            select(Checkpoint)
            .where(Checkpoint.job_id == job_id)
            .order_by(Checkpoint.epoch.desc(), Checkpoint.created_at.desc(), Checkpoint.id.desc())
        )
    )
    session.commit()
    return rows


def latest_checkpoint(session: Session, job_id: str) -> Checkpoint:
    """The job's newest checkpoint (a stop in the middle of an epoch writes one after the
    previous epoch's); raises `JobNotFound`, or `CheckpointNotFound` when it has none yet."""
    job, rows = _job_checkpoints(session, job_id)
    if not rows:
        raise CheckpointNotFound(
            f"job {job_id} has no checkpoint yet (status {job.status}, {job.epoch} epochs "
            "done): one is written after an epoch"
        )
    return rows[0]


def best_checkpoint(session: Session, job_id: str) -> Checkpoint:
    """The checkpoint of the job's validation-best epoch (marked `is_best`). Raises
    `CheckpointNotFound` saying why there is none: no validation split (so no best epoch), its
    file not kept (`keep_best` false), or no epoch finished yet."""
    job, rows = _job_checkpoints(session, job_id)
    best = next((row for row in rows if row.is_best), None)
    if best is not None:
        return best
    spec = job.spec or {}
    if not spec.get("val_fraction"):
        message = (
            f"job {job_id} has no validation split (val_fraction 0), so no best epoch: the best "
            "epoch is chosen on held-out training data, never on the test set. Download "
            "checkpoints/latest/file or checkpoints/epoch/<n>/file, or submit with "
            "val_fraction > 0"
        )
    elif spec.get("keep_best") is False:
        message = (
            f"job {job_id} does not keep its best epoch's checkpoint (keep_best false); its best "
            f"epoch is {job.best_epoch}: try checkpoints/epoch/{job.best_epoch}/file"
        )
    else:
        message = f"job {job_id} has no best checkpoint yet ({job.epoch} epochs done)"
    raise CheckpointNotFound(message)


def checkpoint_of_epoch(session: Session, job_id: str, epoch: int) -> Checkpoint:
    """The checkpoint written after epoch `epoch` (rather than one written by a stop in the
    middle of the next epoch, which records the same number of finished epochs). Raises
    `CheckpointNotFound` naming the epochs that have one."""
    job, rows = _job_checkpoints(session, job_id)
    matching = [row for row in rows if row.epoch == epoch]
    if matching:
        # A mid-epoch file is named checkpoint-epochEEEE-stepSSSSSS.pt (`jumpout.engine`).
        return min(matching, key=lambda row: "-step" in Path(row.path).name)
    kept = sorted({row.epoch for row in rows})
    if kept:
        listed = ", ".join(str(number) for number in kept)
        message = (
            f"job {job_id} has no checkpoint of epoch {epoch}; epochs with one: {listed} (only "
            f"the newest keep_last={(job.spec or {}).get('keep_last')} are kept, plus the best "
            "with keep_best, and short epochs are not each checkpointed)"
        )
    else:
        message = f"job {job_id} has no checkpoint of epoch {epoch}; it has none yet"
    raise CheckpointNotFound(message)


# --- cancelling ------------------------------------------------------------------------------


def request_cancel(session: Session, job_id: str, *, token) -> Job:
    """Cancel a job on behalf of `token` (an `api.auth.Principal`, or anything with `id` and
    `is_admin`; id None is the anonymous owner). A queued job is cancelled at once; a running
    one is flagged and the worker stops it at its next check. Raises `JobNotFound`,
    `Forbidden` (not the owner, not an admin) or `JobFinished` (409)."""
    job = get_job(session, job_id)
    if not token.is_admin and job.owner_id != token.id:
        raise Forbidden("only the job's owner or an admin can cancel it")
    flagged = cancel_jobs(session, Job.id == job_id)
    session.commit()
    job = get_job(session, job_id)
    if not flagged:
        raise JobFinished(f"job {job_id} has already finished ({job.status}); nothing to cancel")
    return job


def cancel_jobs(session: Session, *criteria: Any) -> int:
    """Cancel the jobs matching `criteria` that have not finished, in the caller's transaction
    (it commits): a queued job is cancelled at once, a running one flagged for its worker to stop
    at its next check. Returns how many jobs were cancelled or flagged."""
    cancelled = session.execute(
        update(Job)
        .where(*criteria, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, cancel_requested=True, finished_at=utcnow())
    ).rowcount
    flagged = session.execute(
        update(Job).where(*criteria, Job.status == JobStatus.RUNNING).values(cancel_requested=True)
    ).rowcount
    return cancelled + flagged


def cancel_requested(session: Session, job_id: str) -> bool:
    """True when the job should stop: cancel was requested, or it is no longer running here."""
    row = session.execute(select(Job.cancel_requested).where(Job.id == job_id)).one_or_none()
    session.commit()
    return True if row is None else bool(row[0])


# --- retrying --------------------------------------------------------------------------------

RETRYABLE_STATUSES = (JobStatus.FAILED, JobStatus.CANCELLED)


def retry_job(session: Session, job_id: str, *, token) -> Job:
    """Put a failed or cancelled job back in the queue on behalf of `token` (its owner or an
    admin; see `request_cancel`), with a fresh budget of `max_attempts` attempts. Its
    checkpoints and metrics stay, so the next attempt resumes from the newest valid checkpoint
    (a job that never wrote one starts over). The caller enqueues it after this commits.

    The attempt count goes on (the budget is raised instead, `attempt_budget`): each attempt's
    number stays unique, so a supervisor of an old attempt that is still alive can never take
    the job for its own.

    Raises `JobNotFound`, `Forbidden`, `JobNotRetryable` (409: the job is queued, running or
    succeeded) or `TooManyQueued` (a job of its own, not an experiment's, when its owner already
    has `max_queued_per_token` queued)."""
    settings = get_settings()
    job = get_job(session, job_id)
    if not token.is_admin and job.owner_id != token.id:
        raise Forbidden("only the job's owner or an admin can retry it")
    if job.status not in RETRYABLE_STATUSES:
        raise JobNotRetryable(
            f"job {job_id} is {job.status}: only a failed or cancelled job can be retried"
        )
    if job.experiment_id is None:
        limit = settings.max_queued_per_token
        queued = session.execute(
            _QUEUED_OF_ANONYMOUS if job.owner_id is None else _QUEUED_OF_OWNER,
            {"owner_id": job.owner_id, "limit": limit},
        ).scalar_one()
        if queued >= limit:
            session.rollback()
            raise TooManyQueued(
                f"the job's owner already has {queued} queued jobs; the limit is {limit} "
                "(max_queued_per_token): wait for some to start or cancel them"
            )
    retried = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(RETRYABLE_STATUSES))
        .values(
            status=JobStatus.QUEUED,
            cancel_requested=False,
            finished_at=None,
            error=None,
            worker=None,
            heartbeat_at=None,
            max_attempts=Job.attempt + settings.max_attempts,
        )
    ).rowcount
    session.commit()
    job = get_job(session, job_id)
    if not retried:  # a concurrent retry (or nothing to retry any more)
        raise JobNotRetryable(
            f"job {job_id} is {job.status}: only a failed or cancelled job can be retried"
        )
    return job


def attempt_budget(job_max_attempts: int, *, configured: int) -> int:
    """The attempts a job may use: the `configured` `max_attempts`, plus those a retry
    granted it (`retry_job` raises the job's own `max_attempts` above the setting)."""
    return configured + max(0, job_max_attempts - get_settings().max_attempts)


# --- the worker's side -----------------------------------------------------------------------


def claim_job(session: Session, job_id: str, *, worker: str) -> Job | None:
    """Take a queued job: `queued -> running`, attempt + 1. None when it is not queued (someone
    else has it, it was cancelled or it finished): the caller then exits quietly."""
    now = utcnow()
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(False))
        .values(
            status=JobStatus.RUNNING,
            attempt=Job.attempt + 1,
            worker=worker,
            heartbeat_at=now,
            started_at=func.coalesce(Job.started_at, now),
        )
    ).rowcount
    session.commit()
    if not claimed:
        return None
    return get_job(session, job_id)


def claim_next(session: Session, *, worker: str, tries: int = 20) -> Job | None:
    """Take the queued job that is next in the fair order (`jobstore.fairshare`: round-robin over
    the owners, priority within an owner): `queued -> running`, attempt + 1. None when nothing is
    queued.

    The pick and the conditional UPDATE share one transaction. On SQLite that transaction holds
    the write lock from its first statement, so no other worker can pick in between; on
    PostgreSQL two workers may pick the same job, the UPDATE lets one have it and the other picks
    again (`tries` times: each lost race means another worker took a job)."""
    for _ in range(tries):
        job_id = fairshare.next_job_id(session)
        if job_id is None:
            session.commit()
            return None
        job = claim_job(session, job_id, worker=worker)
        if job is not None:
            return job
    logger.warning("claim_next: lost the race for a queued job %d times; giving up", tries)
    return None


def count_claimable(session: Session) -> int:
    """How many queued jobs a worker could claim now (what the dispatch messages are for)."""
    count = fairshare.count_claimable(session)
    session.commit()
    return count


def heartbeat(session: Session, job_id: str, *, attempt: int) -> bool:
    """Record that attempt `attempt` is alive. False when the job is no longer running under that
    attempt (requeued by the reaper, finished, cancelled): the caller should stop."""
    touched = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.attempt == attempt)
        .values(heartbeat_at=utcnow())
    ).rowcount
    session.commit()
    return bool(touched)


def set_device(session: Session, job_id: str, *, device: str) -> None:
    """Record the device the trainer actually uses (e.g. "cuda:0")."""
    session.execute(update(Job).where(Job.id == job_id).values(device=device[:64]))
    session.commit()


def set_environment(
    session: Session, job_id: str, *, environment: dict[str, Any], device: str | None = None
) -> None:
    """Record what reproducing the job needs beyond its spec (`jumpout.provenance.environment`:
    versions, git commit, device, host, the starting weights' source and sha256), and with
    `device` the device it trains on, in one transaction. Written by each attempt's trainer when
    it starts, so a later attempt replaces an earlier one's."""
    values: dict[str, Any] = {"environment": environment}
    if device is not None:
        values["device"] = device[:64]
    session.execute(update(Job).where(Job.id == job_id).values(**values))
    session.commit()


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _upsert(
    session: Session,
    model,
    values: dict[str, Any] | list[dict[str, Any]],
    keys: list[str],
    update_cols,
):
    """Insert ``values`` (a row, or a list of rows with the same keys, in one executemany),
    updating ``update_cols`` of the rows whose ``keys`` exist."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - only the two supported backends
        raise RuntimeError(f"unsupported database dialect {dialect!r}")
    if isinstance(values, list):
        statement = insert(model)
        statement = statement.on_conflict_do_update(
            index_elements=keys, set_={c: statement.excluded[c] for c in update_cols}
        )
        session.execute(statement, values)
        return
    statement = insert(model).values(**values)
    statement = statement.on_conflict_do_update(
        index_elements=keys, set_={c: statement.excluded[c] for c in update_cols}
    )
    session.execute(statement)


def metric_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """The stored form of one of the engine's epoch dicts: every metric column by name
    (non-finite values as null) and per dropout slot its name and `LAYER_FIELDS`."""
    row: dict[str, Any] = {"epoch": int(metrics["epoch"])}
    for name in METRIC_FIELDS:
        row[name] = _finite(metrics.get(name))
    row["layers"] = [
        {"name": str(layer.get("name")), **{key: _finite(layer.get(key)) for key in LAYER_FIELDS}}
        for layer in metrics.get("layers") or []
    ]
    return row


def metric_view(row: Any) -> dict[str, Any]:
    """One epoch as the API serves it (`api.schemas.EpochMetricRead`), from an `EpochMetric`
    or a Core row of its columns."""
    view = {"epoch": row.epoch, **{name: getattr(row, name) for name in METRIC_FIELDS}}
    view["layers"] = [
        {"name": str(layer.get("name")), **{key: layer.get(key) for key in LAYER_FIELDS}}
        for layer in row.layers or ()
    ]
    return view


def job_view(job: Any) -> dict[str, Any]:
    """A job as the API serves it (`api.schemas.JobRead`), from a `Job` or a Core row of its
    columns and `owner_name`: the columns marked `READ` as they are, plus progress (with an ETA
    from the mean epoch time), result, owner and queue (None here: see `api.queries.job_json`).
    Datetimes stay datetimes; the caller serialises."""
    view = {column.name: getattr(job, column.name) for column in READ_COLUMNS}
    view["spec"] = public_spec(view["spec"])
    environment = view.get("environment")
    if environment and (environment.get("init_from") or {}).get("path"):
        # Where the starting weights lay on the server: its `source` and sha256 say which.
        init = {k: v for k, v in environment["init_from"].items() if k != "path"}
        view["environment"] = {**environment, "init_from": init}
    epochs = job.epochs or 0
    eta = None
    if job.status == JobStatus.RUNNING and job.epoch_seconds is not None:
        eta = float(max(0, epochs - job.epoch) * job.epoch_seconds)
    elif job.status == JobStatus.SUCCEEDED:
        eta = 0.0
    view["cancel_requested"] = bool(job.cancel_requested)
    view["progress"] = {
        "epoch": job.epoch,
        "epochs": epochs,
        "fraction": float(min(1.0, job.epoch / epochs)) if epochs else 0.0,
        "eta_seconds": eta,
    }
    # The column holds the newest recorded epoch's test accuracy: the headline only once the
    # job has succeeded (a running job's latest epoch is not its final one).
    view["result"] = {
        "final_accuracy": job.final_accuracy if job.status == JobStatus.SUCCEEDED else None,
        "latest_accuracy": job.final_accuracy,
        "best_val_accuracy": job.best_val_accuracy,
        "best_epoch": job.best_epoch,
        "test_accuracy_at_best": job.test_accuracy_at_best,
    }
    view["owner"] = job.owner_name
    # Where a queued job stands in the fair order takes queries (`fairshare.queue_position`):
    # only the read of one job fills it in (`api.queries.job_json`).
    view["queue"] = None
    return view


def public_spec(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """A job's resolved spec as a client sees it: only the fields its run reads
    (`jumpout.spec.applicable_fields`: no `dropout_rate` on a jumpout job, no `sigma` on a
    dropout one) and none of the server's paths (`SERVER_PATH_FIELDS`). The stored row keeps
    the whole spec: the worker trains from it."""
    if not spec:
        return spec
    return {
        name: spec[name]
        for name in applicable_fields(spec)
        if name in spec and name not in SERVER_PATH_FIELDS
    }


def record_epoch(session: Session, job_id: str, metrics: dict[str, Any]) -> None:
    """Store one finished epoch's metrics (upsert on (job, epoch): a resumed run that repeats an
    epoch replaces it) and refresh the job's progress, final test accuracy and, when the run
    holds out a validation split, the epoch chosen on it (never on the test set)."""
    record_epochs(session, job_id, [metrics])


def record_epochs(
    session: Session, job_id: str, epochs: list[dict[str, Any]], *, commit: bool = True
) -> None:
    """`record_epoch` for several epochs in one transaction, the job's summary refreshed once
    (the trainer writes sub-second epochs in batches). ``commit=False`` leaves the transaction
    open for the checkpoint that covers these epochs (`record_checkpoint`)."""
    if not epochs:
        return
    now = utcnow()
    rows = [{"job_id": job_id, **metric_row(metrics), "created_at": now} for metrics in epochs]
    # One statement for the batch (an executemany: 1 ms for 20 epochs, a statement each 8 ms).
    _upsert(
        session,
        EpochMetric,
        rows,
        ["job_id", "epoch"],
        [*METRIC_FIELDS, "layers", "created_at"],
    )
    best = session.execute(
        select(EpochMetric.epoch, EpochMetric.val_accuracy, EpochMetric.test_accuracy)
        .where(EpochMetric.job_id == job_id, EpochMetric.val_accuracy.is_not(None))
        .order_by(EpochMetric.val_accuracy.desc(), EpochMetric.epoch)
        .limit(1)
    ).one_or_none()
    last = session.execute(
        select(EpochMetric.epoch, EpochMetric.test_accuracy)
        .where(EpochMetric.job_id == job_id)
        .order_by(EpochMetric.epoch.desc())
        .limit(1)
    ).one()
    mean_seconds = session.scalar(
        select(func.avg(EpochMetric.seconds)).where(EpochMetric.job_id == job_id)
    )
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            epoch=last.epoch,
            final_accuracy=last.test_accuracy,
            best_val_accuracy=best.val_accuracy if best else None,
            best_epoch=best.epoch if best else None,
            test_accuracy_at_best=best.test_accuracy if best else None,
            epoch_seconds=float(mean_seconds) if mean_seconds is not None else None,
        )
    )
    if commit:
        session.commit()


def record_checkpoint(
    session: Session,
    job_id: str,
    *,
    path: str,
    epoch: int,
    sha256: str,
    size_bytes: int,
    is_best: bool,
    commit: bool = True,
) -> Checkpoint:
    """Record a checkpoint file the worker wrote (upsert on (job, path): a resumed run may
    rewrite the same file). A new best clears the flag on the job's other checkpoints."""
    path = str(path)
    if is_best:
        session.execute(
            update(Checkpoint)
            .where(Checkpoint.job_id == job_id, Checkpoint.path != path)
            .values(is_best=False)
        )
    values = {
        "job_id": job_id,
        "path": path,
        "epoch": int(epoch),
        "sha256": sha256.lower(),
        "size_bytes": int(size_bytes),
        "is_best": bool(is_best),
        "created_at": utcnow(),
    }
    _upsert(
        session,
        Checkpoint,
        values,
        ["job_id", "path"],
        ["epoch", "sha256", "size_bytes", "is_best", "created_at"],
    )
    row = session.scalars(
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id, Checkpoint.path == path)
        .execution_options(populate_existing=True)
    ).one()
    if commit:
        session.commit()
    return row


class AttemptSuperseded(RuntimeError):
    """The job no longer runs as the attempt that is writing: the reaper gave it to another
    attempt (this one's heartbeats did not reach the store in time), or it ended. That attempt's
    trainer must write nothing more: its checkpoints and metrics are the new attempt's now."""


def hold_attempt(session: Session, job_id: str, *, attempt: int, lock: bool = True) -> None:
    """The first statement of a trainer's write: check that the job still runs as ``attempt``
    and keep it so until the transaction ends, or raise `AttemptSuperseded`. PostgreSQL locks
    the job's row (a reaper's requeue waits for the write, and two writes of one job's
    checkpoints are serialised, so one best flag); SQLite's transactions already are
    (``BEGIN IMMEDIATE``). ``lock=False``: the check alone, for a read."""
    query = select(Job.attempt, Job.status).where(Job.id == job_id)
    if lock and session.get_bind().dialect.name != "sqlite":
        # NO KEY UPDATE: what the UPDATE of the job's summary takes anyway; it does not block
        # the inserts of rows that reference the job (epochs, checkpoints) from elsewhere.
        query = query.with_for_update(key_share=True)
    row = session.execute(query).one_or_none()
    if row is None or row.attempt != attempt or row.status != JobStatus.RUNNING:
        state = "gone" if row is None else f"{row.status} as attempt {row.attempt}"
        raise AttemptSuperseded(
            f"job {job_id} no longer runs as attempt {attempt} (now {state}): this attempt "
            "writes nothing more"
        )


def forget_checkpoint(session: Session, job_id: str, *, path: str) -> None:
    """The worker deletes this file (keep-last-N pruning; the record goes first)."""
    session.execute(
        delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.path == str(path))
    )
    session.commit()


def finish_job(
    session: Session,
    job_id: str,
    *,
    status: JobStatus,
    error: str | None = None,
    attempt: int | None = None,
) -> bool:
    """Move a running job to a final `status` and stamp finished_at. Conditional: only from
    running (and, for cancelled, from queued). With `attempt`, only if that attempt still owns
    the job. True when this call changed the row."""
    if status not in FINAL_STATUSES:
        raise ValueError(
            f"status must be one of {', '.join(sorted(FINAL_STATUSES))}, not {status!r}"
        )
    allowed = [JobStatus.RUNNING]
    if status == JobStatus.CANCELLED:
        allowed.append(JobStatus.QUEUED)
    query = update(Job).where(Job.id == job_id, Job.status.in_(allowed))
    if attempt is not None:
        query = query.where(Job.attempt == attempt)
    changed = session.execute(
        query.values(status=status, error=error, finished_at=utcnow())
    ).rowcount
    session.commit()
    return bool(changed)


def _back_to_queue(now: datetime) -> dict[str, Any]:
    """The values that put a running job back in the queue, decided in the UPDATE itself: a
    cancel flagged since the caller last looked makes it cancelled instead (a queued job with the
    flag set is never claimed: it would wait forever)."""
    return {
        "status": case(
            (Job.cancel_requested, JobStatus.CANCELLED.value), else_=JobStatus.QUEUED.value
        ),
        "finished_at": case(
            (Job.cancel_requested, literal(now, Job.__table__.c.finished_at.type)), else_=None
        ),
    }


def requeue_job(
    session: Session, job_id: str, *, attempt: int, error: str, count_attempt: bool
) -> bool:
    """Put a job that `attempt` still owns back to `queued` (the caller then enqueues it).

    `requeue_stale_jobs` requeues only jobs whose heartbeat went stale; the worker's supervisor
    knows sooner (its trainer crashed, or the worker is shutting down) and requeues at once, with
    the reason in `error`. A shutdown is not the job's fault: `count_attempt=False` gives the
    attempt back. False when that attempt no longer owns the job (nothing changed)."""
    values: dict[str, Any] = {
        **_back_to_queue(utcnow()),
        "worker": None,
        "heartbeat_at": None,
        "error": error,
    }
    if not count_attempt:
        values["attempt"] = Job.attempt - 1
    changed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.attempt == attempt)
        .values(**values)
    ).rowcount
    session.commit()
    return bool(changed)


def requeue_stale_jobs(session: Session, *, timeout_s: float, max_attempts: int) -> list[str]:
    """Running jobs whose heartbeat is older than `timeout_s` lost their worker: put them back
    to queued (attempt unchanged; the next claim adds one) and return their ids for the caller to
    enqueue. A job that already used `max_attempts` attempts (plus any a retry granted it,
    `attempt_budget`) fails instead, and one whose cancel was requested is cancelled."""
    now = utcnow()
    cutoff = now - timedelta(seconds=timeout_s)
    stale = session.execute(
        select(Job.id, Job.attempt, Job.cancel_requested, Job.heartbeat_at, Job.max_attempts).where(
            Job.status == JobStatus.RUNNING,
            or_(
                Job.heartbeat_at < cutoff, and_(Job.heartbeat_at.is_(None), Job.started_at < cutoff)
            ),
        )
    ).all()
    requeued: list[str] = []
    for job_id, attempt, cancel, beat, job_max_attempts in stale:
        budget = attempt_budget(job_max_attempts, configured=max_attempts)
        # Conditional on the heartbeat we saw: a worker that wakes up in between keeps its job.
        guard = update(Job).where(
            Job.id == job_id,
            Job.status == JobStatus.RUNNING,
            Job.attempt == attempt,
            Job.heartbeat_at.is_(None) if beat is None else Job.heartbeat_at == beat,
        )
        if cancel:
            values = {"status": JobStatus.CANCELLED, "finished_at": now, "error": None}
        elif attempt >= budget:
            values = {
                "status": JobStatus.FAILED,
                "finished_at": now,
                "error": f"worker lost {attempt} times (heartbeat timeout)",
            }
        else:
            values = {**_back_to_queue(now), "worker": None, "heartbeat_at": None}
        changed = session.execute(guard.values(**values)).rowcount
        if changed and not cancel and attempt < budget:
            requeued.append(job_id)
    session.commit()
    return requeued


def queued_job_ids(session: Session) -> list[str]:
    """Every queued job, oldest first (for a reconciler that re-enqueues after a broker outage)."""
    ids = list(
        session.scalars(
            select(Job.id).where(Job.status == JobStatus.QUEUED).order_by(Job.created_at)
        )
    )
    session.commit()
    return ids


# --- checkpoint files ------------------------------------------------------------------------


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checkpoint_file(checkpoint: Checkpoint) -> Path:
    """The checkpoint's file, after checking it is there and matches its recorded size and
    sha256. Raises `CheckpointGone` (missing) or `ChecksumMismatch` (changed or corrupted).
    Call it outside a transaction: hashing a large file must not hold the SQLite write lock.

    Only files under `settings.artifact_dir` (symlinks resolved) are ever served or resumed from:
    a record pointing elsewhere raises `CheckpointRefused` before the file is even looked at."""
    path = Path(checkpoint.path)
    root = Path(get_settings().artifact_dir).resolve()
    if not path.resolve().is_relative_to(root):
        # A row the worker did not write (or an artifact_dir that moved): say so to the operator
        # in the log; the client is not told the server path.
        logger.error(
            "checkpoint %s of job %s points outside the artifact directory %s: %s",
            checkpoint.id, checkpoint.job_id, root, checkpoint.path,
        )  # fmt: skip
        raise CheckpointRefused(
            f"the file of checkpoint {checkpoint.id} (epoch {checkpoint.epoch}) is not in the "
            "server's artifact directory; it will not be served"
        )
    if not path.is_file():
        raise CheckpointGone(
            f"the file of checkpoint {checkpoint.id} (epoch {checkpoint.epoch}) no longer exists"
        )
    if path.stat().st_size != checkpoint.size_bytes or file_sha256(path) != checkpoint.sha256:
        raise ChecksumMismatch(
            f"the file of checkpoint {checkpoint.id} (epoch {checkpoint.epoch}) does not match "
            "its recorded sha256: it is corrupted or was replaced; it will not be served"
        )
    return path


def newest_valid_checkpoint(session: Session, job_id: str) -> Checkpoint | None:
    """The newest checkpoint of the job whose file exists and matches its sha256 (for resuming);
    None when there is none. Corrupted files are skipped (and logged), not deleted."""
    for row in _checkpoints_newest_first(session, job_id):
        try:
            verify_checkpoint_file(row)
        except (CheckpointGone, ChecksumMismatch, CheckpointRefused) as exc:
            logger.warning("skipping checkpoint %s of job %s: %s", row.id, job_id, exc.message)
            continue
        return row
    return None
