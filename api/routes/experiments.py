"""`/v1/experiments`: submit rows x seeds as jobs in one request, read progress, list, cancel,
and the statistical report (`jobstore.experiments`, `jumpout.report`).

An experiment is visible to its owner and to admins only; to anyone else it does not exist (404).
"""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, BackgroundTasks, Query, Response, status
from starlette.concurrency import run_in_threadpool

from api import queries
from api.deps import BearerDep, PageCursor, PageLimit, SessionDep, TokenDep, presented_token
from api.experiment_schemas import (
    ExperimentCreate,
    ExperimentRead,
    ExperimentReport,
    ExperimentsPage,
    ReportFormat,
)
from api.idempotency import (
    REPLAYED_RESPONSE_HEADERS,
    IdempotencyKeyHeader,
    create_once,
    replay_headers,
)
from api.schemas import error_responses
from jobstore import db, events, experiments, queue
from jobstore.idempotency import EXPERIMENTS_ROUTE, IdempotentRequest, StoredAnswer
from jumpout.report import report_csv, report_markdown

router = APIRouter(prefix="/v1/experiments", tags=["experiments"])

REPORT_CACHE_SIZE = 64  # experiments; a 240-job report is about 10 kB in each format
report_cache = experiments.ReportCache(REPORT_CACHE_SIZE)

REPORT_MEDIA_TYPES = {
    ReportFormat.JSON: "application/json",
    ReportFormat.CSV: "text/csv",
    ReportFormat.MARKDOWN: "text/markdown",
}


def load_statistics() -> None:
    """Import what building a report needs (numpy, scipy.stats)."""
    import scipy.stats  # noqa: F401


def _experiment_body(connection, experiment_id: str, principal) -> bytes:
    row = experiments.experiment_row(connection, experiment_id, principal)
    view = experiments.experiment_view(connection, row)
    return orjson.dumps(view, option=queries.JSON_OPTIONS)


@router.post(
    "",
    operation_id="submit_experiment",
    status_code=status.HTTP_201_CREATED,
    response_model=ExperimentRead,
    responses={
        201: {
            "description": "The experiment, its jobs queued",
            "headers": REPLAYED_RESPONSE_HEADERS,
        },
        **error_responses(400, 401, 413, 422, 507),
    },
)
async def submit_experiment(
    body: ExperimentCreate,
    credentials: BearerDep,
    background: BackgroundTasks,
    idempotency_key: IdempotencyKeyHeader = None,
):
    request = body.model_dump(exclude_unset=True)
    if idempotency_key is not None:
        experiment_id, job_ids, content, replayed = await run_in_threadpool(
            _store_once, request, presented_token(credentials), idempotency_key
        )
        if replayed:
            # Nothing new was stored, so nothing is enqueued (jobstore.idempotency).
            location = f"/v1/experiments/{experiment_id}"
            return queries.json_response(
                content, status.HTTP_201_CREATED, headers=replay_headers(location)
            )
        background.add_task(queue.try_enqueue_all, job_ids)
        return queries.json_response(
            content,
            status.HTTP_201_CREATED,
            headers={"Location": f"/v1/experiments/{experiment_id}"},
        )
    priority = request.pop("priority", 0)
    # In the thread pool on both backends, unlike a single job's submission: planning and
    # resolving up to max_experiment_jobs specs is tens of milliseconds of CPU, which on the
    # event loop would stall every poll meanwhile (the SQLite write lock is taken only for the
    # inserts, after all of it).
    experiment_id, job_ids, content = await run_in_threadpool(
        _store, request, priority, presented_token(credentials)
    )
    # Committed first; published once the answer is sent (bounded, and the reaper covers the
    # jobs it does not announce), so the client never waits for the broker.
    background.add_task(queue.try_enqueue_all, job_ids)
    return queries.json_response(
        content,
        status.HTTP_201_CREATED,
        headers={"Location": f"/v1/experiments/{experiment_id}"},
    )


def _store(
    request: dict,
    priority: int,
    token: str | None,
    idempotency: IdempotentRequest | None = None,
    principal=None,
) -> tuple[str, list[str], bytes]:
    principal = principal or queries.caller(token)
    with db.session_scope() as session:
        experiment_id, job_ids = experiments.create_experiment(
            session,
            request=request,
            owner_id=principal.id,
            priority=priority,
            idempotency=idempotency,
        )
    return experiment_id, job_ids, queries.read(_experiment_body, experiment_id, principal)


def _store_once(request: dict, token: str | None, key: str) -> tuple[str, list[str], bytes, bool]:
    """`_store` with an Idempotency-Key: (experiment id, job ids, body, whether a replay)."""
    principal = queries.caller(token)
    once = IdempotentRequest.of(
        owner_id=principal.id, route=EXPERIMENTS_ROUTE, key=key, body=request
    )
    plan = dict(request)
    priority = plan.pop("priority", 0)

    def create(idempotency: IdempotentRequest) -> tuple[str, list[str], bytes]:
        return _store(plan, priority, token, idempotency, principal)

    def replay(answer: StoredAnswer) -> tuple[str, list[str], bytes]:
        body = queries.read(_experiment_body, answer.resource_id, principal)
        return answer.resource_id, [], body

    (experiment_id, job_ids, content), replayed = create_once(once, create, replay)
    return experiment_id, job_ids, content, replayed


@router.get(
    "",
    operation_id="list_experiments",
    response_model=ExperimentsPage,
    responses=error_responses(401, 422),
)
async def list_experiments(
    credentials: BearerDep,
    limit: PageLimit = 50,
    cursor: PageCursor = None,
):
    def page(connection) -> bytes:
        principal = queries.principal(connection, presented_token(credentials))
        body = experiments.experiments_page(connection, principal, limit=limit, cursor=cursor)
        return orjson.dumps(body, option=queries.JSON_OPTIONS)

    return queries.json_response(queries.read(page))


@router.get(
    "/{experiment_id}",
    operation_id="read_experiment",
    response_model=ExperimentRead,
    responses=error_responses(401, 404, 422),
)
async def read_experiment(experiment_id: str, credentials: BearerDep):
    def body(connection) -> bytes:
        principal = queries.principal(connection, presented_token(credentials))
        return _experiment_body(connection, experiment_id, principal)

    return queries.json_response(queries.read(body))


@router.post(
    "/{experiment_id}/cancel",
    operation_id="cancel_experiment",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ExperimentRead,
    responses=error_responses(401, 404, 413, 422, 507),
)
def cancel_experiment(experiment_id: str, session: SessionDep, principal: TokenDep):
    job_ids = experiments.request_experiment_cancel(session, experiment_id, principal=principal)
    events.publish_changed(*job_ids)  # their event streams' `status` (cancelled, or flagged)
    content = queries.read(_experiment_body, experiment_id, principal)
    return queries.json_response(content, status.HTTP_202_ACCEPTED)


@router.get(
    "/{experiment_id}/report",
    operation_id="read_experiment_report",
    response_model=ExperimentReport,
    responses={
        200: {
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "text/markdown": {"schema": {"type": "string"}},
            },
            "description": "The report: JSON, or one line per row as CSV, or a Markdown table "
            "(`format`)",
        },
        **error_responses(401, 404, 422),
    },
)
def read_experiment_report(
    experiment_id: str,
    credentials: BearerDep,
    report_format: Annotated[ReportFormat, Query(alias="format")] = ReportFormat.JSON,
):
    # A plain def: a report not in the cache is built (scipy's bootstrap) in the thread pool.
    def body(connection) -> bytes:
        principal = queries.principal(connection, presented_token(credentials))
        row = experiments.experiment_row(connection, experiment_id, principal)
        return _report_body(connection, row, report_format)

    return Response(content=queries.read(body), media_type=REPORT_MEDIA_TYPES[report_format])


def _report_body(connection, row, report_format: ReportFormat) -> bytes:
    """The report in `report_format`, from the cache while the experiment's jobs have not
    changed state (`jobstore.experiments.report_key`)."""
    name = (str(connection.engine.url), row.id)
    key = experiments.report_key(connection, row.id)
    bodies = report_cache.get(name, key)
    if bodies is None:
        # Built from rows read after the key: at least as new as it (see api.queries' cache).
        report = experiments.build_experiment_report(connection, row)
        bodies = {"report": report}
        report_cache.put(name, key, bodies)
    body = bodies.get(report_format)
    if body is None:
        report = bodies["report"]
        if report_format == ReportFormat.CSV:
            body = report_csv(report).encode()
        elif report_format == ReportFormat.MARKDOWN:
            body = report_markdown(report).encode()
        else:
            body = orjson.dumps(report, option=queries.JSON_OPTIONS)
        # Two threads rendering the same format at once store equal bytes.
        bodies[report_format] = body
    return body
