"""How long `jumpout.report.build_report` takes on a finished experiment the size of the paper's
Table 1 with 30 seeds: 8 rows x 30 seeds = 240 succeeded runs, each with 12 dropout slots of
statistics, the bootstrap included (7 rows compared with the dropout row).

The outcomes are synthetic (accuracies near 95% with seed noise) and built once; each round
builds the report from them, as the service does for ``GET /v1/experiments/{id}/report``
(the HTTP round trip is timed by benchmarks/api.py's helper). Prints one Markdown line:

    python benchmarks/report.py [--rounds 30] [--seeds 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _local import percentile
from _machine import host_name

from jumpout.experiment import plan_experiment
from jumpout.report import (
    BOOTSTRAP_METHOD,
    BOOTSTRAP_RESAMPLES,
    RunOutcome,
    build_report,
    report_csv,
    report_markdown,
)

SLOTS = 12  # a WRN-28-10 has 12 residual blocks, each with a dropout slot


def synthetic_outcomes(plan, seed: int = 0) -> list[RunOutcome]:
    """One succeeded outcome per planned run: a per-seed level shared by the rows (what pairing
    removes) plus row and run noise, and per-slot statistics."""
    rng = np.random.default_rng(seed)
    seed_level = {s: rng.normal(0.0, 0.002) for s in plan.seeds}
    row_effect = {row.label: rng.normal(0.0, 0.003) for row in plan.rows}
    return [
        RunOutcome(
            label=run.row.label,
            seed=run.seed,
            status="succeeded",
            value=float(0.95 + seed_level[run.seed] + row_effect[run.row.label]
                        + rng.normal(0.0, 0.001)),
            job_id=f"{index:032x}",
            layers=[
                {
                    "name": f"block{slot}",
                    "active_fraction": float(rng.uniform(0.3, 0.6)),
                    "rate": float(rng.uniform(0.1, 0.3)),
                    "capped_fraction": 0.0,
                }
                for slot in range(SLOTS)
            ],
        )
        for index, run in enumerate(plan.runs())
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=30)
    args = parser.parse_args()

    plan = plan_experiment(
        {
            "base": {"dataset": "cifar10", "architecture": "wrn_28_10"},
            "preset": "table1",
            "seeds": args.seeds,
        }
    )
    outcomes = synthetic_outcomes(plan)
    build_report(plan, outcomes)  # warm: imports numpy and scipy.stats once
    times = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        report = build_report(plan, outcomes)
        times.append(1000 * (time.perf_counter() - started))
    render = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        report_markdown(report)
        report_csv(report)
        render.append(1000 * (time.perf_counter() - started))

    print(
        f"| build_report, {len(plan.rows)} rows x {len(plan.seeds)} seeds = {plan.job_count} runs, "
        f"{SLOTS} slots, bootstrap {BOOTSTRAP_METHOD} x {BOOTSTRAP_RESAMPLES} | "
        f"median {statistics.median(times):.1f} ms | p95 {percentile(times, 95):.1f} ms | "
        f"max {max(times):.1f} ms | markdown + csv median {statistics.median(render):.2f} ms | "
        f"{args.rounds} rounds | {host_name()} |"
    )


if __name__ == "__main__":
    main()
