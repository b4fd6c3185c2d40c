"""`jobstore.db.call`, how the worker reaches the store: transient database errors are retried
with backoff, others are not."""

from __future__ import annotations

import pytest
from sqlalchemy import exc as sa_exc

from jobstore import db


def flaky(failures: int, error: Exception):
    calls = []

    def fn(session, value):
        calls.append(value)
        if len(calls) <= failures:
            raise error
        return value * 2

    return fn, calls


def operational_error() -> Exception:
    return sa_exc.OperationalError("UPDATE jobs ...", {}, Exception("server closed the connection"))


def test_a_briefly_unavailable_database_is_retried(job_store, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(db.time, "sleep", sleeps.append)
    fn, calls = flaky(3, operational_error())
    assert db.call(fn, 21) == 42
    assert len(calls) == 4
    assert sleeps == sorted(sleeps) and sleeps[0] > 0  # backing off


def test_retrying_gives_up_after_its_deadline(job_store, monkeypatch):
    monkeypatch.setattr(db.time, "sleep", lambda seconds: None)
    fn, calls = flaky(10**6, operational_error())
    with pytest.raises(sa_exc.OperationalError):
        db.call(fn, 1, retry_for_s=0)
    assert len(calls) == 1


def test_a_programming_error_is_not_retried(job_store):
    error = sa_exc.IntegrityError("INSERT ...", {}, Exception("duplicate key"))
    fn, calls = flaky(1, error)
    with pytest.raises(sa_exc.IntegrityError):
        db.call(fn, 1)
    assert len(calls) == 1
