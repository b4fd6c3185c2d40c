"""Prometheus metrics for `GET /metrics`: request latency by route, and the service's state read at
scrape time (jobs by status, the broker's queue, epoch durations, heartbeat ages).

Two sources, one registry per app (`ServiceMetrics`, kept on `app.state`, so each test's app
counts from zero and nothing is global):

* `RequestLatency`, a pure ASGI middleware (not Starlette's BaseHTTPMiddleware, which buffers
  streaming responses such as the SSE events), observes one histogram labelled by the route's
  template (`/v1/jobs/{job_id}`, never the raw path: a label per job id would grow without bound),
  the method and the status class (`2xx`). The time is to the response's headers: a stream's or
  a download's length is the client's, not the server's latency.
* `ServiceCollector` reads the store and the broker when Prometheus scrapes: one GROUP BY for jobs
  by status, one query over the running jobs (heartbeat ages and their newest epoch's duration,
  labelled by worker: one per GPU, so bounded), the newest `RECENT_EPOCHS` epoch rows (by primary
  key, no scan) for duration quantiles, and the broker queue's length (its client times out after
  `jobstore.queue.PUBLISH_TIMEOUT_S`, so a hung Redis delays a scrape by at most that). A store or
  broker that does not answer shows as `jumpout_database_up 0` / `jumpout_broker_up 0` rather than
  a failed scrape.

The values are per API process: run one uvicorn process per port (as the compose file does), or
Prometheus sees whichever process answered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Connection, func, select

from api import queries
from jobstore import queue
from jobstore.tables import EpochMetric, Job, JobStatus

logger = logging.getLogger(__name__)

# How many of the newest epoch rows the duration quantiles are computed over.
RECENT_EPOCHS = 200
QUANTILES = (0.5, 0.9, 0.99, 1.0)
# Anything else a client sends as a method is counted as "other" (the label set stays bounded).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "<unmatched>"


def route_template(scope: dict) -> str:
    """The template of the route that served this request (after routing), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path is not None:
        # A Mount's path is its prefix; whatever it serves below counts as one route.
        return path if hasattr(route, "endpoint") else f"{path}/{{path:path}}"
    if "endpoint" not in scope:
        return UNMATCHED_ROUTE  # a 404 before any route matched
    if "app_root_path" in scope:  # a mounted app (starlette.routing.Mount)
        return f"{scope.get('root_path', '')}/{{path:path}}"
    if scope.get("path_params"):
        return UNMATCHED_ROUTE  # a templated route we cannot name: never the raw path
    # A plain route without parameters (FastAPI's /docs, /openapi.json): it matches one path.
    return scope["path"]


class RequestLatency:
    """Pure ASGI middleware: observes `histogram` once per HTTP request, when its response starts
    (or when the app raises before that: status 500)."""

    def __init__(self, app, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        observed = False

        def observe(status: int) -> None:
            nonlocal observed
            if observed:
                return
            observed = True
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            self.histogram.labels(
                route=route_template(scope), method=method, status=f"{status // 100}xx"
            ).observe(time.perf_counter() - started)

        async def send_observed(message):
            if message["type"] == "http.response.start":
                observe(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except BaseException:
            observe(500)
            raise
        observe(500)  # the app returned without starting a response: the server answers 500


class ServiceCollector(Collector):
    """The service's state, read from the store and the broker at each scrape."""

    def collect(self) -> Iterator[Metric]:
        database_up = GaugeMetricFamily(
            "jumpout_database_up", "1 when the store answered this scrape's queries, else 0"
        )
        try:
            by_status, running, recent = queries.read(_store_state)
        except Exception as exc:  # any driver error: the scrape still reports the rest
            logger.warning("metrics: the store did not answer (%s)", exc)
            database_up.add_metric([], 0)
        else:
            database_up.add_metric([], 1)
            yield from _job_metrics(by_status, running, recent)
        yield database_up
        yield from _broker_metrics()


def _store_state(connection: Connection) -> tuple[dict[str, int], list, list[float]]:
    by_status = dict(
        connection.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    )
    newest_epoch_seconds = (
        select(EpochMetric.seconds)
        .where(EpochMetric.job_id == Job.id)
        .order_by(EpochMetric.epoch.desc())
        .limit(1)
        .correlate(Job)
        .scalar_subquery()
    )
    running = connection.execute(
        select(
            Job.worker,
            func.coalesce(Job.heartbeat_at, Job.started_at).label("beat"),
            newest_epoch_seconds.label("epoch_seconds"),
        ).where(Job.status == JobStatus.RUNNING)
    ).all()
    recent = connection.scalars(
        select(EpochMetric.seconds)
        .where(EpochMetric.seconds.is_not(None))
        .order_by(EpochMetric.id.desc())
        .limit(RECENT_EPOCHS)
    ).all()
    return by_status, running, list(recent)


def _job_metrics(by_status: dict[str, int], running: list, recent: list[float]) -> Iterator[Metric]:
    jobs = GaugeMetricFamily("jumpout_jobs", "Jobs in the store by status", labels=["status"])
    for status in JobStatus:
        jobs.add_metric([status.value], by_status.get(status.value, 0))
    yield jobs

    now = datetime.now(UTC)
    ages: dict[str, float] = {}
    epoch_seconds: dict[str, float] = {}
    for row in running:
        worker = row.worker or "unknown"
        if row.beat is not None:
            # A worker may run several jobs: its oldest heartbeat is the one that matters.
            age = max(0.0, (now - _aware(row.beat)).total_seconds())
            ages[worker] = max(age, ages.get(worker, 0.0))
        if row.epoch_seconds is not None:
            epoch_seconds[worker] = max(row.epoch_seconds, epoch_seconds.get(worker, 0.0))
    per_worker = GaugeMetricFamily(
        "jumpout_heartbeat_age_seconds",
        "Age of the oldest heartbeat among each worker's running jobs",
        labels=["worker"],
    )
    for worker, age in sorted(ages.items()):
        per_worker.add_metric([worker], age)
    yield per_worker
    yield GaugeMetricFamily(
        "jumpout_heartbeat_age_max_seconds",
        "Age of the oldest heartbeat of any running job (0 when none runs); the reaper requeues "
        "a job past JUMPOUT_HEARTBEAT_TIMEOUT",
        value=max(ages.values(), default=0.0),
    )
    running_epoch = GaugeMetricFamily(
        "jumpout_running_epoch_seconds",
        "Wall time of the newest recorded epoch of each worker's running job",
        labels=["worker"],
    )
    for worker, seconds in sorted(epoch_seconds.items()):
        running_epoch.add_metric([worker], seconds)
    yield running_epoch

    recent_epochs = GaugeMetricFamily(
        "jumpout_recent_epoch_seconds",
        f"Quantiles of the wall time of the newest {RECENT_EPOCHS} recorded epochs (any job)",
        labels=["quantile"],
    )
    if recent:
        ordered = sorted(recent)
        for q in QUANTILES:
            index = min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))
            recent_epochs.add_metric([str(q)], ordered[index])
    yield recent_epochs


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _broker_metrics() -> Iterator[Metric]:
    broker_up = GaugeMetricFamily(
        "jumpout_broker_up", "1 when the broker answered this scrape, else 0"
    )
    try:
        waiting = queue.waiting_messages()
    except Exception as exc:  # unreachable or timed out (PUBLISH_TIMEOUT_S)
        logger.warning("metrics: the broker did not answer (%s)", exc)
        broker_up.add_metric([], 0)
        yield broker_up
        return
    broker_up.add_metric([], 1)
    yield broker_up
    if waiting is not None:  # None: not a Redis broker, its queue cannot be measured
        yield GaugeMetricFamily(
            "jumpout_broker_queue_messages",
            "Dispatch messages waiting in the broker queue (at most JUMPOUT_DISPATCH_DEPTH; "
            'queued jobs are jumpout_jobs{status="queued"})',
            value=waiting,
        )


class ServiceMetrics:
    """One app's registry: the latency histogram, the service collector, the process' own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_duration = Histogram(
            "jumpout_http_request_duration_seconds",
            "Time from a request's arrival to its response's headers, by route template",
            labelnames=("route", "method", "status"),
            registry=self.registry,
        )
        self.registry.register(ServiceCollector())
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
