"""Engines, sessions, retried transactions and migrations of the job store.

SQLite is the embedded default and is written by several processes (the API, the worker's
supervisor, the trainer child): every connection runs in WAL mode with a 30 s busy timeout and
foreign keys on, and every transaction starts with `BEGIN IMMEDIATE`, because in WAL mode a deferred
transaction that later upgrades to a write fails at once with SQLITE_BUSY whatever the timeout.
The service functions keep transactions short (each commits its own), so taking the write lock at
BEGIN costs little.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from jobstore.settings import get_settings

log = logging.getLogger(__name__)

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = REPO_ROOT / "migrations"

SQLITE_BUSY_TIMEOUT_MS = 30_000
# How long `call` retries a database that is briefly unavailable before giving up.
RETRY_FOR_S = 60.0

# One engine per (url, process): pooled connections must never cross a fork.
_engines: dict[tuple[str, int], Engine] = {}
_sessionmakers: dict[tuple[str, int], sessionmaker[Session]] = {}
_read_engines: dict[tuple[str, int], Engine] = {}


class _WriteLock:
    """The write lock of one SQLite file, taken before ``BEGIN IMMEDIATE`` and released when the
    transaction ends. This process's threads queue on a `threading.Lock`; the one at the head
    takes an flock on ``<database>-writelock``, which orders the writers of every process that
    uses `make_engine` (API, supervisor, trainer, reaper). Both wake the next waiter at once,
    where SQLite's busy handler sleeps up to 100 ms between tries and favours no one: under 20
    concurrent submissions that left requests waiting seconds for a lock that was mostly free."""

    def __init__(self, database: str) -> None:
        self._threads = threading.Lock()
        self._fd = os.open(database + "-writelock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def acquire(self, timeout: float) -> bool:
        if not self._threads.acquire(timeout=timeout):
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise
        return True

    def release(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()


_write_locks: dict[tuple[str, int], _WriteLock] = {}
_write_locks_guard = threading.Lock()


def _write_lock(database: str) -> _WriteLock:
    key = (os.path.realpath(database), os.getpid())  # a forked process takes its own
    with _write_locks_guard:
        lock = _write_locks.get(key)
        if lock is None:
            lock = _write_locks[key] = _WriteLock(key[0])
        return lock


class _WriteLockedConnection(sqlite3.Connection):
    """A pysqlite connection that releases its process's write lock when its transaction ends."""

    write_lock: _WriteLock | None = None
    holds_write_lock = False

    def _release_write_lock(self) -> None:
        if self.holds_write_lock:
            self.holds_write_lock = False
            self.write_lock.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._release_write_lock()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._release_write_lock()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._release_write_lock()


def _json_text(value: Any) -> str:
    # orjson: the job's spec is serialised on every submission; the stdlib's json was a tenth of
    # the submit route's CPU.
    return orjson.dumps(value).decode()


def _is_file(database: str | None) -> bool:
    return bool(database) and database != ":memory:" and not database.startswith("file:")


def _configure_sqlite(engine: Engine, *, read_only: bool = False) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Stop pysqlite from issuing its own (deferred) BEGIN; the "begin" hook below does it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        if read_only:
            # A read connection that tried to write would be a bug: make it fail loudly.
            cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    if read_only:
        # No BEGIN at all: each statement is its own read transaction, which in WAL mode reads a
        # snapshot and neither waits for nor blocks the writers (BEGIN IMMEDIATE on every read
        # had serialised the API's reads behind the worker's writes and each other).
        return

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        dbapi_connection = connection.connection.dbapi_connection
        lock = getattr(dbapi_connection, "write_lock", None)
        if lock is not None and not dbapi_connection.holds_write_lock:
            if not lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000):
                raise sqlite3.OperationalError("database is locked (write lock)")
            dbapi_connection.holds_write_lock = True
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            if lock is not None:
                dbapi_connection._release_write_lock()
            raise


def is_sqlite(url: str | None = None) -> bool:
    """Whether `url` (default: settings.database_url) is a SQLite database: a local file whose
    writes take a millisecond and never wait on a network."""
    return _backend(url or get_settings().database_url) == "sqlite"


@lru_cache(maxsize=8)
def _backend(url: str) -> str:
    return make_url(url).get_backend_name()


def make_engine(url: str | None = None, *, read_only: bool = False) -> Engine:
    """A new engine for `url` (default: settings.database_url), configured for this project.
    `read_only`: autocommit, for the API's reads (`get_read_engine`)."""
    settings = get_settings()
    url = url or settings.database_url
    if is_sqlite(url):
        database = make_url(url).database
        locked = _is_file(database) and not read_only
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        if _is_file(database):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        if locked:
            connect_args["factory"] = _WriteLockedConnection
        engine = create_engine(
            url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            connect_args=connect_args,
            json_serializer=_json_text,
        )
        if locked:
            lock = _write_lock(str(Path(database).expanduser()))

            @event.listens_for(engine, "connect")
            def _attach_write_lock(dbapi_connection, _record) -> None:
                dbapi_connection.write_lock = lock

        _configure_sqlite(engine, read_only=read_only)
        return engine
    connect_args = network_timeouts(url, settings.db_connect_timeout)
    if read_only:
        # No pre-ping round trip per checkout: `api.queries.read` retries once on a connection
        # found dead (SQLAlchemy then invalidates the pool), which is all a read needs.
        return create_engine(
            url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            isolation_level="AUTOCOMMIT",
            connect_args=connect_args,
        )
    return create_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_pre_ping=True,
        json_serializer=_json_text,
        connect_args=connect_args,
    )


def network_timeouts(url: str, timeout_s: float) -> dict[str, Any]:
    """libpq's options that bound how long a PostgreSQL connection waits on a network that does
    not answer (a partition, a host that accepts and never speaks): ``connect_timeout`` for
    opening it, ``tcp_user_timeout`` for data sent and never acknowledged, keepalives for an idle
    one. Without them the trainer's cancel poll (once a second, in the training thread) could
    block for the kernel's TCP retransmission timeout (about 15 minutes), freezing training. A
    statement's own time is bounded where it matters (`worker.trainer.read_stop_request`). Empty
    for other backends."""
    if _backend(url) != "postgresql":
        return {}
    seconds = max(2, math.ceil(timeout_s))  # libpq's minimum is 2 s
    return {
        "connect_timeout": seconds,
        "tcp_user_timeout": seconds * 1000,
        "keepalives": 1,
        "keepalives_idle": max(10, seconds),
        "keepalives_interval": max(2, seconds // 3),
        "keepalives_count": 3,
    }


def forget_inherited_engines() -> None:
    """In a freshly forked process: drop the parent's engines without closing their connections
    (closing a PostgreSQL connection sends a goodbye on the parent's socket); this process opens
    its own on first use."""
    pid = os.getpid()
    for cache in (_engines, _read_engines):
        for key in [key for key in cache if key[1] != pid]:
            cache.pop(key).dispose(close=False)
    for key in [key for key in _sessionmakers if key[1] != pid]:
        del _sessionmakers[key]


def get_engine(url: str | None = None) -> Engine:
    """The shared engine of this process for `url` (default: settings.database_url)."""
    key = (url or get_settings().database_url, os.getpid())
    engine = _engines.get(key)
    if engine is None:
        forget_inherited_engines()
        engine = _engines[key] = make_engine(key[0])
    return engine


def get_read_engine(url: str | None = None) -> Engine:
    """The shared engine of this process for reads that need no transaction (`api.queries`):
    every statement commits on its own, which saves the BEGIN and COMMIT round trips. A second
    pool: on SQLite of query-only connections, on PostgreSQL in autocommit without pre-ping."""
    key = (url or get_settings().database_url, os.getpid())
    engine = _read_engines.get(key)
    if engine is None:
        engine = _read_engines[key] = make_engine(key[0], read_only=True)
    return engine


def get_sessionmaker(url: str | None = None) -> sessionmaker[Session]:
    key = (url or get_settings().database_url, os.getpid())
    factory = _sessionmakers.get(key)
    if factory is None:
        # expire_on_commit=False: service functions commit and then return the objects they loaded.
        factory = _sessionmakers[key] = sessionmaker(get_engine(key[0]), expire_on_commit=False)
    return factory


def dispose_engines() -> None:
    """Close every pooled connection of this process (tests; after a fork use a fresh process)."""
    for (_, pid), engine in [*_engines.items(), *_read_engines.items()]:
        if pid == os.getpid():
            engine.dispose()
    _engines.clear()
    _read_engines.clear()
    _sessionmakers.clear()


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session for scripts and the worker; rolled back on error, always closed."""
    session = get_sessionmaker(url)()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _transient(error: Exception) -> bool:
    if isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError):
        return True
    return isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated


def call(fn: Callable[..., T], *args: Any, retry_for_s: float = RETRY_FOR_S, **kwargs: Any) -> T:
    """Run ``fn(session, *args, **kwargs)`` in its own session and commit: how the worker, the
    trainer and the reaper reach the store. A database that is briefly unavailable (a restart, a
    failover, SQLite busy beyond its timeout) is retried with backoff for ``retry_for_s`` seconds
    rather than dropping a metric or a heartbeat; other errors are raised at once."""
    deadline = time.monotonic() + retry_for_s
    delay = 0.25
    while True:
        try:
            with get_sessionmaker()() as session:
                result = fn(session, *args, **kwargs)
                session.commit()
                return result
        except sa_exc.SQLAlchemyError as error:
            if not _transient(error) or time.monotonic() + delay > deadline:
                raise
            log.warning(
                "database unavailable (%s); retrying %s in %.1fs", error, fn.__name__, delay
            )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def get_session() -> Iterator[Session]:
    """FastAPI dependency: one session per request."""
    with session_scope() as session:
        yield session


def alembic_config(url: str | None = None):
    """An Alembic config for `migrations/`, independent of the working directory."""
    from alembic.config import Config

    ini = REPO_ROOT / "alembic.ini"
    config = Config(str(ini)) if ini.exists() else Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option(
        "sqlalchemy.url", (url or get_settings().database_url).replace("%", "%%")
    )
    return config


def migrate(url: str | None = None, revision: str = "head") -> None:
    """Upgrade the database to `revision`; run once before the services start (no lock)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
