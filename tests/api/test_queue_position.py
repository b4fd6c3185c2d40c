"""`priority` on POST /v1/jobs and the `queue` object of GET /v1/jobs/{id}: where a queued job
stands in the fair order (`jobstore.fairshare`) and why it waits."""

from __future__ import annotations

import pytest

from api import auth
from jobstore import jobs

SPEC = {"dataset": "synthetic", "architecture": "mlp", "epochs": 1}


def bearer(session, name: str) -> dict[str, str]:
    _, token = auth.create_token(session, name=name)
    return {"Authorization": f"Bearer {token}"}


def submit(client, headers=None, **extra) -> dict:
    response = client.post("/v1/jobs", json={**SPEC, **extra}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def test_priority_is_stored_and_defaults_to_zero(client):
    assert submit(client)["priority"] == 0
    assert submit(client, priority=-100)["priority"] == -100
    job = submit(client, priority=100)
    assert client.get(f"/v1/jobs/{job['id']}").json()["priority"] == 100
    assert "priority" not in job["spec"]  # not a training field


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (101, "less than or equal to 100"),
        (-101, "greater than or equal to -100"),
        (1.5, "valid integer"),
        (True, "valid integer"),
        ("high", "valid integer"),
    ],
)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_bad_priority_is_a_422_naming_the_field(client, enqueued, value, message):
    response = client.post("/v1/jobs", json={**SPEC, "priority": value})
    assert response.status_code == 422, response.text
    fields = {f["field"]: f["message"] for f in response.json()["error"]["fields"]}
    assert list(fields) == ["priority"]
    assert message in fields["priority"]
    assert enqueued == []


def test_a_queued_job_shows_its_place_and_why_it_waits(client, session):
    alice, bob = bearer(session, "alice"), bearer(session, "bob")
    backlog = [submit(client, alice)["id"] for _ in range(5)]
    assert jobs.claim_next(session, worker="w1").id == backlog[0]
    single = submit(client, bob)["id"]

    place = client.get(f"/v1/jobs/{single}", headers=bob).json()["queue"]
    assert place == {
        "position": 1,
        "ahead": 0,
        "reason": "next in line: starts as soon as a worker is free",
    }
    place = client.get(f"/v1/jobs/{backlog[3]}", headers=alice).json()["queue"]
    assert (place["position"], place["ahead"]) == (4, 3)
    assert place["reason"] == (
        "waiting for a free worker: 3 jobs ahead (1 in the round-robin turns of another owner; "
        "2 of the same owner's, submitted earlier or with a higher priority)"
    )
    # Running, and in the list: no place.
    assert client.get(f"/v1/jobs/{backlog[0]}").json()["queue"] is None
    listed = client.get("/v1/jobs").json()["items"]
    assert {item["queue"] is None for item in listed} == {True}


def test_a_higher_priority_moves_a_job_ahead_of_its_owners_others_only(client, session):
    alice, bob = bearer(session, "alice"), bearer(session, "bob")
    first = submit(client, alice)["id"]
    assert jobs.claim_next(session, worker="w1").id == first
    bobs = submit(client, bob)["id"]
    later = submit(client, alice)["id"]
    urgent = submit(client, alice, priority=50)["id"]
    order = {
        job_id: client.get(f"/v1/jobs/{job_id}").json()["queue"]["position"]
        for job_id in (bobs, later, urgent)
    }
    assert order == {bobs: 1, urgent: 2, later: 3}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_unknown_field_names_priority_among_the_accepted_ones(client, enqueued):
    response = client.post("/v1/jobs", json={**SPEC, "prio": 1})
    assert response.status_code == 422, response.text
    (field,) = response.json()["error"]["fields"]
    assert field["field"] == "prio"
    assert field["message"].startswith("unknown field; accepted fields: ")
    assert "priority" in field["message"].split(": ", 1)[1].split(", ")
