"""Experiments in the store: one request (rows x seeds, `jumpout.experiment`) submitted as ordinary
jobs in one transaction, read back as one body with counts, progress and an ETA, cancelled as one,
and the outcomes of its jobs gathered for `jumpout.report`.

Every job of an experiment is an ordinary job (`experiment_id`, `row_label`, `priority` set):
claimed, resumed, read and cancelled as any other. The experiment row holds the normalised plan
(`ExperimentPlan.to_dict()`), so a report is built from the plan and the jobs, never from the
client's request again.

Limits: an experiment holds at most `max_experiment_jobs` jobs, each within this server's limits
(`max_epochs`, `max_batch_size`); a refusal names the row and the field and stores nothing. Its jobs
do not count against `max_queued_per_token` (that limit is for single submissions; see
`jobstore.jobs.create_job`).

The reads take a SQLAlchemy `Connection` (the API's read engine, `api.queries.read`); the writes a
`Session`, each its own short transaction, like `jobstore.jobs`.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    Text,
    and_,
    bindparam,
    cast,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from jobstore import jobs
from jobstore.errors import FieldError, InvalidSpec, NotFound
from jobstore.idempotency import IdempotentRequest, remember
from jobstore.settings import get_settings
from jobstore.tables import (
    FINAL_STATUSES,
    LAYER_FIELDS,
    ApiToken,
    EpochMetric,
    Experiment,
    Job,
    JobStatus,
    new_job_id,
    utcnow,
)
from jumpout.experiment import ExperimentError, ExperimentPlan, plan_experiment
from jumpout.spec import TrainConfig


class ExperimentNotFound(NotFound, LookupError):
    code = "experiment_not_found"

    def __init__(self, experiment_id: str):
        super().__init__(f"no experiment with id {experiment_id!r}")
        self.experiment_id = experiment_id


# --- submitting ------------------------------------------------------------------------------


def field_name(location: Iterable[str | int]) -> str:
    """An `ExperimentError.location` as the error body's field (what `api.errors` makes of a
    request-model loc): ("rows", 2, "sigma") -> "rows.2.sigma"."""
    return ".".join(str(part) for part in location) or "body"


def plan_request(request: dict[str, Any]) -> ExperimentPlan:
    """The experiment plan of a client's request (everything but `priority`), checked whole by
    `jumpout.experiment.plan_experiment` up to this server's `max_experiment_jobs`; raises
    `InvalidSpec` naming the field (and the row) at fault."""
    limit = get_settings().max_experiment_jobs
    try:
        return plan_experiment(request, max_jobs=limit)
    except ExperimentError as error:
        message = error.message
        if error.location == ("seeds",) and f"at most {limit} jobs" in message:
            # The library knows the number, not the setting: name it, so an operator knows
            # which setting to raise.
            message += f" on this server (max_experiment_jobs = {limit})"
        label = _row_label_at(request, error.location)
        if label is not None and not message.startswith("row "):
            message = f"row {label!r}: {message}"
        field = field_name(error.location)
        raise InvalidSpec(
            f"invalid value for: {field}", fields=[FieldError(field, message)]
        ) from None


def _row_label_at(request: dict[str, Any], location: tuple[str | int, ...]) -> str | None:
    """The label the client gave the row at `location` (("rows", 2, ...)), if any."""
    if len(location) < 2 or location[0] != "rows" or not isinstance(location[1], int):
        return None
    rows = request.get("rows")
    if not isinstance(rows, list) or not 0 <= location[1] < len(rows):
        return None
    row = rows[location[1]]
    label = row.get("label") if isinstance(row, dict) else None
    return label if isinstance(label, str) else None


def _row_field(request: dict[str, Any], plan: ExperimentPlan, label: str, field: str) -> str:
    """Where in the request a value of one row's run comes from: the row's own parameters (in
    `rows`, `grid` or the preset) or else `base` (sent there, or the recipe's default)."""
    index = next(i for i, row in enumerate(plan.rows) if row.label == label)
    if field in plan.rows[index].params:
        if "rows" in request:
            return field_name(("rows", index, field))
        if "grid" in request:
            return field_name(("grid", field))
        return "preset"
    return field_name(("base", field))


def create_experiment(
    session: Session,
    *,
    request: dict[str, Any],
    owner_id: int | None,
    priority: int = 0,
    idempotency: IdempotentRequest | None = None,
) -> tuple[str, list[str]]:
    """Plan `request`, resolve every run as a job spec (recipe defaults, this server's operator
    fields and limits: `jobstore.jobs.resolve_job_spec`), and store the experiment and all its
    queued jobs in one transaction: all or nothing. Returns (experiment id, job ids in plan
    order); the caller enqueues the jobs after this commits.

    Raises `InvalidSpec` naming the field, and for a run over this server's limits the row (each
    row and field once, whichever seed), before anything is written.

    `idempotency`: the request's `Idempotency-Key`, stored in the same transaction
    (`jobstore.idempotency.remember`); a concurrent request that stored it first makes this raise
    `sqlalchemy.exc.IntegrityError`, with nothing written."""
    plan = plan_request(request)
    experiment_id = new_job_id()
    values: list[dict[str, Any]] = []
    errors: dict[tuple[str, str], FieldError] = {}
    starting_points: dict[str, TrainConfig] = {}  # init_from -> one config naming it
    # Everything is resolved before the transaction starts: on SQLite the write lock is held
    # only for the inserts.
    for run in plan.runs():
        job_id = new_job_id()
        try:
            config = jobs.resolve_job_spec(run.spec, job_id=job_id)
        except InvalidSpec as refused:
            for error in refused.fields:
                field = _row_field(request, plan, run.row.label, error.field)
                message = f"row {run.row.label!r}: {error.message}"
                errors.setdefault((run.row.label, error.field), FieldError(field, message))
            continue
        if config.init_from is not None:
            starting_points.setdefault(config.init_from, config)
        values.append(
            jobs.job_values(
                job_id,
                config,
                owner_id=owner_id,
                priority=priority,
                experiment_id=experiment_id,
                row_label=run.row.label,
            )
        )
    if errors:
        names = ", ".join(dict.fromkeys(error.field for error in errors.values()))
        raise InvalidSpec(f"invalid value for: {names}", fields=list(errors.values()))

    if starting_points:
        # The same rule as a single job's: only the caller's own jobs (any, for an admin).
        is_admin = owner_id is not None and bool(
            session.scalar(select(ApiToken.is_admin).where(ApiToken.id == owner_id))
        )
        for config in starting_points.values():
            jobs.check_init_from(session, config, owner_id=owner_id, is_admin=is_admin)

    connection = session.connection()
    if idempotency is not None:
        remember(connection, idempotency, resource_kind="experiment", resource_id=experiment_id)
    connection.execute(
        _INSERT_EXPERIMENT,
        {
            "id": experiment_id,
            "name": plan.name,
            "owner_id": owner_id,
            "spec": plan.to_dict(),
            "baseline": plan.baseline,
            "job_count": len(values),
            "cancel_requested": False,
            "created_at": utcnow(),
        },
    )
    # One executemany (PostgreSQL: batched multi-row INSERTs): 500 jobs in a few milliseconds.
    connection.execute(jobs.INSERT_JOB, values)
    session.commit()
    return experiment_id, [row["id"] for row in values]


_INSERT_EXPERIMENT = insert(Experiment.__table__)


# --- reading ---------------------------------------------------------------------------------

_EXPERIMENTS = select(Experiment.__table__, ApiToken.name.label("owner_name")).outerjoin(
    ApiToken, Experiment.owner_id == ApiToken.id
)
_EXPERIMENT_BY_ID = _EXPERIMENTS.where(Experiment.id == bindparam("experiment_id"))

_JOB_STATES = (
    select(
        Job.id,
        Job.row_label,
        Job.spec["seed"].as_integer().label("seed"),
        Job.status,
        Job.priority,
        Job.epoch,
        Job.epochs,
        Job.epoch_seconds,
        Job.final_accuracy,
    )
    .where(Job.experiment_id == bindparam("experiment_id"))
    .order_by(Job.created_at, Job.id)
)

# Per experiment and status: how many jobs, their epochs done and planned, and the epoch time
# measured so far (seconds x epochs, over the jobs that have a mean epoch time).
_STATUS_TOTALS = (
    select(
        Job.experiment_id,
        Job.status,
        func.count().label("jobs"),
        func.coalesce(func.sum(Job.epoch), 0).label("epoch"),
        func.coalesce(func.sum(Job.epochs), 0).label("epochs"),
        func.sum(Job.epoch_seconds * Job.epoch).label("timed_seconds"),
        func.sum(Job.epoch).filter(Job.epoch_seconds.is_not(None)).label("timed_epochs"),
    )
    .where(Job.experiment_id.in_(bindparam("experiment_ids", expanding=True)))
    .group_by(Job.experiment_id, Job.status)
)


def is_experiment_id(value: str) -> bool:
    return jobs.is_job_id(value)  # the same uuid4 hex


def visible_to(row: Any, principal: Any) -> bool:
    """The ownership rule of experiments: the owner (the anonymous owner included, when auth is
    off) and admins see one; to anyone else it does not exist (404, not 403: its id tells them
    nothing)."""
    return bool(principal.is_admin) or row.owner_id == principal.id


def experiment_row(connection: Connection, experiment_id: str, principal: Any) -> Any:
    """The experiment's row (with `owner_name`) if `principal` may see it; else
    `ExperimentNotFound`."""
    if not is_experiment_id(experiment_id):
        raise ExperimentNotFound(experiment_id[:64])
    row = connection.execute(_EXPERIMENT_BY_ID, {"experiment_id": experiment_id}).first()
    if row is None or not visible_to(row, principal):
        raise ExperimentNotFound(experiment_id)
    return row


def _summary(row: Any, totals: list[Any]) -> dict[str, Any]:
    """The experiment's summary (`ExperimentSummary`) from its row and its per-status totals.

    Progress: `fraction` is finished jobs over all jobs; `epoch_fraction` weighs each job by its
    epochs, a finished job (whatever its end) counting all of its epochs since it will run no
    more. ETA: the epochs still to run x the mean epoch time measured over the experiment's jobs,
    divided by the number of its jobs running now (each worker runs one job at a time, so that is
    how many workers serve it at this moment; at least one). None until an epoch has been timed,
    0 once every job has finished."""
    counts = {status.value: 0 for status in JobStatus}
    done_epochs = total_epochs = 0
    timed_seconds = 0.0
    timed_epochs = 0
    for total in totals:
        counts[total.status] = total.jobs
        total_epochs += total.epochs
        done_epochs += total.epochs if total.status in FINAL_STATUSES else total.epoch
        if total.timed_seconds is not None and total.timed_epochs:
            timed_seconds += float(total.timed_seconds)
            timed_epochs += total.timed_epochs
    job_count = sum(counts.values())
    finished = sum(counts[status] for status in FINAL_STATUSES)
    remaining = max(0, total_epochs - done_epochs)
    running = counts[JobStatus.RUNNING]
    if remaining == 0:
        eta = 0.0
    elif timed_epochs:
        eta = remaining * (timed_seconds / timed_epochs) / max(1, running)
    else:
        eta = None
    return {
        "id": row.id,
        "name": row.name,
        "owner": row.owner_name,
        "created_at": row.created_at,
        "preset": (row.spec or {}).get("preset"),
        "baseline": row.baseline,
        "job_count": job_count,
        "cancel_requested": bool(row.cancel_requested),
        "counts": counts,
        "progress": {
            "finished": finished,
            "total": job_count,
            "fraction": finished / job_count if job_count else 0.0,
            "epochs_done": done_epochs,
            "epochs_total": total_epochs,
            "epoch_fraction": done_epochs / total_epochs if total_epochs else 0.0,
            "eta_seconds": eta if eta is None or math.isfinite(eta) else None,
            "running": running,
        },
    }


class _Totals:
    """One (status) line of `_STATUS_TOTALS`, summed from job rows in Python."""

    def __init__(self, status: str) -> None:
        self.status = status
        self.jobs = self.epoch = self.epochs = self.timed_epochs = 0
        self.timed_seconds: float | None = None


def _totals_of(job_rows: list[Any]) -> list[_Totals]:
    by_status: dict[str, _Totals] = {}
    for job in job_rows:
        total = by_status.setdefault(job.status, _Totals(job.status))
        total.jobs += 1
        total.epoch += job.epoch or 0
        total.epochs += job.epochs or 0
        if job.epoch_seconds is not None:
            total.timed_seconds = (total.timed_seconds or 0.0) + job.epoch_seconds * job.epoch
            total.timed_epochs += job.epoch or 0
    return list(by_status.values())


def experiment_view(connection: Connection, row: Any) -> dict[str, Any]:
    """An experiment as the API serves it (`ExperimentRead`): its summary, plan (base, rows,
    seeds, metric) and its jobs in plan order (row, then seed)."""
    job_rows = connection.execute(_JOB_STATES, {"experiment_id": row.id}).all()
    plan = ExperimentPlan.from_dict(row.spec)
    row_order = {r.label: index for index, r in enumerate(plan.rows)}
    seed_order = {seed: index for index, seed in enumerate(plan.seeds)}
    job_rows.sort(
        key=lambda job: (
            row_order.get(job.row_label, len(row_order)),
            seed_order.get(job.seed, len(seed_order)),
        )
    )
    view = _summary(row, _totals_of(job_rows))
    view.update(
        metric=plan.metric,
        base=plan.base,
        rows=[{"label": r.label, "params": r.params} for r in plan.rows],
        seeds=list(plan.seeds),
        priority=job_rows[0].priority if job_rows else 0,
        jobs=[
            {
                "id": job.id,
                "row_label": job.row_label,
                "seed": job.seed,
                "status": job.status,
                "epoch": job.epoch,
                "epochs": job.epochs,
                "final_accuracy": job.final_accuracy,
            }
            for job in job_rows
        ],
    )
    return view


def experiments_page(
    connection: Connection, principal: Any, *, limit: int = 50, cursor: str | None = None
) -> dict[str, Any]:
    """An `ExperimentsPage`: the experiments `principal` may see (its own; all for an admin),
    newest first, keyset pagination on (created_at, id) as the jobs listing."""
    query = _EXPERIMENTS.order_by(Experiment.created_at.desc(), Experiment.id.desc())
    if not principal.is_admin:
        owner = (
            Experiment.owner_id.is_(None)
            if principal.id is None
            else Experiment.owner_id == principal.id
        )
        query = query.where(owner)
    if cursor:
        created, last_id = jobs._decode_cursor(cursor)
        query = query.where(
            or_(
                Experiment.created_at < created,
                and_(Experiment.created_at == created, Experiment.id < last_id),
            )
        )
    rows = connection.execute(query.limit(limit + 1)).all()
    next_cursor = jobs.encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    rows = rows[:limit]
    totals: dict[str, list[Any]] = defaultdict(list)
    if rows:
        ids = [row.id for row in rows]
        for total in connection.execute(_STATUS_TOTALS, {"experiment_ids": ids}):
            totals[total.experiment_id].append(total)
    return {"items": [_summary(row, totals[row.id]) for row in rows], "next_cursor": next_cursor}


# --- cancelling ------------------------------------------------------------------------------


def request_experiment_cancel(session: Session, experiment_id: str, *, principal: Any) -> list[str]:
    """Cancel an experiment on behalf of `principal` (owner or admin; anyone else gets
    `ExperimentNotFound`): record the request and, in the same transaction, cancel every job of
    it that has not finished (`jobstore.jobs.cancel_jobs`: queued ones at once, running ones
    flagged for their worker). Cancelling again, or a finished experiment, changes nothing more
    and is not an error. Returns the ids of the jobs it cancelled or flagged (for the caller to
    publish, after this commit, to their event streams)."""
    if not is_experiment_id(experiment_id):
        session.commit()
        raise ExperimentNotFound(experiment_id[:64])
    owner = session.execute(
        select(Experiment.owner_id).where(Experiment.id == experiment_id)
    ).one_or_none()
    if owner is None or not (principal.is_admin or owner.owner_id == principal.id):
        session.rollback()
        raise ExperimentNotFound(experiment_id)
    # On PostgreSQL, lock the experiment's jobs first: between the two UPDATEs of cancel_jobs a
    # worker could otherwise claim a queued job (missed by both) or requeue a running one, and a
    # retry could make a failed one queued after the ids below were read (cancelled, but not
    # published). A claim, requeue or retry that comes after waits for this commit and then sees
    # the cancel. SQLite's BEGIN IMMEDIATE already keeps every other writer out.
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Job.id).where(Job.experiment_id == experiment_id).with_for_update())
    unfinished = select(Job.id).where(
        Job.experiment_id == experiment_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])
    )
    job_ids = list(session.execute(unfinished).scalars())
    session.execute(
        update(Experiment).where(Experiment.id == experiment_id).values(cancel_requested=True)
    )
    jobs.cancel_jobs(session, Job.experiment_id == experiment_id)
    session.commit()
    return job_ids


# --- reporting -------------------------------------------------------------------------------

# The report's cache key: per status, how many jobs and the newest finished_at. A job's outcome
# (status, final accuracy, metrics) is written before it reaches a final status and never after,
# so the same key means the same report.
_REPORT_KEY = (
    select(Job.status, func.count().label("jobs"), func.max(Job.finished_at).label("newest"))
    .where(Job.experiment_id == bindparam("experiment_id"))
    .group_by(Job.status)
)

_OUTCOMES = select(
    Job.id, Job.row_label, Job.spec["seed"].as_integer().label("seed"), Job.status,
    Job.final_accuracy,
).where(Job.experiment_id == bindparam("experiment_id"))  # fmt: skip

# The layers as JSON text, parsed with orjson: the driver's json.loads was a third of a cold
# 240-job report (4,800 epoch rows).
_SUCCEEDED_LAYERS = (
    select(EpochMetric.job_id, cast(EpochMetric.layers, Text).label("layers"))
    .join(Job, Job.id == EpochMetric.job_id)
    .where(Job.experiment_id == bindparam("experiment_id"), Job.status == JobStatus.SUCCEEDED.value)
)


def report_key(connection: Connection, experiment_id: str) -> tuple:
    rows = connection.execute(_REPORT_KEY, {"experiment_id": experiment_id}).all()
    return tuple(sorted((row.status, row.jobs, _stamp(row.newest)) for row in rows))


def _stamp(value: Any) -> str | None:
    # SQLite returns max() of a timestamp column as text; PostgreSQL as a datetime.
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else str(value)


def run_outcomes(connection: Connection, experiment_id: str) -> list[Any]:
    """Every job of the experiment as a `jumpout.report.RunOutcome`: its row, seed, status, final
    test accuracy (succeeded jobs only) and, for a succeeded job, its dropout slots averaged over
    its epochs."""
    from jumpout.report import RunOutcome, mean_layers

    if connection.dialect.name == "postgresql":
        layers_of = _mean_layers_in_postgres(connection, experiment_id)
    else:
        epochs_of: dict[str, list[Any]] = defaultdict(list)
        rows = connection.execute(_SUCCEEDED_LAYERS, {"experiment_id": experiment_id})
        for job_id, layers in rows:
            epochs_of[job_id].append(orjson.loads(layers) if layers is not None else None)
        layers_of = {job_id: mean_layers(epochs) for job_id, epochs in epochs_of.items()}
    outcomes = []
    for job in connection.execute(_OUTCOMES, {"experiment_id": experiment_id}):
        succeeded = job.status == JobStatus.SUCCEEDED
        outcomes.append(
            RunOutcome(
                label=job.row_label,
                seed=job.seed,
                status=job.status,
                value=job.final_accuracy if succeeded else None,
                job_id=job.id,
                layers=layers_of.get(job.id, []) if succeeded else None,
            )
        )
    return outcomes


# The same means as `jumpout.report.mean_layers`, computed by PostgreSQL: unnesting the JSONB
# there is a third of the time of sending 4,800 epochs' layers as text and averaging them here
# (SQLite's JSON functions are slower than Python's loop, so SQLite keeps that).
_PG_MEAN_LAYERS = text(
    f"""
    SELECT m.job_id, slot.value ->> 'name' AS name, min(slot.position) AS position,
           {", ".join(f"avg((slot.value ->> '{field}')::float8) AS {field}"
                      for field in LAYER_FIELDS)}
    FROM epoch_metrics AS m
    JOIN jobs AS j ON j.id = m.job_id
    CROSS JOIN LATERAL jsonb_array_elements(m.layers) WITH ORDINALITY AS slot(value, position)
    WHERE j.experiment_id = :experiment_id AND j.status = 'succeeded'
    GROUP BY m.job_id, slot.value ->> 'name'
    ORDER BY m.job_id, position
    """
)  # fmt: skip


def _mean_layers_in_postgres(connection: Connection, experiment_id: str) -> dict[str, list]:
    layers_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in connection.execute(_PG_MEAN_LAYERS, {"experiment_id": experiment_id}):
        layers_of[row.job_id].append(
            {
                "name": row.name,
                **{field: getattr(row, field) for field in LAYER_FIELDS},
            }
        )
    return layers_of


def build_experiment_report(connection: Connection, row: Any) -> dict[str, Any]:
    """The experiment's report (`jumpout.report.build_report`, which imports numpy and scipy on
    first use) from its plan and its jobs' outcomes."""
    from jumpout.report import build_report

    plan = ExperimentPlan.from_dict(row.spec)
    return build_report(plan, run_outcomes(connection, row.id))


class ReportCache:
    """(database, experiment id) -> (key, {format: body}), least recently used dropped first.
    Thread-safe: the report route runs in the thread pool."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[tuple[str, str], tuple[Any, dict[str, Any]]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, name: tuple[str, str], key: Any) -> dict[str, Any] | None:
        with self.lock:
            entry = self.entries.get(name)
            if entry is None or entry[0] != key:
                return None
            self.entries.move_to_end(name)
            return entry[1]

    def put(self, name: tuple[str, str], key: Any, bodies: dict[str, Any]) -> None:
        with self.lock:
            self.entries[name] = (key, bodies)
            self.entries.move_to_end(name)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
