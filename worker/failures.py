"""What a failed attempt's `error` says: readable, short, without the server's paths.

A job's ``error`` is read by the person who submitted it, not by the operator: it names what
went wrong and what to do, and points to the full output (``GET /v1/jobs/{id}/log``) instead of
pasting it. Three kinds, by the trainer's exit (`worker.supervisor`):

* a deterministic failure (``EXIT_FAILED``: bad spec, missing dataset, divergence, CUDA out of
  memory): the trainer's own sentence, unchanged; never retried;
* an environment failure (``EXIT_ENVIRONMENT``): the server's disk is full (``ENOSPC``,
  ``EDQUOT``, SQLite's ``SQLITE_FULL``, PostgreSQL's ``disk_full``: `jobstore.storage`). Retrying
  cannot help until someone frees space, so the job fails at once, saying which checkpoint is
  intact and how to resume it once space is freed (`disk_full_reason`);
* a crash (any other exception, a signal, the OOM killer): retried while attempts remain; the
  trainer writes ``"<ExceptionType>: <message>"`` (`describe_exception`) and the supervisor
  prefixes the attempt and appends where the full output is (`attempt_error`).

Paths are cut out of messages (`strip_paths`): one under the artifact, data or home directory
becomes its name relative to that directory, any other absolute path its last component.
"""

from __future__ import annotations

import re
from pathlib import Path

from jobstore.settings import Settings, get_settings

MESSAGE_CHARS = 300
"""The longest exception message kept in an ``error`` (the full text is in the log)."""

# An absolute path: a slash that does not continue a word, a number, a URL or a relative path
# ("1/2", "http://h/x", "a/b" are left alone), then everything up to a space or a delimiter.
_ABSOLUTE_PATH = re.compile(r"(?<![\w./:~-])/[^\s'\"`,;:()\[\]{}<>]+")


def strip_paths(text: str, settings: Settings | None = None) -> str:
    """``text`` without the server's absolute paths (see the module's docstring)."""
    settings = settings or get_settings()
    roots = set()
    for root in (settings.artifact_dir, settings.data_dir, settings.home):
        if root is None:
            continue
        for variant in (Path(root).expanduser().absolute(), Path(root).expanduser().resolve()):
            roots.add(str(variant).rstrip("/") + "/")
    for root in sorted(roots, key=len, reverse=True):  # the most specific first
        if root != "/":
            text = text.replace(root, "")

    def last_part(match: re.Match) -> str:
        name = match.group(0).rstrip("/").rsplit("/", 1)[-1]
        return f".../{name}" if name else "..."

    return _ABSOLUTE_PATH.sub(last_part, text)


def shorten(text: str, limit: int = MESSAGE_CHARS) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def describe_exception(error: BaseException, settings: Settings | None = None) -> str:
    """``"<ExceptionType>: <message>"``, the message shortened and stripped of paths."""
    message = shorten(strip_paths(str(error), settings))
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def last_output_line(output: str, settings: Settings | None = None) -> str:
    """The last non-empty line of a trainer's output (for a crash that left no reason: often
    the exception's line), shortened and stripped of paths; empty if there is none."""
    for line in reversed(output.splitlines()):
        if line.strip():
            return shorten(strip_paths(line.strip(), settings))
    return ""


def log_pointer(job_id: str) -> str:
    return f"the full output: GET /v1/jobs/{job_id}/log"


def attempt_error(job_id: str, *, attempt: int, budget: int, reason: str) -> str:
    """A crashed attempt's ``error``: which attempt, what happened, where the output is."""
    return f"attempt {attempt} of {budget}: {reason} ({log_pointer(job_id)})"


def disk_full_reason(
    job_id: str, *, failed_epoch: int | None = None, intact_epoch: int | None = None
) -> str:
    """An environment failure's ``error``: the disk is full; what was kept; how to resume.

    ``failed_epoch``: the epoch whose checkpoint could not be written (None: the disk was full
    elsewhere, e.g. the database or the log); ``intact_epoch``: the newest checkpoint the job
    still has (None: none, the job will start over)."""
    where = (
        f" while writing the checkpoint of epoch {failed_epoch}" if failed_epoch is not None else ""
    )
    kept = (
        f"the checkpoint of epoch {intact_epoch} is intact"
        if intact_epoch is not None
        else "no checkpoint was kept, so the job will start over"
    )
    return (
        f"no space left on the server's disk{where}; {kept}; once the operator has freed space, "
        f"resume the job (POST /v1/jobs/{job_id}/retry)"
    )
