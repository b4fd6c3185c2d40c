"""Faults that must be survived, with nothing lost (issue 5), on the real processes: Redis,
uvicorn, a Celery worker, the reaper and trainer children. Each test injects one fault and checks
the outcome; each prints ``RECOVERY <name>: <seconds>`` (run with ``-s`` to see them), the time
from the fault to the job running again or finishing, which ``docs/reliability.md`` quotes.

Most tests share one SQLite stack (the state machine is the same on PostgreSQL, which the service
tests cover); the database outage needs PostgreSQL and the burst its own stack. Short heartbeat
timeout (8 s), reaper interval (2 s) and reconcile delay (3 s) keep each recovery to seconds.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from celery import Celery

from jobstore.queue import QUEUE, RUN_JOB_TASK
from jumpout import catalog

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FINISHED = ("succeeded", "failed", "cancelled")
FAST_ENV = {
    "JUMPOUT_RECONCILE_AFTER": "3",
    "JUMPOUT_MAX_QUEUED_PER_TOKEN": "100000",
}
TINY = {"dataset": "digits", "architecture": "mlp", "epochs": 1, "train_size": 64, "test_size": 64}
QUICK = {"dataset": "digits", "architecture": "mlp", "epochs": 2, "train_size": 256}
LONG = {"dataset": "digits", "architecture": "mlp", "epochs": 300}


def report(name: str, seconds: float) -> None:
    print(f"\nRECOVERY {name}: {seconds:.1f} s")


def make_stack(kit, home: Path, database_url: str, cleanup: contextlib.ExitStack, **env: str):
    redis = kit.RedisServer(home / "redis")
    cleanup.callback(lambda: stop_redis(redis))
    service = kit.Stack(home, database_url=database_url, redis=redis, **{**FAST_ENV, **env})
    cleanup.callback(service.close)
    service.migrate()
    for name in ("api", "reaper", "worker"):
        service.start(name)
    return service


def stop_redis(redis) -> None:
    redis.process.stop()


@pytest.fixture(scope="module")
def stack(service_kit, tmp_path_factory):
    home = tmp_path_factory.mktemp("faults-sqlite")
    with contextlib.ExitStack() as cleanup:
        yield make_stack(service_kit, home, f"sqlite:///{home / 'jumpout.db'}", cleanup)


# --- helpers ----------------------------------------------------------------------------------


def wait_until(condition, *, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def checkpoints(stack, job_id: str) -> list[dict]:
    return stack.client.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"]


def trainer_log(stack, job_id: str) -> str:
    path = stack.home / "artifacts" / "jobs" / job_id / "trainer.log"
    return path.read_text() if path.exists() else ""


def kill_trainer(stack, job_id: str, sig: int = signal.SIGKILL) -> None:
    pids = wait_until(lambda: stack.trainer_pids(job_id), timeout=30, what="the trainer")
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def send_duplicate(stack, job_id: str) -> None:
    """What Redis does after a visibility timeout or a lost ack: deliver the same task again."""
    app = Celery("it", broker=stack.redis.url(), set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=QUEUE)


def redeliver_unacked(stack, job_id: str) -> str:
    """Move the job's unacknowledged message back to the queue (what kombu's Redis transport
    does once the visibility timeout has passed); returns its delivery tag."""
    client = stack.redis.client()
    for tag, value in client.hgetall("unacked").items():
        message, _exchange, routing_key = json.loads(value)
        if job_id in json.dumps(message) or job_id in str(base64_body(message)):
            with client.pipeline() as pipe:
                pipe.lpush(routing_key or QUEUE, json.dumps(message))
                pipe.hdel("unacked", tag)
                pipe.zrem("unacked_index", tag)
                pipe.execute()
            return tag.decode()
    raise AssertionError(f"no unacknowledged message of job {job_id} in Redis")


def base64_body(message: dict) -> bytes:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return base64.b64decode(message["body"])
    return b""


def queue_drained(stack) -> bool:
    client = stack.redis.client()
    return client.llen(QUEUE) == 0 and client.hlen("unacked") == 0


def download(stack, job_id: str, checkpoint_id: int) -> httpx.Response:
    return stack.client.get(f"/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/file")


def flip_byte(path: Path, offset: int = 200) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


# --- 1. the trainer killed mid-epoch ----------------------------------------------------------


@pytest.mark.slow
def test_trainer_sigkill_resumes_and_gives_the_same_weights_as_an_uninterrupted_run(stack):
    # 40 epochs (about 0.06 s each): the trainer must still be there when the poll sees epoch 3.
    spec = {"dataset": "digits", "architecture": "mlp", "epochs": 40, "seed": 1234}
    job = stack.submit(**spec)
    stack.wait_running(job["id"], 3)
    kill_trainer(stack, job["id"])  # epoch 3 has ended: the trainer is inside epoch 4
    killed = time.monotonic()
    stack.wait_attempt(job["id"], 2, timeout=60)
    report("trainer SIGKILL -> attempt 2 running", time.monotonic() - killed)
    done = stack.wait_finished(job["id"], timeout=180)
    report("trainer SIGKILL -> job succeeded", time.monotonic() - killed)
    assert done["status"] == "succeeded", stack.diagnostics(job["id"])
    assert done["attempt"] == 2
    assert stack.epochs(job["id"]) == list(range(1, spec["epochs"] + 1))
    assert "resuming" in trainer_log(stack, job["id"])

    last = max(checkpoints(stack, job["id"]), key=lambda c: c["epoch"])
    assert last["epoch"] == spec["epochs"]
    response = download(stack, job["id"], last["id"])
    assert response.status_code == 200
    served = torch.load(io.BytesIO(response.content), weights_only=True)["model"]

    # The same resolved spec, uninterrupted, in this process, on the CPU.
    from jumpout.engine import fit
    from jumpout.spec import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {key: value for key, value in done["spec"].items() if key in fields}
    out_dir = stack.home / "reference-run"
    values.update(out_dir=str(out_dir), data_dir=str(stack.home / "data"), device="cpu")
    result = fit(TrainConfig(**values))
    reference = torch.load(result.last_checkpoint, weights_only=True)["model"]
    assert served.keys() == reference.keys()
    different = [key for key in served if not torch.equal(served[key], reference[key])]
    assert different == [], f"weights differ from the uninterrupted run: {different}"


# --- 2. the whole worker killed; the original message redelivered afterwards ------------------


@pytest.mark.slow
def test_worker_sigkill_is_reaped_resumed_and_a_late_redelivery_is_a_no_op(stack):
    spec = {**QUICK, "epochs": 60, "train_size": 1024}  # still running at the kill
    job = stack.submit(**spec)
    stack.wait_running(job["id"], 1)
    stack.processes.pop("worker").kill()  # Celery parent, pool process: SIGKILL to the group
    for pid in stack.trainer_pids(job["id"]):  # and the trainer, as if the machine died
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    stack.start("worker")
    stack.wait_attempt(job["id"], 2, timeout=90)
    report("worker SIGKILL -> attempt 2 running (heartbeat timeout 8 s)", time.monotonic() - killed)
    done = stack.wait_finished(job["id"], timeout=180)
    report("worker SIGKILL -> job succeeded", time.monotonic() - killed)
    assert done["status"] == "succeeded", stack.diagnostics(job["id"])
    assert done["attempt"] == 2
    metrics = stack.client.get(f"/v1/jobs/{job['id']}/metrics").json()["items"]
    assert [row["epoch"] for row in metrics] == list(range(1, spec["epochs"] + 1))

    # The killed worker's message is still unacknowledged in Redis; it would come back after the
    # visibility timeout (days). Bring it back now, as kombu's restore does.
    tag = redeliver_unacked(stack, job["id"])
    client = stack.redis.client()
    wait_until(
        lambda: client.llen(QUEUE) == 0 and not client.hexists("unacked", tag),
        timeout=30, what="the redelivered message to be consumed",
    )  # fmt: skip
    time.sleep(1.5)
    again = stack.job(job["id"])
    assert (again["status"], again["attempt"]) == ("succeeded", 2)
    assert stack.client.get(f"/v1/jobs/{job['id']}/metrics").json()["items"] == metrics
    assert trainer_log(stack, job["id"]).count("=== attempt") == 2


# --- 3. Redis restarted or flushed ------------------------------------------------------------


def restart_redis(redis, kit) -> None:
    """Kill Redis and start it again on the same port with nothing in it (no persistence)."""
    argv = list(redis.process.popen.args)
    redis.process.kill()
    redis.process._log.close()
    redis.process = kit.Process(
        "redis", argv, env=dict(os.environ), log_dir=redis.process.log_path.parent
    )
    redis._wait()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["restart", "flushall"])
def test_redis_loss_forgets_no_queued_job_and_running_jobs_finish(stack, service_kit, how):
    # About 10 s of epochs on the 2-core VM (an epoch of 1024 digits takes about 0.06 s): the
    # job must still be running when Redis goes (a CI run's 10 epochs had finished by then, and
    # the free worker had taken a message).
    running = stack.submit(**{**QUICK, "epochs": 150, "train_size": 1024})
    stack.wait_running(running["id"], 1)
    queued = [stack.submit(**TINY) for _ in range(3)]
    # Wake-up messages, at most dispatch_depth (2), not one per job (jobstore.queue). The API
    # publishes after sending each 201: wait for two, then give the third time to be refused.
    broker = stack.redis.client()
    wait_until(lambda: broker.llen(QUEUE) == 2, timeout=15, what="two dispatch messages")
    time.sleep(0.5)
    assert broker.llen(QUEUE) == 2
    if how == "restart":
        restart_redis(stack.redis, service_kit)
    else:
        stack.redis.client().flushall()
    assert stack.redis.client().llen(QUEUE) == 0  # the broker forgot them
    assert stack.job(running["id"])["status"] == "running"  # lost under a running job
    lost = time.monotonic()
    done = stack.wait_finished(running["id"], timeout=120)
    assert done["status"] == "succeeded", stack.diagnostics(running["id"])
    assert done["attempt"] == 1
    assert stack.epochs(running["id"]) == list(range(1, 151))
    for job in queued:
        finished = stack.wait_finished(job["id"], timeout=120)
        assert finished["status"] == "succeeded", stack.diagnostics(job["id"])
        assert finished["attempt"] == 1
    report(f"Redis {how} -> all 4 jobs finished", time.monotonic() - lost)
    assert "too few dispatch messages in the broker" in stack.processes["reaper"].output()


# --- 4. the API restarted ---------------------------------------------------------------------


def test_api_restart_does_not_touch_running_jobs(stack):
    job = stack.submit(**{**QUICK, "epochs": 100, "train_size": 1024})  # outlives the restart
    stack.wait_running(job["id"], 1)
    stopped = time.monotonic()
    stack.stop("api")
    with pytest.raises(httpx.TransportError):
        stack.client.get("/v1/health", timeout=2)
    time.sleep(2)
    stack.start("api")
    report("API restart -> polling answers again", time.monotonic() - stopped)
    done = stack.wait_finished(job["id"], timeout=120)
    assert done["status"] == "succeeded", stack.diagnostics(job["id"])
    assert done["attempt"] == 1
    assert stack.epochs(job["id"]) == list(range(1, 101))


# --- 5. the database briefly unavailable (PostgreSQL) -----------------------------------------


def pg_cluster(action: str) -> None:
    version = os.listdir("/etc/postgresql")[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        check=True, timeout=60, capture_output=True,
    )  # fmt: skip


@pytest.mark.slow
def test_database_outage_retries_metric_writes_and_the_job_finishes(service_kit, tmp_path):
    if not os.path.isdir("/etc/postgresql") or os.geteuid() != 0:
        pytest.skip("needs the machine's PostgreSQL cluster and root to stop it")
    with contextlib.ExitStack() as cleanup:
        url = cleanup.enter_context(service_kit.postgres_database())
        # A heartbeat timeout well above the outage: this test is about writes, not reaping.
        stack = make_stack(service_kit, tmp_path, url, cleanup, JUMPOUT_HEARTBEAT_TIMEOUT="30")
        epochs = 100  # about 6 s of training: epochs end during the outage
        job = stack.submit(**{**QUICK, "epochs": epochs, "train_size": 1024})
        stack.wait_running(job["id"], 2)
        started = time.monotonic()
        try:
            pg_cluster("stop")
            time.sleep(5)  # epochs end meanwhile: their metric writes must wait, not vanish
        finally:
            pg_cluster("start")
        outage = time.monotonic() - started

        def answered():
            with contextlib.suppress(httpx.TransportError, AssertionError):
                return stack.job(job["id"])

        wait_until(answered, timeout=60, what="the API to reach the database again")
        done = stack.wait_finished(job["id"], timeout=180)
        report(f"PostgreSQL down {outage:.0f} s -> job succeeded", time.monotonic() - started)
        assert done["status"] == "succeeded", stack.diagnostics(job["id"])
        assert done["attempt"] == 1
        assert stack.epochs(job["id"]) == list(range(1, epochs + 1))
        log = trainer_log(stack, job["id"])
        assert "database unavailable" in log, log[-3000:]


# --- 6. a checkpoint interrupted or corrupted -------------------------------------------------


@pytest.mark.slow
def test_corrupted_newest_checkpoint_is_refused_and_resume_uses_the_previous_one(stack):
    # Enough epochs to be caught running at epoch 3 by a poll every 0.2 s: eight epochs of 1024
    # images took 0.4 s from a forked trainer.
    epochs = 100
    job = stack.submit(**{**QUICK, "epochs": epochs, "train_size": 1024})
    stack.wait_running(job["id"], 3)
    pids = stack.trainer_pids(job["id"])
    for pid in pids:  # freeze it: no checkpoint is written while we look
        os.kill(pid, signal.SIGSTOP)
    try:
        items = sorted(checkpoints(stack, job["id"]), key=lambda c: c["epoch"])
        newest, previous = items[-1], items[-2]
        job_dir = stack.home / "artifacts" / "jobs" / job["id"]
        flip_byte(job_dir / f"checkpoint-epoch{newest['epoch']:04d}.pt")
        # What a kill during torch.save leaves: a truncated temp file next to the checkpoints.
        (job_dir / f".checkpoint-epoch{newest['epoch'] + 1:04d}.pt.tmp").write_bytes(b"PK\x03")
        refused = download(stack, job["id"], newest["id"])
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "checksum_mismatch"
        assert download(stack, job["id"], previous["id"]).status_code == 200
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
    killed = time.monotonic()
    stack.wait_attempt(job["id"], 2, timeout=60)
    report("corrupt checkpoint + trainer SIGKILL -> attempt 2", time.monotonic() - killed)
    done = stack.wait_finished(job["id"], timeout=180)
    assert done["status"] == "succeeded", stack.diagnostics(job["id"])
    assert done["attempt"] == 2
    assert stack.epochs(job["id"]) == list(range(1, epochs + 1))
    log = trainer_log(stack, job["id"])
    assert f"checkpoint-epoch{previous['epoch']:04d}.pt" in log.split("=== attempt 2 ===")[1]
    # The rewritten newest epoch is whole again, and every served file matches its sha256.
    for item in checkpoints(stack, job["id"]):
        assert download(stack, job["id"], item["id"]).status_code == 200


# --- 7. a job that always crashes -------------------------------------------------------------


def test_always_crashing_jobs_fail_once_and_the_worker_moves_on(stack):
    diverges = stack.submit(
        dataset="digits", architecture="mlp", epochs=10, lr=10, schedule="constant",
        method="none", batch_norm=False,
    )  # fmt: skip
    # Present at submission (a job without its files is refused then), unreadable at the start.
    for relative in catalog.entry("cifar10").files:
        (stack.home / "data" / relative).parent.mkdir(parents=True, exist_ok=True)
        (stack.home / "data" / relative).write_bytes(b"not the real file")
    missing = stack.submit(dataset="cifar10", architecture="mlp", epochs=1)
    good = stack.submit(**TINY)
    nan = stack.wait_finished(diverges["id"], timeout=120)
    assert nan["status"] == "failed", stack.diagnostics(diverges["id"])
    assert "diverged" in nan["error"] and "lr" in nan["error"]
    assert "Traceback" not in nan["error"]
    gone = stack.wait_finished(missing["id"], timeout=120)
    assert gone["status"] == "failed" and "cifar10" in gone["error"].lower()
    assert stack.wait_finished(good["id"], timeout=120)["status"] == "succeeded"
    time.sleep(5)  # two reaper passes: nothing brings the failed jobs back
    for job_id in (diverges["id"], missing["id"]):
        again = stack.job(job_id)
        assert (again["status"], again["attempt"]) == ("failed", 1)
        assert trainer_log(stack, job_id).count("=== attempt") == 1


# --- 8. cancellation in every state -----------------------------------------------------------


def test_cancel_in_every_state(stack):
    # Running: the worker is busy with this one, so the next waits in the queue.
    running = stack.submit(**LONG)
    stack.wait_running(running["id"], 1)
    queued = stack.submit(**TINY)
    response = stack.client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    asked = time.monotonic()
    assert stack.client.post(f"/v1/jobs/{running['id']}/cancel").status_code == 202
    assert stack.wait_finished(running["id"], timeout=30)["status"] == "cancelled"
    report("cancel running -> cancelled", time.monotonic() - asked)

    # Claimed but not started: the trainer is frozen (SIGSTOP) the moment it appears, before
    # it can train a step, then cancelled, then let go: it must stop without an epoch.
    claimed = stack.submit(**LONG)
    pids = wait_until(
        lambda: stack.trainer_pids(claimed["id"]), timeout=30, what="the trainer", every=0.01
    )
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        state = stack.job(claimed["id"])
        assert state["status"] == "running" and state["progress"]["epoch"] == 0
        assert stack.client.post(f"/v1/jobs/{claimed['id']}/cancel").status_code == 202
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    done = stack.wait_finished(claimed["id"], timeout=60)
    assert done["status"] == "cancelled", stack.diagnostics(claimed["id"])
    assert stack.epochs(claimed["id"]) == []

    # The cancelled queued job never ran.
    wait_until(lambda: queue_drained(stack), timeout=30, what="the queue to drain")
    time.sleep(1.0)
    never = stack.job(queued["id"])
    assert (never["status"], never["attempt"]) == ("cancelled", 0)

    # Finished: 409, unchanged.
    finished = stack.client.post(f"/v1/jobs/{running['id']}/cancel")
    assert finished.status_code == 409, finished.text
    assert stack.job(running["id"])["status"] == "cancelled"


# --- 9. a burst of submissions ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_burst_of_1000_submissions_from_20_clients(service_kit, tmp_path):
    with contextlib.ExitStack() as cleanup:
        stack = make_stack(service_kit, tmp_path, f"sqlite:///{tmp_path / 'jumpout.db'}", cleanup)
        statuses: list[int] = []
        ids: list[str] = []
        lock = threading.Lock()

        def client_submits(n: int) -> None:
            with httpx.Client(base_url=str(stack.client.base_url), timeout=60) as client:
                for _ in range(n):
                    response = client.post("/v1/jobs", json=TINY)
                    with lock:
                        statuses.append(response.status_code)
                        if response.status_code == 201:
                            ids.append(response.json()["id"])

        started = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(client_submits, [50] * 20))
        burst_s = time.monotonic() - started
        print(f"\nBURST 1000 submissions from 20 clients: {burst_s:.1f} s")
        assert collections.Counter(statuses) == {201: 1000}
        assert len(set(ids)) == 1000

        # Every row is there.
        listed: set[str] = set()
        cursor = None
        while True:
            params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = stack.client.get("/v1/jobs", params=params).json()
            listed.update(item["id"] for item in page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                break
        assert listed == set(ids)

        # A handful run (5); the rest are cancelled.
        wait_until(
            lambda: sum(stack.job(i)["status"] == "succeeded" for i in ids[:60]) >= 5,
            timeout=180, what="a few jobs to run", every=1.0,
        )  # fmt: skip
        for job_id in ids:
            response = stack.client.post(f"/v1/jobs/{job_id}/cancel")
            assert response.status_code in (202, 409), response.text
        for job_id in ids:
            stack.wait_for(job_id, lambda job: job["status"] in FINISHED, timeout=60)
        final = [stack.job(job_id) for job_id in ids]
        counts = collections.Counter(job["status"] for job in final)
        print(f"\nBURST outcome: {dict(counts)}")
        assert set(counts) <= {"succeeded", "cancelled"}, counts
        assert counts["succeeded"] >= 5
        assert all(job["attempt"] <= 1 for job in final)
        for job in final:
            if job["attempt"]:
                epochs = stack.epochs(job["id"])
                assert len(epochs) == len(set(epochs)), job["id"]

        # The worker still receives every cancelled job's message; each is a no-op claim. The pool
        # process is kept across tasks, so the backlog drains in seconds, not hours.
        client = stack.redis.client()
        backlog = client.llen(QUEUE)
        drain_started = time.monotonic()
        deadline = drain_started + 180
        while client.llen(QUEUE) and time.monotonic() < deadline:
            time.sleep(1)
        drain_seconds = time.monotonic() - drain_started
        print(f"\nBURST {backlog} queued messages drained in {drain_seconds:.1f} s, none ran")
        assert client.llen(QUEUE) == 0, f"{client.llen('jobs')} of {backlog} messages left"
        after = {job["id"]: (job["status"], job["attempt"]) for job in map(stack.job, ids)}
        assert after == {job["id"]: (job["status"], job["attempt"]) for job in final}
