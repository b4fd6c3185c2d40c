"""Fixtures for the worker's unit tests: a migrated SQLite store in tmp_path, selected through
the settings, with the worker's own engine pointed at it."""

from __future__ import annotations

import pytest

from jobstore import db, jobs
from jobstore.settings import get_settings


@pytest.fixture
def job_store(tmp_path, monkeypatch):
    monkeypatch.setenv("JUMPOUT_HOME", str(tmp_path))
    monkeypatch.setenv("JUMPOUT_DATABASE_URL", f"sqlite:///{tmp_path / 'jumpout.db'}")
    get_settings.cache_clear()
    db.migrate()
    yield db
    db.dispose_engines()
    get_settings.cache_clear()


@pytest.fixture
def claimed_job(job_store) -> str:
    """A digits/mlp job claimed by this worker (attempt 1)."""
    job = job_store.call(
        jobs.create_job,
        spec={"dataset": "digits", "architecture": "mlp", "epochs": 2},
        owner_id=None,
    )
    assert job_store.call(jobs.claim_job, job.id, worker="test") is not None
    return job.id
