"""Submission benchmark: `POST /v1/jobs` from concurrent clients, and a check that nothing is lost.

Each client keeps one connection and sends its next submission when the last one is answered
(closed loop). Reported: submissions/s, p50/p99/max latency, how many took over 1 s, and the loss
check: every 201 must be a stored job that is still queued with its message in the broker's queue
(or already claimed by a worker).

For each checkout given (``label=path``; default: this one) it starts its own server with the same
Python: Redis on a free port, a migrated SQLite database (the embedded default), one uvicorn
process, no worker (so no training competes for the CPU). The client is this process, on the same
machine::

    git archive 5eb733f | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    python benchmarks/submit.py before=/tmp/before after=.

`submit_load` is also what ``benchmarks/api.py`` reports as its submission row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis
from _local import checkout_environment, free_port, percentile
from _machine import host_name

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SPEC = {"dataset": "digits", "architecture": "mlp", "epochs": 1}


async def _client(host: str, port: int, requests: int, out: list, headers: str) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    body = json.dumps(SPEC).encode()
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"{headers}Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        for _ in range(requests):
            started = time.perf_counter()
            writer.write(head + body)
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            answer = await reader.readexactly(length)
            job_id = json.loads(answer).get("id") if status == 201 else None
            out.append((time.perf_counter() - started, status, job_id))
    finally:
        writer.close()


def submit_load(url: str, *, clients: int = 20, total: int = 2000, token: str | None = None):
    """`total` submissions from `clients` concurrent keep-alive connections."""
    host, port = url.removeprefix("http://").split(":")
    headers = f"Authorization: Bearer {token}\r\n" if token else ""
    results: list = []

    async def run() -> None:
        share = [total // clients + (i < total % clients) for i in range(clients)]
        await asyncio.gather(*(_client(host, int(port), n, results, headers) for n in share))

    started = time.perf_counter()
    asyncio.run(run())
    elapsed = time.perf_counter() - started
    latencies = [seconds for seconds, _, _ in results]
    return {
        "rps": len(results) / elapsed,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "max": max(latencies),
        "over_1s": sum(seconds > 1 for seconds in latencies),
        "statuses": sorted({status for _, status, _ in results}),
        "created": [job_id for _, status, job_id in results if status == 201],
    }


def lost(created: list[str], database: Path, broker_url: str) -> int:
    """201s that are not a stored job, plus the wake-up messages the broker lacks while jobs are
    queued: it must hold min(queued jobs, dispatch_depth) (the database is the queue; the broker
    only wakes workers, `jobstore.queue`; a checkout from before that holds one per job)."""
    from jobstore import queue
    from jobstore.settings import Settings

    with contextlib.closing(sqlite3.connect(database)) as connection:
        status = dict(connection.execute("SELECT id, status FROM jobs"))
    queued = sum(status.get(job_id) == "queued" for job_id in created)
    waiting = redis.Redis.from_url(broker_url).llen(queue.QUEUE)
    missing_messages = max(0, min(queued, Settings().dispatch_depth) - waiting)
    return sum(job_id not in status for job_id in created) + missing_messages


def measure(checkout: Path, *, clients: int, total: int, processes: int) -> dict:
    with tempfile.TemporaryDirectory() as home:
        redis_port, port = free_port(), free_port()
        broker = f"redis://127.0.0.1:{redis_port}/0"
        env = checkout_environment(
            checkout,
            Path(home),
            JUMPOUT_BROKER_URL=broker,
            JUMPOUT_MAX_QUEUED_PER_TOKEN=str(10 * total),
        )
        redis_server = subprocess.Popen(
            [str(Path(sys.executable).parent / "redis-server"), "--port", str(redis_port),
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        subprocess.run([sys.executable, "-m", "api", "migrate"], cwd=checkout, env=env, check=True)
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port),
             "--workers", str(processes), "--no-access-log", "--log-level", "warning"],
            cwd=checkout, env=env, start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/v1/jobs?limit=1").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError("the server did not start")
                time.sleep(0.2)
            submit_load(url, clients=clients, total=clients * 5)  # warm-up, not counted
            result = submit_load(url, clients=clients, total=total)
            result["lost"] = lost(result["created"], Path(home) / "jumpout.db", broker)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()
            redis_server.terminate()
            redis_server.wait()
    return result


def row(label: str, result: dict, clients: int, processes: int) -> str:
    return (
        f"| {label} | {processes} | {clients} | {len(result['created'])} | "
        f"{result['rps']:.0f} | {1000 * result['p50']:.1f} | {1000 * result['p99']:.1f} | "
        f"{1000 * result['max']:.1f} | {result['over_1s']} | {result['lost']} |"
    )


HEADER = (
    "| checkout | API processes | clients | 201s | submissions/s | p50 ms | p99 ms | max ms "
    "| over 1 s | lost |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="*", default=[f"this={REPO}"], help="label=path")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--total", type=int, default=2000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per checkout")
    args = parser.parse_args()
    rows = []
    for _ in range(args.rounds):
        for processes in args.processes:
            for item in args.checkouts:
                label, _, path = item.partition("=")
                checkout = Path(path or label).resolve()
                result = measure(
                    checkout, clients=args.clients, total=args.total, processes=processes
                )
                rows.append(row(label, result, args.clients, processes))
                print(rows[-1], file=sys.stderr)
    print(f"\nMachine: {host_name()}; SQLite; the client runs on the same machine.\n")
    print(HEADER)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
