"""The model-step benchmark runs end to end on the CPU at toy sizes (full sizes run on a GPU in
scripts/gpu-check): every case it times writes a row, and the JSON holds the figures."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_model_step_benchmark_times_each_precision_and_writes_json(tmp_path):
    out = tmp_path / "model_step.json"
    done = subprocess.run(
        [
            sys.executable,
            "model_step.py",
            "--device",
            "cpu",
            "--models",
            "cnn_small",
            "--batch",
            "2",
            "--steps",
            "2",
            "--rounds",
            "1",
            "--warmup",
            "1",
            "--precisions",
            "fp32",
            "bf16",
            "--channels-last",
            "on",
            "--json",
            str(out),
        ],  # fmt: skip
        cwd=ROOT / "benchmarks",
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(row["precision"], row["channels_last"]) for row in rows] == [
        ("fp32", True),
        ("bf16", True),
    ]
    assert all(row["dropout_s"] > 0 and row["jumpout_s"] > 0 for row in rows)
    assert "| cnn_small | bf16 | eager, channels_last | 2 |" in done.stdout
