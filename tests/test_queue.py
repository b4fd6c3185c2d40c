"""The job message the service pushes to Redis is the one Celery's own `send_task` would write
(kombu's Redis envelope, Celery's protocol 2), so that a worker, and the reaper reading the queue,
cannot tell them apart. Uses the machine's Redis (127.0.0.1:6379, a database of its own)."""

from __future__ import annotations

import base64
import json

import pytest
import redis

from jobstore import queue
from jobstore.settings import get_settings

URL = "redis://127.0.0.1:6379/13"
JOB_ID = "0123456789abcdef0123456789abcdef"
PER_MESSAGE = {"id", "root_id", "correlation_id", "delivery_tag", "reply_to"}


@pytest.fixture
def broker(monkeypatch):
    monkeypatch.setenv("JUMPOUT_BROKER_URL", URL)
    get_settings.cache_clear()
    client = redis.Redis.from_url(URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379 (make services starts one)")
    client.flushdb()
    yield client
    client.flushdb()
    get_settings.cache_clear()


def pushed(client) -> dict:
    (raw,) = client.lrange(queue.QUEUE, 0, -1)
    client.delete(queue.QUEUE)
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    for part in ("headers", "properties"):
        message[part] = {k: v for k, v in message[part].items() if k not in PER_MESSAGE}
    return message


def test_the_pushed_message_is_what_send_task_writes(broker):
    queue.celery_app().send_task(queue.RUN_JOB_TASK, args=[JOB_ID], queue=queue.QUEUE)
    expected = pushed(broker)
    queue.enqueue_job(JOB_ID)
    assert pushed(broker) == expected
    assert expected["body"][0] == [JOB_ID]


def test_the_event_loop_publishes_the_same_message(broker):
    import asyncio

    queue.enqueue_job(JOB_ID)
    expected = pushed(broker)
    asyncio.run(queue.enqueue_job_async(JOB_ID))
    assert pushed(broker) == expected


def test_the_job_id_is_read_back_from_the_queue(broker):
    # What the reaper's reconciler does to find the jobs the broker holds.
    queue.enqueue_job(JOB_ID)
    assert list(queue.job_ids(broker.lrange(queue.QUEUE, 0, -1))) == [JOB_ID]


def test_an_unreachable_broker_fails_within_the_publish_timeout(monkeypatch):
    import asyncio
    import time

    # A port nothing listens on: refused at once; a hung broker is bounded by PUBLISH_TIMEOUT_S.
    monkeypatch.setenv("JUMPOUT_BROKER_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    started = time.monotonic()
    try:
        assert asyncio.run(queue.try_enqueue(JOB_ID)) is False
    finally:
        get_settings.cache_clear()
    assert time.monotonic() - started < 2 * queue.PUBLISH_TIMEOUT_S


# --- the capacity rule: the broker holds wake-up messages, at most dispatch_depth ---------------


@pytest.fixture
def depth(broker, monkeypatch):
    monkeypatch.setenv("JUMPOUT_DISPATCH_DEPTH", "2")
    get_settings.cache_clear()
    return 2


def test_a_submission_publishes_only_below_the_dispatch_depth(broker, depth):
    published = [queue.enqueue_job(f"{n:032x}") for n in range(5)]
    assert published == [True, True, False, False, False]
    assert broker.llen(queue.QUEUE) == depth
    # The oldest two messages stay, naming the jobs that sent them (only a label).
    assert sorted(queue.job_ids(broker.lrange(queue.QUEUE, 0, -1))) == [f"{0:032x}", f"{1:032x}"]
    broker.rpop(queue.QUEUE)  # a worker took one
    assert queue.enqueue_job(JOB_ID) is True
    assert broker.llen(queue.QUEUE) == depth


def test_concurrent_submissions_cannot_overfill_the_queue(broker, depth):
    import threading

    start = threading.Barrier(16)

    def publish() -> None:
        start.wait()
        for _ in range(5):
            queue.enqueue_job(JOB_ID)

    threads = [threading.Thread(target=publish) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert broker.llen(queue.QUEUE) == depth


def test_the_event_loop_follows_the_same_rule(broker, depth):
    import asyncio

    async def submit_three() -> list[bool]:
        return [await queue.enqueue_job_async(JOB_ID) for _ in range(3)]

    assert asyncio.run(submit_three()) == [True, True, False]
    assert broker.llen(queue.QUEUE) == depth
    assert asyncio.run(queue.try_enqueue(JOB_ID)) is True  # a full queue is not a failure


def test_top_up_fills_to_the_smaller_of_claimable_jobs_and_the_depth(broker, depth):
    assert queue.top_up(0) == 0
    assert queue.top_up(1) == 1
    assert queue.top_up(1) == 0
    assert queue.top_up(50) == 1
    assert queue.top_up(50) == 0
    assert queue.waiting_messages() == depth
    broker.delete(queue.QUEUE)
    assert queue.top_up(50, requeued=[JOB_ID]) == depth
    assert list(queue.job_ids(broker.lrange(queue.QUEUE, 0, -1))) == [JOB_ID, JOB_ID]


def test_a_broker_whose_queue_cannot_be_measured_gets_one_message_per_requeued_job(monkeypatch):
    monkeypatch.setenv("JUMPOUT_BROKER_URL", "memory://")
    get_settings.cache_clear()
    sent: list[str] = []
    monkeypatch.setattr(queue, "enqueue_job", sent.append)
    try:
        assert queue.top_up(10) == 0
        assert queue.top_up(10, requeued=["a" * 32, "b" * 32]) == 2
        assert queue.waiting_messages() is None
    finally:
        get_settings.cache_clear()
    assert sent == ["a" * 32, "b" * 32]


def test_publishing_an_experiments_jobs_stops_when_the_queue_is_full(broker, monkeypatch):
    # An experiment's 50 jobs: on Redis only dispatch_depth messages can wait, so the rest are
    # not even tried (the workers top the queue up as they claim).
    import asyncio

    tried = []
    publish = queue.enqueue_job_async

    async def counting(job_id):
        tried.append(job_id)
        return await publish(job_id)

    monkeypatch.setattr(queue, "enqueue_job_async", counting)
    ids = [f"{n:032x}" for n in range(50)]
    assert asyncio.run(queue.try_enqueue_all(ids))
    depth = queue.dispatch_depth()
    assert broker.llen(queue.QUEUE) == depth
    assert tried == ids[: depth + 1]  # the last one found the queue full
