"""``python -m jumpout train --devices 2``: the command line launches two gloo ranks itself
(PyTorch's elastic launcher); rank 0 prints the summary once and writes the checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jumpout.engine import list_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two spawned ranks importing torch: ~15 s on an idle 2-core machine
def test_train_with_two_devices_launches_two_ranks(tmp_path):
    done = subprocess.run(
        [
            sys.executable, "-m", "jumpout", "train", "--dataset", "digits", "--architecture",
            "mlp", "--epochs", "2", "--devices", "2", "--device", "cpu", "--out", str(tmp_path),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "launching 2 ranks" in done.stderr
    assert done.stdout.count("finished: 2/2 epochs") == 1  # rank 0 alone prints
    [*_, newest] = list_checkpoints(tmp_path)
    state = load_checkpoint(newest)
    assert state["config"]["devices"] == 2 and len(state["rng_ranks"]) == 2


def test_batch_size_not_divisible_by_devices_is_refused_naming_the_field():
    from jumpout.cli import main

    status = main(
        ["train", "--dataset", "digits", "--architecture", "mlp", "--devices", "3",
         "--batch-size", "64"]
    )  # fmt: skip
    assert status == 2
