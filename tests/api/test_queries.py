"""`api.queries`, the fast read paths: same bodies as the pydantic models, a metrics cache that
follows every upsert, and reads that never take the SQLite write lock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest
from sqlalchemy import update

from api import auth, queries
from api.schemas import EpochMetricRead, JobRead, JobsPage, MetricsPage
from jobstore import jobs
from jobstore.tables import EpochMetric, Job


def epoch_metrics(epoch: int, accuracy: float = 0.5) -> dict:
    return {
        "epoch": epoch,
        "train_loss": 1.0 / epoch,
        "train_accuracy": 0.9,
        "test_loss": 1.1 / epoch,
        "test_accuracy": accuracy,
        "lr": 0.05,
        "seconds": 1.5,
        "images_per_second": 1000.0,
        "layers": [{"name": "layer0", "active_fraction": 0.5, "rate": 0.3}],
    }


def model_json(model) -> dict:
    return orjson.loads(model.model_dump_json())


@pytest.mark.parametrize("state", ["queued", "running", "succeeded", "failed"])
def test_job_body_equals_job_read(client, session, make_job, state):
    _, token = auth.create_token(session, name="alice")
    owner = auth.authenticate(session, token)
    job_id = make_job(owner_id=owner.id, epochs=4)
    if state != "queued":
        jobs.claim_job(session, job_id, worker="w1")
        jobs.record_epoch(session, job_id, epoch_metrics(1, 0.25))
    if state in ("succeeded", "failed"):
        jobs.finish_job(session, job_id, status=state, error="boom" if state == "failed" else None)
    expected = model_json(JobRead.from_job(jobs.get_job(session, job_id)))
    if state == "queued":
        # Only the read by id places a queued job in the fair order (jobstore.fairshare).
        reason = "next in line: starts as soon as a worker is free"
        expected["queue"] = {"position": 1, "ahead": 0, "reason": reason}
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == expected
    assert response.json()["owner"] == "alice"
    assert model_json(JobRead.model_validate(response.json())) == expected
    listed = client.get("/v1/jobs").json()
    assert listed == model_json(
        JobsPage(items=[JobRead.from_job(jobs.get_job(session, job_id))], next_cursor=None)
    )


def test_job_list_pages_like_the_service_function(client, session, make_job):
    ids = [make_job() for _ in range(5)]
    seen, cursor = [], None
    while True:
        page = client.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200
        body = page.json()
        seen += [item["id"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    page, _ = jobs.list_jobs(session, limit=10)
    assert seen == [job.id for job in page] and sorted(seen) == sorted(ids)


def test_metrics_body_equals_metrics_page(client, session, make_job):
    job_id = make_job(epochs=3)
    for epoch in (1, 2, 3):
        jobs.record_epoch(session, job_id, epoch_metrics(epoch))
    rows = jobs.list_metrics(session, job_id)
    expected = model_json(MetricsPage(items=[EpochMetricRead.model_validate(r) for r in rows]))
    assert client.get(f"/v1/jobs/{job_id}/metrics").json() == expected


def test_metrics_cache_follows_new_and_rewritten_epochs(client, session, make_job):
    job_id = make_job(epochs=5)
    url = f"/v1/jobs/{job_id}/metrics"
    assert client.get(url).json() == {"items": []}
    jobs.record_epoch(session, job_id, epoch_metrics(1, 0.1))
    jobs.record_epoch(session, job_id, epoch_metrics(2, 0.2))
    assert [m["test_accuracy"] for m in client.get(url).json()["items"]] == [0.1, 0.2]
    assert client.get(url).json() == client.get(url).json()  # served from the cache
    # A resumed run rewrites epoch 2: same row count, so only the newer created_at tells.
    jobs.record_epoch(session, job_id, epoch_metrics(2, 0.7))
    assert [m["test_accuracy"] for m in client.get(url).json()["items"]] == [0.1, 0.7]
    jobs.record_epoch(session, job_id, epoch_metrics(3, 0.3))
    assert [m["epoch"] for m in client.get(url).json()["items"]] == [1, 2, 3]


def test_metrics_cache_key_changes_with_any_upsert_timestamp(client, session, make_job):
    job_id = make_job(epochs=5)
    jobs.record_epoch(session, job_id, epoch_metrics(1, 0.1))
    url = f"/v1/jobs/{job_id}/metrics"
    assert client.get(url).json()["items"][0]["test_accuracy"] == 0.1
    later = datetime.now(UTC) + timedelta(seconds=5)
    session.execute(
        update(EpochMetric)
        .where(EpochMetric.job_id == job_id)
        .values(test_accuracy=0.9, created_at=later)
    )
    session.commit()
    assert client.get(url).json()["items"][0]["test_accuracy"] == 0.9


def test_unknown_and_malformed_ids_are_404(client):
    for path in ("/v1/jobs/{}", "/v1/jobs/{}/metrics"):
        for job_id in ("0" * 32, "not-a-job"):
            response = client.get(path.format(job_id))
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "job_not_found"


def test_fast_reads_check_the_token_on_every_request(client, configure, session, make_job):
    configure(auth_required=True)
    _, token = auth.create_token(session, name="carol")
    job_id = make_job()
    headers = {"Authorization": f"Bearer {token}"}
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/metrics", "/v1/jobs"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer jo_nope"}).status_code == 401
        assert client.get(path, headers=headers).status_code == 200
    auth.revoke_token(session, name_or_id="carol")
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/metrics", "/v1/jobs"):
        response = client.get(path, headers=headers)
        assert response.status_code == 401 and "revoked" in response.json()["error"]["message"]


def test_reads_do_not_wait_for_a_writer(client, settings, session, make_job):
    """On SQLite a read used to begin with BEGIN IMMEDIATE and queue behind any writer; the read
    connection's deferred transaction reads its WAL snapshot instead."""
    if not settings.database_url.startswith("sqlite"):
        pytest.skip("SQLite's write lock")
    job_id = make_job()
    session.execute(update(Job).where(Job.id == job_id).values(error="being written"))
    try:  # the session now holds the write lock, uncommitted
        with queries.read_connection() as connection:
            body = orjson.loads(queries.job_json(connection, job_id))
        assert body["error"] is None  # the committed state
    finally:
        session.rollback()


def test_reads_survive_a_postgresql_restart(client, settings, make_job):
    """The read pool does not pre-ping; a connection found dead is replaced and the read retried."""
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL connections")
    from sqlalchemy import text

    from jobstore import db

    job_id = make_job()
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # the read pool holds one now
    with db.get_engine().connect() as admin:
        admin.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/metrics", "/v1/jobs"):
        assert client.get(path).status_code == 200
