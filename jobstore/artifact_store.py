"""The artifact directory as the artifact service keeps it for workers on other boxes.

A worker whose ``artifact_url`` is set (`worker.artifacts`) sends its checkpoints and its
trainer's log to the artifact service (`api.artifact_service`), which runs beside the API and
writes into the API's ``artifact_dir``, so that the API serves them exactly as it serves a local
worker's: ``<artifact_dir>/jobs/<id>/checkpoint-epochEEEE[-stepSSSSSS].pt`` and ``trainer.log``.
These functions are that service's logic, torch-free and without HTTP:

* `IncomingCheckpoint`: an uploaded file written to a temporary name in the job's directory,
  hashed as it arrives; `commit` checks its size and sha256 against what the worker declared,
  fsyncs it and renames it into place (a reader never sees half a file; a mismatch stores nothing).
  The worker records the checkpoint in the database only after this answered, so a recorded
  checkpoint always has its file.
* `append_log`: a chunk of the log at the byte offset the worker says it belongs at. Appends are
  in order and idempotent: a chunk sent again (its answer was lost) is not written twice, a chunk
  that would leave a gap is refused with the log's size, and so is one whose overlap with the
  stored log differs from it (an attempt the job was taken from, writing where its successor
  did). The log is bounded as a local one is (`jobstore.joblog.cut_log`).
* `checkpoint_path` / `delete_checkpoint`: a checkpoint by job and file name (names are checked
  against the engine's pattern; job ids against `jobs.is_job_id`: no path comes from a request).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import uuid
from pathlib import Path

from jobstore import joblog
from jobstore.errors import ChecksumMismatch, FieldError, InvalidRequest, JobNotFound, ServiceError
from jobstore.jobs import is_job_id, job_directory
from jobstore.settings import get_settings

# `jumpout.engine.CHECKPOINT_PATTERN`, repeated because this side imports no torch (a test checks
# that the two agree). Use `fullmatch`: `$` also matches before a trailing newline.
CHECKPOINT_NAME = re.compile(r"^checkpoint-epoch(\d{4,})(?:-step(\d{6,}))?\.pt$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
PART_SUFFIX = ".part"


class ArtifactTooLarge(ServiceError):
    status_code = 413
    code = "request_too_large"


class LogGap(ServiceError):
    """A log chunk that starts beyond the end of the stored log (the worker resynchronises)."""

    status_code = 409
    code = "log_offset_ahead"


class LogConflict(ServiceError):
    """A log chunk whose overlap with the stored log differs from it: not a resend but another
    writer's output (the worker resynchronises: it appends at the end)."""

    status_code = 409
    code = "log_conflict"


def job_dir(job_id: str) -> Path:
    """The job's directory, for a job id that `jobs.is_job_id` accepts (else `JobNotFound`)."""
    if not is_job_id(job_id):
        raise JobNotFound(job_id[:64])
    return job_directory(job_id)


def checkpoint_path(job_id: str, name: str) -> Path:
    """Where the checkpoint file ``name`` of the job lives; `InvalidRequest` for a name the
    engine never writes (so no request names any other file)."""
    if not CHECKPOINT_NAME.fullmatch(name):
        raise InvalidRequest(
            f"{name[:80]!r} is not a checkpoint file name",
            fields=[
                FieldError("name", "checkpoint-epochEEEE.pt or checkpoint-epochEEEE-stepSSSSSS.pt")
            ],
        )
    return job_dir(job_id) / name


def check_sha256(value: str | None) -> str:
    value = (value or "").strip().lower()
    if not SHA256_HEX.fullmatch(value):
        raise InvalidRequest(
            "the X-Checksum-SHA256 header must be the file's sha256 (64 hexadecimal digits)",
            fields=[FieldError("X-Checksum-SHA256", "64 hexadecimal digits")],
        )
    return value


class IncomingCheckpoint:
    """One upload being received: ``write`` each chunk, then ``commit`` (or ``discard``)."""

    def __init__(self, job_id: str, name: str, *, sha256: str, size_bytes: int | None) -> None:
        self.path = checkpoint_path(job_id, name)
        self.expected_sha256 = check_sha256(sha256)
        self.expected_size = size_bytes
        self.max_bytes = get_settings().max_artifact_bytes
        if size_bytes is not None and size_bytes > self.max_bytes:
            raise self._too_large()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A name no reader looks for, unique per upload (two retries of one file may overlap).
        self.part = self.path.with_name(f".{name}.{uuid.uuid4().hex}{PART_SUFFIX}")
        self._file = open(self.part, "xb")  # noqa: SIM115 - closed by commit or discard
        self._digest = hashlib.sha256()
        self.size = 0

    def _too_large(self) -> ArtifactTooLarge:
        return ArtifactTooLarge(
            f"the checkpoint exceeds {self.max_bytes} bytes (max_artifact_bytes)",
            fields=[FieldError("body", f"at most {self.max_bytes} bytes")],
        )

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise self._too_large()
        self._digest.update(chunk)
        self._file.write(chunk)

    def commit(self) -> dict:
        """Check, fsync and rename into place; returns what the worker records."""
        sha256 = self._digest.hexdigest()
        if self.expected_size is not None and self.size != self.expected_size:
            raise InvalidRequest(
                f"received {self.size} bytes, Content-Length said {self.expected_size}: "
                "nothing was stored",
                fields=[FieldError("body", "the whole file")],
            )
        if sha256 != self.expected_sha256:
            raise ChecksumMismatch(
                f"the received file's sha256 is {sha256}, the X-Checksum-SHA256 header says "
                f"{self.expected_sha256}: nothing was stored; send it again"
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.part, self.path)
        _fsync_directory(self.path.parent)
        return {"path": str(self.path), "size_bytes": self.size, "sha256": sha256}

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self.part.unlink()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def delete_checkpoint(job_id: str, name: str) -> bool:
    """Remove a pruned checkpoint's file; False when it was not there (a retried delete)."""
    try:
        checkpoint_path(job_id, name).unlink()
        return True
    except FileNotFoundError:
        return False


def log_size(job_id: str) -> int:
    return joblog.log_size(job_dir(job_id) / joblog.LOG_FILE)


def append_log(job_id: str, offset: int, data: bytes) -> int:
    """Write ``data`` at byte ``offset`` of the job's log; returns the log's new size.

    The bytes below the log's size are already stored, so a chunk sent twice (its answer was
    lost) writes only what it adds, once its overlap is checked to be the stored bytes (else
    `LogConflict`, nothing written); a chunk that starts beyond the end would leave a hole and is
    refused (`LogGap`, with the size to send from)."""
    path = job_dir(job_id) / joblog.LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    # Read too: a resent chunk's overlap is compared with what is stored.
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # One appender at a time per log (a retry may overlap the request it repeats).
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if offset > size:
            raise LogGap(
                f"offset {offset} is beyond the end of the log ({size} bytes)",
                fields=[FieldError("offset", f"at most {size}")],
            )
        _check_overlap(path, fd, offset, data[: size - offset])
        new = data[size - offset :]
        view = memoryview(new)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        size += len(new)
    finally:
        os.close(fd)
    joblog.cut_log(path, get_settings().log_max_bytes)
    return size


def _check_overlap(path: Path, fd: int, offset: int, overlap: bytes) -> None:
    """`LogConflict` unless the stored bytes at ``offset`` are ``overlap``. A range this log's
    own cut dropped or wrote its marker over (`joblog.cut_log`) is not compared: it no longer
    holds what was sent."""
    if not overlap:
        return
    stored = os.pread(fd, len(overlap), offset)
    hole = joblog.read_hole(path)
    if hole is not None:
        # The marker's length is not recorded; its longest form bounds it.
        unknown_end = hole.end + len(joblog.marker(2**63))
        start, end = max(hole.start - offset, 0), max(unknown_end - offset, 0)
        stored = stored[:start] + overlap[start:end] + stored[end:]
    if stored != overlap:
        raise LogConflict(
            f"the {len(overlap)} bytes from offset {offset} differ from the stored log: another "
            "attempt wrote there; append at the log's end",
            fields=[FieldError("offset", "the log's size (GET the log's size)")],
        )
