"""Read confinement (`JUMPOUT_READ_SCOPE`, `api.access`) on every route of the app, on SQLite and
PostgreSQL, with auth on.

The routes are enumerated from the app (`app_routes`, as test_auth_every_route.py does), and
each must be one of:

- a route with a job or experiment in its path: called as the owner, as an admin and as another
  token, under both scopes. Under `team` the other token reads every job (experiments are their
  owner's in both scopes); under `owner` it gets the same 404 as for a job that does not exist.
  A route added without the check (`api.access`) fails here;
- a list (`LISTS`): under `owner` another token lists only its own rows;
- a route that serves no job data (`NO_JOB_DATA`, each with the reason).

A new route that is none of these fails `test_every_route_is_classified`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import pytest
from test_auth_every_route import app_routes

from api import auth
from api.main import create_app
from jobstore import jobs
from jobstore.tables import JobStatus

SPEC = {"dataset": "synthetic", "architecture": "mlp", "epochs": 2}

NO_JOB_DATA = {
    ("GET", "/"): "the dashboard's page: static HTML; its data comes from the routes checked here",
    ("GET", "/static/{path:path}"): "the dashboard's static assets",
    ("GET", "/docs"): "the API's schema, no data",
    ("GET", "/docs/oauth2-redirect"): "the API's schema, no data",
    ("GET", "/redoc"): "the API's schema, no data",
    ("GET", "/openapi.json"): "the API's schema, no data",
    ("GET", "/v1/health"): "the service's health: database, broker, worker count",
    ("GET", "/v1/datasets"): "the server's datasets: no job data",
    ("GET", "/metrics"): "Prometheus aggregates (counts by status, latencies): no job ids",
    ("POST", "/v1/jobs"): "creates; answers with the caller's own new job (or, replaying an "
    "Idempotency-Key, which is per owner, the caller's own earlier one)",
    ("POST", "/v1/experiments"): "creates; answers with the caller's own new experiment",
}
LISTS = {("GET", "/v1/jobs"), ("GET", "/v1/experiments")}

# Routes that change a job: (the state of the fresh job each call gets, the status another
# token gets under `team` scope, where it sees the job but does not own it).
WRITES = {
    ("POST", "/v1/jobs/{job_id}/cancel"): (JobStatus.QUEUED, 403),
    ("POST", "/v1/jobs/{job_id}/retry"): (JobStatus.CANCELLED, 403),
    ("POST", "/v1/experiments/{experiment_id}/cancel"): (None, 404),
}

ROUTES = app_routes(create_app())
ID_PARAMETERS = ("{job_id}", "{experiment_id}")
DATA_ROUTES = [route for route in ROUTES if any(p in route[1] for p in ID_PARAMETERS)]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class World:
    alice: str  # owns the job and the experiment
    bob: str  # another token, not an admin
    root: str  # an admin
    alice_id: int
    bob_id: int
    job_id: str  # alice's, finished, with an epoch and a checkpoint file
    bob_job_id: str
    experiment_id: str  # alice's
    checkpoint_id: int


def finished_job(session, owner_id: int, settings) -> tuple[str, int]:
    job_id = jobs.create_job(session, spec=SPEC, owner_id=owner_id).id
    jobs.claim_job(session, job_id, worker="w1")
    jobs.record_epoch(
        session, job_id, {"epoch": 1, "test_accuracy": 0.5, "train_loss": 1.0, "layers": []}
    )
    directory = jobs.job_directory(job_id)
    directory.mkdir(parents=True, exist_ok=True)
    content = b"not really a checkpoint"
    path = directory / "checkpoint-epoch0001.pt"
    path.write_bytes(content)
    checkpoint = jobs.record_checkpoint(
        session,
        job_id,
        path=str(path),
        epoch=1,
        sha256=hashlib.sha256(content).hexdigest(),
        size_bytes=len(content),
        is_best=True,
    )
    jobs.finish_job(session, job_id, status=JobStatus.SUCCEEDED)
    return job_id, checkpoint.id


@pytest.fixture
def world(client, configure, session, settings, enqueued) -> World:
    configure(auth_required=True)
    alice_row, alice = auth.create_token(session, name="alice")
    bob_row, bob = auth.create_token(session, name="bob")
    _, root = auth.create_token(session, name="root", is_admin=True)
    job_id, checkpoint_id = finished_job(session, alice_row.id, settings)
    bob_job_id, _ = finished_job(session, bob_row.id, settings)
    experiment = client.post(
        "/v1/experiments",
        json={"base": SPEC, "rows": [{}], "seeds": 1},
        headers=bearer(alice),
    )
    assert experiment.status_code == 201, experiment.text
    return World(
        alice, bob, root, alice_row.id, bob_row.id, job_id, bob_job_id,
        experiment.json()["id"], checkpoint_id,
    )  # fmt: skip


def url_of(path: str, world: World, job_id: str) -> str:
    values = {
        "job_id": job_id,
        "experiment_id": world.experiment_id,
        "checkpoint_id": str(world.checkpoint_id),
        "epoch": "1",
    }
    unknown = set(re.findall(r"{(\w+)[^}]*}", path)) - set(values)
    assert not unknown, f"{path}: give the parameter(s) {unknown} a value in url_of"
    return re.sub(r"{(\w+)[^}]*}", lambda m: values[m.group(1)], path)


def test_every_route_is_classified():
    unclassified = [
        route
        for route in ROUTES
        if route not in DATA_ROUTES and route not in LISTS and route not in NO_JOB_DATA
    ]
    assert not unclassified, (
        f"{unclassified}: a route that reads a job or an experiment takes its id in the path "
        "(and goes through api.access), or is a list in LISTS; one with no job data goes in "
        "NO_JOB_DATA with the reason"
    )
    assert all(route in ROUTES for route in NO_JOB_DATA), "an allowlisted route is gone"
    writes = [route for route in DATA_ROUTES if route[0] != "GET"]
    assert sorted(writes) == sorted(WRITES), "say in WRITES what a new writing route needs"


@pytest.mark.parametrize("scope", ["team", "owner"])
def test_every_job_and_experiment_route_under_each_scope(client, configure, session, world, scope):
    configure(read_scope=scope)
    failures = []

    def call(method, path, token, job_id=world.job_id):
        response = client.request(method, url_of(path, world, job_id), headers=bearer(token))
        return response.status_code, response

    for method, path in DATA_ROUTES:
        of_experiment = "{experiment_id}" in path
        if (method, path) in WRITES:
            state, team_status = WRITES[(method, path)]

            def fresh(state=state):
                if state is None:
                    return world.job_id
                job_id = jobs.create_job(session, spec=SPEC, owner_id=world.alice_id).id
                if state != JobStatus.QUEUED:
                    jobs.finish_job(session, job_id, status=state)  # only cancelled from queued
                return job_id

            expected_other = 404 if scope == "owner" else team_status
            callers = [(world.bob, expected_other), (world.alice, 2), (world.root, 2)]
            for token, expected in callers:
                status, response = call(method, path, token, fresh())
                if status != expected and not (expected == 2 and 200 <= status < 300):
                    failures.append((method, path, token[:8], status, expected, response.text))
            continue
        other = 404 if scope == "owner" or of_experiment else 2
        for token, expected in [(world.alice, 2), (world.root, 2), (world.bob, other)]:
            status, response = call(method, path, token)
            ok = 200 <= status < 300 if expected == 2 else status == expected
            if ok and status == 404:
                code = "experiment_not_found" if of_experiment else "job_not_found"
                ok = response.json()["error"]["code"] == code
            if not ok:
                failures.append((method, path, token[:8], status, expected, response.text[:200]))
    assert not failures, "\n".join(map(str, failures))


@pytest.mark.parametrize("scope", ["team", "owner"])
def test_lists_hold_only_the_callers_rows_under_owner_scope(client, configure, world, scope):
    configure(read_scope=scope)
    experiment_jobs = 1

    def ids(path, token, **params):
        response = client.get(path, params=params, headers=bearer(token))
        assert response.status_code == 200, response.text
        return {item["id"] for item in response.json()["items"]}

    bob_sees = ids("/v1/jobs", world.bob)
    every_job = ids("/v1/jobs", world.root)
    assert len(every_job) == 2 + experiment_jobs
    if scope == "owner":
        assert bob_sees == {world.bob_job_id}
        assert ids("/v1/jobs", world.bob, owner="alice") == set()
        assert ids("/v1/jobs", world.bob, experiment_id=world.experiment_id) == set()
        assert ids("/v1/jobs", world.alice) == every_job - {world.bob_job_id}
    else:
        assert bob_sees == every_job
    # Experiments are their owner's (and the admins') in both scopes.
    assert ids("/v1/experiments", world.bob) == set()
    assert ids("/v1/experiments", world.alice) == {world.experiment_id}
    assert ids("/v1/experiments", world.root) == {world.experiment_id}


def test_an_unknown_job_and_a_hidden_one_answer_alike(client, configure, world):
    configure(read_scope="owner")
    hidden = client.get(f"/v1/jobs/{world.job_id}", headers=bearer(world.bob))
    missing = client.get(f"/v1/jobs/{'0' * 32}", headers=bearer(world.bob))
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["code"] == missing.json()["error"]["code"] == "job_not_found"
