"""The trainer's log file: where it is, how it stays bounded on disk, how it is read by offset.

The supervisor appends each attempt's trainer output (stdout and stderr, the engine's progress
lines and any traceback) to ``<artifact_dir>/jobs/<id>/trainer.log``; the trainer writes to it
directly through an ``O_APPEND`` descriptor, so the file can be neither rewritten nor truncated
while it runs without losing output or moving what later bytes are at.

How it is bounded (``cut_log``, called by the supervisor once a second): when the bytes kept on
disk exceed ``log_max_bytes``, the middle is dropped by punching a hole in the file
(``fallocate(PUNCH_HOLE | KEEP_SIZE)``): the disk blocks are freed, the file's size and every
offset stay what they were. The first quarter of the bound (the start-up, the first epochs) and
the newest output are kept. A marker line is written at the end of the dropped range, and the
range of zeros before it is recorded in ``trainer.log.cut`` (JSON ``{"start", "end"}``) before the
punch, so a reader skips it. Offsets are therefore byte positions in everything the trainers ever
wrote: a follower that asks for an offset inside the dropped range gets the marker and what
follows. On a filesystem without hole punching the log is left whole (a warning, once).

Reading (``read_log``): the bytes from an offset, the hole skipped; the chunk's own start (after
a skip) and the offset to ask for next.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from jobstore.jobs import job_directory

log = logging.getLogger(__name__)

LOG_FILE = "trainer.log"
CUT_FILE = "trainer.log.cut"
# The kept head: the start-up, the configuration, the first epochs.
HEAD_FRACTION = 4
# A cut drops down to this fraction of the bound, so that the next one is not due a second later.
CUT_TO_FRACTION = 0.75

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = None
_unsupported_warned = False


def log_path(job_id: str) -> Path:
    """The job's log file (the id must have been validated: `jobstore.jobs.is_job_id`)."""
    return job_directory(job_id) / LOG_FILE


@dataclass(frozen=True)
class Hole:
    """Bytes [start, end) of the log were dropped (they read as zeros)."""

    start: int
    end: int


def read_hole(path: Path) -> Hole | None:
    try:
        data = json.loads((path.parent / CUT_FILE).read_text())
        return Hole(int(data["start"]), int(data["end"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_hole(path: Path, hole: Hole) -> None:
    cut = path.parent / CUT_FILE
    tmp = cut.with_suffix(".tmp")
    tmp.write_text(json.dumps({"start": hole.start, "end": hole.end}))
    os.replace(tmp, cut)


def _punch_hole(fd: int, offset: int, length: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def marker(dropped: int) -> bytes:
    return (
        f"\n[jumpout: {dropped} bytes of this log were dropped here to keep it under "
        "log_max_bytes]\n"
    ).encode()


def cut_log(path: Path, max_bytes: int) -> Hole | None:
    """Drop the middle of the log when more than ``max_bytes`` of it are kept on disk; returns
    the new hole, or None when nothing was cut. Never raises (a log is not worth a job)."""
    global _unsupported_warned
    try:
        size = path.stat().st_size
        hole = read_hole(path)
        kept = size - (hole.end - hole.start if hole else 0)
        if kept <= max_bytes:
            return None
        head = max_bytes // HEAD_FRACTION
        start = hole.start if hole else head
        # Keep the newest bytes so that head + tail is CUT_TO_FRACTION of the bound.
        tail = int(max_bytes * CUT_TO_FRACTION) - head
        cut_end = size - tail  # the marker ends here; the zeros end where it starts
        text = marker(cut_end - start)
        end = cut_end - len(text)
        if end <= (hole.end if hole else start):
            return None
        fd = os.open(path, os.O_WRONLY)
        try:
            # Marker, record, then punch: a reader that sees zeros re-reads the record and skips.
            os.pwrite(fd, text, end)
            new_hole = Hole(start, end)
            _write_hole(path, new_hole)
            _punch_hole(fd, start, end - start)
        finally:
            os.close(fd)
        return new_hole
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.ENOSYS) and not _unsupported_warned:
            _unsupported_warned = True
            log.warning("%s: this filesystem cannot punch holes; the log is not bounded", path)
        elif error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOENT):
            log.warning("could not bound %s: %s", path, error)
        return None


@dataclass(frozen=True)
class LogChunk:
    """``data`` is the log from byte ``start`` (the offset asked for, or the end of a dropped
    range it fell in) to ``next_offset``; ``size`` is the log's size when it was read."""

    start: int
    data: bytes
    next_offset: int
    size: int


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_log(path: Path, offset: int, limit: int) -> LogChunk:
    """At most ``limit`` bytes of the log from ``offset`` (which must not exceed its size),
    skipping a dropped range; a missing log (the job has not started) reads as empty."""
    for _ in range(3):
        hole = read_hole(path)
        start = offset
        if hole is not None and hole.start <= start < hole.end:
            start = hole.end
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                handle.seek(start)
                data = handle.read(max(0, min(limit, size - start)))
        except FileNotFoundError:
            return LogChunk(offset, b"", offset, 0)
        if hole is not None and start < hole.start < start + len(data):
            data = data[: hole.start - start]  # stop at the hole; the next read skips it
        # A cut between the record's read and the file's: the chunk may hold zeros; read again.
        if read_hole(path) == hole:
            return LogChunk(start, data, start + len(data), size)
    return LogChunk(start, data, start + len(data), size)
