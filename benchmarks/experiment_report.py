"""How fast ``GET /v1/experiments/{id}/report`` answers for a finished experiment the size of the
paper's Table 1 with 30 seeds: 8 rows x 30 seeds = 240 succeeded jobs of 20 epochs, each epoch
with 12 dropout slots of statistics (4,800 epoch rows per experiment), over HTTP from a real
uvicorn.

The experiments are stored through `jobstore.experiments.create_experiment` (the same rows the
API writes) in a fresh SQLite database, or with ``--postgres`` a fresh database on the local
PostgreSQL (127.0.0.1:5432), and finished directly in the store: the jobs set succeeded with a
final accuracy (a per-seed level shared by the rows, row effects and noise), the epoch rows
inserted in bulk. No training, no broker.

Measured, one request at a time:

* first: the server's first report (numpy and scipy imported then, lazily);
* cold: each further experiment's first report (cache miss: the jobs' outcomes and 4,800 epoch
  rows read, the per-slot means, `jumpout.report.build_report` with its bootstraps);
* warm: the same experiment again (cache hit: one aggregate query for the key), JSON and Markdown.

    python benchmarks/experiment_report.py                 # SQLite
    python benchmarks/experiment_report.py --postgres      # PostgreSQL too
    python benchmarks/experiment_report.py --experiments 6 --warm 100
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from _local import free_port, percentile
from _machine import host_name

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POSTGRES_ADMIN = "host=127.0.0.1 port=5432 dbname=test user=postgres connect_timeout=3"
SLOTS = 12
EPOCHS = 20
SEEDS = 30
REQUEST = {
    "name": "table 1, 30 seeds",
    "base": {"dataset": "cifar10", "architecture": "wrn_28_10", "epochs": EPOCHS},
    "preset": "table1",
    "seeds": SEEDS,
}


def environment(home: Path, database_url: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUMPOUT_")}
    env.update(
        JUMPOUT_HOME=str(home),
        JUMPOUT_DATABASE_URL=database_url,
        # Nothing is published: a broker that is never reached.
        JUMPOUT_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0",
        JUMPOUT_PORT=str(port),
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
    )
    return env


def seed_experiments(count: int, rng: random.Random) -> list[str]:
    """`count` finished Table-1 experiments of 240 jobs; returns their ids."""
    from sqlalchemy import insert, update

    from jobstore import db, experiments
    from jobstore.tables import EpochMetric, Job, JobStatus, utcnow

    ids = []
    for _ in range(count):
        with db.session_scope() as session:
            experiment_id, job_ids = experiments.create_experiment(
                session, request=REQUEST, owner_id=None
            )
        seed_level = {seed: rng.gauss(0.0, 0.002) for seed in range(SEEDS)}
        with db.session_scope() as session:
            jobs = session.execute(
                Job.__table__.select().where(Job.experiment_id == experiment_id)
            ).all()
            row_effect = {label: rng.gauss(0.0, 0.003) for label in {j.row_label for j in jobs}}
            metrics = []
            now = utcnow()
            for job in jobs:
                final = 0.95 + seed_level[job.spec["seed"]] + row_effect[job.row_label]
                final += rng.gauss(0.0, 0.001)
                for epoch in range(1, EPOCHS + 1):
                    metrics.append({
                        "job_id": job.id, "epoch": epoch, "created_at": now, "seconds": 30.0,
                        "test_accuracy": final - 0.01 * (EPOCHS - epoch),
                        "layers": [
                            {"name": f"block{slot}", "active_fraction": rng.uniform(0.3, 0.6),
                             "rate": rng.uniform(0.1, 0.3), "capped_fraction": 0.0,
                             "mean_drift": None, "var_drift": None}
                            for slot in range(SLOTS)
                        ],
                    })  # fmt: skip
                session.execute(
                    update(Job)
                    .where(Job.id == job.id)
                    .values(
                        status=JobStatus.SUCCEEDED, attempt=1, epoch=EPOCHS, epoch_seconds=30.0,
                        final_accuracy=final, started_at=now, finished_at=utcnow(),
                    )
                )  # fmt: skip
            session.execute(insert(EpochMetric.__table__), metrics)
            session.commit()
        ids.append(experiment_id)
    return ids


def timed_get(client: httpx.Client, url: str, **params) -> float:
    start = time.perf_counter()
    response = client.get(url, params=params)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed * 1000


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} | {percentile(values, 95):.1f}"


def measure(backend: str, database_url: str, args) -> list[str]:
    home = Path(tempfile.mkdtemp(prefix="jumpout-report-bench-"))
    port = free_port()
    env = environment(home, database_url, port)
    subprocess.run([sys.executable, "-m", "api", "migrate"], env=env, cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip
    os.environ.update({k: v for k, v in env.items() if k.startswith("JUMPOUT_")})
    from jobstore import db
    from jobstore.settings import get_settings

    get_settings.cache_clear()
    db.dispose_engines()
    started = time.perf_counter()
    ids = seed_experiments(args.experiments, random.Random(0))
    seeded_s = time.perf_counter() - started
    db.dispose_engines()

    log = open(home / "uvicorn.log", "ab")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port",
         str(port), "--no-access-log", "--log-level", "warning"],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.get("/v1/experiments", params={"limit": 1})
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            first = timed_get(client, f"/v1/experiments/{ids[0]}/report")
            cold = [timed_get(client, f"/v1/experiments/{i}/report") for i in ids[1:]]
            url = f"/v1/experiments/{ids[0]}/report"
            warm = [timed_get(client, url) for _ in range(args.warm)]
            timed_get(client, url, format="markdown")
            warm_markdown = [timed_get(client, url, format="markdown") for _ in range(args.warm)]
            view = [timed_get(client, f"/v1/experiments/{ids[0]}") for _ in range(args.warm)]
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=10)
        server.kill()
        log.close()
    print(f"{backend}: seeded {len(ids)} experiments in {seeded_s:.1f} s", file=sys.stderr)
    return [
        f"| {backend} | first (imports numpy, scipy) | 1 | {first:.1f} | - |",
        f"| {backend} | cold (cache miss) | {len(cold)} | {summary(cold)} |",
        f"| {backend} | warm JSON (cached) | {len(warm)} | {summary(warm)} |",
        f"| {backend} | warm Markdown (cached) | {len(warm_markdown)} | {summary(warm_markdown)} |",
        f"| {backend} | GET /v1/experiments/{{id}} (240 jobs) | {len(view)} | {summary(view)} |",
    ]


@contextlib.contextmanager
def postgres_database():
    import psycopg

    name = f"jumpout_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        from jobstore import db

        db.dispose_engines()
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=12, help="first + this - 1 cold")
    parser.add_argument("--warm", type=int, default=50, help="requests per warm measurement")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL as well as SQLite")
    args = parser.parse_args()
    lines = [
        f"Report of a finished 240-job experiment (8 rows x 30 seeds, 20 epochs, {SLOTS} slots), "
        f"one request at a time; {host_name()}",
        "",
        "| database | request | n | median ms | p95 ms |",
        "|---|---|---:|---:|---:|",
    ]
    home = Path(tempfile.mkdtemp(prefix="jumpout-report-bench-"))
    lines += measure("SQLite", f"sqlite:///{home / 'jumpout.db'}", args)
    if args.postgres:
        with postgres_database() as url:
            lines += measure("PostgreSQL", url, args)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
