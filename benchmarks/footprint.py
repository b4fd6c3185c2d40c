"""Footprint benchmark: what one API process and the whole embedded stack cost at rest.

For each checkout given (``label=path``; default: this one), with the same Python:

* **API start-up**: ``uvicorn api.main:app`` on a migrated SQLite database; seconds from the
  process start to the first answered ``GET /v1/jobs``, then its resident memory (VmRSS) after a
  few reads and one submission;
* **embedded stack, idle**: what ``make run`` starts (``python -m launcher``; ``python -m worker``
  in checkouts from before the launcher had its own package) with its bundled Redis and one
  worker, once ``/v1/health`` counts the worker and 5 s have passed: the resident memory of every
  process in the tree, summed (RSS; shared pages counted once per process) and as PSS (shared
  pages split between the processes that map them, so the sum is the real total).

Compare a commit with the working tree in one run, on one machine::

    git archive 5eb733f | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    python benchmarks/footprint.py before=/tmp/before after=.

Prints a markdown table naming the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _local import checkout_environment, free_port
from _machine import host_name

REPO = Path(__file__).resolve().parents[1]


def _status_kb(pid: int, key: str, name: str = "status") -> int:
    try:
        with open(f"/proc/{pid}/{name}") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def wait_until(check, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return time.monotonic() - started
        time.sleep(0.02)
    raise TimeoutError("the server did not answer in time")


def stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def api_startup(checkout: Path) -> tuple[float, float]:
    """(seconds to the first answer, MB resident after warm-up) of one uvicorn process."""
    with tempfile.TemporaryDirectory() as home:
        env = checkout_environment(
            checkout, Path(home), JUMPOUT_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0"
        )
        subprocess.run([sys.executable, "-m", "api", "migrate"], cwd=checkout, env=env, check=True)
        port = free_port()
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port)],
            cwd=checkout,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: httpx.get(f"{base}/v1/jobs?limit=1").status_code == 200, 120)
            first_answer = time.monotonic() - started
            for _ in range(10):
                httpx.get(f"{base}/v1/jobs?limit=5")
            spec = {"dataset": "digits", "architecture": "mlp", "epochs": 1}
            assert httpx.post(f"{base}/v1/jobs", json=spec, timeout=30).status_code == 201
            rss_mb = _status_kb(process.pid, "VmRSS") / 1024
        finally:
            stop(process)
    return first_answer, rss_mb


def stack_idle(checkout: Path) -> tuple[int, float, float]:
    """(processes, MB RSS summed, MB PSS summed) of the embedded stack at rest."""
    module = "launcher" if (checkout / "launcher").is_dir() else "worker"
    with tempfile.TemporaryDirectory() as home:
        port = free_port()
        env = checkout_environment(
            checkout, Path(home), JUMPOUT_PORT=str(port), JUMPOUT_REDIS_PORT=str(free_port())
        )
        process = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=checkout,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            health = f"http://127.0.0.1:{port}/v1/health"
            wait_until(lambda: httpx.get(health, timeout=5).json().get("workers", 0) >= 1, 180)
            time.sleep(5)
            pids = tree(process.pid)
            rss = sum(_status_kb(pid, "VmRSS") for pid in pids) / 1024
            pss = sum(_status_kb(pid, "Pss", "smaps_rollup") for pid in pids) / 1024
        finally:
            stop(process)
    return len(pids), rss, pss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="*", default=[f"this={REPO}"], help="label=path")
    parser.add_argument("--rounds", type=int, default=3, help="API start-ups per checkout")
    args = parser.parse_args()
    rows = []
    for item in args.checkouts:
        label, _, path = item.partition("=")
        checkout = Path(path or label).resolve()
        startups = [api_startup(checkout) for _ in range(args.rounds)]
        processes, rss, pss = stack_idle(checkout)
        first = sorted(s for s, _ in startups)
        rows.append(
            f"| {label} | {first[len(first) // 2]:.2f} s (min {first[0]:.2f}) | "
            f"{max(m for _, m in startups):.0f} MB | {processes} | {rss:.0f} MB | {pss:.0f} MB |"
        )
    print(f"\nMachine: {host_name()}\n")
    print(
        "| checkout | API start to first answer (median) | API RSS | stack processes "
        "| stack RSS (sum) | stack PSS (sum) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
