"""The worker's access to the job store: ``api.jobs`` functions in short transactions, retried.

Each process gets its own engine (a pooled connection must never cross a fork), and every call
runs in its own session and transaction. A database that is briefly unavailable (a restart, a
failover, SQLite busy beyond its timeout) is retried with backoff for about a minute rather than
dropping a metric or a heartbeat.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.db import make_engine
from api.settings import get_settings

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_FOR_S = 60.0

_engine: Engine | None = None
_engine_pid: int | None = None
_sessions: sessionmaker[Session] | None = None


def _session_factory() -> sessionmaker[Session]:
    global _engine, _engine_pid, _sessions
    if _sessions is None or _engine_pid != os.getpid():
        if _engine is not None:
            # Inherited through fork: drop the parent's connections without closing them (they
            # belong to the parent), then open our own.
            _engine.dispose(close=False)
        _engine = make_engine(get_settings().database_url)
        _engine_pid = os.getpid()
        _sessions = sessionmaker(bind=_engine, expire_on_commit=False)
    return _sessions


def forget_inherited_connections() -> None:
    """Called in a freshly forked process: the next call opens a new engine."""
    global _engine_pid
    _engine_pid = None


def _transient(error: Exception) -> bool:
    if isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError):
        return True
    return isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated


def call(fn: Callable[..., T], *args: Any, retry_for_s: float = RETRY_FOR_S, **kwargs: Any) -> T:
    """Run ``fn(session, *args, **kwargs)`` in a transaction and commit; retry transient errors."""
    deadline = time.monotonic() + retry_for_s
    delay = 0.25
    while True:
        try:
            with _session_factory()() as session:
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
