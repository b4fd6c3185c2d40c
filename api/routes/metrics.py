"""`GET /metrics`: the Prometheus text format (`api.metrics`), for a scraper.

Not in the OpenAPI schema (it is not part of the job API). With `JUMPOUT_AUTH_REQUIRED` it needs a
token like every other route (any valid one: it shows counts and timings, no job's data); give the
scraper a token of its own that may read nothing else (`python -m api token create --name
prometheus --scope metrics`; every other route refuses it) in its scrape config's `authorization`
section. A sync route: the scrape's queries run in the thread pool.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import choose_encoder

from api import queries
from api.deps import BearerDep, presented_token

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def read_metrics(request: Request, credentials: BearerDep) -> Response:
    queries.caller(presented_token(credentials), metrics_scope_ok=True)
    # OpenMetrics when the scraper asks for it (Prometheus does), else the classic text format.
    encoder, content_type = choose_encoder(request.headers.get("accept"))
    body = encoder(request.app.state.metrics.registry)
    return Response(content=body, media_type=None, headers={"Content-Type": content_type})
