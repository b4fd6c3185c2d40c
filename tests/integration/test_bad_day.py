"""The service's bad day (issue 12), on the real processes: a full disk under the database, a full
disk while a job checkpoints, a broker that hangs.

One SQLite stack (Redis, uvicorn, a Celery worker, the reaper) whose database and artifact
directory each live on a small tmpfs of their own, which a test fills with a file until the
kernel says ENOSPC and empties afterwards (mounting needs root: skipped, with the reason,
without it). The home (logs, Redis) stays on the ordinary disk, so the processes' own logs are not
what runs out. Redis is hung with SIGSTOP, which keeps its TCP port accepting connections while
nothing answers: the worst case for a client.

Each test prints ``BAD DAY <name>: ...`` with what it measured (run with ``-s``);
``docs/reliability.md`` quotes them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MIN_FREE_BYTES = 1024 * 1024
TINY = {"dataset": "digits", "architecture": "mlp", "epochs": 1, "train_size": 64, "test_size": 64}


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` for the block; skips the test if it cannot."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (root needed): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        # Lazy: a process that outlived the stack may still hold a file there.
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a file in ``directory`` until its filesystem is full; returns the file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        for size in (1 << 16, 4096, 512, 1):  # down to the last byte
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * size)
    probe = directory / "probe"
    with pytest.raises(OSError) as refused, open(probe, "wb", buffering=0) as out:
        out.write(b"x" * 4096)
    probe.unlink(missing_ok=True)
    assert refused.value.errno == errno.ENOSPC
    return filler


@pytest.fixture(scope="module")
def bad_day(service_kit, tmp_path_factory):
    home = tmp_path_factory.mktemp("bad-day")
    with contextlib.ExitStack() as cleanup:
        database_dir = cleanup.enter_context(tmpfs(home / "database-fs", "8m"))
        # Room for every job of the module (a digits MLP checkpoint is 0.7 MB), until filled.
        artifact_dir = cleanup.enter_context(tmpfs(home / "artifact-fs", "64m"))
        redis = service_kit.RedisServer(home / "redis")
        cleanup.callback(redis.stop)
        stack = service_kit.Stack(
            home,
            database_url=f"sqlite:///{database_dir / 'jumpout.db'}",
            redis=redis,
            JUMPOUT_ARTIFACT_DIR=str(artifact_dir),
            JUMPOUT_MIN_FREE_BYTES=str(MIN_FREE_BYTES),
            JUMPOUT_RECONCILE_AFTER="3",
            JUMPOUT_MAX_QUEUED_PER_TOKEN="100000",
            # Not the faults' 8 s: no job here loses its worker, and the first one waits for
            # the trainer template's imports without a heartbeat (seconds on a loaded machine).
            JUMPOUT_HEARTBEAT_TIMEOUT="60",
        )
        cleanup.callback(stack.close)
        stack.migrate()
        for name in ("api", "reaper", "worker"):
            stack.start(name)
        # The trainer template warm, so that each test times its own fault only.
        warm_up = stack.wait_finished(stack.submit(**TINY)["id"], timeout=120)
        assert warm_up["status"] == "succeeded", stack.diagnostics(warm_up["id"])
        yield SimpleNamespace(stack=stack, database_dir=database_dir, artifact_dir=artifact_dir)


def volumes(stack) -> dict[str, dict]:
    return {volume["name"]: volume for volume in stack.client.get("/v1/health").json()["storage"]}


def trainer_log(bad_day, job_id: str) -> str:
    path = bad_day.artifact_dir / "jobs" / job_id / "trainer.log"
    return path.read_text(errors="replace") if path.exists() else ""


def test_a_full_disk_under_the_database_answers_507_and_health_says_degraded(bad_day):
    stack = bad_day.stack
    health = stack.client.get("/v1/health")
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    assert not volumes(stack)["database"]["low"]

    filler = fill(bad_day.database_dir)
    try:
        response = stack.client.post("/v1/jobs", json=TINY)
        assert response.status_code == 507, response.text
        error = response.json()["error"]
        assert error["code"] == "storage_full"
        assert error["message"].startswith("the server's disk is full"), error
        assert str(bad_day.database_dir) not in response.text  # no server path
        # Health still answers 200 (reads work) but says why writes fail.
        health = stack.client.get("/v1/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded", health.text
        database = volumes(stack)["database"]
        assert database["low"] and database["free_bytes"] < MIN_FREE_BYTES, database
        assert stack.client.get("/v1/jobs").status_code == 200
    finally:
        filler.unlink()
    # Space freed: the same request is taken.
    response = stack.client.post("/v1/jobs", json=TINY)
    assert response.status_code == 201, response.text
    assert stack.client.get("/v1/health").json()["status"] == "ok"
    finished = stack.wait_finished(response.json()["id"])
    assert finished["status"] == "succeeded", finished
    print(f"\nBAD DAY disk full at submit: 507 storage_full; health degraded ({database})")


def test_a_full_disk_while_checkpointing_fails_once_and_the_job_resumes_after_a_retry(bad_day):
    stack = bad_day.stack
    # About 0.03 s an epoch: 200 leave seconds of training when the disk is filled (with 12 the
    # job could finish between seeing epoch 2 and the fill).
    epochs = 200
    job = stack.submit(dataset="digits", architecture="mlp", epochs=epochs, train_size=256)
    job_id = job["id"]

    def listed() -> list[dict]:
        return stack.client.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"]

    deadline = time.monotonic() + 120
    while not any(item["epoch"] >= 2 for item in listed()):
        assert time.monotonic() < deadline, stack.diagnostics(job_id)
        time.sleep(0.05)
    filler = fill(bad_day.artifact_dir)
    try:
        failed = stack.wait_finished(job_id, timeout=120)
        assert failed["status"] == "failed", failed
        assert failed["attempt"] == 1, failed
        intact = max(listed(), key=lambda item: item["epoch"])
        error = failed["error"]
        assert error == (
            f"no space left on the server's disk while writing the checkpoint of epoch "
            f"{intact['epoch'] + 1}; the checkpoint of epoch {intact['epoch']} is intact; once "
            f"the operator has freed space, resume the job (POST /v1/jobs/{job_id}/retry)"
        ), error
        # The reaper's passes do not bring it back either.
        time.sleep(5)
        assert stack.job(job_id)["status"] == "failed"
    finally:
        filler.unlink()
    # The partial file is gone; the previous checkpoint verifies.
    job_dir = bad_day.artifact_dir / "jobs" / job_id
    assert not list(job_dir.glob(".checkpoint-*")), sorted(p.name for p in job_dir.iterdir())
    download = stack.client.get(f"/v1/jobs/{job_id}/checkpoints/{intact['id']}/file")
    assert download.status_code == 200, download.text
    assert hashlib.sha256(download.content).hexdigest() == intact["sha256"]

    retried = stack.client.post(f"/v1/jobs/{job_id}/retry")
    assert retried.status_code == 202, retried.text
    body = retried.json()
    assert (body["status"], body["attempt"], body["error"]) == ("queued", 1, None), body
    assert body["max_attempts"] == 1 + 3  # a fresh budget of the server's max_attempts
    done = stack.wait_finished(job_id, timeout=180)
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    assert stack.epochs(job_id) == list(range(1, epochs + 1))
    attempt_2 = trainer_log(bad_day, job_id).split("=== attempt 2 ===")[-1]
    assert "resuming job" in attempt_2, attempt_2[-2000:]
    print(
        f"\nBAD DAY disk full at checkpoint: failed once at epoch {intact['epoch'] + 1}, "
        f"resumed from epoch {intact['epoch']} after the retry"
    )


def test_a_full_disk_before_the_trainer_starts_fails_the_job_once_and_the_worker_goes_on(bad_day):
    stack = bad_day.stack
    filler = fill(bad_day.artifact_dir)
    try:
        # The supervisor cannot even prepare the job's directory: it fails the job itself,
        # without starting a trainer, and stays up for the next one.
        job_id = stack.submit(**TINY)["id"]
        failed = stack.wait_finished(job_id, timeout=120)
        assert (failed["status"], failed["attempt"]) == ("failed", 1), failed
        assert failed["error"] == (
            "no space left on the server's disk; no checkpoint was kept, so the job will start "
            "over; once the operator has freed space, resume the job "
            f"(POST /v1/jobs/{job_id}/retry)"
        )
    finally:
        filler.unlink()
    assert stack.client.post(f"/v1/jobs/{job_id}/retry").status_code == 202
    done = stack.wait_finished(job_id, timeout=120)
    assert (done["status"], done["attempt"]) == ("succeeded", 2), done


def test_a_crash_is_retried_and_its_error_is_readable_without_server_paths(bad_day):
    stack = bad_day.stack
    blocker = stack.submit(dataset="digits", architecture="mlp", epochs=300, train_size=256)
    stack.wait_running(blocker["id"], 0)  # the one worker is busy: the next job waits
    job_id = stack.submit(**TINY)["id"]
    # A directory where its first checkpoint goes: every attempt's write fails (EISDIR), a
    # crash that is not a full disk, so it is retried until its attempts are spent.
    (bad_day.artifact_dir / "jobs" / job_id / "checkpoint-epoch0001.pt").mkdir(parents=True)
    assert stack.client.post(f"/v1/jobs/{blocker['id']}/cancel").status_code == 202

    failed = stack.wait_finished(job_id, timeout=180)
    assert (failed["status"], failed["attempt"]) == ("failed", 3), failed
    error = failed["error"]
    assert error.startswith("attempt 3 of 3: CheckpointWriteError: "), error
    assert "could not write the checkpoint of epoch 1: Is a directory" in error, error
    assert error.endswith(f"(the full output: GET /v1/jobs/{job_id}/log)"), error
    assert str(bad_day.artifact_dir) not in error and "Traceback" not in error, error
    assert len(error) < 300, error
    # The full output, tracebacks included, is in the log, for each attempt.
    attempts = trainer_log(bad_day, job_id).split("=== attempt ")[1:]
    assert len(attempts) == 3 and all("Traceback" in output for output in attempts), attempts
    print(f"\nBAD DAY crash: {error}")


def api_threads(stack) -> int:
    return len(os.listdir(f"/proc/{stack.processes['api'].popen.pid}/task"))


def test_a_hung_broker_holds_no_submission_and_the_reaper_delivers_later(bad_day):
    stack = bad_day.stack
    redis = stack.redis.process.popen
    stack.submit(**TINY)  # the publishing path warm
    threads_before = api_threads(stack)
    os.kill(redis.pid, signal.SIGSTOP)
    latencies: list[float] = []
    try:

        def submit(client: httpx.Client) -> str:
            started = time.monotonic()
            response = client.post("/v1/jobs", json=TINY)
            latencies.append(time.monotonic() - started)
            assert response.status_code == 201, response.text
            return response.json()["id"]

        def submit_alone(_n: int) -> str:
            with httpx.Client(base_url=str(stack.client.base_url), timeout=30) as client:
                return submit(client)

        # Ten one after the other on one kept-alive connection, then ten at once.
        job_ids = [submit(stack.client) for _ in range(10)]
        with ThreadPoolExecutor(10) as pool:
            job_ids += list(pool.map(submit_alone, range(10)))
        started = time.monotonic()
        experiment = stack.client.post(
            "/v1/experiments", json={"base": TINY, "preset": "table2", "seeds": 1}
        )
        latencies.append(time.monotonic() - started)
        assert experiment.status_code == 201, experiment.text
        started = time.monotonic()
        health = stack.client.get("/v1/health")
        health_s = time.monotonic() - started
        assert health.status_code == 503 and health.json()["broker"] == "unavailable"
        threads_during = api_threads(stack)
    finally:
        os.kill(redis.pid, signal.SIGCONT)
    assert max(latencies) < 1.0, sorted(latencies)  # the publish waits for no one
    assert health_s < 3.0, health_s
    assert threads_during <= threads_before + 4, (threads_before, threads_during)
    listed = stack.client.get(
        "/v1/jobs", params={"experiment_id": experiment.json()["id"], "limit": 100}
    ).json()["items"]
    job_ids += [item["id"] for item in listed]
    assert len(job_ids) == 22
    # Nothing was lost: the reaper publishes for the jobs the API could not announce.
    recovered = time.monotonic()
    for job_id in job_ids:
        finished = stack.wait_finished(job_id, timeout=240)
        assert finished["status"] == "succeeded" and finished["attempt"] == 1, (
            finished["status"],
            finished["attempt"],
            finished["error"],
            trainer_log(bad_day, job_id)[-3000:],
        )
    print(
        f"\nBAD DAY hung broker: 21 submissions answered in at most {max(latencies):.2f} s "
        f"(median {sorted(latencies)[len(latencies) // 2]:.2f} s), health in {health_s:.2f} s, "
        f"API threads {threads_before} -> {threads_during}; all 22 jobs done "
        f"{time.monotonic() - recovered:.1f} s after SIGCONT"
    )
