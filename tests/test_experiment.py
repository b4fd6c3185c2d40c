"""Experiment planning: grids, rows and presets expanded over seeds; every refusal located; the
paper's Table 1 and Table 2 figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jumpout.experiment import (
    PRESETS,
    ExperimentError,
    ExperimentPlan,
    Row,
    paper_accuracy,
    plan_experiment,
)
from jumpout.spec import ABLATIONS, TABLE1_ROWS

REPO = Path(__file__).resolve().parents[1]
BASE = {"dataset": "digits", "architecture": "mlp", "epochs": 2}


def plan(**request):
    return plan_experiment({"base": BASE, "seeds": 2, **request})


def test_grid_is_the_cartesian_product_first_field_slowest():
    result = plan(grid={"sigma": [0.1, 0.2], "p_max": [0.6, 0.7, 0.8]})
    assert [row.label for row in result.rows] == [
        "sigma=0.1,p_max=0.6",
        "sigma=0.1,p_max=0.7",
        "sigma=0.1,p_max=0.8",
        "sigma=0.2,p_max=0.6",
        "sigma=0.2,p_max=0.7",
        "sigma=0.2,p_max=0.8",
    ]
    assert result.rows[4].params == {"sigma": 0.2, "p_max": 0.7}
    assert result.preset is None and result.job_count == 12


def test_grid_labels_spell_values_as_json_and_lists_without_commas():
    result = plan(grid={"augment": [True, False], "milestones": [[1], [1, 2]]})
    assert [row.label for row in result.rows] == [
        "augment=true,milestones=[1]",
        "augment=true,milestones=[1 2]",
        "augment=false,milestones=[1]",
        "augment=false,milestones=[1 2]",
    ]


def test_grid_values_are_stored_as_the_spec_checks_them():
    result = plan(grid={"ablation": ["DROPOUT", "Dropout+III+I"], "sigma": [1]})
    assert [row.params for row in result.rows] == [
        {"ablation": "dropout", "sigma": 1.0},
        {"ablation": "dropout+I+III", "sigma": 1.0},
    ]


def test_runs_are_row_major_and_carry_the_full_client_spec():
    result = plan(rows=[{"sigma": 0.2}, {"label": "wide", "p_max": 0.8}], seeds=[7, 3])
    runs = result.runs()
    assert [(run.row.label, run.seed) for run in runs] == [
        ("sigma=0.2", 7),
        ("sigma=0.2", 3),
        ("wide", 7),
        ("wide", 3),
    ]
    assert runs[3].spec == {**BASE, "p_max": 0.8, "seed": 3}


def test_rows_labels_default_to_their_params_and_an_ablation_to_its_name():
    result = plan(rows=[{}, {"ablation": "jumpout"}, {"sigma": 0.3, "method": "jumpout"}])
    assert [row.label for row in result.rows] == ["base", "jumpout", "sigma=0.3,method=jumpout"]


def test_presets_are_the_papers_rows_as_ablations():
    table1 = plan(preset="table1")
    assert [row.label for row in table1.rows] == list(TABLE1_ROWS) == list(ABLATIONS)
    assert all(row.params == {"ablation": row.label} for row in table1.rows)
    table2 = plan(preset="table2")
    assert table2.rows == (
        Row("dropout", {"ablation": "dropout"}),
        Row("jumpout", {"ablation": "jumpout"}),
    )
    assert table1.preset == "table1" and table1.baseline == table2.baseline == "dropout"
    assert PRESETS == ("table1", "table2")


def test_seeds_as_a_count_or_a_list():
    assert plan(preset="table2", seeds=3).seeds == (0, 1, 2)
    assert plan(preset="table2", seeds=[9, 2**31 - 1, 0]).seeds == (9, 2**31 - 1, 0)
    assert len(plan(preset="table1", seeds=30).runs()) == 240


def test_baseline_defaults_to_the_plain_dropout_row():
    assert plan(grid={"method": ["jumpout", "dropout"]}).baseline == "method=dropout"
    named = plan(rows=[{"label": "mine", "method": "dropout", "dropout_rate": 0.5}, {}])
    assert named.baseline == "mine"
    assert plan(grid={"sigma": [0.1, 0.2]}).baseline is None
    # The rule is the resolved method, not the label.
    assert plan(rows=[{"sigma": 0.2}, {"label": "b", "ablation": "DROPOUT"}]).baseline == "b"
    assert plan(rows=[{"label": "dropout", "sigma": 0.2}, {"method": "dropout"}]).baseline == (
        "dropout"
    )


def test_baseline_given_or_switched_off():
    assert plan(preset="table1", baseline="dropout+I").baseline == "dropout+I"
    assert plan(preset="table1", baseline=None).baseline is None


def test_name_is_kept():
    assert plan(preset="table2", name="Table 2 on digits").name == "Table 2 on digits"


def test_round_trip_through_json():
    original = plan_experiment(
        {
            "name": "sweep",
            "base": {**BASE, "ablation": None, "milestones": [1]},
            "grid": {"sigma": [0.1, 0.2], "ablation": ["jumpout", "dropout+II"]},
            "seeds": [4, 1],
            "baseline": "sigma=0.1,ablation=dropout+II",
        }
    )
    stored = json.loads(json.dumps(original.to_dict()))
    assert ExperimentPlan.from_dict(stored) == original
    assert ExperimentPlan.from_dict(stored).runs() == original.runs()
    assert stored["metric"] == "final_test_accuracy"


def test_max_jobs_names_the_limit_and_the_count():
    assert plan_experiment({"base": BASE, "preset": "table1", "seeds": 30}, max_jobs=240)
    with pytest.raises(ExperimentError) as caught:
        plan_experiment({"base": BASE, "preset": "table1", "seeds": 31}, max_jobs=240)
    assert caught.value.location == ("seeds",)
    assert "248" in caught.value.message and "240" in caught.value.message


@pytest.mark.parametrize(
    ("request_", "location", "words"),
    [
        ({"base": BASE, "preset": "table1", "seeds": 1, "priority": 2}, ("priority",), "unknown"),
        ({"preset": "table1", "seeds": 1}, ("base",), "required"),
        ({"base": {"dataset": "digits"}, "preset": "table1", "seeds": 1},
         ("base", "architecture"), "required"),
        ({"base": {**BASE, "seed": 3}, "preset": "table1", "seeds": 1}, ("base", "seed"), "seeds"),
        ({"base": {**BASE, "dataset": "mnist"}, "preset": "table1", "seeds": 1},
         ("base", "dataset"), "accepted"),
        ({"base": {**BASE, "colour": 1}, "preset": "table1", "seeds": 1}, ("base", "colour"),
         "unknown field"),
        ({"base": {**BASE, "device": "cpu"}, "preset": "table1", "seeds": 1}, ("base", "device"),
         "whoever runs"),
        ({"base": {**BASE, "p_min": 0.7}, "grid": {"sigma": [0.1]}, "seeds": 1},
         ("base", "p_min"), "below p_max"),
        ({"base": BASE, "seeds": 1}, ("rows",), "exactly one of"),
        ({"base": BASE, "grid": {"sigma": [0.1]}, "preset": "table1", "seeds": 1}, ("preset",),
         "exactly one of"),
        ({"base": BASE, "grid": {"sigma": [0.1, 11]}, "seeds": 1}, ("grid", "sigma"), "[0, 10]"),
        ({"base": BASE, "grid": {"sigma": []}, "seeds": 1}, ("grid", "sigma"), "non-empty"),
        ({"base": BASE, "grid": {"sigma": 0.1}, "seeds": 1}, ("grid", "sigma"), "list"),
        ({"base": BASE, "grid": {"sigma": [0.1, 0.1]}, "seeds": 1}, ("grid", "sigma"), "twice"),
        ({"base": BASE, "grid": {"seed": [1, 2]}, "seeds": 1}, ("grid", "seed"), "seeds"),
        ({"base": BASE, "grid": {}, "seeds": 1}, ("grid",), "field"),
        ({"base": BASE, "grid": {"p_min": [0.1, 0.7]}, "seeds": 1}, ("grid", "p_min"),
         "p_min=0.7"),
        ({"base": BASE, "rows": [], "seeds": 1}, ("rows",), "non-empty"),
        ({"base": BASE, "rows": [{}, 3], "seeds": 1}, ("rows", 1), "object"),
        ({"base": BASE, "rows": [{}, {"sigma": -1}], "seeds": 1}, ("rows", 1, "sigma"), "[0, 10]"),
        ({"base": BASE, "rows": [{}, {"seed": 1}], "seeds": 1}, ("rows", 1, "seed"), "seeds"),
        ({"base": BASE, "rows": [{"p_min": 0.7}], "seeds": 1}, ("rows", 0, "p_min"), "below"),
        ({"base": BASE, "rows": [{"method": "none", "ablation": "jumpout"}], "seeds": 1},
         ("rows", 0, "ablation"), "method 'jumpout'"),
        ({"base": BASE, "rows": [{"sigma": 0.2}, {"sigma": 0.2}], "seeds": 1},
         ("rows", 1, "label"), "unique"),
        ({"base": BASE, "rows": [{"label": "a"}, {"label": "a", "sigma": 1}], "seeds": 1},
         ("rows", 1, "label"), "unique"),
        ({"base": BASE, "rows": [{"label": ""}], "seeds": 1}, ("rows", 0, "label"), "non-empty"),
        ({"base": BASE, "rows": [{"label": "a\nb"}], "seeds": 1}, ("rows", 0, "label"),
         "printable"),
        ({"base": BASE, "preset": "table3", "seeds": 1}, ("preset",), "table1, table2"),
        ({"base": {**BASE, "ablation": "jumpout"}, "preset": "table1", "seeds": 1},
         ("base", "ablation"), "rows set"),
        ({"base": {**BASE, "method": "dropout"}, "preset": "table2", "seeds": 1},
         ("base", "method"), "jumpout"),
        ({"base": BASE, "preset": "table1"}, ("seeds",), "count"),
        ({"base": BASE, "preset": "table1", "seeds": 0}, ("seeds",), "count"),
        ({"base": BASE, "preset": "table1", "seeds": True}, ("seeds",), "count"),
        ({"base": BASE, "preset": "table1", "seeds": 1001}, ("seeds",), "1000"),
        ({"base": BASE, "preset": "table1", "seeds": []}, ("seeds",), "list"),
        ({"base": BASE, "preset": "table1", "seeds": [1, 2, 1]}, ("seeds", 2), "twice"),
        ({"base": BASE, "preset": "table1", "seeds": [1, -1]}, ("seeds", 1), "integer"),
        ({"base": BASE, "preset": "table1", "seeds": [2**31]}, ("seeds", 0), "integer"),
        ({"base": BASE, "preset": "table1", "seeds": [1.0]}, ("seeds", 0), "integer"),
        ({"base": BASE, "preset": "table1", "seeds": 1, "baseline": "plain"}, ("baseline",),
         "dropout+I"),
        ({"base": BASE, "preset": "table1", "seeds": 1, "name": "x" * 129}, ("name",), "128"),
        ({"base": BASE, "preset": "table1", "seeds": 1, "name": "a\tb"}, ("name",), "printable"),
    ],
)  # fmt: skip
def test_every_refusal_names_its_location(request_, location, words):
    with pytest.raises(ExperimentError) as caught:
        plan_experiment(request_)
    assert caught.value.location == location
    assert words in caught.value.message
    assert str(caught.value).startswith(".".join(str(part) for part in location) + ": ")


def test_a_huge_grid_is_refused_before_it_is_built():
    grid = {
        field: [0.1 * (i + 1) for i in range(9)] for field in ("sigma", "lr", "momentum", "p_max")
    }
    with pytest.raises(ExperimentError) as caught:
        plan_experiment({"base": BASE, "grid": grid, "seeds": 1})
    assert caught.value.location[0] == "grid" and "1000 rows" in caught.value.message


def test_a_request_that_is_not_an_object_is_refused():
    with pytest.raises(ExperimentError, match="object"):
        plan_experiment(["table1"])


# --------------------------------------------------------------------------------------------
# The paper's figures


@pytest.mark.parametrize(
    ("label", "dataset", "architecture", "expected"),
    [
        ("dropout", "cifar10", "cnn_small", 86.50),
        ("Dropout+I+II", "cifar10", "cnn_small", 90.06),
        ("dropout+II", "cifar10", "wrn_28_10", 95.67),
        ("Dropout+III+I", "cifar100", "wrn_28_10", 81.20),  # the paper's spelling of +I+III
        ("dropout+II+III", "stl10", "wrn_16_8", 82.22),
        ("jumpout", "stl10", "wrn_16_8", 84.02),
        ("dropout", "fashion_mnist", "resnet_preact_20", 96.09),
        ("jumpout", "fashion_mnist", "resnet_preact_20", 97.17),
        ("dropout", "svhn", "wrn_16_8", 98.22),
        ("jumpout", "svhn", "wrn_16_8", 98.51),
        ("dropout", "imagenet", "resnet18", 71.15),
        ("jumpout", "imagenet", "resnet18", 71.48),
        # Table 2 has no ablation rows, Table 1 no SVHN; our own pairs are not in the paper.
        ("dropout+I", "svhn", "wrn_16_8", None),
        ("jumpout", "digits", "mlp", None),
        ("jumpout", "cifar10", "wrn_16_8", None),
        ("sigma=0.1", "cifar10", "wrn_28_10", None),
    ],
)
def test_paper_accuracy(label, dataset, architecture, expected):
    assert paper_accuracy(label, dataset, architecture) == expected


def test_paper_tables_agree_where_they_overlap():
    for dataset, architecture in [
        ("cifar10", "cnn_small"),
        ("cifar10", "wrn_28_10"),
        ("cifar100", "wrn_28_10"),
        ("stl10", "wrn_16_8"),
    ]:
        for row in ("dropout", "jumpout"):
            assert paper_accuracy(row, dataset, architecture) is not None
        for row in ABLATIONS:
            assert 70 < paper_accuracy(row, dataset, architecture) < 100


def test_planning_and_reporting_import_neither_torch_nor_numpy():
    code = (
        "import sys, jumpout.experiment, jumpout.report\n"
        "print(sorted({'torch', 'numpy', 'scipy'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
