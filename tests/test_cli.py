"""The command line: train and demo runs; clean errors with exit status 2 (the ablation command
is tested with the report it prints, in tests/test_report.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jumpout.cli import main
from jumpout.data import list_datasets
from jumpout.engine import list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--train-size", "128", "--test-size", "100", "--batch-size", "32", "--device", "cpu"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "jumpout", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_train_subprocess_writes_checkpoints_and_summary(tmp_path):
    out = tmp_path / "run"
    done = run_cli(
        "train",
        "--dataset", "digits",
        "--architecture", "mlp",
        "--method", "jumpout",
        "--epochs", "2",
        "--out", str(out),
        *TINY,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "finished: 2/2 epochs" in done.stdout
    assert "final test accuracy" in done.stdout
    assert "epoch   2/2" in done.stderr  # per-epoch line under the progress bar
    names = [path.name for path in list_checkpoints(out)]
    assert names[-1] == "checkpoint-epoch0002.pt"
    assert load_checkpoint(out / names[-1])["config"]["method"] == "jumpout"


def test_bad_dataset_exits_2_naming_field_and_accepted_names():
    done = run_cli("train", "--dataset", "mnist-ish", "--architecture", "mlp")
    assert done.returncode == 2
    message = done.stderr.strip()
    assert message.startswith("error: dataset:")
    assert all(name in message for name in list_datasets())
    assert "Traceback" not in done.stderr
    assert len(message.splitlines()) == 1


def test_missing_dataset_files_exit_2_without_traceback(tmp_path, capsys):
    assert (
        main(["train", "--dataset", "cifar10", "--arch", "mlp", "--data-dir", str(tmp_path)]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: dataset 'cifar10' not found")
    assert "--download" in err


def test_bad_value_exits_2(capsys):
    assert main(["train", "--dataset", "digits", "--architecture", "mlp", "--lr", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: lr:")


def test_resume_continues_from_newest_checkpoint(tmp_path, capsys):
    common = ["train", "--dataset", "digits", "--architecture", "mlp", "--out", str(tmp_path)]
    assert main([*common, "--epochs", "2", *TINY]) == 0
    (tmp_path / "checkpoint-epoch0002.pt").unlink()  # as if stopped after epoch 1
    capsys.readouterr()
    assert main([*common, "--epochs", "2", "--resume", *TINY]) == 0
    captured = capsys.readouterr()
    assert "resuming from" in captured.err and "checkpoint-epoch0001.pt" in captured.err
    state = load_checkpoint(tmp_path / "checkpoint-epoch0002.pt")
    assert [m["epoch"] for m in state["metrics"]] == [1, 2]
    # A resume with another number of epochs (another schedule) is refused, naming the field.
    assert main([*common, "--epochs", "3", "--resume", *TINY]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: epochs: cannot resume")
    assert "epochs=2 (asked: 3)" in last_line


def test_resume_needs_out(capsys):
    assert main(["train", "--dataset", "digits", "--architecture", "mlp", "--resume"]) == 2
    assert capsys.readouterr().err.startswith("error: out_dir:")


@pytest.mark.slow
def test_demo_prints_both_methods(capsys):
    assert main(["demo", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "| dropout |" in out and "| jumpout |" in out


def test_train_prints_final_test_accuracy_and_the_validation_best_only_with_a_split(capsys):
    command = ["train", "--dataset", "digits", "--architecture", "mlp", "--epochs", "2", *TINY]
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "final test accuracy" in out and "best" not in out
    assert main([*command, "--val-fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "final test accuracy" in out and "; best on validation: epoch " in out


@pytest.mark.slow
def test_demo_reports_no_test_selected_figure(capsys):
    assert main(["demo", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "| method  | final test acc % |" in out and "best" not in out


def test_svhn_without_its_extra_file_is_refused_before_training(tmp_path, monkeypatch, capsys):
    # svhn_extra is on by default (the paper's train + extra): the early check reads extra too,
    # so a missing extra_32x32.mat is an exit 2 naming it, not a crash after the model is built.
    from test_datasets import svhn_images, write_svhn

    splits = {"train": (svhn_images([10, 20]), [1, 2]), "test": (svhn_images([30, 40]), [3, 4])}
    write_svhn(tmp_path / "svhn", splits, monkeypatch)
    argv = ["train", "--dataset", "svhn", "--arch", "mlp", "--data-dir", str(tmp_path)]
    built = []
    monkeypatch.setattr("jumpout.engine.fit", lambda *a, **k: built.append(a))
    assert main([*argv, "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "extra_32x32.mat" in err and "svhn_extra=false" in err
    assert "Traceback" not in err and built == []
