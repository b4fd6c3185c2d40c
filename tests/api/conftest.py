"""Fixtures for the API tests: every test runs on SQLite (a file in tmp_path) and on PostgreSQL
(a database created for the test session on 127.0.0.1:5432), with the schema built by the Alembic
migrations, and the broker's `enqueue_job` (and its async twin) replaced by a recorder."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from jobstore import db, queue
from jobstore.settings import get_settings

TABLES = ("epoch_metrics", "checkpoints", "jobs", "api_tokens", "idempotency_keys")
QUICK_SPEC = {"dataset": "synthetic", "architecture": "mlp"}


def _set_env(monkeypatch, **values) -> None:
    for key, value in values.items():
        monkeypatch.setenv(f"JUMPOUT_{key.upper()}", str(value))
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """A migrated SQLite file, copied for each test (migrating once is the slow part)."""
    path = tmp_path_factory.mktemp("template") / "jumpout.db"
    url = f"sqlite:///{path}"
    db.migrate(url)
    db.dispose_engines()
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        path = tmp_path / "jumpout.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("postgres_url")
    from sqlalchemy import text

    with db.get_engine(url).begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    return url


@pytest.fixture
def settings(monkeypatch, tmp_path, database_url):
    """Settings pointing at this test's database and directories; auth off, broker on db 15."""
    _set_env(
        monkeypatch,
        home=tmp_path,
        database_url=database_url,
        artifact_dir=tmp_path / "artifacts",
        data_dir=tmp_path / "data",
        broker_url="redis://127.0.0.1:6379/15",
        auth_required="false",
        max_queued_per_token=100,
        # A TestClient reads a streaming response to its end: the event stream and a followed
        # log of a job that is still queued or running must end on their own.
        stream_max_s=0.3,
    )
    yield get_settings()
    db.dispose_engines()
    get_settings.cache_clear()


@pytest.fixture
def configure(monkeypatch, settings):
    """Change settings within a test: `configure(auth_required=True)`."""

    def apply(**values):
        _set_env(monkeypatch, **values)
        return get_settings()

    return apply


@pytest.fixture
def enqueued(monkeypatch) -> list[str]:
    """The job ids the API sent to the broker (nothing reaches a real broker)."""
    calls: list[str] = []

    def record(job_id: str) -> bool:
        calls.append(job_id)
        return True  # published: a broker whose queue is never full

    async def record_async(job_id: str) -> bool:
        return record(job_id)

    monkeypatch.setattr(queue, "enqueue_job", record)
    monkeypatch.setattr(queue, "enqueue_job_async", record_async)
    return calls


@pytest.fixture
def client(settings, enqueued) -> Iterator[TestClient]:
    from api.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture
def session(settings):
    with db.session_scope() as s:
        yield s


@pytest.fixture
def make_job(session):
    """Create a queued job through the service function; returns its id."""
    from jobstore import jobs

    def make(owner_id: int | None = None, **spec) -> str:
        return jobs.create_job(session, spec={**QUICK_SPEC, **spec}, owner_id=owner_id).id

    return make
