"""The trainer process: ``python -m worker.trainer JOB_ID``, started by the supervisor.

It owns CUDA (the Celery worker never touches it), trains one attempt of one job with
``jumpout.engine.fit`` and reports through the engine's callbacks to the store: epoch metrics
(an upsert, so a resumed attempt never duplicates an epoch), checkpoints written and pruned, and
``should_stop`` from the job's cancel flag (read at most once a second), a SIGTERM or the death of
the supervisor. On a stop the engine checkpoints and returns; the exit code tells the supervisor
what happened (see ``worker.supervisor``):

* 0: trained every epoch;
* ``EXIT_FAILED``: a deterministic failure (bad config, missing dataset, non-finite loss, CUDA
  out of memory); the
  readable reason is in ``trainer-result.json`` next to the checkpoints; retrying cannot help;
* ``EXIT_STOPPED``: stopped on request after checkpointing;
* ``EXIT_SUPERSEDED``: the job was given to another attempt meanwhile (`jobs.AttemptSuperseded`);
  this trainer wrote nothing after learning it, and reports nothing;
* ``EXIT_DEVICE``: the worker's device is broken (no usable GPU where one is configured, a
  driver too old for the wheel's CUDA line, a GPU lost mid-run: `worker.devices`); the reason is
  for the operator; the job goes back to the queue without using an attempt;
* ``EXIT_FAILED`` also for a ``compile=true`` job whose ``torch.compile`` fails (no C compiler
  for Triton or Inductor, a backend compiler error): the same spec fails the same way on this
  server, so the reason says to submit with ``compile=false`` or ask the operator;
* ``EXIT_ENVIRONMENT``: the server's disk is full (a checkpoint, the log or the database could
  not be written: `jobstore.storage.is_disk_full`); the partial checkpoint is gone, the earlier
  ones intact, and the reason (`worker.failures.disk_full_reason`) says how to resume the job
  once space is freed; retrying before that cannot help;
* anything else (an exception, a signal, the OOM killer): a crash, retried from a checkpoint;
  for an exception the result file holds ``"<ExceptionType>: <message>"`` without the server's
  paths (`worker.failures.describe_exception`), and the traceback is in the log.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Any

from sqlalchemy import text

from jobstore import datasets, db, events, jobs
from jobstore.settings import get_settings
from jobstore.storage import is_disk_full
from jobstore.tables import JobStatus
from worker import devices, ranks
from worker.failures import describe_exception, disk_full_reason, shorten, strip_paths
from worker.supervisor import (
    ATTEMPT_ENV,
    EXIT_DEVICE,
    EXIT_ENVIRONMENT,
    EXIT_FAILED,
    EXIT_STOPPED,
    EXIT_SUCCEEDED,
    EXIT_SUPERSEDED,
)

log = logging.getLogger("worker.trainer")

CANCEL_POLL_S = 1.0
_PR_SET_PDEATHSIG = 1


class StoreCallback:
    """Engine callback that writes one job's progress to the store.

    Epoch metrics are held back until the next checkpoint and written with it, in one database
    session, metrics first (and by ``flush`` when training ends, however it ends). So a
    recorded checkpoint never has epochs the database lacks, and a crash loses only epochs after
    the newest checkpoint, which the next attempt trains again and records (an upsert). With a
    checkpoint per epoch (``checkpoint_interval`` 0) that is one transaction per epoch; with
    sub-second epochs, one per interval.

    Every write is this ``attempt``'s (`jobs.hold_attempt`): once the reaper has given the job
    to another attempt, the next write or cancel poll raises `jobs.AttemptSuperseded` and this
    trainer ends without writing (no stop checkpoint, no record, no deleted file), so it never
    prunes or overwrites what the new attempt recorded.
    """

    def __init__(
        self,
        job_id: str,
        *,
        attempt: int,
        stop_event: threading.Event,
        parent_pid: int,
        epochs: int = 1,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        # Progress within an epoch, for the event streams only (not stored), at most 2/s.
        self.progress = events.ProgressReporter(job_id, epochs=epochs)
        self.stop_event = stop_event
        self.parent_pid = parent_pid
        self._cancel_checked_at = float("-inf")
        self._cancelled = False
        self.superseded = False  # the job went to another attempt: send nothing more
        self._pending: list[dict] = []
        # A worker on another box (`worker.artifacts`): checkpoints are sent to the API's box
        # first, and the uploader records them (with their epochs) once they are there.
        self.uploader = None

    def on_epoch_end(self, metrics: dict) -> None:
        self._pending.append(metrics)
        # The engine's progress, one line an epoch, for the job's log (GET /v1/jobs/{id}/log).
        log.info("epoch %s", _epoch_line(metrics))

    def flush(self) -> None:
        """Write the epochs held back (a remote worker: after the uploads queued before them,
        all of which are waited for; none after a hand-over)."""
        if self.uploader is not None:
            if self.superseded:
                self.uploader.abandon()
                return
            self.uploader.epochs(self._pending)
            self._pending = []
            self.uploader.close()
            return
        if self._pending:
            db.call(_record_progress, self.job_id, self._pending, attempt=self.attempt)
            self._pending = []
            events.publish_changed(self.job_id)

    def before_checkpoint(self, path: str, epoch: int) -> None:
        # The file may replace one the job's new attempt has recorded (it trains the same
        # epochs): written only while the job is still this attempt's. The cancel poll does
        # not cover it: it runs once a second, and not after the last epoch.
        try:
            db.call(jobs.hold_attempt, self.job_id, attempt=self.attempt, lock=False)
        except jobs.AttemptSuperseded:
            self.superseded = True
            raise

    def on_checkpoint(
        self, path: str, epoch: int, sha256: str, size_bytes: int, is_best: bool
    ) -> None:
        if self.uploader is not None:
            self.uploader.checkpoint(path, epoch=epoch, sha256=sha256, size_bytes=size_bytes,
                                     is_best=is_best, epochs=self._pending)  # fmt: skip
            self._pending = []
            return
        checkpoint = dict(path=path, epoch=epoch, sha256=sha256, size_bytes=size_bytes)
        db.call(
            _record_progress,
            self.job_id,
            self._pending,
            {**checkpoint, "is_best": is_best},
            attempt=self.attempt,
        )
        if self._pending:
            events.publish_changed(self.job_id)
        self._pending = []

    def on_checkpoint_removed(self, path: str) -> None:
        if self.uploader is None:  # else the uploader prunes the records, by the same rule
            db.call(
                _as_attempt, jobs.forget_checkpoint, self.job_id, attempt=self.attempt, path=path
            )

    def on_step(self, epoch: int, step: int, steps: int, loss: float | None) -> None:
        self.progress.on_step(epoch, step, steps, loss)

    def should_stop(self) -> bool:
        if self.stop_event.is_set() or os.getppid() != self.parent_pid:
            return True
        now = time.monotonic()
        if not self._cancelled and now - self._cancel_checked_at >= CANCEL_POLL_S:
            self._cancel_checked_at = now
            try:
                self._cancelled = bool(
                    db.call(read_stop_request, self.job_id, self.attempt, retry_for_s=0)
                )
            except jobs.AttemptSuperseded:
                self.superseded = True
                raise  # ends the run at once: a stop would write a checkpoint
            except Exception as error:  # noqa: BLE001 - the next poll asks again
                log.warning("could not read the cancel flag: %s", error)
        return self._cancelled


def _epoch_line(metrics: dict) -> str:
    """``3: train loss 0.412 acc 87.1%, test loss 0.380 acc 88.0%, lr 0.05, 1.2 s``: what the
    epoch measured, leaving out what it did not."""
    parts = [str(metrics.get("epoch", "?"))]
    for split in ("train", "val", "test"):
        loss, accuracy = metrics.get(f"{split}_loss"), metrics.get(f"{split}_accuracy")
        if loss is not None and accuracy is not None:
            parts.append(f"{split} loss {loss:.4f} acc {100 * accuracy:.1f}%")
    if metrics.get("lr") is not None:
        parts.append(f"lr {metrics['lr']:.4g}")
    if metrics.get("seconds") is not None:
        parts.append(f"{metrics['seconds']:.2f} s")
    return parts[0] + ": " + ", ".join(parts[1:])


def read_stop_request(session, job_id: str, attempt: int) -> bool:
    """`jobs.cancel_requested` for the training thread (raising `jobs.AttemptSuperseded` once
    the job no longer runs as ``attempt``), bounded in time: on PostgreSQL the
    statement gives up after ``db_connect_timeout`` seconds (a lock, a stalled server), and the
    connection itself was opened with a connect timeout and a TCP user timeout (`jobstore.db`),
    so a network partition costs a poll at most about that long, never the training."""
    if not db.is_sqlite():
        timeout_ms = int(get_settings().db_connect_timeout * 1000)
        session.execute(text(f"SET LOCAL statement_timeout = {timeout_ms}"))
    jobs.hold_attempt(session, job_id, attempt=attempt, lock=False)
    return jobs.cancel_requested(session, job_id)


def _record_progress(
    session, job_id: str, epochs: list[dict], checkpoint: dict | None = None, *, attempt: int
) -> None:
    """Epochs, then the checkpoint that covers them, in one transaction (``db.call`` commits),
    as long as the job still runs as ``attempt``: a kill between the two leaves neither."""
    jobs.hold_attempt(session, job_id, attempt=attempt)
    jobs.record_epochs(session, job_id, epochs, commit=False)
    if checkpoint is not None:
        jobs.record_checkpoint(session, job_id, **checkpoint, commit=False)


def _as_attempt(session, write, job_id: str, *, attempt: int, **values) -> None:
    """``write(session, job_id, **values)`` as long as the job still runs as ``attempt``
    (with ``db.call``)."""
    jobs.hold_attempt(session, job_id, attempt=attempt)
    write(session, job_id, **values)


def build_config(spec: dict[str, Any], *, job_id: str):
    """The job's resolved spec as a ``TrainConfig``, with this machine's paths and device,
    validated again by the spec (a row written by an older version, or by hand, is refused
    with the field named)."""
    from jumpout.spec import TrainConfig

    return TrainConfig.from_dict({**spec, **jobs.server_fields(job_id)})


def _describe_device(device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``: what ran the job, for the job record."""
    if device.type != "cuda":
        return device.type
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def _die_with_parent() -> None:
    """Get SIGTERM (checkpoint and stop) if the supervisor dies, rather than train on orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: should_stop still notices the parent change


def _write_result(job_id: str, error: str) -> None:
    """The failure's reason, for the supervisor, written over the room it reserved for it
    (`worker.supervisor.RESULT_RESERVED_BYTES`): that still works on a disk that has filled up.
    The supervisor reads it only once this process has exited."""
    path = jobs.job_directory(job_id) / ranks.result_name()  # a rank's own (`worker.ranks`)
    data = json.dumps({"status": JobStatus.FAILED, "error": error}).encode()
    with open(path, "r+b" if path.exists() else "wb") as result:
        result.write(data)
        result.truncate()


def _write_result_quietly(job_id: str, error: str) -> None:
    """`_write_result` where the disk may be full: a failure is logged, and the supervisor
    falls back on a reason of its own."""
    try:
        _write_result(job_id, error)
    except OSError as write_error:
        log.warning("could not write the result file: %s", write_error)


def _fail_for_environment(job_id: str, error: BaseException) -> int:
    """The disk is full: record why and how to resume; ``EXIT_ENVIRONMENT`` (not retried)."""
    from jumpout.engine import CheckpointWriteError

    log.error("job %s: no space left on the disk", job_id, exc_info=error)
    failed_epoch = None
    cause: BaseException | None = error
    while cause is not None and failed_epoch is None:
        if isinstance(cause, CheckpointWriteError):
            failed_epoch = cause.epoch
        cause = cause.__cause__ or cause.__context__
    from worker import artifacts

    try:
        # The engine removed the partial file; the newest checkpoint whose sha256 matches is
        # what a retry resumes from (a remote worker's: the newest recorded, on the API's box).
        intact = db.call(artifacts.newest_intact_checkpoint, job_id, retry_for_s=0)
    except Exception as read_error:  # noqa: BLE001 - the reason is written without it
        log.warning("could not read the job's checkpoints: %s", read_error)
        intact = None
    reason = disk_full_reason(
        job_id,
        failed_epoch=failed_epoch,
        intact_epoch=intact.epoch if intact is not None else None,
    )
    _write_result_quietly(job_id, reason)
    return EXIT_ENVIRONMENT


def _resume_file(job_id: str) -> str | None:
    """The file of the job's newest checkpoint whose sha256 matches its record, or None: here,
    or, for a worker on another box, fetched from the API's box (`worker.artifacts`)."""
    from worker import artifacts

    if artifacts.remote_artifacts():
        client = artifacts.ArtifactClient()
        try:
            found = artifacts.fetch_checkpoint(job_id, client, into=jobs.job_directory(job_id))
        finally:
            client.close()
        return str(found) if found is not None else None
    checkpoint = db.call(jobs.newest_valid_checkpoint, job_id)
    return checkpoint.path if checkpoint is not None else None


def _checkpoint_uploader(job_id: str, config, *, attempt: int):
    """For a worker on another box: the thread that sends the checkpoints to the API's box and
    records them once there (`worker.artifacts.CheckpointUploader`); None on the API's box."""
    from worker import artifacts

    if not artifacts.remote_artifacts():
        return None
    artifacts.clear_staging(jobs.job_directory(job_id))

    def record(epochs: list[dict], checkpoint: dict | None) -> None:
        db.call(_record_progress, job_id, epochs, checkpoint, attempt=attempt)
        if epochs:
            events.publish_changed(job_id)

    return artifacts.CheckpointUploader(
        job_id,
        artifacts.ArtifactClient(),
        record,
        keep_last=config.keep_last,
        keep_best=config.keep_best,
        attempt=attempt,
    )


def _init_source(job, config, *, resuming: bool) -> dict | None:
    """Where this attempt's starting weights come from (`jumpout.engine.resolve_init_from`'s
    record): for ``job:<id>`` that job's newest valid checkpoint (sha256 checked), else a file
    under the data directory. A resumed attempt starts from its own checkpoint, so its record is
    the earlier attempt's, kept in the job's environment."""
    from jumpout.engine import resolve_init_from
    from jumpout.spec import ConfigError

    if config.init_from is None:
        return None
    if resuming:
        return (job.environment or {}).get("init_from")
    job_checkpoint = None
    if config.init_from.startswith("job:"):
        source_id = config.init_from.removeprefix("job:")
        job_checkpoint = _resume_file(source_id)
        if job_checkpoint is None:
            raise ConfigError("init_from", f"job {source_id} has no valid checkpoint to start from")
    return resolve_init_from(config, job_checkpoint=job_checkpoint)


def _fail_for_device(job_id: str, error: BaseException | str) -> int:
    """The worker's device is broken: the reason for the operator; ``EXIT_DEVICE`` (requeued
    without using an attempt, and this worker takes no more jobs)."""
    import torch

    log.error("job %s: the device is not usable: %s", job_id, error)
    reason = devices.device_failure_reason(error, torch_cuda=torch.version.cuda)
    _write_result_quietly(job_id, strip_paths(reason))
    return EXIT_DEVICE


def _check_device(device) -> None:
    """A real call on a CUDA device (an allocation, a kernel, a copy back): the NVML-based
    availability check says "available" even on a driver too old for the wheel."""
    if device.type == "cuda":
        import torch

        torch.ones(8, device=device).mul_(2).sum().item()


# A failure of torch.compile's backend, not of the model: Dynamo wraps what Inductor or Triton
# raised (no C compiler, a compiler error) in BackendCompilerFailed (InductorError since 2.6).
_COMPILER_FAILURE = re.compile(
    r"C\+\+ compiler|C compiler|InvalidCxxCompiler|CalledProcessError|"
    r"backend='inductor' raised|CompilationError",
    re.IGNORECASE,
)


def is_compile_failure(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is ``torch.compile`` failing to compile."""
    try:
        from torch._dynamo.exc import BackendCompilerFailed
    except ImportError:  # pragma: no cover - torch without dynamo
        BackendCompilerFailed = ()  # noqa: N806
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, BackendCompilerFailed) or _COMPILER_FAILURE.search(str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def compile_failure_reason(error: BaseException) -> str:
    """A ``torch.compile`` failure for the person who submitted the job, without server paths."""
    detail = shorten(strip_paths(f"{type(error).__name__}: {error}"), 200)
    return (
        f"torch.compile failed: {detail}; submit the job with compile=false, or ask the "
        "server's operator to install a C compiler (gcc) and writable compiler caches "
        "(TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR) in the worker"
    )


def train(job_id: str) -> int:
    """Train one attempt of ``job_id``; returns the exit code."""
    parent_pid = os.getppid()
    _die_with_parent()
    stop_event = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_event.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop_event.set())

    import torch

    from jumpout.data import DatasetNotFoundError
    from jumpout.engine import NonFiniteLossError, fit, resolve_device
    from jumpout.provenance import environment
    from jumpout.spec import ConfigError

    try:
        job = db.call(jobs.get_job, job_id)
    except LookupError:
        _write_result(job_id, f"job {job_id} does not exist")
        return EXIT_FAILED
    try:
        config = build_config(job.spec, job_id=job_id)
    except (ConfigError, TypeError, ValueError) as error:
        _write_result(job_id, f"invalid job spec: {error}")
        return EXIT_FAILED
    if config.devices > 1 and ranks.rank() is None:
        # This process launches the job's ranks, which train (each checks its device), and
        # makes one end of theirs (`worker.ranks`).
        return ranks.run_ranks(job_id, config.devices)
    try:
        # The device is the server's setting, not the job's: a device that cannot be used here
        # is this worker's failure, and the job goes back to the queue for another.
        device = resolve_device(config.device)
        _check_device(device)
    except Exception as error:  # noqa: BLE001 - whatever CUDA raises: the device is unusable
        return _fail_for_device(job_id, error)
    # This attempt's number, from the supervisor; a trainer started by hand takes the job's
    # current one, and trains only while the job is running (its first write checks).
    attempt = int(os.environ.get(ATTEMPT_ENV) or job.attempt)
    resume_from = _resume_file(job_id)
    if resume_from:
        log.info("resuming job %s from %s", job_id, resume_from)
    try:
        init_source = _init_source(job, config, resuming=resume_from is not None)
    except ConfigError as error:
        _write_result(job_id, f"invalid job spec: {error}")
        return EXIT_FAILED
    # What reproducing the job needs beyond its spec; this attempt's replaces an earlier one's.
    provenance = environment(config, device=device, init_source=init_source)
    slots = devices.job_slots()
    if slots is not None:  # which of the box's device slots (GPUs) this attempt was given
        provenance["device_slots"] = slots
    if ranks.reports():  # one device, or rank 0 of several: the others only train
        described = ranks.describe_device(config.devices, _describe_device(device))
        db.call(
            _as_attempt,
            jobs.set_environment,
            job_id,
            attempt=attempt,
            environment=provenance,
            device=described,
        )
        callback = StoreCallback(
            job_id,
            attempt=attempt,
            stop_event=stop_event,
            parent_pid=parent_pid,
            epochs=config.epochs,
        )
        callback.uploader = _checkpoint_uploader(job_id, config, attempt=attempt)
    else:
        callback = ranks.RankCallback(stop_event=stop_event, parent_pid=parent_pid)
    trained = False
    try:
        result = fit(
            config,
            [callback],
            resume_from=resume_from,
            init_source=init_source,
            checkpoint_every_s=get_settings().checkpoint_interval,
        )
        trained = True
    except ConfigError as error:
        _write_result(job_id, f"invalid job spec: {error}")
        return EXIT_FAILED
    except DatasetNotFoundError as error:
        # The library's message (server paths, download=True) is for this log; the job's error
        # is for an API client and says what the server's operator must do.
        log.warning("job %s: %s", job_id, error)
        _write_result(job_id, datasets.worker_failure_message(config))
        return EXIT_FAILED
    except NonFiniteLossError as error:
        _write_result(job_id, f"training diverged: {error}")
        return EXIT_FAILED
    except torch.OutOfMemoryError:
        # The same spec on the same device runs out again: not worth another attempt.
        _write_result(
            job_id,
            f"out of memory on {_describe_device(device)} with batch_size {config.batch_size}: "
            "submit a smaller batch_size or a smaller architecture",
        )
        return EXIT_FAILED
    except Exception as error:
        if device.type == "cuda" and devices.is_device_failure(error):
            return _fail_for_device(job_id, error)
        if config.compile and is_compile_failure(error):
            # Deterministic on this server: another attempt would compile, and fail, again.
            log.error("job %s: torch.compile failed", job_id, exc_info=error)
            _write_result(job_id, compile_failure_reason(error))
            return EXIT_FAILED
        raise
    finally:
        # The epochs after the last checkpoint (none when it was the last). After a failure, a
        # store that cannot take them must not change how the attempt ends (a deterministic
        # failure would become a crash, retried).
        if trained:
            callback.flush()
        else:
            try:
                callback.flush()
            except jobs.AttemptSuperseded:
                pass  # what the run ended on, most likely; the new attempt trains them again
            except Exception as error:  # noqa: BLE001 - logged; the failure decides the exit
                log.warning("job %s: the last epochs were not recorded: %s", job_id, error)
    if result.stopped:
        return EXIT_STOPPED
    return EXIT_SUCCEEDED


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m worker.trainer JOB_ID", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    job_id = args[0]
    try:
        return train(job_id)
    except jobs.AttemptSuperseded as error:
        # Not this attempt's failure, nor its to report: the job's new attempt owns the result
        # file and the checkpoints; its old supervisor records nothing either.
        log.warning("%s", error)
        return EXIT_SUPERSEDED
    except Exception as error:
        if is_disk_full(error):
            return _fail_for_environment(job_id, error)
        # A crash, retried while attempts remain (it may be transient): the job's error names
        # the exception (`worker.failures`); the traceback goes to the log as the error rises.
        _write_result_quietly(job_id, describe_exception(error))
        raise


if __name__ == "__main__":
    sys.exit(main())
