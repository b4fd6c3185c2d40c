"""Fixtures shared by every test directory: a PostgreSQL database made for the test session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A migrated database of its own on 127.0.0.1:5432, dropped at the end of the session
    (callers empty its tables between tests); skips when PostgreSQL does not answer."""
    # Imported here: the library's tests, which need neither, also run where the service's
    # packages are not installed (the GPU machine).
    from jobstore import db

    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    name = f"jumpout_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        db.migrate(url)
        db.dispose_engines()
        yield url
    finally:
        db.dispose_engines()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
