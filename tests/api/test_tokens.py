"""Bearer tokens: hashed at rest, required when auth is on, owners and admins cancel."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from api import auth
from api.cli import main as cli
from jobstore.tables import ApiToken

SPEC = {"dataset": "synthetic", "architecture": "mlp", "epochs": 2}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def tokens(session):
    _, alice = auth.create_token(session, name="alice")
    _, bob = auth.create_token(session, name="bob")
    _, admin = auth.create_token(session, name="root", is_admin=True)
    return {"alice": alice, "bob": bob, "admin": admin}


@pytest.fixture
def auth_on(configure):
    configure(auth_required=True)


def test_tokens_are_stored_as_hashes(session, tokens):
    rows = session.scalars(select(ApiToken)).all()
    stored = {row.token_hash for row in rows} | {row.name for row in rows}
    for token in tokens.values():
        assert token not in stored
        assert auth.hash_token(token) in stored


def test_auth_on_requires_a_valid_token(client, auth_on, tokens):
    response = client.get("/v1/jobs")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "unauthorized"
    assert client.post("/v1/jobs", json=SPEC).status_code == 401
    assert client.get("/v1/jobs", headers=bearer("jo_wrong")).status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": "Basic eDp5"}).status_code == 401
    assert client.get("/v1/jobs", headers=bearer(tokens["alice"])).status_code == 200


def test_jobs_are_owned_readable_by_all_cancellable_by_owner_or_admin(client, auth_on, tokens):
    job = client.post("/v1/jobs", json=SPEC, headers=bearer(tokens["alice"])).json()
    assert job["owner"] == "alice"
    assert client.get(f"/v1/jobs/{job['id']}", headers=bearer(tokens["bob"])).status_code == 200

    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(tokens["bob"]))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(tokens["alice"]))
    assert response.status_code == 202

    other = client.post("/v1/jobs", json=SPEC, headers=bearer(tokens["bob"])).json()
    response = client.post(f"/v1/jobs/{other['id']}/cancel", headers=bearer(tokens["admin"]))
    assert response.status_code == 202 and response.json()["status"] == "cancelled"


def test_a_revoked_token_is_refused_at_once(client, auth_on, session, tokens):
    assert client.get("/v1/jobs", headers=bearer(tokens["bob"])).status_code == 200
    auth.revoke_token(session, name_or_id="bob")
    response = client.get("/v1/jobs", headers=bearer(tokens["bob"]))
    assert response.status_code == 401
    assert "revoked" in response.json()["error"]["message"]


def test_auth_off_accepts_anonymous_but_not_bad_tokens(client, tokens):
    job = client.post("/v1/jobs", json=SPEC).json()
    assert job["owner"] is None
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    assert client.get("/v1/jobs", headers=bearer("jo_wrong")).status_code == 401
    owned = client.post("/v1/jobs", json=SPEC, headers=bearer(tokens["alice"])).json()
    assert owned["owner"] == "alice"
    # The anonymous caller does not own alice's job.
    assert client.post(f"/v1/jobs/{owned['id']}/cancel").status_code == 403


def test_the_queued_limit_is_per_token(client, configure, tokens):
    configure(max_queued_per_token=1)
    assert client.post("/v1/jobs", json=SPEC, headers=bearer(tokens["alice"])).status_code == 201
    assert client.post("/v1/jobs", json=SPEC, headers=bearer(tokens["alice"])).status_code == 429
    assert client.post("/v1/jobs", json=SPEC, headers=bearer(tokens["bob"])).status_code == 201


def test_token_cli_prints_the_token_once(settings, session, capsys):
    assert cli(["token", "create", "--name", "ci", "--admin"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("jo_")
    assert auth.authenticate(session, token).is_admin

    assert cli(["token", "list"]) == 0
    listing = capsys.readouterr().out
    assert "ci" in listing and token not in listing

    assert cli(["token", "create", "--name", "ci"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli(["token", "revoke", "ci"]) == 0
    with pytest.raises(auth.Unauthorized):
        auth.authenticate(session, token)
    assert cli(["token", "revoke", "nobody"]) == 1


def test_a_metrics_token_from_the_cli_reads_only_metrics(client, auth_on, settings, capsys):
    assert cli(["token", "create", "--name", "prometheus", "--scope", "metrics"]) == 0
    captured = capsys.readouterr()
    token = captured.out.strip()
    assert "metrics-only token 'prometheus'" in captured.err
    assert client.get("/metrics", headers=bearer(token)).status_code == 200
    refused = client.post("/v1/jobs", json=SPEC, headers=bearer(token))
    assert refused.status_code == 403 and "GET /metrics only" in refused.json()["error"]["message"]
    assert cli(["token", "list"]) == 0
    (line,) = [row for row in capsys.readouterr().out.splitlines() if "prometheus" in row]
    assert line.split()[3] == "metrics"
    # An admin token has the full scope; an unknown scope is refused by argparse.
    assert cli(["token", "create", "--name", "x", "--admin", "--scope", "metrics"]) == 1
    assert "full scope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["token", "create", "--name", "y", "--scope", "read"])


def test_migrate_cli(settings, capsys):
    assert cli(["migrate"]) == 0
    assert "newest revision" in capsys.readouterr().out


def test_python_dash_m_api_runs_the_cli(settings):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "api", "token", "create", "--name", "sub"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = result.stdout.strip()
    assert token.startswith("jo_") and token not in result.stderr
    assert "shown only this once" in result.stderr
