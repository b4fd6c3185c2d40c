"""`GET /v1/jobs` filters: a repeated parameter means any of its values (OR within a field, AND
across fields), never "the last one"; `owner` filters by token name; each value is validated and
their number capped; keyset pages stay whole. SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from api import auth
from api.routes.jobs import MAX_FILTER_VALUES
from jobstore import jobs

ADMIN = type("Admin", (), {"id": None, "is_admin": True})


@pytest.fixture
def owned_jobs(session, make_job):
    """Jobs of alice and bob, in submission order: (owner, method, dataset, status)."""
    alice, _ = auth.create_token(session, name="alice")
    bob, _ = auth.create_token(session, name="bob")
    plan = [
        (alice.id, "jumpout", "digits"),
        (bob.id, "dropout", "digits"),
        (alice.id, "none", "synthetic"),
        (bob.id, "jumpout", "synthetic"),
        (alice.id, "dropout", "synthetic"),
        (bob.id, "none", "digits"),
    ]
    ids = [make_job(owner_id=owner, method=m, dataset=d) for owner, m, d in plan]
    jobs.request_cancel(session, ids[1], token=ADMIN)
    jobs.claim_job(session, ids[2], worker="w1")
    return ids


def listed(client, params) -> list[str]:
    response = client.get("/v1/jobs", params=params)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def test_a_repeated_filter_keeps_any_of_its_values(client, owned_jobs):
    ids = owned_jobs
    # The old behaviour kept the last value only: this would list the cancelled job alone.
    assert listed(client, [("status", "running"), ("status", "cancelled")]) == [ids[2], ids[1]]
    assert listed(client, [("method", "none"), ("method", "dropout")]) == [
        ids[5], ids[4], ids[2], ids[1],
    ]  # fmt: skip
    assert listed(client, [("dataset", "digits"), ("dataset", "synthetic")]) == ids[::-1]


def test_filters_on_different_fields_must_all_match(client, owned_jobs):
    ids = owned_jobs
    params = [("method", "jumpout"), ("method", "none"), ("dataset", "synthetic")]
    assert listed(client, params) == [ids[3], ids[2]]
    params = [("owner", "alice"), ("status", "queued"), ("status", "running")]
    assert listed(client, params) == [ids[4], ids[2], ids[0]]


def test_the_owner_filter_takes_token_names(client, owned_jobs):
    ids = owned_jobs
    assert listed(client, {"owner": "bob"}) == [ids[5], ids[3], ids[1]]
    assert listed(client, [("owner", "bob"), ("owner", "alice")]) == ids[::-1]
    assert listed(client, {"owner": "nobody"}) == []


def test_keyset_pages_stay_whole_with_several_values(client, owned_jobs):
    ids = owned_jobs
    seen, cursor = [], None
    while True:
        params = [("method", "jumpout"), ("method", "dropout"), ("limit", "1")]
        page = client.get("/v1/jobs", params=params + ([("cursor", cursor)] if cursor else []))
        seen += [item["id"] for item in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == [ids[4], ids[3], ids[1], ids[0]]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ([("status", "queued"), ("status", "done")], "status"),
        ([("method", "jumpout"), ("method", "maxout")], "method"),
        ([("dataset", "digits"), ("dataset", "../etc")], "dataset"),
        ([("experiment_id", "0" * 32), ("experiment_id", "x")], "experiment_id"),
        ([("owner", "a" * 65)], "owner"),
        ([("status", "queued")] * (MAX_FILTER_VALUES + 1), "status"),
    ],
)
def test_each_value_is_checked_and_their_number_capped(client, params, field):
    response = client.get("/v1/jobs", params=params)
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert any(item["field"].split(".")[0] == field for item in body["error"]["fields"]), body
