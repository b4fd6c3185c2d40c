"""Experiment reports: per-row accuracy with intervals, and seed-paired comparisons to a baseline.

`build_report` turns an `ExperimentPlan` and its runs' outcomes into one JSON-ready dict; the
same dict is rendered as CSV (`report_csv`) or as a Markdown table like the paper's
(`report_markdown`). Accuracies are in percent, as the paper prints them.

What is computed, and with what (no statistic is written by hand):

* per row, over its succeeded runs: n, mean, std (ddof=1; null for n < 2), and the 95% t-interval
  of the mean (`scipy.stats.t`);
* against the baseline row, pairing runs by seed (only seeds both rows finished): the mean paired
  difference, the paired t-test (`scipy.stats.ttest_rel`), the Wilcoxon signed-rank test
  (`scipy.stats.wilcoxon`; null with fewer than 2 non-zero differences), a bootstrap 95% CI of the
  mean difference (`scipy.stats.bootstrap`, BCa, `BOOTSTRAP_RESAMPLES` resamples of the paired
  differences, seeded from ``seed`` and the row's index so a report is reproducible), and the
  wins / ties / losses;
* the paper's figure where the row is a Table-1/2 row (`jumpout.experiment.paper_accuracy`);
* per dropout slot, the mean over the row's succeeded runs of each logged statistic (realised rate,
  active fraction, capped fraction...): a row whose rate sits at the cap shows it.

Reading the numbers: with fewer than 6 pairs the exact Wilcoxon p-value cannot go below 0.03
(1/16 two-sided at 5 pairs, 0.0625; 0.03125 at 6), and a bootstrap interval over a handful of
pairs is too narrow; trust the t-interval and the paired t-test only as far as the differences
look normal. Runs that did not succeed (failed, cancelled, still queued or running, or missing
altogether) are listed in ``excluded`` and named under the Markdown table, never silently dropped.

numpy and scipy are imported inside `build_report`: importing this module stays cheap.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from jumpout.experiment import METRIC, ExperimentPlan, Row, paper_accuracy
from jumpout.spec import canonical_ablation

__all__ = [
    "BOOTSTRAP_METHOD",
    "BOOTSTRAP_RESAMPLES",
    "CSV_COLUMNS",
    "RunOutcome",
    "build_report",
    "mean_layers",
    "report_csv",
    "report_markdown",
]

SUCCEEDED = "succeeded"
MISSING = "missing"  # a planned run no outcome was given for
CONFIDENCE = 0.95
# BCa corrects the percentile interval's bias and skew; 4000 resamples keep the Monte-Carlo
# error of the interval's ends small against the third decimal of a percent while a 240-run
# report builds in tens of milliseconds (benchmarks/report.py).
BOOTSTRAP_METHOD = "BCa"
BOOTSTRAP_RESAMPLES = 4000

# Differences (in percent) closer than this are the same difference: accuracies are counts over
# a test set, and the x100 leaves float noise (95.23 - 94.23 = 1.0000000000000142).
_SAME_DIFFERENCE = 1e-9

CSV_COLUMNS = (
    "label",
    "params",
    "n",
    "mean",
    "std",
    "ci95_low",
    "ci95_high",
    "diff",
    "diff_ci95_low",
    "diff_ci95_high",
    "p_t",
    "p_wilcoxon",
    "wins",
    "ties",
    "losses",
    "pairs",
    "paper",
)


@dataclass(frozen=True)
class RunOutcome:
    """How one run of an experiment ended.

    Attributes:
        label: its row's label.
        seed: its seed.
        status: the job's status (``succeeded``, ``failed``, ``cancelled``, ``queued``...).
        value: its final test accuracy, a fraction in [0, 1] (None if it has none).
        job_id: the job's id, when it ran as a job.
        layers: per dropout slot ``{"name", "active_fraction", "rate", "capped_fraction", ...}``,
            each statistic the run's mean over its epochs.
    """

    label: str
    seed: int
    status: str
    value: float | None
    job_id: str | None = None
    layers: list[dict[str, Any]] | None = None


def build_report(
    plan: ExperimentPlan, outcomes: Iterable[RunOutcome], *, seed: int = 0
) -> dict[str, Any]:
    """The experiment's report as JSON values (see the module docstring for what is in it).

    Args:
        plan: the experiment.
        outcomes: at most one per planned (label, seed); planned runs without one are reported
            as excluded with status ``missing``.
        seed: seeds the bootstrap (the same seed gives the same report).

    Raises:
        ValueError: an outcome for a row or seed the plan does not have, or two for one run.
    """
    import numpy as np

    by_run: dict[tuple[str, int], RunOutcome] = {}
    labels = {row.label for row in plan.rows}
    seeds = set(plan.seeds)
    for outcome in outcomes:
        key = (outcome.label, outcome.seed)
        if outcome.label not in labels or outcome.seed not in seeds:
            raise ValueError(f"outcome for {key}, which is not a run of this experiment")
        if key in by_run:
            raise ValueError(f"two outcomes for row {outcome.label!r} seed {outcome.seed}")
        by_run[key] = outcome

    excluded: list[dict[str, Any]] = []
    # label -> seed -> accuracy in percent, for the runs that count.
    values: dict[str, dict[int, float]] = {row.label: {} for row in plan.rows}
    counted: dict[str, list[RunOutcome]] = {row.label: [] for row in plan.rows}
    for run in plan.runs():
        outcome = by_run.get((run.row.label, run.seed))
        if outcome is not None and outcome.status == SUCCEEDED and _is_number(outcome.value):
            values[run.row.label][run.seed] = 100.0 * float(outcome.value)
            counted[run.row.label].append(outcome)
            continue
        excluded.append(
            {
                "label": run.row.label,
                "seed": run.seed,
                "job_id": outcome.job_id if outcome else None,
                "status": outcome.status if outcome else MISSING,
            }
        )

    baseline = values.get(plan.baseline) if plan.baseline is not None else None
    rows = []
    for index, row in enumerate(plan.rows):
        row_values = values[row.label]
        accuracies = np.array([row_values[s] for s in sorted(row_values)], dtype=float)
        summary = {
            "label": row.label,
            "params": dict(row.params),
            **_describe(accuracies),
            "vs_baseline": None,
            "paper": _paper(row, plan),
            "layers": mean_layers(outcome.layers for outcome in counted[row.label]),
        }
        if baseline is not None and row.label != plan.baseline:
            summary["vs_baseline"] = _compare(row_values, baseline, rng_seed=(seed, index))
        rows.append(summary)

    return {
        "metric": plan.metric if plan.metric else METRIC,
        "unit": "percent",
        "dataset": plan.dataset,
        "architecture": plan.architecture,
        "baseline": plan.baseline,
        "n_jobs": plan.job_count,
        "excluded": excluded,
        "rows": rows,
        "bootstrap": {
            "method": BOOTSTRAP_METHOD,
            "n_resamples": BOOTSTRAP_RESAMPLES,
            "confidence": CONFIDENCE,
            "seed": seed,
        },
    }


# --------------------------------------------------------------------------------------------
# The statistics


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _float(value: Any) -> float | None:
    """A statistic as a JSON number, or None where it is undefined (NaN)."""
    number = float(value)
    return None if math.isnan(number) else number


def _describe(accuracies: Any) -> dict[str, Any]:
    """n, mean, std (ddof=1) and the 95% t-interval of the mean."""
    import numpy as np
    from scipy import stats

    n = len(accuracies)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = float(np.mean(accuracies))
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None}
    std = float(np.std(accuracies, ddof=1))
    sem = float(stats.sem(accuracies))
    if sem == 0.0:  # every run the same: the interval is that value (t.interval gives NaN)
        interval = (mean, mean)
    else:
        interval = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=sem)
    return {"n": n, "mean": mean, "std": std, "ci95": [float(interval[0]), float(interval[1])]}


def _compare(
    row_values: dict[int, float], baseline: dict[int, float], *, rng_seed: tuple[int, int]
) -> dict[str, Any] | None:
    """The row against the baseline, paired by seed (seeds both finished)."""
    import numpy as np
    from scipy import stats

    pairs = sorted(set(row_values) & set(baseline))
    if not pairs:
        return {
            "diff": None,
            "ci95": None,
            "p_t": None,
            "p_wilcoxon": None,
            "wins": 0,
            "ties": 0,
            "losses": 0,
            "pairs": 0,
        }
    ours = np.array([row_values[s] for s in pairs])
    theirs = np.array([baseline[s] for s in pairs])
    differences = ours - theirs
    result: dict[str, Any] = {
        "diff": float(np.mean(differences)),
        "ci95": None,
        "p_t": None,
        "p_wilcoxon": None,
        "wins": int(np.count_nonzero(differences > 0)),
        "ties": int(np.count_nonzero(differences == 0)),
        "losses": int(np.count_nonzero(differences < 0)),
        "pairs": len(pairs),
    }
    if len(pairs) < 2:
        return result
    # Identical differences are legitimate data here (e.g. two rows that train the same
    # model): the tests' "nearly identical data" warnings say nothing the numbers do not.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result["p_t"] = _float(stats.ttest_rel(ours, theirs).pvalue)
        if np.count_nonzero(differences) >= 2:
            result["p_wilcoxon"] = _float(stats.wilcoxon(ours, theirs).pvalue)
        if np.ptp(differences) <= _SAME_DIFFERENCE:
            # Every resample has the same mean; BCa's acceleration would be 0/0.
            result["ci95"] = [result["diff"], result["diff"]]
        else:
            bootstrap = stats.bootstrap(
                (differences,),
                np.mean,
                n_resamples=BOOTSTRAP_RESAMPLES,
                confidence_level=CONFIDENCE,
                method=BOOTSTRAP_METHOD,
                vectorized=True,
                **_bootstrap_generator(np.random.default_rng(list(rng_seed))),
            )
            low, high = bootstrap.confidence_interval
            if not (math.isnan(low) or math.isnan(high)):
                result["ci95"] = [float(low), float(high)]
    return result


def _bootstrap_generator(generator: Any) -> dict[str, Any]:
    """The generator as `scipy.stats.bootstrap` takes it: ``rng`` since scipy 1.15, before
    that ``random_state`` (now deprecated)."""
    import inspect

    from scipy import stats

    takes_rng = "rng" in inspect.signature(stats.bootstrap).parameters
    return {"rng": generator} if takes_rng else {"random_state": generator}


def _paper(row: Row, plan: ExperimentPlan) -> float | None:
    """The paper's figure, only where the row is a Table-1/2 row and nothing else."""
    name = canonical_ablation(row.label)
    if name is None:
        return None
    is_that_row = row.params == {"ablation": name} or (
        name in ("dropout", "jumpout") and row.params == {"method": name}
    )
    return paper_accuracy(name, plan.dataset, plan.architecture) if is_that_row else None


def mean_layers(layer_lists: Iterable[list[dict[str, Any]] | None]) -> list[dict[str, Any]]:
    """Per dropout slot, the mean of each numeric statistic over several lists of slots (a run's
    epochs, or a row's runs); slots in the order first seen, a statistic over the lists that have
    it (a statistic no list has is left out). The engine's epoch ``layers``, the stored epochs'
    and `RunOutcome.layers` have this shape. Plain sums: it runs per job for a whole report."""
    slots: dict[str, dict[str, list[float]]] = {}
    for layers in layer_lists:
        for position, layer in enumerate(layers or ()):
            name = str(layer.get("name", position))
            fields = slots.setdefault(name, {})
            for field, value in layer.items():
                if field != "name" and _is_number(value):
                    totals = fields.setdefault(field, [0.0, 0])
                    totals[0] += float(value)
                    totals[1] += 1
    return [
        {"name": name, **{field: total / count for field, (total, count) in fields.items()}}
        for name, fields in slots.items()
    ]


# --------------------------------------------------------------------------------------------
# Rendering: one table, two spellings


def _flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """A report row as the flat columns of `CSV_COLUMNS` (None where undefined)."""
    import json

    versus = row["vs_baseline"] or {}
    interval = row["ci95"] or (None, None)
    diff_interval = versus.get("ci95") or (None, None)
    return {
        "label": row["label"],
        "params": json.dumps(row["params"], separators=(",", ":")),
        "n": row["n"],
        "mean": row["mean"],
        "std": row["std"],
        "ci95_low": interval[0],
        "ci95_high": interval[1],
        "diff": versus.get("diff"),
        "diff_ci95_low": diff_interval[0],
        "diff_ci95_high": diff_interval[1],
        "p_t": versus.get("p_t"),
        "p_wilcoxon": versus.get("p_wilcoxon"),
        "wins": versus.get("wins"),
        "ties": versus.get("ties"),
        "losses": versus.get("losses"),
        "pairs": versus.get("pairs"),
        "paper": row["paper"],
    }


def report_csv(report: dict[str, Any]) -> str:
    """One line per row, the columns of `CSV_COLUMNS` (full precision; empty where undefined)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in report["rows"]:
        writer.writerow({k: "" if v is None else v for k, v in _flat_row(row).items()})
    return buffer.getvalue()


def format_percent(value: float | None) -> str:
    """An accuracy or difference as the Markdown table prints it (two decimals, like the paper)."""
    return "-" if value is None else f"{value:.2f}"


def format_p(value: float | None) -> str:
    """A p-value as the Markdown table prints it (three significant digits)."""
    return "-" if value is None else f"{value:.3g}"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table like the paper's, the excluded runs named below it, and
    the dropout slots' realised statistics per row."""
    baseline = report["baseline"]
    heading = (
        f"{report['architecture']} on {report['dataset']}: final test accuracy (%), "
        f"{report['n_jobs']} runs"
    )
    versus = f"vs {baseline}" if baseline else "vs baseline"
    lines = [
        heading,
        "",
        f"| row | n | mean | std | 95% CI | {versus} | 95% CI (bootstrap) | p (t) "
        "| p (Wilcoxon) | wins/ties/losses | paper |",
        "|---|---:|---:|---:|---|---:|---|---:|---:|---|---:|",
    ]
    for row in report["rows"]:
        flat = _flat_row(row)
        interval = _interval(flat["ci95_low"], flat["ci95_high"])
        if row["vs_baseline"] is None:
            comparison = ["-", "-", "-", "-", "-"]
        else:
            comparison = [
                _signed(flat["diff"]),
                _interval(flat["diff_ci95_low"], flat["diff_ci95_high"], signed=True),
                format_p(flat["p_t"]),
                format_p(flat["p_wilcoxon"]),
                f"{flat['wins']}/{flat['ties']}/{flat['losses']}",
            ]
        cells = [
            row["label"] + (" (baseline)" if row["label"] == baseline else ""),
            str(flat["n"]),
            format_percent(flat["mean"]),
            format_percent(flat["std"]),
            interval,
            *comparison,
            format_percent(flat["paper"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    included = sum(row["n"] for row in report["rows"])
    excluded = report["excluded"]
    if excluded:
        named = ", ".join(
            f"{item['label']} seed {item['seed']} ({item['status']}"
            + (f", job {item['job_id']}" if item["job_id"] else "")
            + ")"
            for item in excluded
        )
        lines.append(f"{included} of {report['n_jobs']} runs counted; excluded: {named}.")
    else:
        lines.append(f"{included} of {report['n_jobs']} runs counted; none excluded.")
    bootstrap = report.get("bootstrap")
    if bootstrap:
        lines.append(
            f"Differences are paired by seed; bootstrap: {bootstrap['method']}, "
            f"{bootstrap['n_resamples']} resamples, seed {bootstrap['seed']}. With fewer than 6 "
            "pairs the Wilcoxon p-value cannot go below about 0.03."
        )
    layer_lines = [
        f"| {row['label']} | {layer['name']} | "
        + " | ".join(_fraction(layer.get(field)) for field in _LAYER_COLUMNS)
        + " |"
        for row in report["rows"]
        for layer in row["layers"]
    ]
    if layer_lines:
        lines += [
            "",
            "Dropout slots (means over each row's counted runs and epochs):",
            "",
            "| row | slot | " + " | ".join(_LAYER_COLUMNS) + " |",
            "|---|---|" + "---:|" * len(_LAYER_COLUMNS),
            *layer_lines,
        ]
    return "\n".join(lines) + "\n"


_LAYER_COLUMNS = ("active_fraction", "rate", "capped_fraction")


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _interval(low: float | None, high: float | None, *, signed: bool = False) -> str:
    if low is None or high is None:
        return "-"
    show = _signed if signed else format_percent
    return f"[{show(low)}, {show(high)}]"
