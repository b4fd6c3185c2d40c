"""The Celery application: delivery only; the database decides what a job's state is.

One worker per GPU, prefork pool with concurrency 1, one message reserved at a time, acknowledged
only after the task returns. The queue, the pool and the concurrency are this app's configuration,
so ``celery -A worker.celery_app worker`` needs no ``-Q``/``-c``/``--pool`` (and nothing
else repeats the queue's name). The task itself only supervises a separate trainer process, so
neither the worker's parent nor its pool process ever initialises CUDA (see ``docs/pitfalls.md``
of the shared docs), and the trainer's exit returns all GPU memory. That is why the pool process
is kept across tasks (no ``worker_max_tasks_per_child``): replacing it after each task cost up to
5 s per message (Celery's pool-maintenance timer), so a backlog of cancelled jobs drained at about
one message per 5 s.
"""

from __future__ import annotations

import contextlib
import os
import signal

from celery import Celery
from celery.signals import worker_process_init, worker_shutting_down

from jobstore.queue import QUEUE, TASK_PATTERN
from jobstore.settings import get_settings

# Makes torch.cuda.is_available() use NVML instead of initialising CUDA, should anything call it
# in this process or the processes it forks. Set before torch could be imported.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


def make_celery() -> Celery:
    settings = get_settings()
    celery = Celery("jumpout", include=["worker.tasks"])
    celery.conf.update(
        broker_url=settings.broker_url,
        broker_connection_retry_on_startup=True,
        # Longer than the longest job: Redis redelivers an unacknowledged message after this,
        # even one whose job is still running (celery #5935). Lost workers are handled by the
        # reaper, from the heartbeat in the database, long before this expires.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=QUEUE,
        task_routes={TASK_PATTERN: {"queue": QUEUE}},
        task_acks_late=True,
        # A pool process killed mid-task (OOM, SIGKILL) puts its message back at once. That is
        # safe: claim_job only succeeds on a queued job, and the attempts are counted and capped
        # in the database, so a job that always crashes cannot loop.
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="prefork",
        # Explicit because the default changes in Celery 6. False: a broker hiccup must not stop a
        # training run; if the message is redelivered, the duplicate finds the job claimed.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
    )
    return celery


app = make_celery()


@worker_process_init.connect
def _on_pool_process_start(**_: object) -> None:
    """A fresh pool process: never reuse the parent's pooled database connections, turn the
    parent's shutdown notice (SIGUSR2, see below) into a checkpoint-and-stop of the trainer, and
    start the trainer template now (it imports torch in the background, in its own process), so
    that the first job does not wait for it."""
    from jobstore import db
    from worker import supervisor

    db.forget_inherited_engines()
    signal.signal(signal.SIGUSR2, supervisor.on_shutdown_signal)
    supervisor.start_template()


@worker_shutting_down.connect
def _on_worker_shutting_down(**_: object) -> None:
    """Warm shutdown (SIGTERM from ``docker stop``, the launcher or systemd) waits for the
    running task, which may train for hours. Tell the pool processes, so that each supervisor asks
    its trainer to checkpoint and stop, and the task returns within the grace period."""
    for pid in _child_pids(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR2)


def _child_pids(parent: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # The command name (field 2) is in parentheses and may contain spaces.
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(entry))
    return pids
