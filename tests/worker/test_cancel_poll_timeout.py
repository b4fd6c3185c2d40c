"""The trainer's cancel poll (once a second, in the training thread) against a PostgreSQL server
that does not answer: it must give up within about `db_connect_timeout`, not freeze training for
the kernel's TCP timeout (issue 11 §0)."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from jobstore import db
from jobstore.settings import get_settings
from worker.trainer import StoreCallback


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never says a word (a hung or partitioned host:
    the kernel completes the handshake, nothing answers the startup packet)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


def test_network_timeouts_are_set_for_postgresql_only():
    options = db.network_timeouts("postgresql+psycopg://u@h/d", 3.5)
    assert options["connect_timeout"] == 4 and options["tcp_user_timeout"] == 4000
    assert db.network_timeouts("sqlite:///x.db", 3.5) == {}


def test_cancel_poll_returns_within_the_timeout_when_the_database_does_not_answer(
    silent_server, monkeypatch
):
    monkeypatch.setenv(
        "JUMPOUT_DATABASE_URL", f"postgresql+psycopg://u@127.0.0.1:{silent_server}/d"
    )
    monkeypatch.setenv("JUMPOUT_DB_CONNECT_TIMEOUT", "2")
    get_settings.cache_clear()
    try:
        callback = StoreCallback(
            "0" * 32, attempt=1, stop_event=threading.Event(), parent_pid=os.getppid()
        )
        started = time.monotonic()
        assert callback.should_stop() is False  # the poll failed: training goes on
        elapsed = time.monotonic() - started
    finally:
        db.dispose_engines()
        get_settings.cache_clear()
    assert 1.5 <= elapsed < 6, f"the cancel poll took {elapsed:.1f}s"
