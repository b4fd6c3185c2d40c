"""The server's disk: recognising a full one in any error, and how much space is left.

A full disk reaches the service as different errors depending on who was writing: SQLite's
``SQLITE_FULL`` ("database or disk is full"), PostgreSQL's ``disk_full`` (SQLSTATE 53100), an
``OSError`` with ``ENOSPC`` or ``EDQUOT`` from a file write (a checkpoint, the trainer's log).
`is_disk_full` recognises each of them however it is wrapped (SQLAlchemy's ``DBAPIError.orig``,
an exception's cause or context), so that the API answers 507 ``storage_full`` instead of a 500,
and the worker fails the job once as an environment failure instead of retrying a crash that
cannot succeed until someone frees space (`worker.failures`).

`volumes` measures the free space of each filesystem the service writes to (the home, the
artifact directory, the SQLite database's directory, each filesystem once), for ``/v1/health``;
below ``min_free_bytes`` the health says ``degraded``. The names are labels, never paths: the
health answer is public.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jobstore.settings import Settings, get_settings

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
SQLITE_FULL = 13  # sqlite3's primary result code; extended codes keep it in the low byte
POSTGRES_DISK_FULL = "53100"  # SQLSTATE disk_full (psycopg.errors.DiskFull)

STORAGE_FULL_MESSAGE = (
    "the server's disk is full: nothing was stored or changed. Ask the operator to free space "
    "(GET /v1/health shows the free space), then send the request again"
)
"""What a client is told when a write failed on a full disk (no path, no driver text)."""


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or what it wraps: ``orig``, ``__cause__``, ``__context__``) says the
    disk or the database's storage is full."""
    pending = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        code = getattr(current, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF == SQLITE_FULL:
            return True
        if getattr(current, "sqlstate", None) == POSTGRES_DISK_FULL:
            return True
        if type(current).__module__ == "sqlite3" and "database or disk is full" in str(current):
            return True  # a Python built without the error codes
        pending += [getattr(current, "orig", None), current.__cause__, current.__context__]
    return False


@dataclass(frozen=True)
class Volume:
    """One filesystem the service writes to, by the role it plays (not its path)."""

    name: str  # "home", "artifacts" or "database"
    free_bytes: int  # what an unprivileged writer may still use
    total_bytes: int


def _existing(path: Path) -> Path:
    """``path``, or its nearest existing parent (a directory not created yet lives there)."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _written_paths(settings: Settings) -> Iterator[tuple[str, Path]]:
    yield "home", settings.home
    yield "artifacts", Path(settings.artifact_dir)
    from sqlalchemy.engine import make_url

    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        yield "database", Path(url.database).parent


def volumes(settings: Settings | None = None) -> list[Volume]:
    """The free space of each filesystem the service writes to, each filesystem once (named by
    the first role found on it). A path that cannot be measured is left out."""
    settings = settings or get_settings()
    found: list[Volume] = []
    devices: set[int] = set()
    for name, path in _written_paths(settings):
        try:
            existing = _existing(path)
            device = os.stat(existing).st_dev
            if device in devices:
                continue
            stats = os.statvfs(existing)
        except OSError:
            continue
        devices.add(device)
        found.append(
            Volume(
                name=name,
                free_bytes=stats.f_bavail * stats.f_frsize,
                total_bytes=stats.f_blocks * stats.f_frsize,
            )
        )
    return found


def low_volumes(found: list[Volume], settings: Settings | None = None) -> list[Volume]:
    """The volumes with less than ``min_free_bytes`` free."""
    limit = (settings or get_settings()).min_free_bytes
    return [volume for volume in found if volume.free_bytes < limit]
