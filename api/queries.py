"""The API's hot read paths: job status, a job's metrics, the job list, the caller's token.

These are what clients poll, so they skip the ORM and pydantic: SQLAlchemy Core selects of the
needed columns on a read-only connection (`jobstore.db.get_read_engine`: on SQLite a deferred
transaction, so a read never waits for the write lock), response bodies built as dicts and
serialised once with orjson. The bodies come from the same functions as the ORM path's
(`jobstore.jobs.job_view`, `metric_view`), so they are exactly `api.schemas.JobRead`, `JobsPage` and
`MetricsPage` (the routes declare those models for the OpenAPI schema;
tests/api/test_queries.py checks the bytes against the pydantic models).

A job's metrics body is cached per job. The cache key is read from the database on every request
(one indexed aggregate query): the number of epoch rows and their newest `created_at`.
`jobstore.jobs.record_epoch` stamps `created_at` on insert and on every upsert, so a new epoch
changes the count and a rewritten one (a resumed run repeating an epoch) moves the newest
timestamp; the key can only miss a rewrite if the writer's clock is behind the previous write's,
which a resume (after a heartbeat timeout) does not reach.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import orjson
from fastapi import Response
from sqlalchemy import Connection, bindparam, func, select
from sqlalchemy.exc import DBAPIError

from api.auth import Principal, principal_for
from jobstore.db import get_read_engine
from jobstore.errors import JobNotFound
from jobstore.fairshare import queue_position
from jobstore.jobs import Filter, encode_cursor, filter_jobs, is_job_id, job_view, metric_view
from jobstore.tables import METRIC_FIELDS, ApiToken, EpochMetric, Job, JobStatus

T = TypeVar("T")

JSON_OPTIONS = orjson.OPT_UTC_Z  # "2026-01-01T00:00:00Z", as pydantic writes UTC datetimes


def json_response(body: bytes, status_code: int = 200, headers: dict | None = None) -> Response:
    """A body these reads serialised already, as the response (the route's `response_model`
    still documents it in the OpenAPI schema)."""
    return Response(
        content=body, status_code=status_code, media_type="application/json", headers=headers
    )


METRICS_CACHE_SIZE = 256  # jobs; a 200-epoch body is about 60 kB

# Every job column (job_view picks what it serves) and the owner's name.
_JOBS = select(Job.__table__, ApiToken.name.label("owner_name")).outerjoin(
    ApiToken, Job.owner_id == ApiToken.id
)
_JOB_BY_ID = _JOBS.where(Job.id == bindparam("job_id"))

_METRICS = (
    select(
        EpochMetric.epoch,
        *(EpochMetric.__table__.c[name] for name in METRIC_FIELDS),
        EpochMetric.layers,
    )
    .where(EpochMetric.job_id == bindparam("job_id"))
    .order_by(EpochMetric.epoch)
)
# The job's existence and its metrics' cache key in one statement.
_METRICS_KEY = select(
    Job.id,
    select(func.count())
    .where(EpochMetric.job_id == Job.id)
    .correlate(Job)
    .scalar_subquery()
    .label("rows"),
    select(func.max(EpochMetric.created_at))
    .where(EpochMetric.job_id == Job.id)
    .correlate(Job)
    .scalar_subquery()
    .label("newest"),
).where(Job.id == bindparam("job_id"))

_TOKEN_BY_HASH = select(
    ApiToken.id,
    ApiToken.name,
    ApiToken.is_admin,
    ApiToken.token_hash,
    ApiToken.revoked_at,
    ApiToken.scope,
).where(ApiToken.token_hash == bindparam("digest"))


@contextmanager
def read_connection() -> Iterator[Connection]:
    """A connection on which each statement is its own read transaction (no BEGIN, no COMMIT:
    see `jobstore.db.get_read_engine`). Nothing here needs two statements to share a snapshot."""
    with get_read_engine().connect() as connection:
        yield connection


def read(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(connection, *args, **kwargs)` on a read connection; once more on a fresh connection
    when the first turned out dead (a restarted PostgreSQL: the read pool does not pre-ping)."""
    try:
        with read_connection() as connection:
            return fn(connection, *args, **kwargs)
    except DBAPIError as error:
        if not error.connection_invalidated:
            raise
    with read_connection() as connection:
        return fn(connection, *args, **kwargs)


# --- the caller ------------------------------------------------------------------------------


def principal(
    connection: Connection, token: str | None, *, metrics_scope_ok: bool = False
) -> Principal:
    """Who is calling (`api.auth.principal_for`), the token looked up on this connection."""
    return principal_for(
        token,
        lambda digest: connection.execute(_TOKEN_BY_HASH, {"digest": digest}).first(),
        metrics_scope_ok=metrics_scope_ok,
    )


def caller(token: str | None, *, metrics_scope_ok: bool = False) -> Principal:
    """`principal` on a read connection of its own; none is opened when no token is presented.
    `metrics_scope_ok`: GET /metrics only (`api.auth`)."""
    if not token:
        return principal_for(None, lambda digest: None)
    return read(principal, token, metrics_scope_ok=metrics_scope_ok)


# --- jobs ------------------------------------------------------------------------------------


def job_body(job: Job) -> bytes:
    """The `JobRead` body of a `Job` just written (its owner loaded with it)."""
    return orjson.dumps(job_view(job), option=JSON_OPTIONS)


def job_json(connection: Connection, job_id: str) -> bytes:
    """The `JobRead` body of a job; raises `JobNotFound`."""
    if not is_job_id(job_id):
        raise JobNotFound(job_id[:64])
    row = connection.execute(_JOB_BY_ID, {"job_id": job_id}).first()
    if row is None:
        raise JobNotFound(job_id)
    view = job_view(row)
    if row.status == JobStatus.QUEUED:
        # Three aggregate queries over the queued jobs and their owners (not in the list: a
        # page of queued jobs would repeat them per item).
        view["queue"] = queue_position(connection, row)
    return orjson.dumps(view, option=JSON_OPTIONS)


def jobs_page_json(
    connection: Connection,
    *,
    status: Filter = None,
    method: Filter = None,
    dataset: Filter = None,
    owner: Filter = None,
    experiment_id: Filter = None,
    limit: int = 50,
    cursor: str | None = None,
    visible: Any = None,
) -> bytes:
    """A `JobsPage` body: newest first, keyset pagination as in `jobstore.jobs.list_jobs`; each
    filter one value or several (`jobstore.jobs.filter_jobs`). `visible`: the caller's read
    confinement (`api.access.job_filter`; None: every job)."""
    query = filter_jobs(
        _JOBS if visible is None else _JOBS.where(visible),
        status=status,
        method=method,
        dataset=dataset,
        owner=owner,
        experiment_id=experiment_id,
        cursor=cursor,
    )
    rows = connection.execute(query.limit(limit + 1)).all()
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    items = [job_view(row) for row in rows[:limit]]
    body = {"items": items, "next_cursor": next_cursor}
    return orjson.dumps(body, option=JSON_OPTIONS)


# --- metrics ---------------------------------------------------------------------------------


class _MetricsCache:
    """(database, job id) -> (key, body), least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[tuple[str, str], tuple[Any, bytes]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, name: tuple[str, str], key: Any) -> bytes | None:
        with self.lock:
            entry = self.entries.get(name)
            if entry is None or entry[0] != key:
                return None
            self.entries.move_to_end(name)
            return entry[1]

    def put(self, name: tuple[str, str], key: Any, body: bytes) -> None:
        with self.lock:
            self.entries[name] = (key, body)
            self.entries.move_to_end(name)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


metrics_cache = _MetricsCache(METRICS_CACHE_SIZE)


def metrics_json(connection: Connection, job_id: str) -> bytes:
    """The `MetricsPage` body of a job (epochs in order); raises `JobNotFound`."""
    if not is_job_id(job_id):
        raise JobNotFound(job_id[:64])
    current = connection.execute(_METRICS_KEY, {"job_id": job_id}).first()
    if current is None:
        raise JobNotFound(job_id)
    name = (str(connection.engine.url), job_id)
    key = (current.rows, current.newest)
    body = metrics_cache.get(name, key)
    if body is not None:
        return body
    items = [metric_view(row) for row in connection.execute(_METRICS, {"job_id": job_id})]
    body = orjson.dumps({"items": items}, option=JSON_OPTIONS)
    # The rows were read after the key, so they are at least as new as it: a write in between
    # stores a newer body under the older key, and the next request, reading the new key,
    # refetches. The cache never holds a body older than its key.
    metrics_cache.put(name, key, body)
    return body
