"""A worker whose device cannot run jobs (issue 11 §0): the probe at start says so, a job that
meets a broken device goes back to the queue without using an attempt and the worker takes no
more; a driver older than the wheel's CUDA line and a failing torch.compile get readable reasons.
On this CPU-only machine ``JUMPOUT_DEVICE=cuda`` is a real unusable device."""

from __future__ import annotations

import json

import pytest
import torch

from jobstore import jobs
from jobstore.settings import get_settings
from worker import devices, supervisor, trainer
from worker.supervisor import EXIT_DEVICE, _record_outcome

pytestmark = pytest.mark.timeout(120)

needs_no_gpu = pytest.mark.skipif(
    torch.cuda.is_available(), reason="simulates an unusable device with JUMPOUT_DEVICE=cuda"
)


@pytest.fixture
def fresh_plan(monkeypatch):
    """This process's device plan, forgotten before and after the test."""
    monkeypatch.setattr(devices, "_plan", None)
    monkeypatch.setattr(devices, "_hostname", None)
    yield
    devices._plan = None


@pytest.fixture
def enqueued(monkeypatch) -> list[str]:
    sent: list[str] = []
    monkeypatch.setattr(supervisor, "_enqueue", sent.append)
    monkeypatch.setattr(supervisor, "_dispatch_more", lambda: None)
    return sent


@needs_no_gpu
def test_the_probe_finds_cuda_unusable_without_a_gpu(monkeypatch):
    monkeypatch.setenv("JUMPOUT_DEVICE", "cuda")
    get_settings.cache_clear()
    try:
        plan = devices.probe()
    finally:
        get_settings.cache_clear()
    assert (plan.device, plan.usable) == ("cuda", False)
    assert "no CUDA device is available" in plan.reason


def test_a_cpu_worker_needs_no_probe_and_has_its_declared_slots(monkeypatch):
    monkeypatch.setenv("JUMPOUT_DEVICE", "cpu")
    monkeypatch.setenv("JUMPOUT_DEVICE_SLOTS", "3")
    get_settings.cache_clear()
    try:
        plan = devices.probe()
    finally:
        get_settings.cache_clear()
    assert (plan.device, plan.slots, plan.usable) == ("cpu", ["0", "1", "2"], True)


def test_an_old_driver_gets_the_operators_advice():
    error = RuntimeError(
        "The NVIDIA driver on your system is too old (found version 12020). Please update"
    )
    assert devices.is_device_failure(error)
    reason = devices.device_failure_reason(error, torch_cuda="13.0", driver="535.104.05")
    assert "535.104.05 is too old" in reason and ">= 580.65.06" in reason
    assert "TORCH_INDEX_URL" in reason
    assert devices.driver_too_old("13.0", "575.57.08")
    assert not devices.driver_too_old("12.6", "575.57.08")


def test_device_failures_are_told_from_job_failures():
    assert devices.is_device_failure(
        RuntimeError("CUDA error: uncorrectable ECC error encountered")
    )
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = RuntimeError("CUDA error: no CUDA-capable device is detected")
    assert devices.is_device_failure(wrapped)
    assert not devices.is_device_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_a_compile_failure_reads_as_what_to_do():
    from torch._dynamo.exc import BackendCompilerFailed

    inner = RuntimeError("InvalidCxxCompiler: No working C++ compiler found: /usr/bin/nope")
    error = BackendCompilerFailed(lambda *args: None, inner, None)
    assert trainer.is_compile_failure(error)
    assert trainer.is_compile_failure(RuntimeError("Failed to find C compiler. Please specify CC"))
    assert not trainer.is_compile_failure(RuntimeError("shapes cannot be multiplied"))
    reason = trainer.compile_failure_reason(inner)
    assert reason.startswith("torch.compile failed: RuntimeError: InvalidCxxCompiler")
    assert "compile=false" in reason and "/usr/bin" not in reason


def test_a_broken_device_requeues_without_an_attempt_and_stops_the_worker(
    job_store, claimed_job, tmp_path, enqueued, fresh_plan
):
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"error": "the device is not usable: GPU is lost"}))
    status = _record_outcome(
        claimed_job, attempt=1, returncode=EXIT_DEVICE, stop=None, result_path=result, tail=""
    )
    row = job_store.call(jobs.get_job, claimed_job)
    assert (status, row.status, row.attempt) == ("queued", "queued", 0)
    assert "broken device" in row.error and "GPU is lost" in row.error
    assert enqueued == [claimed_job]
    assert devices.current_plan().usable is False
    # The worker now claims nothing: the job waits for a worker whose device works.
    assert supervisor.run(claimed_job) is None
    assert job_store.call(jobs.get_job, claimed_job).status == "queued"


def test_a_jobs_second_device_failure_uses_an_attempt_and_leaves_the_worker_usable(
    job_store, claimed_job, tmp_path, enqueued, fresh_plan
):
    """A job whose own failure matches a device pattern ("initialization error"): before, it was
    requeued for free each time and disabled every worker in turn, for ever."""
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"error": "the device is not usable: initialization error"}))

    def fail_on_a_device(attempt: int) -> str:
        return _record_outcome(claimed_job, attempt=attempt, returncode=EXIT_DEVICE, stop=None,
                               result_path=result, tail="", max_attempts=2)  # fmt: skip

    assert fail_on_a_device(1) == "queued"  # the first: given back, this worker stops
    assert devices.current_plan().usable is False
    devices._plan = None  # the next worker
    for attempt in (1, 2):
        assert job_store.call(jobs.claim_job, claimed_job, worker="next") is not None
        status = fail_on_a_device(attempt)
        row = job_store.call(jobs.get_job, claimed_job)
        assert (row.attempt, devices.current_plan().usable) == (attempt, True), row.error
        assert "met a broken device again" in row.error and "initialization error" in row.error
    assert (status, row.status) == ("failed", "failed")  # out of attempts
    assert row.error.startswith("attempt 2 of 2:")
    assert enqueued == [claimed_job, claimed_job]


@needs_no_gpu
def test_a_trainer_on_an_unusable_device_gives_the_job_back(
    job_store, claimed_job, enqueued, fresh_plan, monkeypatch
):
    """A real trainer process with ``device=cuda`` on a machine without one: before, the job
    failed as an invalid spec (and the worker drained the queue that way)."""
    monkeypatch.setenv("JUMPOUT_DEVICE", "cuda")
    monkeypatch.setenv("JUMPOUT_TRAINER_TEMPLATE", "false")
    get_settings.cache_clear()
    status = supervisor.supervise(claimed_job, attempt=1, max_attempts=3)
    row = job_store.call(jobs.get_job, claimed_job)
    assert (status, row.status, row.attempt) == ("queued", "queued", 0), row.error
    assert "no CUDA device is available" in row.error
    assert devices.current_plan().usable is False


@pytest.mark.slow
def test_a_compiled_job_without_a_c_compiler_fails_once_with_a_readable_reason(
    job_store, claimed_job, enqueued, fresh_plan, monkeypatch, tmp_path
):
    """Inductor without a working C++ compiler (what the slim image lacked): failed at once,
    not retried three times."""
    from sqlalchemy import update

    from jobstore.tables import Job

    def compiled(session) -> None:
        row = session.get(Job, claimed_job)
        session.execute(
            update(Job).where(Job.id == claimed_job).values(spec={**row.spec, "compile": True})
        )

    job_store.call(compiled)
    monkeypatch.setenv("JUMPOUT_DEVICE", "cpu")
    monkeypatch.setenv("JUMPOUT_TRAINER_TEMPLATE", "false")
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    get_settings.cache_clear()
    status = supervisor.supervise(claimed_job, attempt=1, max_attempts=3)
    row = job_store.call(jobs.get_job, claimed_job)
    assert (status, row.status, row.attempt) == ("failed", "failed", 1), row.error
    assert row.error.startswith("torch.compile failed:") and "compile=false" in row.error
    assert enqueued == []
