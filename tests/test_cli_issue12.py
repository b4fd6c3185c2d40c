"""The command line's two annoyances of issue 12, each reproduced with ``python -m jumpout`` as
a process: ``demo`` printed seconds per method that read like a speed result but measured start-up
and warm-up (the first run pays them); ``ablation --help`` did not list, under any option, the
Table-1 row names it accepts (``--rows`` now takes them). Also ``fetch``, which the service's
refusals point an operator to, for the data sets that cannot be fetched."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_cli import run_cli  # the one helper that runs `python -m jumpout` as a process

from jumpout.cli import main
from jumpout.spec import ABLATIONS

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--architecture", "mlp", "--epochs", "1", "--train-size", "64"]
TINY += ["--test-size", "64", "--device", "cpu"]


def test_ablation_help_lists_the_row_names_under_the_option_that_takes_them():
    done = run_cli("ablation", "--help")

    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps lines at spaces
    rows_help = re.search(r" --rows ROW\[,ROW\.\.\.\] (.*?) --", text)
    assert rows_help is not None, done.stdout
    for name in ABLATIONS:
        assert re.search(rf"(?<![\w+]){re.escape(name)}(?![\w+])", rows_help.group(1)), name


def test_ablation_rows_trains_only_those_rows(capsys):
    assert main(["ablation", *TINY, "--rows", "dropout,JUMPOUT,dropout", "--format", "csv"]) == 0
    report = capsys.readouterr().out
    labels = {line.split(",")[0] for line in report.splitlines()[1:] if line}
    assert labels == {"dropout", "jumpout"}, report


def test_ablation_rows_refuses_an_unknown_name_in_one_line(capsys):
    assert main(["ablation", *TINY, "--rows", "dropout,dropout+IV"]) == 2

    message = capsys.readouterr().err.strip()
    assert message.startswith("error: rows: unknown Table-1 row 'dropout+IV'; accepted: ")
    assert all(name in message for name in ABLATIONS)
    assert len(message.splitlines()) == 1


@pytest.mark.slow
def test_demo_prints_no_seconds_per_method_and_labels_its_wall_time():
    done = run_cli("demo", "--epochs", "1")

    assert done.returncode == 0, done.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| method  | final test acc % |"
    assert [line.split("|")[1].strip() for line in table[2:]] == ["dropout", "jumpout"]
    assert "seconds" not in done.stdout
    assert "start-up and warm-up included: not a speed comparison" in done.stderr


def test_fetch_names_what_cannot_be_fetched(tmp_path, capsys):
    assert main(["fetch", "digits", "--data-dir", str(tmp_path)]) == 0
    assert "digits: nothing to fetch" in capsys.readouterr().err
    assert main(["fetch", "imagenet", "--data-dir", str(tmp_path)]) == 2
    assert "image-net.org" in capsys.readouterr().err
    assert main(["fetch", "mnist", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: dataset: unknown dataset 'mnist'")
    assert list(tmp_path.iterdir()) == []
