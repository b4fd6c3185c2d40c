"""A job with ``devices > 1``: its trainer launches the ranks and turns their ends into one.

The supervisor starts one trainer per attempt, as for any job (``worker.trainer``). When the
job's spec asks for N > 1 devices, that trainer does not train: it runs PyTorch's elastic
launcher (`jumpout.distributed.launch`, what ``torchrun --standalone`` runs) for N ranks, each
``worker.trainer``'s ``train`` in a spawned interpreter with the launcher's ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE`` (and the job's ``CUDA_VISIBLE_DEVICES``, set by the
supervisor's device slots: rank r uses the r-th GPU given). The ranks stay in the trainer's
process group, so the supervisor's signals (a cancel's SIGTERM, the SIGKILL after the grace
period) reach every rank, and the trainer's exit is the job's:

* rank 0 alone reports (epoch metrics, checkpoints, progress: the ``StoreCallback``) and polls
  the cancel flag; the other ranks only watch for a signal or the death of the trainer. A stop
  asked of any rank stops all at the same step (`jumpout.distributed`), rank 0 checkpoints;
* every rank writes its failure's reason to its own ``trainer-result-rankR.json`` (room
  reserved as for the trainer's own, `worker.supervisor.RESULT_RESERVED_BYTES`);
* when a rank fails, the launcher stops the others. `run_ranks` gives the supervisor one exit
  code and one reason (`outcome`): a full disk, a broken device or a deterministic failure of
  any rank is the job's (in that order); ranks that all stopped on request are a stop; anything
  else (a rank killed, a crash) is a crash, retried from the last checkpoint like any other.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from jobstore import jobs
from worker.supervisor import (
    EXIT_DEVICE,
    EXIT_ENVIRONMENT,
    EXIT_FAILED,
    EXIT_STOPPED,
    EXIT_SUCCEEDED,
    EXIT_SUPERSEDED,
    RESULT_FILE,
    RESULT_RESERVED_BYTES,
)

log = logging.getLogger("worker.ranks")

EXIT_RANK_CRASHED = 1
"""The trainer's exit when a rank crashed or was killed: the supervisor's crash path (retried)."""

# A rank's failure that is the job's, most telling first: the disk, the device, the spec.
_JOB_FAILURES = (EXIT_ENVIRONMENT, EXIT_DEVICE, EXIT_FAILED)


def rank() -> int | None:
    """This process's rank in a launched job, or None outside one."""
    from jumpout.distributed import in_launched_rank

    return int(os.environ["RANK"]) if in_launched_rank() else None


def reports() -> bool:
    """Whether this process reports to the store: a one-device trainer, or rank 0."""
    return rank() in (None, 0)


def result_name(rank_number: int | None = None) -> str:
    """The result file this process writes its failure's reason to (see the module's text)."""
    number = rank() if rank_number is None else rank_number
    return RESULT_FILE if number is None else f"trainer-result-rank{number}.json"


def describe_device(devices: int, one: str) -> str:
    """The job record's device: ``2 x cuda:0 (NVIDIA H100 80GB HBM3)`` (rank 0's, ``one``)."""
    return one if devices == 1 else f"{devices} x {one}"


class RankCallback:
    """The callback of a rank other than 0: nothing to report, only a stop to notice (a
    signal, or the trainer that launched it gone)."""

    def __init__(self, *, stop_event, parent_pid: int) -> None:
        self.stop_event = stop_event
        self.parent_pid = parent_pid

    def should_stop(self) -> bool:
        return self.stop_event.is_set() or os.getppid() != self.parent_pid

    def flush(self) -> None:
        """Nothing held back (rank 0 writes the epochs)."""


def rank_main(job_id: str) -> None:
    """A rank's entry point (run by the launcher in a spawned interpreter): the trainer's
    ``main`` with this rank's logging and result file; a non-zero exit code is the process's,
    so the launcher sees the failure and stops the other ranks."""
    from worker import trainer

    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s rank {rank()} %(name)s: %(message)s",
    )
    code = trainer.main([job_id])
    if code != EXIT_SUCCEEDED:
        sys.exit(code)


def run_ranks(job_id: str, devices: int) -> int:
    """Launch the job's ``devices`` ranks, wait for them, and return the trainer's exit code
    (writing the reason of a failure to the trainer's result file, `outcome`)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from jumpout.distributed import RanksFailed, launch

    directory = jobs.job_directory(job_id)
    for number in range(devices):
        (directory / result_name(number)).write_bytes(b" " * RESULT_RESERVED_BYTES)
    log.info("job %s: launching %d ranks", job_id, devices)
    try:
        launch(rank_main, (job_id,), devices)
    except RanksFailed as failed:
        code, reason = outcome(failed.exit_codes, directory, devices)
        if reason is not None:
            _write_reason(directory / RESULT_FILE, reason)
        return code
    except SignalException as signalled:
        # The supervisor's SIGTERM (a cancel, a worker shutdown) reached the ranks too: they
        # checkpointed while the launcher waited for them. The supervisor records the stop.
        log.info("job %s: ranks stopped on %s", job_id, signalled.sigval.name)
        return EXIT_STOPPED
    return EXIT_SUCCEEDED


def outcome(exit_codes: dict[int, int], directory: Path, devices: int) -> tuple[int, str | None]:
    """The trainer's exit code and reason for ranks that ended with ``exit_codes`` (the failed
    ones, by rank; the launcher stopped the rest)."""
    from jumpout.distributed import describe_exit

    if EXIT_SUPERSEDED in exit_codes.values():  # the job is another attempt's: nothing to say
        return EXIT_SUPERSEDED, None
    reasons = {number: _read_reason(directory / result_name(number)) for number in exit_codes}
    for code in _JOB_FAILURES:
        for number, exit_code in exit_codes.items():
            if exit_code == code:
                return code, reasons[number]
    if all(code == EXIT_STOPPED for code in exit_codes.values()):
        return EXIT_STOPPED, None
    # A crash: the ranks killed by a signal first (the others often only lost their peer).
    order = sorted(exit_codes, key=lambda number: (exit_codes[number] >= 0, number))
    parts = []
    for number in order:
        if exit_codes[number] == EXIT_STOPPED:
            continue
        part = f"rank {number} of {devices} {describe_exit(exit_codes[number])}"
        parts.append(f"{part}: {reasons[number]}" if reasons[number] else part)
    return EXIT_RANK_CRASHED, "; ".join(parts)


def _read_reason(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["error"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_reason(path: Path, reason: str) -> None:
    from jobstore.tables import JobStatus

    data = json.dumps({"status": JobStatus.FAILED, "error": reason}).encode()
    try:
        with open(path, "r+b" if path.exists() else "wb") as result:
            result.write(data)
            result.truncate()
    except OSError as error:
        log.warning("could not write the result file: %s", error)
