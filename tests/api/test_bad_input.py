"""Bad input that test_jobs.py does not already cover: every case is a 4xx in the uniform shape
that names the field at fault (`body` when the body as a whole is refused), nothing is enqueued,
and a request over a server limit names the limit's setting and value.

Validation does not touch the database, so those cases run on SQLite only; the limits, which count
or store jobs, run on both databases.
"""

from __future__ import annotations

import json

import pytest

SPEC = {"dataset": "synthetic", "architecture": "mlp", "epochs": 2}
JSON = {"Content-Type": "application/json"}
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def refused(response, status: int, field: str) -> dict:
    """The error of a refused request, after checking its status, shape and the field named."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "fields"} and error["message"], error
    named = [f["field"] for f in error["fields"]]
    assert field in named, error
    return error


def with_raw(field: str, raw: str) -> str:
    """SPEC as JSON text with `field` set to the literal `raw` (json.dumps cannot write 1e400)."""
    return json.dumps(SPEC)[:-1] + f', "{field}": {raw}}}'


# --- bodies that are not a JSON object ------------------------------------------------------


@sqlite_only
@pytest.mark.parametrize(
    "content",
    [
        b"   ",
        b'{"dataset": "synthetic"} trailing',
        b"{'dataset': 'synthetic'}",
        b'{"dataset": "synthetic\xff\xfe", "architecture": "mlp"}',  # not UTF-8
        b'{"seed": 1' + b"0" * 5000 + b"}",  # over Python's int-parsing digit limit
        b'{"milestones": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # nesting deeper than recursion
    ],
    ids=["whitespace", "trailing-garbage", "single-quotes", "invalid-utf8", "5000-digits", "deep"],
)
def test_unparseable_bodies_are_400_malformed_json(client, enqueued, content):
    error = refused(client.post("/v1/jobs", content=content, headers=JSON), 400, "body")
    assert error["code"] == "malformed_json"
    assert "JSON" in error["message"]
    assert enqueued == []


@sqlite_only
@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"", "application/json"),
        (b"null", "application/json"),
        (b'"synthetic"', "application/json"),
        (b"42", "application/json"),
    ],
    ids=["empty", "null", "string", "number"],
)
def test_a_body_that_is_not_an_object_names_the_body(client, enqueued, content, content_type):
    response = client.post("/v1/jobs", content=content, headers={"Content-Type": content_type})
    error = refused(response, 422, "body")
    assert "JSON object" in error["message"]
    assert enqueued == []


@sqlite_only
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml", None]
)
def test_a_spec_sent_with_the_wrong_content_type_says_which_to_use(client, enqueued, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/v1/jobs", content=json.dumps(SPEC), headers=headers)
    error = refused(response, 422, "body")
    assert "Content-Type: application/json" in error["message"]
    assert (repr(content_type) if content_type else "none") in error["message"]
    assert enqueued == []


def test_oversized_bodies_name_the_limit_on_every_post(client, settings, make_job):
    limit = settings.max_request_bytes
    padding = "x" * limit
    for url in ("/v1/jobs", f"/v1/jobs/{make_job()}/cancel"):
        response = client.post(url, json={**SPEC, "padding": padding})
        error = refused(response, 413, "body")
        assert error["code"] == "request_too_large"
        assert str(limit) in error["message"] and "max_request_bytes" in error["message"]
    # A lying Content-Length is refused before the body is read.
    response = client.post("/v1/jobs", content=b"{}", headers={**JSON, "Content-Length": "x"})
    assert response.status_code in (400, 413)


# --- numbers ----------------------------------------------------------------------------------

HUGE = "1" + "0" * 400  # a valid JSON integer, far beyond int64 and float


@sqlite_only
@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("epochs", "1e400"),
        ("epochs", "NaN"),
        ("epochs", "-Infinity"),
        ("epochs", HUGE),
        ("epochs", "0"),
        ("epochs", "3.0"),
        ("epochs", "true"),
        ("batch_size", "-1"),
        ("batch_size", "0"),
        ("batch_size", "1e3"),
        ("batch_size", HUGE),
        ("seed", "-1"),
        ("seed", str(2**31)),
        ("seed", HUGE),
        ("lr", HUGE),
        ("lr", "-" + HUGE),
        ("lr", "1e-400"),  # underflows to 0.0: not > 0
        ("lr", "-0.0"),
        ("sigma", "NaN"),
        ("sigma", "1e400"),
        ("p_min", "Infinity"),
        ("p_min", "-0.1"),
        ("p_max", "1"),
        ("dropout_rate", "1.5"),
        ("momentum", "1"),
        ("weight_decay", "-Infinity"),
        ("gamma", "0"),
        ("train_size", "0"),
        ("train_size", HUGE),
        ("test_size", "-5"),
        ("milestones", "[NaN]"),
        ("milestones", "[1e400]"),
        ("milestones", "[-1]"),
        ("milestones", "[" + ", ".join(["1"] * 65) + "]"),
        ("nesterov", "1"),
        ("augment", "0"),
    ],
)
def test_bad_numbers_are_422_naming_the_field(client, enqueued, field, raw):
    response = client.post("/v1/jobs", content=with_raw(field, raw), headers=JSON)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_spec"
    # A list item is named by its index (milestones.0).
    named = [f["field"] for f in error["fields"]]
    assert any(name == field or name.startswith(field + ".") for name in named), error
    assert len(error["message"]) < 500, "the echoed value must be truncated"
    assert enqueued == []


# --- names: registry names only, never paths --------------------------------------------------


@sqlite_only
@pytest.mark.parametrize("field", ["dataset", "architecture", "ablation"])
@pytest.mark.parametrize(
    "name",
    [
        "cifar10/../../x",
        "..",
        "../synthetic",
        "./synthetic",
        "synthetic/",
        "/etc/passwd",
        "~/synthetic",
        "..%2f..%2fetc",
        "C:\\Windows\\system32",
        "synthetic\x00.pt",
        "ｓｙｎｔｈｅｔｉｃ",  # fullwidth look-alike
        "synthet\u0131c",  # dotless i
        "synthetic\u202e",  # right-to-left override
        "synthetic\u200b",  # zero-width space
        "🐍",
        "",
        " synthetic",
        "x" * 10_000,
    ],
    ids=lambda value: ascii(value)[:24],
)
def test_names_are_registry_names_never_paths(client, enqueued, field, name):
    response = client.post("/v1/jobs", json={**SPEC, field: name})
    error = refused(response, 422, field)
    assert error["code"] == "invalid_spec"
    message = next(f["message"] for f in error["fields"] if f["field"] == field)
    assert "accepted" in message, message
    assert len(message) < 1000, "a long name is truncated in the message"
    assert enqueued == []


@sqlite_only
def test_a_lone_surrogate_name_is_refused(client):
    content = json.dumps(SPEC)[:-1] + ', "dataset": "\\ud800"}'
    refused(client.post("/v1/jobs", content=content, headers=JSON), 422, "dataset")


@sqlite_only
@pytest.mark.parametrize(
    "field",
    [
        "owner_id",
        "owner",
        "status",
        "id",
        "attempt",
        "max_attempts",
        "worker",
        "Dataset",
        "dataset ",
        "config",
        "__proto__",
        "resume_from",
        "checkpoint",
    ],
)
def test_unknown_fields_are_refused_not_assigned(client, enqueued, field):
    # Mass assignment: nothing the server decides (owner, status, attempts...) can be set.
    response = client.post("/v1/jobs", json={**SPEC, field: 1})
    error = refused(response, 422, field)
    message = next(f["message"] for f in error["fields"] if f["field"] == field)
    assert message.startswith("unknown field") and "accepted fields: dataset" in message
    assert enqueued == []


@sqlite_only
def test_duplicate_keys_cannot_smuggle_a_value_past_validation(client, enqueued):
    # json.loads keeps the last of duplicate keys: it is the one validated, and refused.
    content = '{"dataset": "synthetic", "architecture": "mlp", "dataset": "../etc"}'
    refused(client.post("/v1/jobs", content=content, headers=JSON), 422, "dataset")
    assert enqueued == []


# --- server limits ----------------------------------------------------------------------------


def test_epochs_and_batch_size_over_the_server_limits_name_the_setting(client, configure):
    configure(max_epochs=5, max_batch_size=16)
    ok = client.post("/v1/jobs", json={**SPEC, "epochs": 5, "batch_size": 16})
    assert ok.status_code == 201, ok.text
    for field, value, setting, limit in (
        ("epochs", 6, "max_epochs", 5),
        ("batch_size", 17, "max_batch_size", 16),
        ("milestones", [6], "max_epochs", 5),
    ):
        error = refused(client.post("/v1/jobs", json={**SPEC, field: value}), 422, field)
        message = next(f["message"] for f in error["fields"] if f["field"] == field)
        assert setting in message and str(limit) in message, message


def test_a_recipe_default_over_the_server_limit_is_refused(client, configure, enqueued):
    # synthetic/mlp's recipe trains 20 epochs with batches of 64: over these limits, although
    # the client did not send those fields.
    configure(max_epochs=2, max_batch_size=8)
    spec = {"dataset": "synthetic", "architecture": "mlp"}
    error = refused(client.post("/v1/jobs", json=spec), 422, "epochs")
    message = error["fields"][0]["message"]
    assert "max_epochs" in message and "2" in message, message
    error = refused(client.post("/v1/jobs", json={**spec, "epochs": 2}), 422, "batch_size")
    assert "max_batch_size" in error["fields"][0]["message"]
    assert client.post("/v1/jobs", json={**spec, "epochs": 2, "batch_size": 8}).status_code == 201
    assert len(enqueued) == 1


def test_the_queued_limit_frees_a_slot_when_a_job_is_cancelled(client, configure):
    configure(max_queued_per_token=2)
    ids = [client.post("/v1/jobs", json=SPEC).json()["id"] for _ in range(2)]
    response = client.post("/v1/jobs", json=SPEC)
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "too_many_queued_jobs" and "max_queued_per_token" in error["message"]
    assert client.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 202
    assert client.post("/v1/jobs", json=SPEC).status_code == 201
