"""The FastAPI application: `uvicorn api.main:app`."""

from __future__ import annotations

import gc
import json
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.experiment_schemas import EXPERIMENT_FIELDS
from api.metrics import RequestLatency, ServiceMetrics
from api.routes import dashboard, experiments, health, jobs
from api.routes import datasets as datasets_routes
from api.routes import events as events_routes
from api.routes import logs as logs_routes
from api.routes import metrics as metrics_routes
from api.schemas import SUBMIT_FIELDS
from jobstore import queue
from jobstore.errors import FieldError, error_body
from jobstore.settings import get_settings

BODY_METHODS = {"POST", "PUT", "PATCH"}


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413, whether or not Content-Length is sent
    (the body is read here, at most `max_bytes` + one chunk, and replayed to the app)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send):
        payload = json.dumps(
            error_body(
                "request_too_large",
                f"the request body exceeds {self.max_bytes} bytes (max_request_bytes)",
                [FieldError("body", f"at most {self.max_bytes} bytes")],
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


@asynccontextmanager
async def lifespan(_app: FastAPI):
    queue.warm_up()
    # Everything loaded so far (FastAPI, SQLAlchemy, pydantic) lives as long as the process: out of
    # the collector's sight. A full collection scanned it all, about 200 ms with the event loop
    # stopped, every few seconds under a stream of submissions; the larger first threshold makes
    # the younger collections rarer too.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    # An experiment report needs scipy (about 1 s to import here): loaded beside the server
    # once it serves, rather than at start-up (slower to answer) or in the first report.
    threading.Thread(target=experiments.load_statistics, name="load-scipy", daemon=True).start()
    yield


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        lifespan=lifespan,
        title="jumpout",
        summary="Train networks with Jumpout, dropout or neither, as a service",
        version="0.1.0",
    )
    install_error_handlers(
        app,
        accepted_fields={
            "/v1/jobs": list(SUBMIT_FIELDS),
            "/v1/experiments": list(EXPERIMENT_FIELDS),
        },
    )
    app.include_router(jobs.router)
    app.include_router(events_routes.router)  # the job's SSE stream
    app.include_router(logs_routes.router)
    app.include_router(experiments.router)
    app.include_router(health.router)
    app.include_router(datasets_routes.router)
    app.include_router(dashboard.router)  # the web page at / (no data; not in the schema)
    app.include_router(metrics_routes.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    # Outermost, so that the 413s above and any 500 are timed too (`api.metrics`).
    app.state.metrics = ServiceMetrics()
    app.add_middleware(RequestLatency, histogram=app.state.metrics.request_duration)
    return app


app = create_app()
