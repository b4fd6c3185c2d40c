"""Fixtures for the worker's unit tests: a migrated SQLite store in tmp_path, selected through
the settings, with the worker's own engine pointed at it."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobstore import db, jobs
from jobstore.settings import get_settings
from jumpout import catalog


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


@pytest.fixture
def unreadable_dataset(job_store):
    """``place(name)`` puts placeholders where the data set's files go under the data directory:
    present, so a job on it passes the submission check (`jobstore.datasets`), but not loadable
    (md5 mismatch; ImageNet: class folders without images), so its trainer fails as on files
    removed or corrupted after the job was accepted."""

    def place(name: str) -> None:
        item = catalog.entry(name)
        root = Path(get_settings().data_dir)
        for folder in item.folders:
            (root / folder / "n00000000").mkdir(parents=True, exist_ok=True)
        for relative in () if item.folders else item.files:
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_bytes(b"not the real file")

    return place
