"""How the supervisor turns a trainer's exit into the job's state (no processes started)."""

from __future__ import annotations

import json
import signal

import pytest

from jobstore import jobs
from worker import supervisor
from worker.supervisor import EXIT_FAILED, EXIT_STOPPED, _record_outcome, _Stop

pytestmark = pytest.mark.timeout(60)  # supervise() waits on real child processes


@pytest.fixture
def enqueued(monkeypatch) -> list[str]:
    sent: list[str] = []
    monkeypatch.setattr(supervisor, "_enqueue", sent.append)
    return sent


def outcome(job_id, tmp_path, *, returncode, attempt=1, stop=None, reason=None):
    result = tmp_path / "result.json"
    if reason is not None:
        result.write_text(json.dumps({"status": "failed", "error": reason}))
    return _record_outcome(
        job_id, attempt=attempt, returncode=returncode, stop=stop, result_path=result,
        tail="Traceback ... RuntimeError: boom",
    )  # fmt: skip


def job(job_store, job_id):
    return job_store.call(jobs.get_job, job_id)


def test_exit_zero_is_success(job_store, claimed_job, tmp_path, enqueued):
    assert outcome(claimed_job, tmp_path, returncode=0) == "succeeded"
    assert job(job_store, claimed_job).status == "succeeded"
    assert enqueued == []


def test_deterministic_failure_fails_once_with_the_trainers_reason(
    job_store, claimed_job, tmp_path, enqueued
):
    status = outcome(
        claimed_job, tmp_path, returncode=EXIT_FAILED, reason="dataset not found: cifar10"
    )
    assert status == "failed"
    row = job(job_store, claimed_job)
    assert (row.status, row.error, row.attempt) == ("failed", "dataset not found: cifar10", 1)
    assert enqueued == []


def test_crash_is_requeued_while_attempts_remain(job_store, claimed_job, tmp_path, enqueued):
    assert outcome(claimed_job, tmp_path, returncode=-signal.SIGKILL) == "queued"
    row = job(job_store, claimed_job)
    assert row.status == "queued"
    # Readable: the attempt, how it ended, where the output is; no tail of raw output.
    assert row.error == (
        "attempt 1 of 3: trainer killed by SIGKILL "
        f"(the full output: GET /v1/jobs/{claimed_job}/log)"
    )
    assert enqueued == [claimed_job]
    # The next delivery claims it as attempt 2.
    assert job_store.call(jobs.claim_job, claimed_job, worker="test").attempt == 2


def test_crash_on_the_last_attempt_fails_with_the_last_line_of_output(
    job_store, claimed_job, tmp_path, enqueued, monkeypatch
):
    monkeypatch.setenv("JUMPOUT_MAX_ATTEMPTS", "1")
    from jobstore.settings import get_settings

    get_settings.cache_clear()
    assert outcome(claimed_job, tmp_path, returncode=1) == "failed"
    row = job(job_store, claimed_job)
    assert row.status == "failed"
    assert row.error.startswith("attempt 1 of 1: trainer exited with code 1: ")
    assert "RuntimeError: boom" in row.error
    assert row.error.endswith(f"(the full output: GET /v1/jobs/{claimed_job}/log)")
    assert enqueued == []


def test_stop_after_a_cancel_request_is_cancelled(job_store, claimed_job, tmp_path, enqueued):
    stop = _Stop("cancel", since=0.0)
    assert outcome(claimed_job, tmp_path, returncode=EXIT_STOPPED, stop=stop) == "cancelled"
    assert job(job_store, claimed_job).status == "cancelled"


def test_shutdown_requeues_without_using_an_attempt(job_store, claimed_job, tmp_path, enqueued):
    stop = _Stop("shutdown", since=0.0, term_sent=0.0)
    assert outcome(claimed_job, tmp_path, returncode=EXIT_STOPPED, stop=stop) == "queued"
    row = job(job_store, claimed_job)
    assert (row.status, row.attempt) == ("queued", 0)
    assert "shutdown" in row.error
    assert enqueued == [claimed_job]


def test_a_job_taken_away_is_left_to_its_new_owner(job_store, claimed_job, tmp_path, enqueued):
    stop = _Stop("lost", since=0.0, term_sent=0.0)
    assert outcome(claimed_job, tmp_path, returncode=EXIT_STOPPED, stop=stop) is None
    row = job(job_store, claimed_job)
    assert (row.status, row.attempt) == ("running", 1)
    assert enqueued == []


def test_a_trainer_that_learnt_its_job_was_taken_away_is_left_alone(
    job_store, claimed_job, tmp_path, enqueued
):
    # No "lost" stop yet (the supervisor's heartbeat had not failed): the exit code says it.
    returncode = supervisor.EXIT_SUPERSEDED
    assert outcome(claimed_job, tmp_path, returncode=returncode, reason="ignored") is None
    row = job(job_store, claimed_job)
    assert (row.status, row.attempt, row.error) == ("running", 1, None)
    assert enqueued == []


def test_the_heartbeat_goes_on_while_the_log_is_sent(job_store, claimed_job):
    import time

    before = job(job_store, claimed_job).heartbeat_at
    with supervisor._heartbeats(claimed_job, attempt=1, every_s=0.1):
        time.sleep(0.5)  # a slow artifact service, on a remote worker
        during = job(job_store, claimed_job).heartbeat_at
    assert during > before


def test_requeue_is_conditional_on_the_attempt(job_store, claimed_job):
    assert not job_store.call(
        jobs.requeue_job, claimed_job, attempt=2, error="x", count_attempt=True
    )
    assert job(job_store, claimed_job).status == "running"


# --- supervise() with stand-in trainers ---------------------------------------------------------


def python(code: str) -> list[str]:
    import sys

    return [sys.executable, "-c", code]


@pytest.fixture
def fast(monkeypatch):
    """Short heartbeat and grace periods."""
    from jobstore.settings import get_settings

    monkeypatch.setenv("JUMPOUT_HEARTBEAT_INTERVAL", "0.2")
    monkeypatch.setenv("JUMPOUT_CANCEL_GRACE", "1")
    monkeypatch.setattr(supervisor, "KILL_AFTER_TERM_S", 1.0)
    get_settings.cache_clear()


def test_supervise_heartbeats_while_the_trainer_runs(job_store, claimed_job, fast, enqueued):
    before = job(job_store, claimed_job).heartbeat_at
    status = supervisor.supervise(
        claimed_job, attempt=1, command=python("import time; time.sleep(1.5)")
    )
    assert status == "succeeded"
    assert job(job_store, claimed_job).heartbeat_at > before


def test_cancel_escalates_to_sigkill_when_the_trainer_ignores_it(
    job_store, claimed_job, fast, enqueued
):
    import time

    job_store.call(jobs.request_cancel, claimed_job, token=_Admin())
    stubborn = python(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    )
    started = time.monotonic()
    assert supervisor.supervise(claimed_job, attempt=1, command=stubborn) == "cancelled"
    assert time.monotonic() - started < 15
    assert job(job_store, claimed_job).status == "cancelled"


def test_a_crashing_trainer_keeps_its_output_in_the_error(job_store, claimed_job, fast, enqueued):
    crash = python("import sys; print('loading the data'); sys.exit('something broke')")
    assert supervisor.supervise(claimed_job, attempt=1, command=crash) == "queued"
    error = job(job_store, claimed_job).error
    assert "exited with code 1" in error and "something broke" in error


def test_a_job_requeued_under_the_supervisor_kills_its_trainer(
    job_store, claimed_job, fast, enqueued, tmp_path
):
    # The reaper gave the job away (our heartbeats were late): the heartbeat write says so. The
    # trainer is killed, not asked to stop: its stop checkpoint could replace the new attempt's.
    job_store.call(jobs.requeue_job, claimed_job, attempt=1, error="stale", count_attempt=True)
    marker = tmp_path / "stop-checkpoint"
    checkpoints_on_sigterm = python(
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w'), sys.exit(4)))\n"
        "time.sleep(60)"
    )
    status = supervisor.supervise(claimed_job, attempt=1, command=checkpoints_on_sigterm)
    assert status is None
    assert not marker.exists()
    assert job(job_store, claimed_job).status == "queued"
    assert enqueued == []


class _Admin:
    id = None
    is_admin = True
