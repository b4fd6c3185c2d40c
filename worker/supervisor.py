"""Run one claimed job: start the trainer process, keep its heartbeat, stop it, record the end.

``run(job_id)`` is what the Celery task calls. It claims the next job in the fair order that
fits this box's free device slots (``jobstore.devicefit.claim_fitting``: the fair order of
``jobstore.jobs.claim_next`` with a reservation for jobs needing several devices; a conditional
update; a message that finds nothing to claim returns quietly), whichever job the message
names, holds the job's slots (``worker.devices``) until its trainer exits, and ``supervise``
starts the trainer, ``python -m worker.trainer JOB_ID``, in a new session, so that the trainer
and its DataLoader workers form one process group that can be stopped together, and CUDA lives
only there. The trainer is forked by this process's trainer template (``worker.template``: torch
imported once, CUDA never touched; restarted if it died), so a job starts in milliseconds rather
than the seconds a fresh interpreter spends importing torch; it is spawned when the template
cannot fork or ``trainer_template`` is off. While the trainer lives, the supervisor writes the
job's heartbeat every ``heartbeat_interval`` seconds and watches for a cancel request.

The supervisor alone writes a job's final state, from the trainer's exit code:

=========================  =================================================================
trainer exit               job
=========================  =================================================================
0                          ``succeeded``
``EXIT_FAILED`` (3)        ``failed`` with the reason the trainer wrote to its result file
                           (bad config, missing dataset, non-finite loss, CUDA OOM): never retried
``EXIT_ENVIRONMENT`` (5)   ``failed`` at once: the server's disk is full (``worker.failures``);
                           the reason says which checkpoint is intact and how to resume the job
                           once space is freed (``POST /v1/jobs/{id}/retry``); never retried,
                           as another attempt would fail the same way
``EXIT_DEVICE`` (6)        requeued at once without using up an attempt: the worker's device
                           broke (driver, lost GPU; ``worker.devices``), not the job; this
                           worker takes no more jobs (``devices.mark_unusable``). The job's
                           next device failure in a row is a crash (below): it uses an
                           attempt and leaves the worker usable
anything, after a cancel   ``cancelled`` (the trainer checkpoints and exits ``EXIT_STOPPED``;
request                    after ``cancel_grace`` s it gets SIGTERM, 10 s later SIGKILL)
anything, after a worker   requeued at once without using up an attempt; resumes from the
shutdown                   checkpoint the trainer wrote when told to stop
anything, after the job    nothing: the reaper already gave the job to another attempt (this
was taken away, and        one's heartbeats did not reach the database in time); the
``EXIT_SUPERSEDED`` (7)    supervisor that learns it SIGKILLs its trainer (a stop checkpoint
                           could replace the new attempt's file), and a trainer that learns it
                           first, at its cancel poll or its next write (`jobs.hold_attempt`),
                           exits with 7 having written nothing more
anything else (signal,     requeued while ``attempt < max_attempts`` (the next attempt resumes
OOM, crash, the template   from the newest checkpoint whose sha256 matches; a retried job has
died under the trainer)    more, ``jobs.attempt_budget``), else ``failed``; the error reads
                           "attempt 2 of 3: RuntimeError: ... (the full output: GET
                           /v1/jobs/<id>/log)": the exception the trainer wrote to its result
                           file, else how it ended and its last line of output, never a
                           traceback or a server path (``worker.failures``)
=========================  =================================================================

A full disk under the supervisor itself (the job's directory or log cannot be created) fails the
job the same way as ``EXIT_ENVIRONMENT``, without starting the trainer; a log line that cannot be
written is skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from jobstore import db, devicefit, events, joblog, jobs
from jobstore.settings import get_settings
from jobstore.storage import is_disk_full
from jobstore.tables import JobStatus
from worker import devices
from worker.failures import attempt_error, disk_full_reason, last_output_line
from worker.template import ForkedTrainer, TemplateError, TrainerTemplate

log = logging.getLogger(__name__)

EXIT_SUCCEEDED = 0
EXIT_FAILED = 3
EXIT_STOPPED = 4
EXIT_ENVIRONMENT = 5
EXIT_DEVICE = 6
EXIT_SUPERSEDED = 7

KILL_AFTER_TERM_S = 10.0
# In a job's ``error`` after a device failure (`_device_failed_before` looks for it).
DEVICE_NOTE = "met a broken device"
# How long the end of a remote worker's log may hold the job's end (the artifact service away;
# plus one request's `artifacts.LOG_REQUEST_TIMEOUT_S`): after it the end is recorded anyway.
LOG_SEND_TIMEOUT_S = 30.0
ERROR_TAIL_BYTES = 2048
RESULT_FILE = "trainer-result.json"
# Room kept for the trainer's result file from the start of each attempt (blank: no reason yet),
# which the trainer writes over in place: on a disk that filled up meanwhile, a new file could not
# be written, and the reason of the failure is what the job's error needs most.
RESULT_RESERVED_BYTES = 4096
LOG_FILE = joblog.LOG_FILE  # the API reads it by the same name
# The trainer's attempt number, in its environment: every write it makes is that attempt's
# (`jobs.hold_attempt`). Not a setting: set per trainer by its supervisor.
ATTEMPT_ENV = "JUMPOUT_TRAINER_ATTEMPT"

_shutdown_requested = False


def on_shutdown_signal(signum: int, frame: object) -> None:
    """SIGUSR2 from the Celery parent's warm shutdown: stop the trainer (it checkpoints).

    The flag stays set for the rest of this pool process's life, which ends with the worker: a
    worker in warm shutdown starts no new task, and one that did would stop it at once.
    """
    global _shutdown_requested
    _shutdown_requested = True


def run(job_id: str = "") -> str | None:
    """Claim the next job in the fair order and supervise it; returns its final status, or None
    when nothing was queued.

    The message that called this carries ``job_id`` (the job whose submission or requeue sent
    it), but it only means "a worker is wanted": the database decides which job runs
    (`jobstore.devicefit.claim_fitting`), so one owner's hundreds of jobs cannot keep a colleague's
    waiting. After claiming, and again after finishing, the queue of dispatch messages is
    topped up, so that other free workers wake for the jobs still queued and this one comes back
    for the next."""
    settings = get_settings()
    if _shutdown_requested:
        # This worker is stopping: a job claimed now would only be stopped and requeued.
        log.info("message for job %s: worker shutting down, not claiming", job_id or "-")
        _dispatch_more()
        return None
    plan = devices.current_plan()
    if not plan.usable:
        # The parent stops consuming when its device is unusable; a message already delivered
        # is passed on to the other workers.
        log.error(
            "message for job %s: not claiming, the device is unusable: %s", job_id, plan.reason
        )
        _dispatch_more()
        return None
    slots = devices.box_slots(settings)
    job, lease = slots.lease(
        lambda free, total: db.call(
            devicefit.claim_fitting,
            worker=settings.worker_name,
            free=free,
            total=total,
            reserve_after_s=settings.device_reserve_after,
        )
    )
    if job is None:
        # Nothing queued, or nothing that fits the free slots: no top-up here (it would only wake
        # this box's idle pool processes to find the same); a job ending on this box tops up, and
        # the reaper does for the other boxes.
        log.info("message for job %s: nothing queued that fits the free slots", job_id or "-")
        return None
    if job.id != job_id:
        log.info(
            "message for job %s: claimed job %s, next in the fair order", job_id or "-", job.id
        )
    events.publish_changed(job.id)  # running: the event streams' `status`
    _dispatch_more()
    budget = jobs.attempt_budget(job.max_attempts, configured=settings.max_attempts)
    log.info("job %s: device slots %s", job.id, ",".join(lease.slots))
    try:
        return supervise(job.id, attempt=job.attempt, max_attempts=budget, env=lease.environment())
    finally:
        lease.release()  # after the trainer exited: no two jobs on one device
        events.publish_changed(job.id)  # finished, cancelled or requeued (committed by now)
        _dispatch_more()


def _dispatch_more() -> None:
    """Top the broker's dispatch messages up to min(claimable jobs, dispatch_depth). Best effort:
    a database or broker hiccup must not fail the task; the reaper tops up on its next pass."""
    from jobstore.queue import top_up

    try:
        claimable = db.call(jobs.count_claimable, retry_for_s=0)
        if claimable:
            top_up(claimable)
    except Exception as error:  # noqa: BLE001 - logged; the reaper covers it
        log.warning("could not top up the dispatch messages: %s", error)


@dataclass
class _Stop:
    """When and why the supervisor started stopping the trainer."""

    reason: str  # "cancel", "shutdown" or "lost" (the job is no longer this attempt's)
    since: float
    term_sent: float | None = None
    kill_sent: bool = False


def trainer_command(job_id: str) -> list[str]:
    return [sys.executable, "-m", "worker.trainer", job_id]


# This process's trainer template (`worker.template`), and the pid that started it: a forked
# process (a Celery pool process forked from the worker's parent) starts its own.
_template: TrainerTemplate | None = None
_template_owner: int | None = None
# Set when a restarted template failed too: this process spawns its trainers from then on
# rather than pay a template's start (seconds of imports) for every job.
_template_failed_in: int | None = None


def start_template() -> TrainerTemplate | None:
    """This process's trainer template, started if it is not running (it imports in the
    background; the first fork waits for it). None when the settings turn it off or it cannot
    start: trainers are then spawned."""
    global _template, _template_owner
    if not get_settings().trainer_template or _template_failed_in == os.getpid():
        return None
    if _template is not None and _template_owner == os.getpid() and _template.alive():
        return _template
    if _template is not None and _template_owner == os.getpid():
        _template.stop()  # dead: collect it and close our end
    _template, _template_owner = TrainerTemplate(), os.getpid()
    try:
        _template.start()
    except OSError as error:
        log.warning("could not start the trainer template (%s): spawning trainers", error)
        _template = None
    return _template


def stop_template() -> None:
    global _template
    if _template is not None and _template_owner == os.getpid():
        _template.stop()
    _template = None


def start_trainer(
    job_id: str,
    log_file,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
    *,
    while_waiting=None,
):
    """Start the trainer of ``job_id`` writing to ``log_file``: forked by the trainer template
    (torch already imported: a small job starts in milliseconds instead of seconds), or spawned
    as ``command`` (default ``trainer_command(job_id)``) when a command is given or the template
    cannot fork (it is restarted once first). ``env``: added to the trainer's environment (its
    device slots). ``while_waiting``: called about once a second while the template is not
    ready yet (see ``TrainerTemplate.fork``). Returns a ``subprocess.Popen`` or a
    ``worker.template.ForkedTrainer``: both have ``pid`` and ``wait(timeout)``."""
    global _template_failed_in
    if command is None:
        for _ in range(2):
            template = start_template()
            if template is None:
                break
            try:
                return template.fork(
                    job_id, log_file.fileno(), env=env, while_waiting=while_waiting
                )
            except TemplateError as error:
                log.warning("job %s: %s; restarting the template", job_id, error)
                stop_template()  # a late fork of this request must not follow
        else:
            log.error("the trainer template fails: this worker spawns its trainers from now on")
            _template_failed_in = os.getpid()
    return subprocess.Popen(
        command or trainer_command(job_id),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def supervise(
    job_id: str,
    *,
    attempt: int,
    command: list[str] | None = None,
    max_attempts: int | None = None,
    env: dict[str, str] | None = None,
) -> str | None:
    """Run the trainer (``command``, default ``trainer_command(job_id)``) for a claimed job until
    it exits, then record the outcome. ``max_attempts``: the job's budget (default: the
    setting); ``env``: added to the trainer's environment."""
    settings = get_settings()
    out_dir = jobs.job_directory(job_id)
    result_path = out_dir / RESULT_FILE
    log_path = out_dir / LOG_FILE
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        result_path.write_bytes(b" " * RESULT_RESERVED_BYTES)  # JSON whitespace: no reason
        # Unbuffered: a header that a full disk refuses must not stay in a buffer and fail later.
        log_file = open(log_path, "ab", buffering=0)  # noqa: SIM115 - closed below
    except OSError as error:
        if not is_disk_full(error):
            raise
        log.error("job %s: no space left for its directory or log: %s", job_id, error)
        return _fail_for_environment(job_id, attempt=attempt)
    with log_file:
        attempt_offset = log_file.tell()  # this attempt's output starts here (`_log_shipper`)
        try:
            log_file.write(f"\n=== attempt {attempt} ===\n".encode())
        except OSError as error:  # a full disk: the trainer will meet it too, and say so
            log.warning("job %s: could not write to its log: %s", job_id, error)
        start_offset = log_file.tell()
        # The job's heartbeat goes on while a template still imports torch (seconds; more than
        # the reaper's timeout on a loaded machine, which then gave the job to another attempt).
        trainer = start_trainer(
            job_id,
            log_file,
            command,
            {**(env or {}), ATTEMPT_ENV: str(attempt)},
            while_waiting=lambda: _best_effort(jobs.heartbeat, job_id, attempt=attempt),
        )
    log.info("job %s attempt %d: trainer pid %d", job_id, attempt, trainer.pid)
    shipper = _log_shipper(job_id, log_path, attempt_offset)
    stop: _Stop | None = None
    next_heartbeat = 0.0
    poll_s = min(1.0, settings.heartbeat_interval)
    while True:
        try:
            returncode = trainer.wait(timeout=poll_s)
            break
        except subprocess.TimeoutExpired:
            pass
        joblog.cut_log(log_path, settings.log_max_bytes)  # bounded on disk, offsets kept
        now = time.monotonic()
        owned = True
        if now >= next_heartbeat:
            next_heartbeat = now + settings.heartbeat_interval
            # False: the reaper gave the job to another attempt (our heartbeats did not reach the
            # database in time) or it finished; None: the database is unreachable, keep going.
            owned = _best_effort(jobs.heartbeat, job_id, attempt=attempt) is not False
        if stop is None:
            if not owned:
                # Another attempt has the job: a checkpoint written now could replace one of
                # its files, and the store refuses this attempt's records anyway.
                stop = _Stop("lost", now, term_sent=now, kill_sent=True)
                _signal_group(trainer.pid, signal.SIGKILL)
            elif _shutdown_requested:
                # The trainer checkpoints on SIGTERM; nothing to wait for.
                stop = _Stop("shutdown", now, term_sent=now)
                _signal_group(trainer.pid, signal.SIGTERM)
            elif _best_effort(jobs.cancel_requested, job_id):
                # The trainer polls the same flag and stops by itself; this is the fallback.
                stop = _Stop("cancel", now)
        else:
            _escalate(trainer.pid, stop, now, grace_s=settings.cancel_grace)
    # DataLoader workers or anything else the trainer left behind in its group.
    _signal_group(trainer.pid, signal.SIGKILL)
    if shipper is not None:  # the API's copy of the log is whole before the job is final
        # Up to LOG_SEND_TIMEOUT_S plus a request's limit: the job's heartbeat goes on, or a
        # heartbeat_timeout under that would hand a finished job to another attempt.
        with _heartbeats(job_id, attempt=attempt, every_s=settings.heartbeat_interval):
            shipper.close(timeout=LOG_SEND_TIMEOUT_S)
    return _record_outcome(
        job_id,
        attempt=attempt,
        returncode=returncode,
        stop=stop,
        result_path=result_path,
        tail=_tail(log_path, start_offset),
        max_attempts=max_attempts,
    )


@contextlib.contextmanager
def _heartbeats(job_id: str, *, attempt: int, every_s: float):
    """The job's heartbeat, from a thread, while the body waits on something else."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            _best_effort(jobs.heartbeat, job_id, attempt=attempt)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _log_shipper(job_id: str, log_path: Path, offset: int):
    """For a worker on another box (``artifact_url``): the thread that appends this attempt's
    output, from ``offset`` of the local log, to the job's log on the API's box
    (`worker.artifacts.LogShipper`); None on the API's box, whose log is this file."""
    if not get_settings().artifact_url:
        return None
    from worker import artifacts

    # No retries inside a request: the thread tries again a second later by itself. A short
    # limit per request: `LogShipper.close` holds the job's end (no heartbeat) at most that long
    # past LOG_SEND_TIMEOUT_S, well inside the reaper's heartbeat timeout.
    client = artifacts.ArtifactClient(retry_s=0, timeout_s=artifacts.LOG_REQUEST_TIMEOUT_S)
    return artifacts.LogShipper(job_id, log_path, offset, client)


def _escalate(pid: int, stop: _Stop, now: float, *, grace_s: float) -> None:
    if stop.term_sent is None:
        if now - stop.since >= grace_s:
            log.warning("trainer %d still running %.0fs after a cancel: SIGTERM", pid, grace_s)
            _signal_group(pid, signal.SIGTERM)
            stop.term_sent = now
    elif not stop.kill_sent:
        kill_after = KILL_AFTER_TERM_S if stop.reason == "cancel" else max(grace_s, 1.0)
        if now - stop.term_sent >= kill_after:
            log.warning("trainer %d ignored SIGTERM for %.0fs: SIGKILL", pid, kill_after)
            _signal_group(pid, signal.SIGKILL)
            stop.kill_sent = True


def _record_outcome(
    job_id: str,
    *,
    attempt: int,
    returncode: int,
    stop: _Stop | None,
    result_path: Path,
    tail: str,
    max_attempts: int | None = None,
) -> str | None:
    settings = get_settings()
    budget = max_attempts if max_attempts is not None else settings.max_attempts
    reason = stop.reason if stop is not None else None
    if reason == "lost" or returncode == EXIT_SUPERSEDED:
        log.warning("job %s attempt %d: no longer ours; left to its new owner", job_id, attempt)
        return None
    if returncode == EXIT_SUCCEEDED:
        status, error = JobStatus.SUCCEEDED, None
    elif reason == "cancel" or _cancel_requested_now(job_id):
        status, error = JobStatus.CANCELLED, None
    elif reason == "shutdown":
        # Not the job's fault: requeued without using up an attempt, resumes from the checkpoint
        # the trainer just wrote when the next worker starts.
        note = f"attempt {attempt} interrupted by a worker shutdown"
        if db.call(jobs.requeue_job, job_id, attempt=attempt, error=note, count_attempt=False):
            _enqueue(job_id)
        log.info("job %s: %s; requeued", job_id, note)
        return JobStatus.QUEUED
    elif returncode == EXIT_FAILED:
        status, error = JobStatus.FAILED, _read_reason(result_path) or tail
    elif returncode == EXIT_ENVIRONMENT:
        return _fail_for_environment(job_id, attempt=attempt, reason=_read_reason(result_path))
    elif returncode == EXIT_DEVICE and not _device_failed_before(job_id):
        # Not the job's fault: back to the queue with its attempt given back, for a worker whose
        # device works; this one takes no more.
        reason = _read_reason(result_path) or _crash_reason(DEVICE_NOTE, 1, tail)
        devices.mark_unusable(reason)
        note = f"attempt {attempt} {DEVICE_NOTE} on worker {settings.worker_name}: {reason}"
        if db.call(jobs.requeue_job, job_id, attempt=attempt, error=note, count_attempt=False):
            _enqueue(job_id)
        log.error("job %s: %s; requeued", job_id, note)
        return JobStatus.QUEUED
    else:
        how = _describe_exit(returncode)
        crash = _read_reason(result_path) or _crash_reason(how, returncode, tail)
        if returncode == EXIT_DEVICE:
            # Its second device failure in a row, on another worker: more likely the job's own
            # error matching a device pattern than two broken devices, so it uses an attempt
            # and this worker stays usable (else it would disable every worker in turn, forever).
            crash = f"{DEVICE_NOTE} again, on worker {settings.worker_name}: {crash}"
        error = attempt_error(job_id, attempt=attempt, budget=budget, reason=crash)
        if attempt < budget:
            log.warning("job %s attempt %d: trainer %s; requeueing", job_id, attempt, how)
            if db.call(jobs.requeue_job, job_id, attempt=attempt, error=error, count_attempt=True):
                _enqueue(job_id)
            return JobStatus.QUEUED
        status = JobStatus.FAILED
    db.call(jobs.finish_job, job_id, status=status, error=error, attempt=attempt)
    log.info("job %s attempt %d: %s", job_id, attempt, status)
    return status


def _device_failed_before(job_id: str) -> bool:
    """Whether the job's last requeue was for a device failure (its ``error`` says so: no
    column of its own; the crash path's error for a repeated one says so too)."""
    row = _best_effort(jobs.get_job, job_id)
    return row is not None and DEVICE_NOTE in (row.error or "")


def _crash_reason(how: str, returncode: int, tail: str) -> str:
    """A crash that left no reason of its own: how it ended and, when it exited by itself, its
    last line of output (a killed process's last line is whatever it was doing)."""
    line = last_output_line(tail) if returncode > 0 else ""
    return f"trainer {how}: {line}" if line else f"trainer {how}"


def _fail_for_environment(job_id: str, *, attempt: int, reason: str | None = None) -> str:
    """Fail the job at once for a full disk (see the table above): ``reason`` is the trainer's
    (which checkpoint it could not write), else one written here."""
    if reason is None:
        from worker import artifacts  # a remote worker's checkpoints are on the API's box

        newest = _best_effort(artifacts.newest_intact_checkpoint, job_id)
        reason = disk_full_reason(job_id, intact_epoch=newest.epoch if newest else None)
    db.call(jobs.finish_job, job_id, status=JobStatus.FAILED, error=reason, attempt=attempt)
    log.error("job %s attempt %d: failed, the disk is full", job_id, attempt)
    return JobStatus.FAILED


def _enqueue(job_id: str) -> None:
    """Best effort: the job is queued in the database already; the reaper publishes for it if
    the broker is down or hangs."""
    from jobstore.queue import enqueue_job

    try:
        enqueue_job(job_id)
    except Exception as error:  # noqa: BLE001 - the reaper covers it
        log.warning("job %s stays queued for the reaper: could not publish (%s)", job_id, error)


def _cancel_requested_now(job_id: str) -> bool:
    return bool(_best_effort(jobs.cancel_requested, job_id))


def _best_effort(fn, *args, **kwargs):
    """A heartbeat or a cancel poll must not kill the supervision: a later one will do."""
    try:
        return db.call(fn, *args, retry_for_s=0, **kwargs)
    except Exception as error:  # noqa: BLE001 - logged, and the next poll retries
        log.warning("%s for job %s failed: %s", fn.__name__, args[0] if args else "?", error)
        return None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _describe_exit(returncode: int) -> str:
    if returncode == ForkedTrainer.LOST:
        return "lost with its template process (exit status unknown)"
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def _read_reason(result_path: Path) -> str | None:
    try:
        return json.loads(result_path.read_text())["error"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _tail(log_path: Path, offset: int) -> str:
    """The last ``ERROR_TAIL_BYTES`` this attempt's trainer wrote."""
    try:
        with open(log_path, "rb") as log_file:
            size = log_file.seek(0, os.SEEK_END)
            log_file.seek(max(offset, size - ERROR_TAIL_BYTES))
            return log_file.read().decode(errors="replace").strip()
    except OSError:
        return ""
