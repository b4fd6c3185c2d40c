"""`/v1/jobs`: submit, validation, read, list, cancel."""

from __future__ import annotations

import json
import logging

import pytest

from jobstore import jobs, queue

SPEC = {"dataset": "synthetic", "architecture": "mlp", "method": "jumpout", "epochs": 3}


def error_fields(response) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"code", "message", "fields"} <= set(body["error"])
    return {f["field"]: f["message"] for f in body["error"]["fields"]}


def test_submit_answers_201_with_location_and_the_resolved_spec(client, settings, enqueued):
    response = client.post("/v1/jobs", json=SPEC)
    assert response.status_code == 201, response.text
    job = response.json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["attempt"] == 0 and job["owner"] is None
    assert job["cancel_requested"] is False
    assert job["progress"] == {"epoch": 0, "epochs": 3, "fraction": 0.0, "eta_seconds": None}
    spec = job["spec"]
    # Recipe defaults are filled; the server chose the device; its paths are not shown, nor
    # the fields a jumpout job does not read (tests/api/test_job_answer.py).
    assert spec["epochs"] == 3 and spec["method"] == "jumpout"
    assert {"lr", "batch_size", "sigma", "p_min", "p_max", "schedule"} <= set(spec)
    assert not {"out_dir", "data_dir", "dropout_rate"} & set(spec)
    assert spec["device"] == settings.device
    assert enqueued == [job["id"]]
    assert job["queue"] is None  # the submission answers without placing it in line
    again = client.get(response.headers["Location"])
    assert again.status_code == 200 and again.json() == {**job, "queue": again.json()["queue"]}
    assert again.json()["queue"]["position"] == 1
    assert again.json()["created_at"].endswith("+00:00") or again.json()["created_at"].endswith("Z")


def test_submit_with_the_broker_down_keeps_the_job_queued(client, monkeypatch, caplog):
    async def unreachable(job_id):
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(queue, "enqueue_job_async", unreachable)
    with caplog.at_level(logging.WARNING, logger="jobstore.queue"):
        response = client.post("/v1/jobs", json=SPEC)
    assert response.status_code == 201
    job_id = response.json()["id"]
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    assert any(job_id in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("body", "field", "hint"),
    [
        ({"dataset": "imagenet22k", "architecture": "mlp"}, "dataset", "cifar10"),
        ({"dataset": "../etc", "architecture": "mlp"}, "dataset", "synthetic"),
        ({"dataset": "/etc/passwd", "architecture": "mlp"}, "dataset", "accepted"),
        ({"dataset": "synthetic", "architecture": "vgg99"}, "architecture", "wrn_28_10"),
        ({**SPEC, "ablation": "dropout+IV"}, "ablation", "dropout+I+II"),
        ({**SPEC, "method": "maxout"}, "method", "jumpout"),
        ({**SPEC, "data_dir": "/etc"}, "data_dir", "unknown field"),
        ({**SPEC, "out_dir": "/tmp/x"}, "out_dir", "accepted fields"),
        ({**SPEC, "device": "cuda"}, "device", "unknown field"),
        ({**SPEC, "epochs": -1}, "epochs", "an integer in [1, 1000]"),
        ({**SPEC, "epochs": 10**9}, "epochs", "an integer in [1, 1000]"),
        ({**SPEC, "epochs": 2.5}, "epochs", "integer"),
        ({**SPEC, "batch_size": "64"}, "batch_size", "integer"),
        ({**SPEC, "batch_size": 10**6}, "batch_size", "an integer in [1, 4096]"),
        ({**SPEC, "lr": 0}, "lr", "a number in (0, 10]"),
        ({**SPEC, "lr": 11}, "lr", "a number in (0, 10]"),
        ({**SPEC, "lr": "fast"}, "lr", "number"),
        ({**SPEC, "sigma": -0.1}, "sigma", "a number in [0, 10]"),
        ({**SPEC, "p_min": 0.7, "p_max": 0.5}, "p_min", "below p_max"),
        ({**SPEC, "augment": "yes"}, "augment", "true or false"),
        ({**SPEC, "milestones": [0, 5]}, "milestones", "strictly increasing"),
        ({**SPEC, "milestones": "5,10"}, "milestones", "list"),
        ({"architecture": "mlp"}, "dataset", "required"),
        # Refused by the library's resolve_config (a ConfigError), still naming the field.
        ({**SPEC, "schedule": "warmup_exp"}, "schedule", "cosine"),
        ({**SPEC, "milestones": [5, 3]}, "milestones", "increasing"),
    ],
)
def test_invalid_specs_are_refused_naming_the_field(client, enqueued, body, field, hint):
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    fields = error_fields(response)
    assert field in fields, fields
    assert hint in fields[field] or hint in response.json()["error"]["message"], fields
    assert enqueued == []


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_refused(client, raw):
    content = '{"dataset": "synthetic", "architecture": "mlp", "lr": ' + raw + "}"
    response = client.post(
        "/v1/jobs", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert "lr" in error_fields(response)


def test_malformed_json_is_a_clear_400(client):
    response = client.post(
        "/v1/jobs", content='{"dataset": "synthetic",', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_json"
    assert "JSON" in response.json()["error"]["message"]


def test_a_body_that_is_not_an_object_is_refused(client):
    response = client.post("/v1/jobs", json=[SPEC])
    assert response.status_code == 422
    assert "body" in error_fields(response)


def test_oversized_bodies_are_refused_with_413(client, settings):
    padding = "x" * (settings.max_request_bytes + 1)
    response = client.post("/v1/jobs", json={**SPEC, "padding": padding})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds for a streamed body too
        for _ in range(settings.max_request_bytes // 1024 + 2):
            yield b" " * 1024

    response = client.post(
        "/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413


def test_ablation_names_are_case_insensitive(client):
    response = client.post("/v1/jobs", json={**SPEC, "ablation": "DROPOUT+i+ii"})
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["ablation"] == "dropout+I+II"


def test_unknown_job_is_404_in_the_uniform_shape(client):
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/metrics", "/v1/jobs/nope/checkpoints"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "job_not_found"
    assert client.get("/v1/jobs/%00").status_code == 404
    assert client.get("/v1/jobs/" + "a" * 5000).status_code == 404
    response = client.post("/v1/jobs/nope/cancel")
    assert response.status_code == 404
    assert client.get("/v1/nowhere").json()["error"]["code"] == "not_found"


def test_too_many_queued_jobs_is_429_naming_the_limit(client, configure):
    configure(max_queued_per_token=2)
    for _ in range(2):
        assert client.post("/v1/jobs", json=SPEC).status_code == 201
    response = client.post("/v1/jobs", json=SPEC)
    assert response.status_code == 429
    assert "max_queued_per_token" in response.json()["error"]["message"]
    assert "2" in response.json()["error"]["message"]


def test_list_is_newest_first_with_filters_and_an_opaque_cursor(client, session, make_job):
    ids = [make_job(method=method) for method in ("jumpout", "dropout", "none", "jumpout", "none")]
    jobs.request_cancel(session, ids[0], token=type("T", (), {"id": None, "is_admin": True}))

    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/jobs", params=params).json()
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]

    by_method = client.get("/v1/jobs", params={"method": "none"}).json()["items"]
    assert [item["id"] for item in by_method] == [ids[4], ids[2]]
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()["items"]
    assert [item["id"] for item in cancelled] == [ids[0]]
    assert client.get("/v1/jobs", params={"dataset": "cifar10"}).json()["items"] == []
    assert len(client.get("/v1/jobs", params={"dataset": "synthetic"}).json()["items"]) == 5


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 101}, "limit"),
        ({"limit": 0}, "limit"),
        ({"status": "done"}, "status"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "W10"}, "cursor"),
        ({"cursor": "WyIyMDI2LTAxLTAxVDAwOjAwOjAwKzAwOjAwIiwgIlx1MDAwMCJd"}, "cursor"),
        ({"dataset": "\x00"}, "dataset"),
    ],
)
def test_bad_list_parameters_are_422(client, params, field):
    response = client.get("/v1/jobs", params=params)
    assert response.status_code == 422, response.text
    # A list filter names the value's position too: status.0 (tests/api/test_list_filters.py).
    assert field in {name.split(".")[0] for name in error_fields(response)}


def test_cancel_a_queued_job_cancels_it_at_once(client, make_job):
    job_id = make_job()
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "cancelled" and job["finished_at"] is not None


def test_cancel_a_running_job_flags_it_for_the_worker(client, session, make_job):
    job_id = make_job()
    assert jobs.claim_job(session, job_id, worker="w1") is not None
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "running"
    assert response.json()["cancel_requested"] is True
    assert jobs.cancel_requested(session, job_id) is True


def test_cancel_a_finished_job_is_409(client, session, make_job):
    job_id = make_job()
    jobs.claim_job(session, job_id, worker="w1")
    assert jobs.finish_job(session, job_id, status="succeeded")
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 409
    assert "succeeded" in response.json()["error"]["message"]
    # Cancelling twice: the second finds it already cancelled.
    other = make_job()
    assert client.post(f"/v1/jobs/{other}/cancel").status_code == 202
    assert client.post(f"/v1/jobs/{other}/cancel").status_code == 409


def test_running_job_reports_progress_and_eta(client, session, make_job):
    job_id = make_job(epochs=4)
    jobs.claim_job(session, job_id, worker="w1")
    jobs.record_epoch(session, job_id, {"epoch": 1, "test_accuracy": 0.5, "seconds": 10.0})
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["progress"] == {"epoch": 1, "epochs": 4, "fraction": 0.25, "eta_seconds": 30.0}
    assert job["worker"] == "w1" and job["attempt"] == 1 and job["started_at"] is not None


def test_openapi_schema_is_served(client):
    schema = client.get("/openapi.json").json()
    assert "/v1/jobs" in schema["paths"]
    assert json.dumps(schema)


def test_a_bad_server_setting_stops_the_server_not_the_client(monkeypatch):
    # The device setting is checked against the spec's choices when the settings load: a
    # misconfigured server does not start, rather than blame its clients' jobs.
    from pydantic import ValidationError

    from jobstore.settings import Settings

    monkeypatch.setenv("JUMPOUT_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="device"):
        Settings()
