"""The reaper's pass (stale heartbeats, jobs the broker lost) and how it reads the broker."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from jobstore import jobs
from jobstore.settings import get_settings
from jobstore.tables import Job
from worker import reaper

SPEC = {"dataset": "digits", "architecture": "mlp", "epochs": 2}


def make_job(job_store, *, age_s: float = 0.0) -> str:
    job = job_store.call(jobs.create_job, spec=SPEC, owner_id=None)
    created = datetime.now(UTC) - timedelta(seconds=age_s)
    job_store.call(_set, job.id, created_at=created)
    return job.id


def _set(session, job_id: str, **values) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(**values))


def status(job_store, job_id: str) -> tuple[str, int]:
    row = job_store.call(jobs.get_job, job_id)
    return row.status, row.attempt


def test_stale_running_job_is_requeued_and_sent(job_store):
    job_id = make_job(job_store)
    job_store.call(jobs.claim_job, job_id, worker="gone")
    job_store.call(_set, job_id, heartbeat_at=datetime.now(UTC) - timedelta(hours=1))
    sent: list[str] = []
    result = reaper.reap_once(enqueue=sent.append, ids_in_broker=set)
    assert result["stale"] == [job_id] and sent == [job_id]
    assert status(job_store, job_id) == ("queued", 1)


def test_fresh_heartbeat_is_left_alone(job_store):
    job_id = make_job(job_store)
    job_store.call(jobs.claim_job, job_id, worker="alive")
    sent: list[str] = []
    assert reaper.reap_once(enqueue=sent.append, ids_in_broker=set) == {"stale": [], "lost": []}
    assert status(job_store, job_id) == ("running", 1)


def test_old_queued_job_missing_from_the_broker_is_sent_again(job_store):
    lost = make_job(job_store, age_s=300)
    waiting = make_job(job_store, age_s=300)
    recent = make_job(job_store)
    sent: list[str] = []
    result = reaper.reap_once(enqueue=sent.append, ids_in_broker=lambda: {waiting})
    assert result["lost"] == [lost] and sent == [lost]
    assert recent not in sent


def test_unreadable_broker_sends_nothing(job_store):
    make_job(job_store, age_s=300)
    sent: list[str] = []
    assert reaper.reap_once(enqueue=sent.append, ids_in_broker=lambda: None)["lost"] == []
    assert sent == []


def test_ids_in_broker_reads_celerys_messages_from_redis(job_store, monkeypatch):
    """Against the local Redis (127.0.0.1:6379, a database of its own): a job sent by the API's
    broker module is found in the queue."""
    redis = pytest.importorskip("redis")
    url = "redis://127.0.0.1:6379/11"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    monkeypatch.setenv("JUMPOUT_BROKER_URL", url)
    get_settings.cache_clear()
    from jobstore import queue

    client.flushdb()
    try:
        job_id = uuid.uuid4().hex
        queue.enqueue_job(job_id)
        assert job_id in reaper._ids_in_broker()
        # Delivered but not acknowledged: kombu keeps it in the "unacked" hash, indexed by time.
        raw = client.rpop("jobs")
        client.hset("unacked", "tag", b"[" + raw + b', "jobs", "jobs"]')
        client.zadd("unacked_index", {"tag": time.time()})
        assert job_id in reaper._ids_in_broker()
        # Delivered long ago to a worker that died: lost, as far as a queued job is concerned.
        client.zadd("unacked_index", {"tag": time.time() - 3600})
        assert job_id not in reaper._ids_in_broker()
    finally:
        client.flushdb()
        queue._celery_app.cache_clear()
