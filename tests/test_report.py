"""Experiment reports: per-row statistics and seed-paired comparisons checked against numbers
worked out here, excluded runs named, CSV and Markdown carrying the same figures, and the
``ablation`` command printing the report."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest

from jumpout.cli import main
from jumpout.experiment import plan_experiment
from jumpout.report import RunOutcome, build_report, report_csv, report_markdown
from jumpout.spec import ABLATIONS

BASE = {"dataset": "cifar10", "architecture": "wrn_28_10"}
# Two-sided 97.5% quantiles of Student's t (printed tables), to check the intervals without
# asking scipy what the module asked it.
T975 = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105, 29: 2.045229642}


def table2(seeds=5, **request):
    return plan_experiment({"base": BASE, "preset": "table2", "seeds": seeds, **request})


def outcomes(plan, values_by_label, status="succeeded"):
    """Succeeded outcomes from {label: [accuracy fraction per seed, in plan.seeds order]}."""
    return [
        RunOutcome(label, seed, status, value, job_id=f"{label}-{seed}")
        for label, values in values_by_label.items()
        for seed, value in zip(plan.seeds, values, strict=True)
    ]


def row(report, label):
    return next(item for item in report["rows"] if item["label"] == label)


def test_row_statistics_match_the_textbook():
    plan = table2(seeds=3)
    report = build_report(plan, outcomes(plan, {"dropout": [0.90, 0.92, 0.94],
                                                "jumpout": [0.91, 0.91, 0.91]}))  # fmt: skip
    dropout = row(report, "dropout")
    assert dropout["n"] == 3
    assert dropout["mean"] == pytest.approx(92.0)
    assert dropout["std"] == pytest.approx(2.0)  # sqrt(((-2)^2 + 0 + 2^2) / 2)
    half_width = T975[2] * 2.0 / math.sqrt(3)
    assert dropout["ci95"] == pytest.approx([92.0 - half_width, 92.0 + half_width])
    jumpout = row(report, "jumpout")
    assert jumpout["std"] == pytest.approx(0.0, abs=1e-12)
    assert jumpout["ci95"] == pytest.approx([91.0, 91.0])


def test_a_constant_improvement_is_certain():
    plan = table2(seeds=8)
    rng = np.random.default_rng(3)
    dropout = rng.uniform(0.80, 0.95, size=8)
    report = build_report(plan, outcomes(plan, {"dropout": dropout, "jumpout": dropout + 0.01}))
    versus = row(report, "jumpout")["vs_baseline"]
    assert versus["diff"] == pytest.approx(1.0)
    assert versus["ci95"] == pytest.approx([1.0, 1.0])
    assert (versus["wins"], versus["ties"], versus["losses"], versus["pairs"]) == (8, 0, 0, 8)
    assert versus["p_t"] < 1e-6
    assert versus["p_wilcoxon"] == pytest.approx(2 / 2**8)  # exact: all 8 signs agree
    assert row(report, "dropout")["vs_baseline"] is None  # the baseline's own
    assert report["baseline"] == "dropout"


def test_identical_rows_tie_with_no_test_to_run():
    plan = table2(seeds=4)
    same = [0.90, 0.91, 0.92, 0.93]
    report = build_report(plan, outcomes(plan, {"dropout": same, "jumpout": same}))
    versus = row(report, "jumpout")["vs_baseline"]
    assert versus["diff"] == 0.0 and versus["ci95"] == [0.0, 0.0]
    assert (versus["wins"], versus["ties"], versus["losses"]) == (0, 4, 0)
    assert versus["p_t"] is None and versus["p_wilcoxon"] is None
    json.dumps(report, allow_nan=False)  # undefined statistics are null, never NaN


def test_paired_tests_agree_with_the_one_sample_view_of_the_differences():
    from scipy import stats

    plan = table2(seeds=5)
    dropout = np.array([0.90, 0.91, 0.92, 0.93, 0.94])
    steps = np.array([0.012, -0.004, 0.020, 0.007, 0.015])
    report = build_report(plan, outcomes(plan, {"dropout": dropout, "jumpout": dropout + steps}))
    versus = row(report, "jumpout")["vs_baseline"]
    differences = 100 * (dropout + steps) - 100 * dropout
    assert versus["diff"] == pytest.approx(np.mean(differences))
    # A paired t-test is a one-sample t-test of the differences against 0.
    assert versus["p_t"] == pytest.approx(stats.ttest_1samp(differences, 0.0).pvalue)
    mean, sem = differences.mean(), differences.std(ddof=1) / math.sqrt(5)
    assert 2 * stats.t.sf(mean / sem, 4) == pytest.approx(versus["p_t"])
    # Exact signed-rank: one negative difference, the smallest in size (rank 1), among 5:
    # P(W- <= 1) two-sided = 2 * 2/32.
    assert versus["p_wilcoxon"] == pytest.approx(4 / 32)
    assert (versus["wins"], versus["ties"], versus["losses"]) == (4, 0, 1)


def test_wilcoxon_needs_two_non_zero_differences():
    plan = table2(seeds=3)
    report = build_report(plan, outcomes(plan, {"dropout": [0.90, 0.91, 0.92],
                                                "jumpout": [0.90, 0.91, 0.95]}))  # fmt: skip
    versus = row(report, "jumpout")["vs_baseline"]
    assert versus["p_wilcoxon"] is None and versus["p_t"] is not None
    assert (versus["wins"], versus["ties"]) == (1, 2)


def test_bootstrap_interval_is_reproducible_and_about_as_wide_as_theory_says():
    plan = table2(seeds=30)
    rng = np.random.default_rng(11)
    dropout = rng.uniform(0.90, 0.95, size=30)
    jumpout = dropout + rng.normal(0.005, 0.004, size=30)  # differences: 0.5 +- 0.4 points
    results = outcomes(plan, {"dropout": dropout, "jumpout": jumpout})
    first = row(build_report(plan, results, seed=1), "jumpout")["vs_baseline"]
    again = row(build_report(plan, results, seed=1), "jumpout")["vs_baseline"]
    other = row(build_report(plan, results, seed=2), "jumpout")["vs_baseline"]
    assert first == again
    assert first["ci95"] != other["ci95"]
    low, high = first["ci95"]
    assert low < first["diff"] < high
    differences = 100 * jumpout - 100 * dropout
    t_width = 2 * T975[29] * differences.std(ddof=1) / math.sqrt(30)
    # The bootstrap and t intervals of a mean of 30 near-normal values differ by a few percent
    # (Monte-Carlo error with 4000 resamples ~2%); 20% is a generous bound.
    assert high - low == pytest.approx(t_width, rel=0.2)
    assert other["ci95"] == pytest.approx(first["ci95"], rel=0.1)


def test_failed_cancelled_and_missing_runs_are_named_not_counted():
    plan = table2(seeds=4)
    results = [
        RunOutcome("dropout", 0, "succeeded", 0.90, "a"),
        RunOutcome("dropout", 1, "succeeded", 0.91, "b"),
        RunOutcome("dropout", 2, "failed", None, "c"),
        RunOutcome("dropout", 3, "succeeded", 0.93, "d"),
        RunOutcome("jumpout", 0, "succeeded", 0.92, "e"),
        RunOutcome("jumpout", 1, "cancelled", 0.95, "f"),  # a value, but it did not finish
        RunOutcome("jumpout", 2, "succeeded", 0.94, "g"),
        # jumpout seed 3: never reported
    ]
    report = build_report(plan, results)
    assert report["n_jobs"] == 8
    assert report["excluded"] == [
        {"label": "dropout", "seed": 2, "job_id": "c", "status": "failed"},
        {"label": "jumpout", "seed": 1, "job_id": "f", "status": "cancelled"},
        {"label": "jumpout", "seed": 3, "job_id": None, "status": "missing"},
    ]
    assert row(report, "dropout")["n"] == 3 and row(report, "jumpout")["n"] == 2
    # Only seed 0 is finished in both rows.
    versus = row(report, "jumpout")["vs_baseline"]
    assert versus["pairs"] == 1 and versus["diff"] == pytest.approx(2.0)
    assert versus["p_t"] is None and versus["ci95"] is None
    markdown = report_markdown(report)
    assert "5 of 8 runs counted" in markdown
    assert "dropout seed 2 (failed, job c)" in markdown
    assert "jumpout seed 1 (cancelled, job f)" in markdown
    assert "jumpout seed 3 (missing)" in markdown


def test_a_row_with_no_finished_run_reports_nothing_rather_than_zero():
    plan = table2(seeds=2)
    results = [RunOutcome("dropout", s, "succeeded", 0.9) for s in (0, 1)]
    results += [RunOutcome("jumpout", s, "failed", None) for s in (0, 1)]
    jumpout = row(build_report(plan, results), "jumpout")
    assert (jumpout["n"], jumpout["mean"], jumpout["std"], jumpout["ci95"]) == (0, None, None, None)
    assert jumpout["vs_baseline"]["pairs"] == 0 and jumpout["vs_baseline"]["diff"] is None


def test_outcomes_must_belong_to_the_plan():
    plan = table2(seeds=2)
    with pytest.raises(ValueError, match="not a run"):
        build_report(plan, [RunOutcome("dropout", 5, "succeeded", 0.9)])
    with pytest.raises(ValueError, match="not a run"):
        build_report(plan, [RunOutcome("dropout+I", 0, "succeeded", 0.9)])
    with pytest.raises(ValueError, match="two outcomes"):
        build_report(plan, [RunOutcome("dropout", 0, "succeeded", 0.9)] * 2)


def test_no_baseline_no_comparisons():
    plan = table2(seeds=2, baseline=None)
    report = build_report(plan, outcomes(plan, {"dropout": [0.9, 0.9], "jumpout": [0.9, 0.9]}))
    assert report["baseline"] is None
    assert all(item["vs_baseline"] is None for item in report["rows"])


def test_paper_figures_only_for_the_papers_own_rows():
    table1 = plan_experiment({"base": BASE, "preset": "table1", "seeds": 1})
    report = build_report(table1, [])
    assert [item["paper"] for item in report["rows"]] == [
        95.23, 96.06, 95.67, 96.20, 96.35, 96.74, 96.45, 96.82,
    ]  # fmt: skip
    custom = plan_experiment(
        {
            "base": BASE,
            "rows": [
                {"label": "dropout", "method": "dropout"},
                {"label": "jumpout", "ablation": "jumpout", "sigma": 0.2},  # not the paper's
                {"label": "Dropout+III+I", "ablation": "dropout+I+III"},
            ],
            "seeds": 1,
        }
    )
    assert [item["paper"] for item in build_report(custom, [])["rows"]] == [95.23, None, 96.45]
    digits = plan_experiment({"base": {"dataset": "digits", "architecture": "mlp"},
                              "preset": "table2", "seeds": 1})  # fmt: skip
    assert [item["paper"] for item in build_report(digits, [])["rows"]] == [None, None]


def test_layers_are_the_mean_over_the_rows_runs():
    plan = table2(seeds=2)
    results = [
        RunOutcome("dropout", 0, "succeeded", 0.9, layers=[
            {"name": "a", "active_fraction": 0.4, "rate": 0.3, "capped_fraction": 0.0},
            {"name": "b", "active_fraction": 0.6, "rate": 0.3, "capped_fraction": 0.0}]),
        RunOutcome("dropout", 1, "succeeded", 0.9, layers=[
            {"name": "a", "active_fraction": 0.5, "rate": 0.3, "capped_fraction": 0.2},
            {"name": "b", "active_fraction": 0.8, "rate": 0.3, "capped_fraction": None}]),
        RunOutcome("jumpout", 0, "failed", None, layers=[
            {"name": "a", "active_fraction": 0.0, "rate": 0.9, "capped_fraction": 1.0}]),
    ]  # fmt: skip
    report = build_report(plan, results)
    assert row(report, "dropout")["layers"] == [
        {"name": "a", "active_fraction": pytest.approx(0.45), "rate": pytest.approx(0.3),
         "capped_fraction": pytest.approx(0.1)},
        {"name": "b", "active_fraction": pytest.approx(0.7), "rate": pytest.approx(0.3),
         "capped_fraction": pytest.approx(0.0)},
    ]  # fmt: skip
    assert row(report, "jumpout")["layers"] == []  # a failed run's statistics do not count
    markdown = report_markdown(report)
    assert "| dropout | a | 0.450 | 0.300 | 0.100 |" in markdown


def test_report_shape():
    plan = table2(seeds=2)
    report = build_report(plan, outcomes(plan, {"dropout": [0.9, 0.91], "jumpout": [0.92, 0.9]}))
    assert {k: report[k] for k in ("metric", "unit", "dataset", "architecture", "baseline")} == {
        "metric": "final_test_accuracy",
        "unit": "percent",
        "dataset": "cifar10",
        "architecture": "wrn_28_10",
        "baseline": "dropout",
    }
    assert set(report["rows"][1]) == {
        "label", "params", "n", "mean", "std", "ci95", "vs_baseline", "paper", "layers",
    }  # fmt: skip
    assert set(report["rows"][1]["vs_baseline"]) == {
        "diff", "ci95", "p_t", "p_wilcoxon", "wins", "ties", "losses", "pairs",
    }  # fmt: skip
    assert report["rows"][0]["params"] == {"ablation": "dropout"}
    json.dumps(report, allow_nan=False)


def test_csv_and_markdown_carry_the_same_figures():
    plan = plan_experiment({"base": BASE, "preset": "table1", "seeds": 6})
    rng = np.random.default_rng(5)
    values = {label: rng.uniform(0.94, 0.97, size=6) for label in ABLATIONS}
    report = build_report(plan, outcomes(plan, values))
    parsed = list(csv.DictReader(io.StringIO(report_csv(report))))
    table = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in report_markdown(report).splitlines()
        if line.startswith("| dropout") or line.startswith("| jumpout")
    ][:8]  # the main table; the slots table (none here) would follow
    assert [line["label"] for line in parsed] == list(ABLATIONS)
    assert [cells[0].removesuffix(" (baseline)") for cells in table] == list(ABLATIONS)
    for line, cells, item in zip(parsed, table, report["rows"], strict=True):
        assert float(line["mean"]) == item["mean"]  # the CSV keeps full precision
        assert cells[1] == line["n"] == "6"
        assert cells[2] == f"{float(line['mean']):.2f}"
        assert cells[3] == f"{float(line['std']):.2f}"
        assert cells[4] == f"[{float(line['ci95_low']):.2f}, {float(line['ci95_high']):.2f}]"
        assert cells[10] == f"{float(line['paper']):.2f}"
        if item["vs_baseline"] is None:
            assert line["diff"] == line["p_t"] == "" and cells[5] == "-"
            continue
        assert cells[5] == f"{float(line['diff']):+.2f}"
        assert cells[6] == (
            f"[{float(line['diff_ci95_low']):+.2f}, {float(line['diff_ci95_high']):+.2f}]"
        )
        assert cells[7] == f"{float(line['p_t']):.3g}"
        assert cells[8] == f"{float(line['p_wilcoxon']):.3g}"
        assert cells[9] == f"{line['wins']}/{line['ties']}/{line['losses']}"
        assert line["pairs"] == "6"


# --------------------------------------------------------------------------------------------
# The command line


TINY = ["--dataset", "digits", "--architecture", "mlp", "--epochs", "1", "--train-size", "128",
        "--test-size", "100", "--device", "cpu"]  # fmt: skip


def test_ablation_command_prints_the_report_table(capsys):
    assert main(["ablation", *TINY, "--seeds", "2"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| row |"))
    rows = lines[header + 2 : header + 10]
    assert [line.split("|")[1].strip().removesuffix(" (baseline)") for line in rows] == list(
        ABLATIONS
    )
    assert all(line.split("|")[2].strip() == "2" for line in rows)  # n = 2 seeds each
    assert "16 of 16 runs counted" in captured.out
    assert "[16/16] jumpout seed 1: final test accuracy" in captured.err  # progress on stderr
    assert "| row |" not in captured.err


def test_ablation_command_as_csv_and_json(capsys):
    assert main(["ablation", *TINY, "--train-size", "64", "--format", "csv", "--seed", "5"]) == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [line["label"] for line in parsed] == list(ABLATIONS)
    assert all(line["n"] == "1" for line in parsed)
    assert main(["ablation", *TINY, "--train-size", "64", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dataset"] == "digits" and report["n_jobs"] == 8
    assert all(0 <= item["mean"] <= 100 for item in report["rows"])
    assert {layer["name"] for layer in report["rows"][0]["layers"]}  # realised rates logged


@pytest.mark.parametrize(
    ("options", "starts"),
    [
        (["--seeds", "0"], "error: seeds:"),
        (["--seed", str(2**31 - 1), "--seeds", "2"], "error: seeds:"),
        (["--sigma", "20"], "error: sigma:"),
    ],
)
def test_ablation_command_refuses_bad_options_in_one_line(capsys, options, starts):
    assert main(["ablation", *TINY, *options]) == 2
    assert capsys.readouterr().err.startswith(starts)
