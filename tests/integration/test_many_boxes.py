"""Workers on other boxes (issue 11 §4), as processes on this machine that share nothing but URLs.

The API's box: PostgreSQL (a box of its own in a deployment), Redis, the API, the reaper and the
artifact service (`api.artifact_service`), under one home. Each "remote" worker has a home of its
own (its own artifact_dir and data_dir, no directory in common with the API's) and is given only
the broker's URL, the database's URL, the artifact service's URL and the workers' secret, as a
second box joins (docker-compose.worker.yml). A job such a worker runs is listed, its metrics
read, its checkpoint downloaded with a matching sha256 and its log read, all through the API;
and a job whose box dies is resumed on another box from the checkpoint the first one uploaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    Process,
    RedisServer,
    Stack,
    _trainer_pids,
    base_env,
    free_port,
    postgres_database,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SECRET = "many-boxes-test-secret-0123456789"


class ApiBox(Stack):
    """The API's box: `Stack` plus the artifact service on a port of its own."""

    def start_artifact_service(self) -> str:
        port = free_port()
        argv = [
            sys.executable, "-m", "uvicorn", "api.artifact_service:app", "--host", "127.0.0.1",
            "--port", str(port), "--no-access-log",
        ]  # fmt: skip
        process = Process("artifacts", argv, env=self.env, log_dir=self.logs)
        self.processes["artifacts"] = process
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        import httpx

        while True:
            try:
                httpx.get(f"{url}/v1/internal/health", timeout=2).raise_for_status()
                return url
            except httpx.HTTPError:
                if process.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"no artifact service:\n{process.output()}") from None
                time.sleep(0.2)


def start_remote_worker(home: Path, *, name: str, database_url: str, broker_url: str,
                        artifact_url: str) -> Process:  # fmt: skip
    """A worker on "another box": its own home; URLs and the secret are all it is given."""
    home.mkdir(parents=True, exist_ok=True)
    env = base_env(
        home, database_url, broker_url,
        JUMPOUT_ARTIFACT_URL=artifact_url,
        JUMPOUT_WORKER_SECRET=SECRET,
        JUMPOUT_WORKER_NAME=name,
    )  # fmt: skip
    argv = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel",
        "INFO", "-n", f"{name}@%h", "--without-mingle", "--without-gossip",
    ]  # fmt: skip
    process = Process(f"worker-{name}", argv, env=env, log_dir=home)
    Stack._wait_for_log(process, "ready.")
    return process


@pytest.fixture(scope="module")
def boxes(tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("boxes")
    with contextlib.ExitStack() as cleanup:
        database_url = cleanup.enter_context(postgres_database())
        redis = RedisServer(root / "api-box" / "redis")
        cleanup.callback(redis.stop)
        # The reaper's heartbeat timeout: longer than base_env's 8 s, as a fresh box's first
        # job waits for its trainer template to import torch (seconds on a loaded machine).
        api = ApiBox(root / "api-box", database_url=database_url, redis=redis,
                     JUMPOUT_WORKER_SECRET=SECRET, JUMPOUT_HEARTBEAT_TIMEOUT="30")  # fmt: skip
        cleanup.callback(api.close)
        api.migrate()
        api.start("api")
        api.start("reaper")
        artifact_url = api.start_artifact_service()

        def worker(name: str) -> Process:
            process = start_remote_worker(
                root / f"box-{name}", name=name, database_url=database_url,
                broker_url=redis.url(), artifact_url=artifact_url,
            )  # fmt: skip
            api.processes[f"worker-{name}"] = process  # stopped with the stack; in diagnostics
            return process

        yield {"api": api, "worker": worker, "root": root}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def api_log(api: Stack, job_id: str) -> str:
    response = api.client.get(f"/v1/jobs/{job_id}/log", params={"offset": 0})
    assert response.status_code == 200, response.text
    return response.text


def test_a_job_run_by_a_remote_worker_is_served_by_the_api(boxes):
    api, root = boxes["api"], boxes["root"]
    boxes["worker"]("b")
    job = api.submit(dataset="digits", architecture="mlp", epochs=3, val_fraction=0.1)
    done = api.wait_finished(job["id"], timeout=120)
    assert done["status"] == "succeeded", api.diagnostics(job["id"])
    assert done["worker"] == "b"

    listed = api.client.get("/v1/jobs", params={"status": "succeeded"}).json()["items"]
    assert job["id"] in [item["id"] for item in listed]
    assert api.epochs(job["id"]) == [1, 2, 3]

    # The checkpoint, from the API's box, is the file the remote worker wrote, byte for byte.
    checkpoints = api.client.get(f"/v1/jobs/{job['id']}/checkpoints").json()["items"]
    assert checkpoints and max(c["epoch"] for c in checkpoints) == 3
    response = api.client.get(f"/v1/jobs/{job['id']}/checkpoints/latest/file")
    assert response.status_code == 200, response.text
    assert sha256(response.content) == response.headers["X-Checksum-SHA256"]
    newest = max(checkpoints, key=lambda c: c["epoch"])
    assert sha256(response.content) == newest["sha256"]
    local = root / "box-b" / "artifacts" / "jobs" / job["id"] / "checkpoint-epoch0003.pt"
    assert sha256(local.read_bytes()) == newest["sha256"]
    served = api.home / "artifacts" / "jobs" / job["id"] / "checkpoint-epoch0003.pt"
    assert served.read_bytes() == local.read_bytes()  # two copies: no directory is shared

    # The log: the remote trainer's output, whole once the job is final.
    response = api.client.get(f"/v1/jobs/{job['id']}/log", params={"offset": 0})
    assert response.headers["X-Log-Complete"] == "true"
    assert "=== attempt 1 ===" in response.text and "epoch 3" in response.text
    local_log = (root / "box-b" / "artifacts" / "jobs" / job["id"] / "trainer.log").read_text()
    assert response.text == local_log


@pytest.mark.slow
def test_a_job_whose_box_dies_resumes_on_another_box_from_the_uploaded_checkpoint(boxes):
    api = boxes["api"]
    box_b = api.processes.get("worker-b") or boxes["worker"]("b")
    job = api.submit(dataset="digits", architecture="mlp", epochs=300)
    api.wait_running(job["id"], 3)
    # Box b dies: its worker and the trainer, at once (nothing checkpoints on the way out).
    trainers = _trainer_pids(job["id"])
    box_b.kill()
    for pid in trainers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    api.processes.pop("worker-b")
    requeued = api.wait_for(job["id"], lambda j: j["status"] == "queued", timeout=60)
    uploaded = api.client.get(f"/v1/jobs/{job['id']}/checkpoints").json()["items"]
    assert uploaded, "box b uploaded no checkpoint before it died"
    resume_epoch = max(c["epoch"] for c in uploaded)

    boxes["worker"]("c")
    running = api.wait_for(
        job["id"],
        lambda j: j["status"] == "running" and j["attempt"] >= 2
        and j["progress"]["epoch"] > resume_epoch,
        timeout=180,
    )  # fmt: skip
    assert running["worker"] == "c"
    # The log reaches the API's box a shipment (about a second) after the trainer wrote it.
    downloaded = f"downloaded checkpoint-epoch{resume_epoch:04d}.pt from the artifact service"
    deadline = time.monotonic() + 30
    while downloaded not in (log := api_log(api, job["id"])) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert downloaded in log, log[-2000:]
    # Box b's own output reached the API only if a shipment (once a second) left before it died.
    assert "=== attempt 2 ===" in log
    if "=== attempt 1 ===" in log:
        assert log.index("=== attempt 1 ===") < log.index("=== attempt 2 ===")
    assert api.client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    final = api.wait_finished(job["id"], timeout=90)
    assert final["status"] == "cancelled" and final["attempt"] >= 2, requeued
    epochs = api.epochs(job["id"])
    assert epochs == list(range(1, len(epochs) + 1)) and epochs[-1] > resume_epoch
    response = api.client.get(f"/v1/jobs/{job['id']}/checkpoints/latest/file")
    assert sha256(response.content) == response.headers["X-Checksum-SHA256"]
    kept = api.client.get(f"/v1/jobs/{job['id']}/checkpoints").json()["items"]
    assert len(kept) <= 3 + 1  # keep_last plus the best: pruned on the API's box too
