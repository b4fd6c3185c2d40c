"""Security of the HTTP surface with auth on (`JUMPOUT_AUTH_REQUIRED=true`, as deployed).

- Every route of the app, enumerated from `app.routes` (so a new route cannot slip through),
  answers 401 without a valid token, except the deliberate public set `PUBLIC`.
- A token cannot cancel another owner's job and the refusal changes nothing; an admin can.
- Tokens appear nowhere in the database (only their sha256) and in no log record of a whole
  request cycle (bad, valid and revoked tokens, the token CLI), even with SQL echo on; a revoked
  token is refused on the very next request.

test_tokens.py has the basic cases (hashes stored, 401/403/202, revocation through the service).

Why /docs, /redoc and /openapi.json are public: the schema describes only what the API accepts
(routes, field bounds, the registry names a client must choose from) and that it needs a bearer
token; it holds no data and no secret, and a client needs it before it has a token. Likewise the
dashboard's page and static files (`/`, `/static/...`): code that asks for the token. Everything
that reads or changes jobs, metrics or checkpoint files needs one.
"""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import inspect, select, text

from api import auth
from api.cli import main as cli
from api.main import create_app
from jobstore import db, experiments, jobs
from jobstore.tables import Job

SPEC = {"dataset": "synthetic", "architecture": "mlp", "epochs": 2}
PUBLIC = {
    ("GET", "/v1/health"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    # The dashboard's page and its files (api/routes/dashboard.py): code, no data; the page must
    # load before it can ask for a token.
    ("GET", "/"),
    ("GET", "/static/{path:path}"),
}
# A concrete URL for a public route with a path parameter.
PUBLIC_EXAMPLES = {"/static/{path:path}": "/static/app.css"}


def app_routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, included routers flattened."""

    def walk(routes):
        for route in routes:
            if hasattr(route, "effective_candidates"):  # FastAPI's included router
                yield from walk(route.effective_candidates())
                continue
            original = getattr(route, "original_route", route)
            for method in getattr(original, "methods", None) or ():
                if method != "HEAD":  # Starlette adds HEAD to GET routes
                    yield method, route.path

    found = sorted(set(walk(app.routes)))
    # If FastAPI's internals change and the walk misses routes, fail here rather than pass.
    schema_paths = {
        (method.upper(), path)
        for path, item in app.openapi()["paths"].items()
        for method in item
    }  # fmt: skip
    assert schema_paths <= set(found), schema_paths - set(found)
    return found


ROUTES = app_routes(create_app())
PROTECTED = [route for route in ROUTES if route not in PUBLIC]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def auth_on(configure):
    configure(auth_required=True)


@pytest.fixture
def tokens(session):
    created = {}
    for name, is_admin in (("alice", False), ("bob", False), ("root", True), ("gone", False)):
        row, token = auth.create_token(session, name=name, is_admin=is_admin)
        created[name] = (row.id, token)
    auth.revoke_token(session, name_or_id="gone")
    row, token = auth.create_token(session, name="scraper", scope=auth.METRICS_SCOPE)
    created["scraper"] = (row.id, token)
    return created


@pytest.fixture
def real_ids(session, settings, make_job, tokens) -> dict[str, str]:
    """Path parameters that exist (alice's job and its checkpoint), so that a 401 is about the
    token and not a 404 in disguise."""
    job_id = make_job(owner_id=tokens["alice"][0])
    path = settings.artifact_dir / "jobs" / job_id / "checkpoint-epoch0001.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    checkpoint = jobs.record_checkpoint(
        session, job_id, path=str(path), epoch=1, is_best=True, size_bytes=7,
        sha256=jobs.file_sha256(path),
    )  # fmt: skip
    experiment_id, _ = experiments.create_experiment(
        session, request={"base": SPEC, "rows": [{}], "seeds": 1}, owner_id=tokens["alice"][0]
    )
    return {
        "job_id": job_id,
        "checkpoint_id": str(checkpoint.id),
        "epoch": str(checkpoint.epoch),
        "experiment_id": experiment_id,
    }


def request(client, method: str, path: str, ids: dict[str, str], headers=None):
    url = path.format(**ids)
    bodies = {"/v1/jobs": SPEC, "/v1/experiments": {"base": SPEC, "rows": [{}], "seeds": 1}}
    body = bodies.get(path) if method == "POST" else None
    return client.request(method, url, json=body, headers=headers or {})


def test_the_public_routes_are_exactly_the_deliberate_ones():
    assert ("POST", "/v1/jobs") in PROTECTED and len(PROTECTED) >= 7
    assert {route for route in ROUTES if route in PUBLIC} == PUBLIC, "a public route went away"


@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=[" ".join(r) for r in PROTECTED])
def test_every_route_but_the_public_ones_needs_a_valid_token(
    client, auth_on, tokens, real_ids, enqueued, method, path
):
    refusals = {
        "no header": {},
        "unknown token": bearer("jo_" + "A" * 43),
        "revoked token": bearer(tokens["gone"][1]),
        "empty bearer": {"Authorization": "Bearer "},
        "basic scheme": {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
        "token without scheme": {"Authorization": tokens["alice"][1]},
    }
    for reason, headers in refusals.items():
        response = request(client, method, path, real_ids, headers)
        assert response.status_code == 401, (reason, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        error = response.json()["error"]
        assert error["code"] == "unauthorized" and error["fields"] == [], reason
    # A scraper's token (scope metrics) reads /metrics and nothing else.
    scraped = request(client, method, path, real_ids, bearer(tokens["scraper"][1]))
    if path == "/metrics":
        assert scraped.status_code == 200, scraped.text
    else:
        assert scraped.status_code == 403, scraped.text
        assert scraped.json()["error"]["code"] == "forbidden"
        assert "scope is metrics" in scraped.json()["error"]["message"]
    assert enqueued == []
    if path == "/v1/jobs/{job_id}/retry":  # only a failed or cancelled job can be retried
        cancel = request(
            client, "POST", "/v1/jobs/{job_id}/cancel", real_ids, bearer(tokens["alice"][1])
        )
        assert cancel.status_code == 202, cancel.text
    # The same request with a valid token gets past authentication.
    response = request(client, method, path, real_ids, bearer(tokens["alice"][1]))
    assert response.status_code < 400, response.text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_public_routes_answer_without_a_token_and_hold_no_secret(
    client, auth_on, settings, tokens
):
    for method, path in sorted(PUBLIC):
        response = client.request(method, PUBLIC_EXAMPLES.get(path, path))
        assert response.status_code in (200, 503), (path, response.status_code)
        for _, token in tokens.values():
            assert token not in response.text
        assert settings.database_url not in response.text
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            expected = [] if (method.upper(), path) in PUBLIC else [{"HTTPBearer": []}]
            assert operation.get("security", []) == expected, (method, path)


def test_a_refused_cancel_changes_nothing_and_an_admin_may_cancel(
    client, auth_on, session, tokens, make_job
):
    queued = make_job(owner_id=tokens["alice"][0])
    running = make_job(owner_id=tokens["alice"][0])
    assert jobs.claim_job(session, running, worker="w1") is not None
    for job_id in (queued, running):
        response = client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(tokens["bob"][1]))
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "forbidden"
        job = session.get(Job, job_id, populate_existing=True)
        assert job.cancel_requested is False and job.status in ("queued", "running")
        session.commit()
    response = client.post(f"/v1/jobs/{running}/cancel", headers=bearer(tokens["root"][1]))
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    response = client.post(f"/v1/jobs/{queued}/cancel", headers=bearer(tokens["root"][1]))
    assert response.status_code == 202 and response.json()["status"] == "cancelled"


def test_no_table_holds_a_token(client, auth_on, settings, session, tokens):
    # Use every token once so that whatever a request might store has been stored.
    for _, token in tokens.values():
        client.post("/v1/jobs", json=SPEC, headers=bearer(token))
    dump = []
    engine = db.get_engine(settings.database_url)
    with engine.connect() as connection:
        for table in inspect(engine).get_table_names():
            for row in connection.execute(text(f'SELECT * FROM "{table}"')):
                dump.extend(str(value) for value in row)
    stored = "\n".join(dump)
    for _, token in tokens.values():
        assert token not in stored
        assert token[len(auth.TOKEN_PREFIX) :] not in stored
        assert auth.hash_token(token) in stored
    hashes = session.scalars(select(auth.ApiToken.token_hash)).all()
    assert all(len(value) == 64 and int(value, 16) >= 0 for value in hashes)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_no_log_record_ever_contains_a_token(client, auth_on, settings, capsys, caplog):
    # DEBUG everywhere: SQLAlchemy then logs every statement, its parameters and result rows.
    # (It sets its own logger to WARNING on import; the handler's level is the last one set.)
    caplog.set_level(logging.DEBUG, logger="sqlalchemy")
    caplog.set_level(logging.DEBUG)
    assert cli(["token", "create", "--name", "ci"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith(auth.TOKEN_PREFIX)
    assert cli(["token", "create", "--name", "ci-admin", "--admin"]) == 0
    admin = capsys.readouterr().out.strip()

    job = client.post("/v1/jobs", json=SPEC, headers=bearer(token))
    assert job.status_code == 201
    job_id = job.json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=bearer(token)).status_code == 200
    assert client.get("/v1/jobs", headers=bearer(token + "x")).status_code == 401
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(admin)).status_code == 202
    assert cli(["token", "list"]) == 0
    assert cli(["token", "revoke", "ci"]) == 0
    # Revoked in another "process" (the CLI's own session): refused on the next request.
    response = client.get("/v1/jobs", headers=bearer(token))
    assert response.status_code == 401 and "revoked" in response.json()["error"]["message"]
    output = capsys.readouterr()

    assert any("sqlalchemy" in r.name for r in caplog.records), "SQL was not logged: weak test"
    logged = "\n".join(
        f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
        for record in caplog.records
    )
    for secret in (token, admin, token + "x"):
        assert secret not in logged
        assert secret not in output.out + output.err
