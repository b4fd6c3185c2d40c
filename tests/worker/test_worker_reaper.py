"""The reaper's pass: stale heartbeats requeued, and the broker's dispatch messages topped up to
min(claimable jobs, dispatch_depth) (a count, not a message per job: `jobstore.queue`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from jobstore import jobs, queue
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


class TopUp:
    """Records each `top_up(claimable, requeued=...)` call; publishes `publishes` messages."""

    def __init__(self, publishes: int = 1) -> None:
        self.calls: list[tuple[int, list[str]]] = []
        self.publishes = publishes

    def __call__(self, claimable: int, *, requeued=()) -> int:
        self.calls.append((claimable, list(requeued)))
        return self.publishes


def test_stale_running_job_is_requeued_and_a_message_published_at_once(job_store):
    job_id = make_job(job_store)  # young: counted only because this pass requeued it
    job_store.call(jobs.claim_job, job_id, worker="gone")
    job_store.call(_set, job_id, heartbeat_at=datetime.now(UTC) - timedelta(hours=1))
    top_up = TopUp()
    result = reaper.reap_once(top_up=top_up)
    assert result == {"stale": [job_id], "published": 1}
    assert top_up.calls == [(1, [job_id])]
    assert status(job_store, job_id) == ("queued", 1)


def test_fresh_heartbeat_is_left_alone_and_nothing_published(job_store):
    job_id = make_job(job_store)
    job_store.call(jobs.claim_job, job_id, worker="alive")
    top_up = TopUp()
    assert reaper.reap_once(top_up=top_up) == {"stale": [], "published": 0}
    assert top_up.calls == []
    assert status(job_store, job_id) == ("running", 1)


def test_only_jobs_queued_longer_than_reconcile_after_count(job_store):
    # The API publishes right after its commit: a young queued job is not the reaper's yet.
    make_job(job_store)
    top_up = TopUp()
    assert reaper.reap_once(top_up=top_up)["published"] == 0
    assert top_up.calls == []
    make_job(job_store, age_s=300)
    make_job(job_store, age_s=300)
    running = make_job(job_store, age_s=300)
    job_store.call(jobs.claim_job, running, worker="alive")
    assert reaper.reap_once(top_up=top_up)["published"] == 1
    assert top_up.calls == [(2, [])]


def test_a_broker_that_cannot_be_reached_fails_only_the_publishing(job_store):
    job_id = make_job(job_store)
    job_store.call(jobs.claim_job, job_id, worker="gone")
    job_store.call(_set, job_id, heartbeat_at=datetime.now(UTC) - timedelta(hours=1))

    def unreachable(claimable, *, requeued=()):
        raise ConnectionError("broker down")

    assert reaper.reap_once(top_up=unreachable) == {"stale": [job_id], "published": 0}
    assert status(job_store, job_id) == ("queued", 1)


@pytest.fixture
def broker(monkeypatch):
    """The machine's Redis (127.0.0.1:6379), a database of its own, emptied before and after."""
    redis = pytest.importorskip("redis")
    url = "redis://127.0.0.1:6379/11"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    monkeypatch.setenv("JUMPOUT_BROKER_URL", url)
    monkeypatch.setenv("JUMPOUT_DISPATCH_DEPTH", "2")
    get_settings.cache_clear()
    client.flushdb()
    yield client
    client.flushdb()


def test_the_reaper_keeps_dispatch_depth_messages_in_redis(job_store, broker):
    ids = [make_job(job_store, age_s=300) for _ in range(5)]
    assert reaper.reap_once()["published"] == 2
    assert broker.llen(queue.QUEUE) == 2
    # Enough already: another pass publishes nothing.
    assert reaper.reap_once()["published"] == 0
    # A worker took one (it is in flight, not waiting): the next pass replaces it.
    raw = broker.rpop(queue.QUEUE)
    assert list(queue.job_ids([raw])) == [""]  # a dispatch message names no job
    assert reaper.reap_once()["published"] == 1
    assert broker.llen(queue.QUEUE) == 2
    # One claimable job left and the queue emptied: one message is enough.
    for job_id in ids[:4]:
        job_store.call(jobs.claim_job, job_id, worker="w")
    broker.delete(queue.QUEUE)
    assert reaper.reap_once()["published"] == 1
    assert broker.llen(queue.QUEUE) == 1
