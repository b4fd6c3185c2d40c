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
* anything else (an exception, a signal, the OOM killer): a crash, retried from a checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from jobstore import db, jobs
from jobstore.settings import get_settings
from jobstore.tables import JobStatus
from worker.supervisor import EXIT_FAILED, EXIT_STOPPED, EXIT_SUCCEEDED, RESULT_FILE

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
    """

    def __init__(self, job_id: str, *, stop_event: threading.Event, parent_pid: int) -> None:
        self.job_id = job_id
        self.stop_event = stop_event
        self.parent_pid = parent_pid
        self._cancel_checked_at = float("-inf")
        self._cancelled = False
        self._pending: list[dict] = []

    def on_epoch_end(self, metrics: dict) -> None:
        self._pending.append(metrics)

    def flush(self) -> None:
        """Write the epochs held back."""
        if self._pending:
            db.call(_record_progress, self.job_id, self._pending)
            self._pending = []

    def on_checkpoint(
        self, path: str, epoch: int, sha256: str, size_bytes: int, is_best: bool
    ) -> None:
        checkpoint = dict(path=path, epoch=epoch, sha256=sha256, size_bytes=size_bytes)
        db.call(_record_progress, self.job_id, self._pending, {**checkpoint, "is_best": is_best})
        self._pending = []

    def on_checkpoint_removed(self, path: str) -> None:
        db.call(jobs.forget_checkpoint, self.job_id, path=path)

    def on_step(self, epoch: int, step: int, steps: int, loss: float | None) -> None:
        pass

    def should_stop(self) -> bool:
        if self.stop_event.is_set() or os.getppid() != self.parent_pid:
            return True
        now = time.monotonic()
        if not self._cancelled and now - self._cancel_checked_at >= CANCEL_POLL_S:
            self._cancel_checked_at = now
            try:
                self._cancelled = bool(db.call(jobs.cancel_requested, self.job_id, retry_for_s=0))
            except Exception as error:  # noqa: BLE001 - the next poll asks again
                log.warning("could not read the cancel flag: %s", error)
        return self._cancelled


def _record_progress(
    session, job_id: str, epochs: list[dict], checkpoint: dict | None = None
) -> None:
    """Epochs, then the checkpoint that covers them, in one session (with ``db.call``)."""
    jobs.record_epochs(session, job_id, epochs)
    if checkpoint is not None:
        jobs.record_checkpoint(session, job_id, **checkpoint)


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
    path = jobs.job_directory(job_id) / RESULT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"status": JobStatus.FAILED, "error": error}))
    os.replace(tmp, path)


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
        found = db.call(jobs.newest_valid_checkpoint, source_id)
        if found is None:
            raise ConfigError("init_from", f"job {source_id} has no valid checkpoint to start from")
        job_checkpoint = found.path
    return resolve_init_from(config, job_checkpoint=job_checkpoint)


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
        device = resolve_device(config.device)
    except (ConfigError, TypeError, ValueError) as error:
        _write_result(job_id, f"invalid job spec: {error}")
        return EXIT_FAILED
    checkpoint = db.call(jobs.newest_valid_checkpoint, job_id)
    resume_from = checkpoint.path if checkpoint is not None else None
    if resume_from:
        log.info("resuming job %s from %s", job_id, resume_from)
    try:
        init_source = _init_source(job, config, resuming=resume_from is not None)
    except ConfigError as error:
        _write_result(job_id, f"invalid job spec: {error}")
        return EXIT_FAILED
    # What reproducing the job needs beyond its spec; this attempt's replaces an earlier one's.
    provenance = environment(config, device=device, init_source=init_source)
    db.call(jobs.set_environment, job_id, environment=provenance, device=_describe_device(device))
    callback = StoreCallback(job_id, stop_event=stop_event, parent_pid=parent_pid)
    try:
        result = fit(
            config,
            [callback],
            resume_from=resume_from,
            init_source=init_source,
            checkpoint_every_s=get_settings().checkpoint_interval,
        )
    except ConfigError as error:
        _write_result(job_id, f"invalid job spec: {error}")
        return EXIT_FAILED
    except DatasetNotFoundError as error:
        _write_result(job_id, f"dataset not found: {error}")
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
    finally:
        callback.flush()  # the epochs after the last checkpoint (none when it was the last)
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
    return train(args[0])


if __name__ == "__main__":
    sys.exit(main())
