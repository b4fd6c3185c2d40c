"""The Celery application: delivery only; the database decides what a job's state is.

One worker per box, prefork pool with one pool process per device slot (``worker.devices``: the
box's visible GPUs, or ``JUMPOUT_DEVICE_SLOTS``), one message reserved at a time per process,
acknowledged only after the task returns. The queue, the pool and the concurrency are this app's
configuration, so ``celery -A worker.celery_app worker`` is the one command a box needs, with no
``-Q``/``-c``/``--pool`` (and nothing else repeats the queue's name). Its device is probed at
start (``_on_worker_init``): a worker that cannot use it consumes nothing.

The task itself only supervises a separate trainer process, so neither the worker's parent nor
its pool processes ever initialise CUDA (see ``docs/pitfalls.md`` of the shared docs), and the
trainer's exit returns all GPU memory. That is why the pool process
is kept across tasks (no ``worker_max_tasks_per_child``): replacing it after each task cost up to
5 s per message (Celery's pool-maintenance timer), so a backlog of cancelled jobs drained at about
one message per 5 s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

from celery import Celery
from celery.signals import celeryd_init, worker_init, worker_process_init, worker_shutting_down
from celery.worker.control import control_command, inspect_command

from jobstore.queue import QUEUE, TASK_PATTERN
from jobstore.settings import get_settings

# Makes torch.cuda.is_available() use NVML instead of initialising CUDA, should anything call it
# in this process or the processes it forks. Set before torch could be imported.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

log = logging.getLogger(__name__)


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


@celeryd_init.connect
def _on_worker_init(sender: str, instance, conf, options: dict, **_: object) -> None:
    """Before the pool forks: probe the device (`worker.devices.probe`, in a subprocess: this
    process never imports torch), and consume nothing when the device is unusable: the worker
    stays up, says why (here, and in /v1/health), and leaves the jobs to the workers that can
    run them."""
    from worker import devices

    plan = devices.probe()
    devices.set_plan(plan, hostname=sender)
    if not plan.usable:
        log.error(
            "THIS WORKER TAKES NO JOBS: its device (%s) is not usable: %s",
            get_settings().device,
            plan.reason,
        )
        # Consume from no queue at all; remote control (ping, /v1/health) still answers.
        instance.app.amqp.queues.select(QUEUE)
        instance.app.amqp.queues.deselect(QUEUE)
        return
    log.info(
        "device %s, %d slot(s) %s%s",
        plan.device,
        len(plan.slots),
        ",".join(plan.slots),
        f" ({', '.join(plan.names)})" if plan.names else "",
    )


@worker_init.connect
def _size_the_pool(sender, **_: object) -> None:
    """One pool process per device slot (set here: the command line's ``-c`` defaults to the
    configured 1, so it cannot say whether it was given; the slots decide)."""
    from worker import devices

    plan = devices.current_plan()
    if plan.usable and hasattr(sender, "concurrency"):
        sender.concurrency = len(plan.slots)


@inspect_command()
def jumpout_devices(state, **_: object) -> dict:
    """This worker's device plan (/v1/health's ``unusable_workers``): device, slots, usable, and
    the reason when not."""
    from worker import devices

    return devices.current_plan().summary()


@control_command(args=[("reason", str)], signature="<reason>")
def jumpout_device_unusable(state, reason: str = "", **_: object) -> dict:
    """A pool process's trainer met a broken device: stop consuming from the queue (the running
    jobs of the other pool processes finish or fail on their own) and report it in /v1/health."""
    from worker import devices

    plan = devices.current_plan()
    plan.usable, plan.reason = False, reason or "the device broke under a job"
    log.error("THIS WORKER TAKES NO MORE JOBS: %s", plan.reason)
    state.consumer.call_soon(state.consumer.cancel_task_queue, QUEUE)
    return {"ok": "no longer consuming"}


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
