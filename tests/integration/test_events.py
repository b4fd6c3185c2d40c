"""The job's event stream and its log with real processes: uvicorn, a Celery worker, the reaper,
Redis (pub/sub) and SQLite. One digits/mlp job is watched over SSE from its submission: snapshot,
status, epochs in order, end; the watcher drops the connection mid-job and resumes with
Last-Event-ID (no epoch twice, none missing); the trainer's log is read by offset and followed.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading

import httpx
import pytest

pytestmark = pytest.mark.timeout(300)

EPOCHS = 60  # about 0.06 s each: the job is still running when the stream is dropped
SPEC = {"dataset": "digits", "architecture": "mlp", "epochs": EPOCHS, "train_size": 1024}


@pytest.fixture(scope="module")
def sqlite_stack(service_kit, tmp_path_factory):
    home = tmp_path_factory.mktemp("events-stack")
    redis = service_kit.RedisServer(home / "redis")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(redis.stop)
        stack = service_kit.Stack(
            home, database_url=f"sqlite:///{home / 'jumpout.db'}", redis=redis
        )
        cleanup.callback(stack.close)
        stack.migrate()
        for name in ("api", "reaper", "worker"):
            stack.start(name)
        yield stack


def read_events(response: httpx.Response, stop_after=None):
    """Yield the events of an SSE response as dicts (id, event, data); comments skipped."""
    event: dict = {}
    for line in response.iter_lines():
        if not line:
            if "event" in event:
                yield event
                if stop_after is not None and stop_after(event):
                    return
            event = {}
        elif not line.startswith((":", "retry:")):
            name, _, value = line.partition(": ")
            event[name] = json.loads(value) if name == "data" else value


def test_watch_a_job_resume_mid_job_and_read_its_log(sqlite_stack):
    stack = sqlite_stack
    base = stack.client.base_url
    job = stack.submit(**SPEC)
    url = f"{base}/v1/jobs/{job['id']}/events"
    first: list[dict] = []
    with httpx.Client(timeout=httpx.Timeout(30, read=60)) as client:
        with client.stream("GET", url) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            # Drop the connection at the first epoch event, mid-job.
            for event in read_events(response, lambda e: e["event"] == "epoch"):
                first.append(event)
        names = [e["event"] for e in first]
        assert names[0] == "snapshot", names
        assert first[0]["data"]["job"]["id"] == job["id"]
        assert "end" not in names, "the job ended before the test could drop the connection"
        # "running" as a status event, or already in the snapshot when the worker claimed the
        # job before the stream connected.
        statuses = [first[0]["data"]["job"]["status"]]
        statuses += [e["data"]["status"] for e in first if e["event"] == "status"]
        assert "running" in statuses, statuses
        last_id = first[-1]["id"]
        with client.stream("GET", url, headers={"Last-Event-ID": last_id}) as response:
            second = list(read_events(response))
    names = [e["event"] for e in second]
    assert "snapshot" not in names and names[-1] == "end", names
    assert second[-1]["data"]["status"] == "succeeded"
    epochs = [e["data"]["epoch"] for e in first + second if e["event"] == "epoch"]
    snapshot_epochs = [m["epoch"] for m in first[0]["data"]["metrics"]]
    assert snapshot_epochs + epochs == list(range(1, EPOCHS + 1)), (snapshot_epochs, epochs)
    progress = [e["data"] for e in first + second if e["event"] == "progress"]
    for item in progress:
        assert 0 <= item["fraction"] <= 1 and item["steps"] >= item["step"] >= 1
    # Ids only move forward within an attempt: epochs in the ids match the events.
    assert all(
        e["id"].startswith(f"{e['data']['epoch']}-") for e in second if e["event"] == "epoch"
    )

    # The log: by offset (complete: the job is final), then followed from the middle.
    log_url = f"{base}/v1/jobs/{job['id']}/log"
    whole = httpx.get(log_url)
    assert whole.status_code == 200 and "=== attempt 1 ===" in whole.text
    # The engine's progress: a line per epoch, with its losses and accuracies.
    lines = re.findall(r"epoch (\d+): train loss [\d.]+ acc [\d.]+%", whole.text)
    assert sorted({int(epoch) for epoch in lines}) == list(range(1, job["spec"]["epochs"] + 1))
    assert whole.headers["x-log-complete"] == "true"
    size = int(whole.headers["x-log-next-offset"])
    assert size == len(whole.content)
    half = size // 2
    tail = httpx.get(log_url, params={"offset": half})
    assert tail.content == whole.content[half:] and tail.headers["x-log-complete"] == "true"
    followed = httpx.get(log_url, params={"offset": half, "follow": "true"}, timeout=30)
    assert followed.content == whole.content[half:]


def test_follow_the_log_of_a_running_job(sqlite_stack):
    stack = sqlite_stack
    job = stack.submit(**SPEC)
    received = bytearray()
    done = threading.Event()

    def follow():
        url = f"{stack.client.base_url}/v1/jobs/{job['id']}/log"
        with httpx.stream("GET", url, params={"follow": "true"}, timeout=120) as response:
            assert response.headers["x-log-offset"] == "0"
            for chunk in response.iter_bytes():
                received.extend(chunk)
        done.set()

    thread = threading.Thread(target=follow)
    thread.start()
    finished = stack.wait_finished(job["id"], timeout=120)
    thread.join(timeout=30)
    assert done.is_set() and finished["status"] == "succeeded"
    whole = httpx.get(f"{stack.client.base_url}/v1/jobs/{job['id']}/log")
    assert bytes(received) == whole.content and whole.headers["x-log-complete"] == "true"
