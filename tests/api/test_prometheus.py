"""`GET /metrics` (`api.metrics`), scraped through the app on SQLite and PostgreSQL and read back
with prometheus_client's own parser: jobs by status equal the store's counts, the latency
histogram is labelled by route template (never a job id) and counts requests, heartbeat ages and
epoch durations reflect the running jobs, a dead broker is a gauge and not a failed scrape, and
with auth on the route needs a token."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from api import auth
from jobstore import jobs
from jobstore.tables import EpochMetric, Job, JobStatus, utcnow

SPEC = {"dataset": "synthetic", "architecture": "mlp", "epochs": 3}


def scrape(client, headers=None) -> dict[str, list]:
    """Metric family name -> its samples."""
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = text_string_to_metric_families(response.text)
    return {family.name: family.samples for family in families}


def value(samples: list, name: str, **labels) -> float | None:
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def test_jobs_by_status_equal_the_stores_counts(client, session):
    ids = [client.post("/v1/jobs", json=SPEC).json()["id"] for _ in range(4)]
    assert jobs.claim_job(session, ids[0], worker="gpu0@box") is not None
    assert client.post(f"/v1/jobs/{ids[1]}/cancel").status_code == 202

    samples = scrape(client)["jumpout_jobs"]
    stored = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    session.commit()
    assert stored == {"queued": 2, "running": 1, "cancelled": 1}
    for status in JobStatus:
        assert value(samples, "jumpout_jobs", status=status.value) == stored.get(status, 0)


def test_latency_is_labelled_by_route_template_and_counts_requests(client, make_job):
    job_id = make_job()
    template = {"route": "/v1/jobs/{job_id}", "method": "GET", "status": "2xx"}
    count = "jumpout_http_request_duration_seconds_count"

    client.get(f"/v1/jobs/{job_id}")
    before = value(scrape(client)["jumpout_http_request_duration_seconds"], count, **template)
    for _ in range(3):
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    client.get(f"/v1/jobs/{'f' * 32}")  # a 404 on the same template
    client.get(f"/nowhere/{job_id}")  # no route at all
    client.request("BREW", "/v1/jobs")  # a method nobody declared
    response = client.get("/metrics")
    histogram = {f.name: f.samples for f in text_string_to_metric_families(response.text)}[
        "jumpout_http_request_duration_seconds"
    ]

    assert value(histogram, count, **template) == before + 3
    assert value(histogram, count, **{**template, "status": "4xx"}) == 1
    assert value(histogram, count, route="<unmatched>", method="GET", status="4xx") == 1
    assert value(histogram, count, route="/v1/jobs", method="other", status="4xx") == 1
    buckets = [
        s for s in histogram if s.name.endswith("_bucket") and s.labels.items() >= template.items()
    ]
    assert buckets and buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == before + 3
    # No job id anywhere: neither in a label nor elsewhere in the body.
    assert job_id not in response.text and "f" * 32 not in response.text
    routes = {s.labels.get("route") for s in histogram}
    assert routes <= {"/v1/jobs/{job_id}", "/v1/jobs", "/metrics", "<unmatched>"}, routes


def test_heartbeat_age_and_epoch_duration_of_running_jobs(client, session, make_job):
    idle = scrape(client)
    assert (
        value(idle["jumpout_heartbeat_age_max_seconds"], "jumpout_heartbeat_age_max_seconds") == 0
    )
    assert idle["jumpout_heartbeat_age_seconds"] == []

    stale, fresh = make_job(), make_job()
    assert jobs.claim_job(session, stale, worker="gpu0@box") is not None
    assert jobs.claim_job(session, fresh, worker="gpu1@box") is not None
    session.execute(
        update(Job).where(Job.id == stale).values(heartbeat_at=utcnow() - timedelta(seconds=42))
    )
    session.add_all(
        [
            EpochMetric(job_id=stale, epoch=1, seconds=9.0, layers=[]),
            EpochMetric(job_id=stale, epoch=2, seconds=3.5, layers=[]),
            EpochMetric(job_id=fresh, epoch=1, seconds=1.0, layers=[]),
        ]
    )
    session.commit()

    samples = scrape(client)
    ages = samples["jumpout_heartbeat_age_seconds"]
    assert 42 <= value(ages, "jumpout_heartbeat_age_seconds", worker="gpu0@box") < 60
    assert 0 <= value(ages, "jumpout_heartbeat_age_seconds", worker="gpu1@box") < 10
    oldest = value(
        samples["jumpout_heartbeat_age_max_seconds"], "jumpout_heartbeat_age_max_seconds"
    )
    assert 42 <= oldest < 60
    running = samples["jumpout_running_epoch_seconds"]
    # The newest epoch of the job, not its slowest.
    assert value(running, "jumpout_running_epoch_seconds", worker="gpu0@box") == 3.5
    assert value(running, "jumpout_running_epoch_seconds", worker="gpu1@box") == 1.0
    recent = samples["jumpout_recent_epoch_seconds"]
    assert value(recent, "jumpout_recent_epoch_seconds", quantile="1.0") == 9.0
    assert value(recent, "jumpout_recent_epoch_seconds", quantile="0.5") == 3.5
    assert value(samples["jumpout_database_up"], "jumpout_database_up") == 1


def test_a_dead_broker_is_a_gauge_not_a_failed_scrape(client, configure):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    configure(broker_url=f"redis://127.0.0.1:{port}/0")
    samples = scrape(client)
    assert value(samples["jumpout_broker_up"], "jumpout_broker_up") == 0
    assert "jumpout_broker_queue_messages" not in samples
    assert value(samples["jumpout_jobs"], "jumpout_jobs", status="queued") == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_broker_queue_length_is_read(client, settings):
    import redis

    broker = redis.Redis.from_url(settings.broker_url)
    broker.delete("jobs")
    broker.lpush("jobs", "a", "b")
    try:
        samples = scrape(client)
    finally:
        broker.delete("jobs")
    assert value(samples["jumpout_broker_up"], "jumpout_broker_up") == 1
    assert value(samples["jumpout_broker_queue_messages"], "jumpout_broker_queue_messages") == 2


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_with_auth_on_a_scrape_needs_a_token(client, configure, session):
    configure(auth_required=True)
    response = client.get("/metrics")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    _, token = auth.create_token(session, name="prometheus")
    samples = scrape(client, headers={"Authorization": f"Bearer {token}"})
    assert "jumpout_jobs" in samples
    # OpenMetrics when asked for, as Prometheus does.
    response = client.get(
        "/metrics",
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/openmetrics-text; version=1.0.0",
        },
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
