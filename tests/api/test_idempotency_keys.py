"""`Idempotency-Key` on the POSTs that create (`jobstore.idempotency`), through the app on SQLite
and PostgreSQL: a retry is answered with what the first request created (no second job, no
second enqueue), another body under the key is a 422, bad keys are 422s, keys are per owner and
route, an expired key creates anew, and concurrent requests with one key create one job.

tests/integration/test_idempotency.py proves the point of it with real processes: the API killed
during submissions, clients retrying.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from api import auth
from jobstore.tables import Experiment, IdempotencyKey, Job, utcnow

SPEC = {"dataset": "synthetic", "architecture": "mlp", "epochs": 2}
EXPERIMENT = {"base": SPEC, "rows": [{}], "seeds": 2}


def count(session, table) -> int:
    value = session.scalar(select(func.count()).select_from(table))
    session.commit()
    return value


def submit(client, key: str | None, body=SPEC, *, token: str | None = None, path="/v1/jobs"):
    headers = {} if key is None else {"Idempotency-Key": key}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return client.post(path, json=body, headers=headers)


def test_a_retry_with_the_key_is_answered_with_the_stored_job(client, session, enqueued):
    first = submit(client, "batch-7/run-1")
    assert first.status_code == 201, first.text
    assert "Idempotent-Replayed" not in first.headers
    # The same request again, with other whitespace and key order: the same canonical body.
    raw = json.dumps(dict(reversed(list(SPEC.items()))), indent=2)
    again = client.post(
        "/v1/jobs",
        content=raw,
        headers={"Idempotency-Key": "batch-7/run-1", "Content-Type": "application/json"},
    )
    assert again.status_code == 201, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"]
    assert again.json()["id"] == first.json()["id"]
    assert count(session, Job) == 1
    assert enqueued == [first.json()["id"]]  # published once
    row = session.scalars(select(IdempotencyKey)).one()
    assert (row.resource_kind, row.resource_id, row.response_status) == ("job", enqueued[0], 201)


def test_the_replay_is_the_jobs_current_body(client, session):
    job_id = submit(client, "k1").json()["id"]
    session.execute(update(Job).where(Job.id == job_id).values(status="running"))
    session.commit()
    assert submit(client, "k1").json()["status"] == "running"


def test_the_same_key_with_another_body_is_a_422_and_stores_nothing(client, session):
    assert submit(client, "k1").status_code == 201
    other = submit(client, "k1", {**SPEC, "epochs": 3})
    assert other.status_code == 422, other.text
    error = other.json()["error"]
    assert error["code"] == "invalid_request"
    assert [field["field"] for field in error["fields"]] == ["Idempotency-Key"]
    assert "different request" in error["fields"][0]["message"]
    assert count(session, Job) == 1


@pytest.mark.parametrize("key", ["", "   ", "x" * 256, "caf\u00e9", "tab\there"])
def test_a_bad_key_is_a_422_naming_the_header(client, session, key):
    response = client.post(
        "/v1/jobs", json=SPEC, headers=[("Idempotency-Key", key.encode("latin-1"))]
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["fields"][0]["field"] == "Idempotency-Key"
    assert count(session, Job) == 0


def test_without_a_key_nothing_is_stored_and_each_post_creates(client, session):
    assert submit(client, None).json()["id"] != submit(client, None).json()["id"]
    assert count(session, IdempotencyKey) == 0


def test_keys_are_per_owner_and_per_route(client, configure, session):
    configure(auth_required=True)
    _, alice = auth.create_token(session, name="alice")
    _, bob = auth.create_token(session, name="bob")
    a = submit(client, "same", token=alice)
    b = submit(client, "same", token=bob)
    assert a.status_code == b.status_code == 201
    assert a.json()["id"] != b.json()["id"]
    assert "Idempotent-Replayed" not in b.headers
    experiment = submit(client, "same", EXPERIMENT, token=alice, path="/v1/experiments")
    assert experiment.status_code == 201, experiment.text
    assert "Idempotent-Replayed" not in experiment.headers


def test_an_expired_key_is_forgotten_and_creates_anew(client, configure, session):
    configure(idempotency_retention=3600)
    first = submit(client, "k1").json()["id"]
    session.execute(update(IdempotencyKey).values(created_at=utcnow() - timedelta(hours=2)))
    session.commit()
    # Another body under the expired key is not a conflict: the key is forgotten.
    second = submit(client, "k1", {**SPEC, "epochs": 3})
    assert second.status_code == 201, second.text
    assert "Idempotent-Replayed" not in second.headers
    assert second.json()["id"] != first
    assert submit(client, "k1", {**SPEC, "epochs": 3}).json()["id"] == second.json()["id"]
    assert count(session, IdempotencyKey) == 1


def test_a_refused_submission_stores_no_key(client, configure, session):
    configure(max_queued_per_token=1)
    assert submit(client, "a").status_code == 201
    assert submit(client, "b").status_code == 429
    assert count(session, IdempotencyKey) == 1
    configure(max_queued_per_token=2)
    retried = submit(client, "b")
    assert retried.status_code == 201 and "Idempotent-Replayed" not in retried.headers


def test_concurrent_requests_with_one_key_create_one_job(client, session, enqueued):
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: submit(client, "race"), range(8)))
    assert {answer.status_code for answer in answers} == {201}, [a.text for a in answers]
    assert len({answer.json()["id"] for answer in answers}) == 1
    assert sum("Idempotent-Replayed" not in answer.headers for answer in answers) == 1
    assert count(session, Job) == 1
    assert len(enqueued) == 1


def test_an_experiment_retried_with_its_key_is_one_experiment(client, session, enqueued):
    first = submit(client, "exp-1", EXPERIMENT, path="/v1/experiments")
    assert first.status_code == 201, first.text
    again = submit(client, "exp-1", EXPERIMENT, path="/v1/experiments")
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert (count(session, Experiment), count(session, Job)) == (1, 2)
    assert len(enqueued) == 2
    other = submit(client, "exp-1", {**EXPERIMENT, "seeds": 3}, path="/v1/experiments")
    assert other.status_code == 422
    assert other.json()["error"]["fields"][0]["field"] == "Idempotency-Key"


def test_the_header_is_declared_in_the_schema(client):
    schema = client.get("/openapi.json").json()
    for path in ("/v1/jobs", "/v1/experiments"):
        operation = schema["paths"][path]["post"]
        names = [(p["in"], p["name"]) for p in operation.get("parameters", [])]
        assert ("header", "Idempotency-Key") in names
        assert "Idempotent-Replayed" in operation["responses"]["201"]["headers"]


def test_expired_keys_are_purged_by_a_later_keyed_request(client, session, monkeypatch):
    from jobstore import idempotency

    for key in ("old-1", "old-2", "recent"):
        assert submit(client, key).status_code == 201
    old = IdempotencyKey.key.in_(["old-1", "old-2"])
    session.execute(
        update(IdempotencyKey).where(old).values(created_at=utcnow() - timedelta(days=2))
    )
    session.commit()
    monkeypatch.setattr(idempotency, "_last_purge", 0.0)  # due now (every PURGE_EVERY_S)
    assert submit(client, "new").status_code == 201
    kept = set(session.scalars(select(IdempotencyKey.key)))
    session.commit()
    assert kept == {"recent", "new"}
