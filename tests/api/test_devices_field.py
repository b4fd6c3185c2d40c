"""The ``devices`` field of a job (issue 11 §3) through the API: accepted and shown, a batch
that does not split evenly over the devices and a count over the server's ``max_devices`` are
refused with a 422 naming the field, on SQLite and PostgreSQL."""

from __future__ import annotations

SPEC = {"dataset": "synthetic", "architecture": "mlp", "epochs": 2}


def _refused_field(response) -> tuple[str, str]:
    assert response.status_code == 422, response.text
    [field] = response.json()["error"]["fields"]
    return field["field"], field["message"]


def test_devices_is_accepted_and_shown(client):
    created = client.post("/v1/jobs", json={**SPEC, "devices": 2, "batch_size": 64})
    assert created.status_code == 201, created.text
    assert created.json()["spec"]["devices"] == 2
    default = client.post("/v1/jobs", json=SPEC)
    assert default.json()["spec"]["devices"] == 1


def test_a_batch_size_not_divisible_by_devices_names_batch_size(client, enqueued):
    field, message = _refused_field(
        client.post("/v1/jobs", json={**SPEC, "devices": 3, "batch_size": 64})
    )
    assert field == "batch_size" and "divisible by devices (3)" in message, message
    field, _ = _refused_field(client.post("/v1/jobs", json={**SPEC, "devices": 17}))
    assert field == "devices"
    assert enqueued == []


def test_devices_over_the_server_limit_names_the_setting(client, configure):
    configure(max_devices=2)
    assert client.post("/v1/jobs", json={**SPEC, "devices": 2}).status_code == 201
    field, message = _refused_field(client.post("/v1/jobs", json={**SPEC, "devices": 4}))
    assert field == "devices" and "max_devices" in message and "2" in message, message
