"""`/v1/health`: 200 when the database and the broker answer, 503 otherwise."""

from __future__ import annotations

import socket


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_health_ok_with_database_and_broker(client, configure):
    configure(health_ping_timeout=0.2)
    response = client.get("/v1/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["database"] == "ok" and body["broker"] == "ok"
    assert isinstance(body["workers"], int) and body["workers"] >= 0


def test_health_503_when_the_broker_is_down(client, configure):
    configure(broker_url=f"redis://127.0.0.1:{closed_port()}/0")
    response = client.get("/v1/health")
    assert response.status_code == 503
    body = response.json()
    assert (body["status"], body["database"], body["broker"], body["workers"]) == (
        "unavailable",
        "ok",
        "unavailable",
        0,
    )


def test_health_needs_no_token(client, configure):
    configure(auth_required=True, health_ping_timeout=0.2)
    assert client.get("/v1/health").status_code == 200


def test_health_503_when_the_database_is_down(client, configure):
    configure(
        database_url=f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/test",
        health_ping_timeout=0.2,
    )
    response = client.get("/v1/health")
    assert response.status_code == 503
    assert response.json()["database"] == "unavailable"
