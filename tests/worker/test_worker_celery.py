"""The Celery app's delivery settings, the worker parent's imports, and the trainer's callback."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import worker.tasks  # noqa: F401 - registers the tasks
from jobstore import jobs
from worker import trainer
from worker.celery_app import _child_pids, app

REPO = Path(__file__).resolve().parents[2]


def test_delivery_settings_suit_long_gpu_jobs():
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_concurrency == 1
    # The pool process only supervises (the trainer owns CUDA), so it serves many tasks.
    assert conf.worker_max_tasks_per_child is None
    assert conf.worker_pool == "prefork"
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_ignore_result is True
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is False
    assert conf.broker_transport_options["visibility_timeout"] >= 24 * 3600
    assert "jumpout.run_job" in app.tasks
    assert app.amqp.router.route({}, "jumpout.run_job")["queue"].name == "jobs"


def test_the_worker_parent_never_imports_torch():
    """CUDA cannot survive fork: the prefork parent must not even import torch (pitfalls)."""
    code = (
        "import sys, worker.celery_app, worker.tasks; "
        "from worker.celery_app import app; app.loader.import_default_modules(); "
        "print(sorted(m for m in sys.modules if m.startswith(('torch', 'jumpout'))))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUMPOUT_")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    # Only the library's pure-Python modules: the spec (what the settings' limits come from) and
    # the dataset catalogue (what a submission is checked against).
    assert out.stdout.strip() == "['jumpout', 'jumpout.catalog', 'jumpout.spec']"


def test_child_pids_finds_direct_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in _child_pids(os.getpid())
    finally:
        child.kill()
        child.wait()


def test_should_stop_reads_the_cancel_flag_at_most_once_a_second(claimed_job, monkeypatch):
    reads = []
    real = jobs.cancel_requested

    def counting(session, job_id):
        reads.append(job_id)
        return real(session, job_id)

    monkeypatch.setattr(jobs, "cancel_requested", counting)
    callback = trainer.StoreCallback(
        claimed_job, attempt=1, stop_event=threading.Event(), parent_pid=os.getppid()
    )
    assert not any(callback.should_stop() for _ in range(50))
    assert len(reads) == 1


def test_should_stop_on_sigterm_flag_or_cancel(job_store, claimed_job):
    stop_event = threading.Event()
    callback = trainer.StoreCallback(
        claimed_job, attempt=1, stop_event=stop_event, parent_pid=os.getppid()
    )
    assert not callback.should_stop()
    stop_event.set()
    assert callback.should_stop()

    callback = trainer.StoreCallback(
        claimed_job, attempt=1, stop_event=threading.Event(), parent_pid=os.getppid()
    )
    job_store.call(jobs.request_cancel, claimed_job, token=_Admin())
    callback._cancel_checked_at = float("-inf")
    assert callback.should_stop()


def test_should_stop_when_the_supervisor_is_gone(claimed_job):
    callback = trainer.StoreCallback(
        claimed_job, attempt=1, stop_event=threading.Event(), parent_pid=os.getppid() + 1
    )
    assert callback.should_stop()


def test_build_config_uses_this_workers_paths_and_device(job_store, claimed_job, monkeypatch):
    monkeypatch.setenv("JUMPOUT_DEVICE", "cpu")
    from jobstore.settings import get_settings

    get_settings.cache_clear()
    spec = job_store.call(jobs.get_job, claimed_job).spec
    config = trainer.build_config({**spec, "out_dir": "/elsewhere"}, job_id=claimed_job)
    settings = get_settings()
    assert config.out_dir == str(Path(settings.artifact_dir) / "jobs" / claimed_job)
    assert config.data_dir == str(settings.data_dir)
    assert config.device == "cpu"
    assert (config.dataset, config.architecture, config.epochs) == ("digits", "mlp", 2)


class _Admin:
    id = None
    is_admin = True
