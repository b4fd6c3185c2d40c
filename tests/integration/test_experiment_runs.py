"""Experiments on the real processes (Redis, uvicorn, a Celery worker, the reaper, trainer
children): a small Table-2 experiment runs to its report on SQLite and PostgreSQL; a worker killed
with SIGKILL in the middle of an experiment loses nothing and runs no job twice; cancelling an
experiment while its jobs start and finish leaves every job in a final state.

The fault tests run on a stack of their own (SQLite, short heartbeat timeout and reconcile delay,
as tests/integration/test_faults.py), so that a killed worker does not disturb the shared one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

FINISHED = ("succeeded", "failed", "cancelled")
FAST_ENV = {"JUMPOUT_RECONCILE_AFTER": "3"}
TINY = {"dataset": "digits", "architecture": "mlp", "epochs": 1, "train_size": 64, "test_size": 64}


def submit_experiment(stack, **request) -> dict:
    response = stack.client.post("/v1/experiments", json=request)
    assert response.status_code == 201, response.text
    return response.json()


def experiment(stack, experiment_id: str) -> dict:
    response = stack.client.get(f"/v1/experiments/{experiment_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_experiment(stack, experiment_id: str, predicate, *, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = experiment(stack, experiment_id)
        if predicate(view):
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {view}\n{stack.diagnostics()}")
        time.sleep(0.2)


def all_final(view: dict) -> bool:
    return all(job["status"] in FINISHED for job in view["jobs"])


def attempts_logged(stack, job_id: str) -> int:
    """How many times a trainer started on the job (one header line per attempt)."""
    path = stack.home / "artifacts" / "jobs" / job_id / "trainer.log"
    return path.read_text().count("=== attempt") if path.exists() else 0


def test_a_table2_experiment_runs_to_its_report(stack):
    created = submit_experiment(stack, name="digits t2", base=TINY, preset="table2", seeds=2)
    assert created["job_count"] == 4 and created["baseline"] == "dropout"
    done = wait_experiment(stack, created["id"], all_final, timeout=240, what="the experiment")
    assert done["counts"]["succeeded"] == 4, done
    assert done["progress"]["fraction"] == 1.0 and done["progress"]["eta_seconds"] == 0.0

    report = stack.client.get(f"/v1/experiments/{created['id']}/report").json()
    assert report["excluded"] == [] and report["n_jobs"] == 4
    assert [(row["label"], row["n"]) for row in report["rows"]] == [("dropout", 2), ("jumpout", 2)]
    for row in report["rows"]:
        assert 0.0 <= row["mean"] <= 100.0
        assert row["layers"] and all(0.0 <= layer["rate"] <= 1.0 for layer in row["layers"])
    assert report["rows"][1]["vs_baseline"]["pairs"] == 2
    markdown = stack.client.get(
        f"/v1/experiments/{created['id']}/report", params={"format": "markdown"}
    )
    assert markdown.status_code == 200 and "| jumpout | 2 |" in markdown.text


@pytest.fixture(scope="module")
def fault_stack(service_kit, tmp_path_factory):
    home = tmp_path_factory.mktemp("experiments-faults")
    redis = service_kit.RedisServer(home / "redis")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(redis.process.stop)
        stack = service_kit.Stack(
            home, database_url=f"sqlite:///{home / 'jumpout.db'}", redis=redis, **FAST_ENV
        )
        cleanup.callback(stack.close)
        stack.migrate()
        for name in ("api", "reaper", "worker"):
            stack.start(name)
        yield stack


@pytest.mark.slow
def test_a_worker_killed_mid_experiment_loses_nothing_and_runs_no_job_twice(fault_stack):
    stack = fault_stack
    # 60 epochs (about 0.06 s each): the victim still has seconds of work when it is killed.
    spec = {**TINY, "epochs": 60, "train_size": 1024, "test_size": 256}
    created = submit_experiment(stack, base=spec, rows=[{"label": "a"}, {"label": "b"}], seeds=2)
    ids = [job["id"] for job in created["jobs"]]
    # The first job in the middle of its run: an epoch done, more to come.
    victim = wait_experiment(
        stack,
        created["id"],
        lambda view: any(
            job["status"] == "running" and 1 <= job["epoch"] < job["epochs"] for job in view["jobs"]
        ),
        timeout=120,
        what="a job in the middle of its run",
    )
    victim_id = next(job["id"] for job in victim["jobs"] if job["status"] == "running")
    stack.processes.pop("worker").kill()  # Celery parent and pool process
    for pid in stack.trainer_pids(victim_id):  # and the trainer: the machine died
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    stack.start("worker")

    done = wait_experiment(stack, created["id"], all_final, timeout=300, what="every job")
    assert done["counts"]["succeeded"] == 4, (done, stack.diagnostics(victim_id))
    for job_id in ids:
        job = stack.job(job_id)
        # One attempt each; the killed job's second attempt resumed it. A job never started
        # twice, whatever the broker redelivered.
        expected = 2 if job_id == victim_id else 1
        assert job["attempt"] == expected, (job_id, job["attempt"], stack.diagnostics(job_id))
        assert attempts_logged(stack, job_id) == expected
        # One set of metrics per epoch.
        assert stack.epochs(job_id) == list(range(1, spec["epochs"] + 1))
    before = [(stack.job(i)["status"], stack.job(i)["attempt"]) for i in ids]
    time.sleep(3)  # nothing comes back to life afterwards (a late message is a no-op)
    assert [(stack.job(i)["status"], stack.job(i)["attempt"]) for i in ids] == before


@pytest.mark.slow
def test_cancelling_an_experiment_while_jobs_start_and_finish_leaves_all_final(fault_stack):
    stack = fault_stack
    created = submit_experiment(
        stack, base={**TINY, "epochs": 2}, grid={"sigma": [0.1, 0.2, 0.3]}, seeds=3
    )
    # Cancel while one job has finished and the next is being started or trained.
    wait_experiment(
        stack,
        created["id"],
        lambda view: view["counts"]["succeeded"] >= 1 and view["counts"]["running"] >= 1,
        timeout=180,
        what="one job finished and the next running",
    )
    response = stack.client.post(f"/v1/experiments/{created['id']}/cancel")
    assert response.status_code == 202, response.text
    assert response.json()["cancel_requested"] is True
    assert response.json()["counts"]["queued"] == 0

    done = wait_experiment(stack, created["id"], all_final, timeout=90, what="every job final")
    counts = done["counts"]
    assert counts["queued"] == counts["running"] == 0 and counts["failed"] == 0, done
    assert counts["succeeded"] >= 1 and counts["cancelled"] >= 1
    assert counts["succeeded"] + counts["cancelled"] == 9
    # And they stay so: no cancelled job is claimed later, none runs again.
    time.sleep(5)
    again = experiment(stack, created["id"])
    assert {job["id"]: job["status"] for job in again["jobs"]} == {
        job["id"]: job["status"] for job in done["jobs"]
    }
    for job in again["jobs"]:
        if job["status"] == "cancelled":
            assert attempts_logged(stack, job["id"]) <= 1
    # The report leaves out the cancelled runs and names them.
    report = stack.client.get(f"/v1/experiments/{created['id']}/report").json()
    assert len(report["excluded"]) == counts["cancelled"]
    assert {item["status"] for item in report["excluded"]} == {"cancelled"}
