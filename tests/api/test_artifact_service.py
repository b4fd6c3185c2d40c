"""The artifact service (`api.artifact_service`): the routes workers on other boxes send their
checkpoints and logs to. Only the workers' secret opens them (never a user's token); an upload is
stored only when its sha256 matches, under the API's artifact directory, where the public API
serves it; the log is appended by offset, once, in order. On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from api import auth
from jobstore import artifact_store, joblog, jobs
from jobstore.settings import Settings, get_settings

SECRET = "s3cret-for-the-workers-only"
WORKER = {"Authorization": f"Bearer {SECRET}"}
NAME = "checkpoint-epoch0001.pt"


@pytest.fixture
def service(configure):
    from api.artifact_service import create_app

    configure(worker_secret=SECRET)
    with TestClient(create_app()) as test_client:
        yield test_client


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(service, job_id: str, data: bytes, *, name: str = NAME, digest: str | None = None):
    headers = {**WORKER, "X-Checksum-SHA256": digest or sha(data)}
    return service.put(f"/v1/internal/jobs/{job_id}/checkpoints/{name}", content=data,
                       headers=headers)  # fmt: skip


def service_routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route, included routers flattened (as test_auth_every_route)."""

    def walk(routes):
        for route in routes:
            if hasattr(route, "effective_candidates"):  # FastAPI's included router
                yield from walk(route.effective_candidates())
                continue
            original = getattr(route, "original_route", route)
            for method in getattr(original, "methods", None) or ():
                if method != "HEAD":
                    yield method, route.path

    return sorted(set(walk(app.routes)))


def test_every_route_but_health_refuses_anything_but_the_workers_secret(service, session, make_job):
    _, user_token = auth.create_token(session, name="alice", is_admin=True)
    job_id = make_job()
    routes = service_routes(service.app)
    assert ("PUT", "/v1/internal/jobs/{job_id}/checkpoints/{name}") in routes
    refusals = {
        "no header": {},
        "a user's admin token": {"Authorization": f"Bearer {user_token}"},
        "a wrong secret": {"Authorization": "Bearer " + "x" * len(SECRET)},
        "the secret without scheme": {"Authorization": SECRET},
        "basic scheme": {"Authorization": f"Basic {SECRET}"},
    }
    for method, path in routes:
        url = path.format(job_id=job_id, name=NAME)
        if path == "/v1/internal/health":
            assert service.request(method, url).status_code == 200
            continue
        for reason, headers in refusals.items():
            response = service.request(method, url, headers=headers, params={"offset": 0})
            assert response.status_code == 401, (method, path, reason, response.text)
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"] == "Bearer"
    assert service.get("/v1/internal/ping", headers=WORKER).status_code == 200
    assert not (get_settings().artifact_dir / "jobs" / job_id).exists()


def test_the_service_is_not_in_any_public_schema_and_needs_a_secret(configure):
    from api.artifact_service import create_app
    from api.main import create_app as create_public_app

    configure(worker_secret="")
    with pytest.raises(RuntimeError, match="JUMPOUT_WORKER_SECRET"):
        create_app()
    configure(worker_secret=SECRET)
    assert create_app().openapi_url is None
    public_paths = create_public_app().openapi()["paths"]
    assert not [path for path in public_paths if path.startswith("/v1/internal")]


@pytest.mark.parametrize("secret", ["short", "jo_" + "a" * 40])
def test_a_weak_or_token_like_secret_is_refused_at_start(monkeypatch, secret):
    monkeypatch.setenv("JUMPOUT_WORKER_SECRET", secret)
    with pytest.raises(ValidationError, match="JUMPOUT_WORKER_SECRET"):
        Settings()


def test_an_upload_is_stored_only_when_its_sha256_matches(service, client, make_job):
    job_id = make_job()
    data = b"weights" * 1000
    directory = get_settings().artifact_dir / "jobs" / job_id

    refused = upload(service, job_id, data, digest=sha(b"something else"))
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "checksum_mismatch"
    assert list(directory.iterdir()) == []  # no file, no temporary left behind

    stored = upload(service, job_id, data)
    assert stored.status_code == 201, stored.text
    body = stored.json()
    assert body == {"path": str(directory / NAME), "size_bytes": len(data), "sha256": sha(data)}
    assert (directory / NAME).read_bytes() == data
    assert [path.name for path in directory.iterdir()] == [NAME]

    # Sent again (its answer was lost): the same file, replaced atomically.
    assert upload(service, job_id, data).status_code == 201
    fetched = service.get(f"/v1/internal/jobs/{job_id}/checkpoints/{NAME}", headers=WORKER)
    assert fetched.status_code == 200 and fetched.content == data


def test_an_uploaded_checkpoint_is_served_by_the_public_api_once_recorded(
    service, client, session, make_job
):
    job_id = make_job()
    data = b"model bytes"
    body = upload(service, job_id, data).json()
    jobs.record_checkpoint(session, job_id, path=body["path"], epoch=1, sha256=body["sha256"],
                           size_bytes=body["size_bytes"], is_best=False)  # fmt: skip
    response = client.get(f"/v1/jobs/{job_id}/checkpoints/latest/file")
    assert response.status_code == 200 and response.content == data
    assert response.headers["X-Checksum-SHA256"] == sha(data)


@pytest.mark.parametrize(
    ("name", "digest", "status", "code"),
    [
        ("../trainer.log", None, 404, "not_found"),  # never a path: the router does not match
        ("trainer.log", None, 422, "invalid_request"),
        ("checkpoint-epoch0001.pt.tmp", None, 422, "invalid_request"),
        ("checkpoint-epoch0001.pt%0A", None, 422, "invalid_request"),  # `$` matched before \n
        (NAME, "not-a-sha", 422, "invalid_request"),
    ],
)
def test_bad_names_and_checksums_are_refused(service, make_job, name, digest, status, code):
    job_id = make_job()
    response = upload(service, job_id, b"data", name=name, digest=digest or sha(b"data"))
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_an_unknown_job_or_an_oversized_file_is_refused(service, configure, make_job):
    assert upload(service, "0" * 32, b"data").status_code == 404
    assert upload(service, "not-an-id", b"data").status_code == 404
    job_id = make_job()
    configure(worker_secret=SECRET, max_artifact_bytes=1024)
    response = upload(service, job_id, b"x" * 2048)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    directory = get_settings().artifact_dir / "jobs" / job_id
    assert not directory.exists() or list(directory.iterdir()) == []


def test_a_pruned_checkpoint_is_deleted_and_a_repeated_delete_is_harmless(service, make_job):
    job_id = make_job()
    upload(service, job_id, b"data")
    url = f"/v1/internal/jobs/{job_id}/checkpoints/{NAME}"
    assert service.delete(url, headers=WORKER).status_code == 204
    assert service.delete(url, headers=WORKER).status_code == 204
    assert service.get(url, headers=WORKER).status_code == 404


def test_the_log_is_appended_in_order_once_and_read_through_the_public_api(
    service, client, make_job
):
    job_id = make_job()
    url = f"/v1/internal/jobs/{job_id}/log"

    def append(offset: int, data: bytes):
        return service.post(url, params={"offset": offset}, content=data, headers=WORKER)

    assert service.get(url, headers=WORKER).json() == {"size": 0}
    assert append(0, b"=== attempt 1 ===\n").json() == {"size": 18}
    assert append(0, b"=== attempt 1 ===\n").json() == {"size": 18}  # a retry: not twice
    assert append(18, b"epoch 1\n").json() == {"size": 26}
    assert append(22, b"h 1\nepoch 2\n").json() == {"size": 34}  # overlaps: only the new part
    gap = append(40, b"lost?\n")
    assert gap.status_code == 409 and gap.json()["error"]["code"] == "log_offset_ahead"
    assert gap.json()["error"]["fields"] == [{"field": "offset", "message": "at most 34"}]
    response = client.get(f"/v1/jobs/{job_id}/log", params={"offset": 0})
    assert response.status_code == 200
    assert response.text == "=== attempt 1 ===\nepoch 1\nepoch 2\n"
    assert artifact_store.log_size(job_id) == 34


def test_a_chunk_that_differs_from_the_stored_log_is_refused_not_merged(service, make_job):
    """An attempt the job was taken from, writing at the offset its successor already wrote at:
    before, its bytes below the end were taken for a resend and its tail appended (corrupt)."""
    job_id = make_job()
    url = f"/v1/internal/jobs/{job_id}/log"

    def append(offset: int, data: bytes):
        return service.post(url, params={"offset": offset}, content=data, headers=WORKER)

    assert append(0, b"=== attempt 1 ===\n").json() == {"size": 18}
    for offset, data in ((0, b"=== attempt 2 ===\n"), (10, b"t 2 ===\nepoch 1\n"),
                         (17, b"!stale output of attempt 1\n")):  # fmt: skip
        conflict = append(offset, data)
        assert conflict.status_code == 409, conflict.text
        assert conflict.json()["error"]["code"] == "log_conflict"
    assert append(10, b"t 1 ===\nepoch 1\n").json() == {"size": 26}  # a true resend still is
    assert artifact_store.log_size(job_id) == 26
    stored = (get_settings().artifact_dir / "jobs" / job_id / "trainer.log").read_bytes()
    assert stored == b"=== attempt 1 ===\nepoch 1\n"


def test_a_resend_over_the_range_the_logs_cut_dropped_is_not_a_conflict(
    service, configure, make_job
):
    configure(worker_secret=SECRET, log_max_bytes=64 * 1024)
    job_id = make_job()
    data = b"".join(b"line %06d\n" % n for n in range(10_000))  # 110 kB: the middle is cut
    url = f"/v1/internal/jobs/{job_id}/log"
    first = service.post(url, params={"offset": 0}, content=data, headers=WORKER)
    assert first.json() == {"size": len(data)}
    path = get_settings().artifact_dir / "jobs" / job_id / "trainer.log"
    assert joblog.read_hole(path) is not None  # the service's own cut happened
    again = service.post(url, params={"offset": 0}, content=data, headers=WORKER)
    assert again.status_code == 200 and again.json() == {"size": len(data)}, again.text


def test_the_checkpoint_name_pattern_is_the_engines():
    from jumpout.engine import CHECKPOINT_PATTERN, checkpoint_name

    assert artifact_store.CHECKPOINT_NAME.pattern == CHECKPOINT_PATTERN.pattern
    for epoch, step in ((1, 0), (12, 345), (10000, 0)):
        assert artifact_store.CHECKPOINT_NAME.fullmatch(checkpoint_name(epoch, step))
