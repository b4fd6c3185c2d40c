"""scripts/gpu-check runs end to end without a GPU: ``--dry-run`` reports every GPU step skipped
with its reason and still writes the JSON and the markdown table (the run on a lent GPU must
never need a second try to say what happened)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = [
    "environment",
    "cuda_tests",
    "layer_benchmark",
    "model_step_eager",
    "model_step_compiled",
    "service",
]


def test_dry_run_skips_each_gpu_step_and_writes_the_results(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu-check"), "--dry-run", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    records = json.loads((out / "gpu-check.json").read_text())["steps"]
    assert [record["step"] for record in records] == STEPS
    assert records[0]["status"] == "ok" and records[0]["figures"]["torch"]
    for record in records[1:]:
        assert record["status"] == "skipped", record
        assert "no CUDA device" in record["reason"]
    table = (out / "gpu-check.md").read_text()
    assert "| service | skipped |" in table and "## Environment" in table
    assert "== service: skipped" in done.stdout  # printed as it goes


def test_a_failing_step_is_recorded_and_fails_the_run(tmp_path, monkeypatch):
    """One step that raises does not stop the others, and the exit status says so."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("gpu_check", str(ROOT / "scripts" / "gpu-check"))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    gpu_check = importlib.util.module_from_spec(spec)
    loader.exec_module(gpu_check)

    def broken(out, gpu):
        raise RuntimeError("planted")

    steps = [(name, broken if name == "cuda_tests" else step) for name, step in gpu_check.STEPS]
    monkeypatch.setattr(gpu_check, "STEPS", steps)
    assert gpu_check.main(["--dry-run", str(tmp_path)]) == 1
    records = json.loads((tmp_path / "gpu-check.json").read_text())["steps"]
    assert [r["status"] for r in records] == ["ok", "failed", *["skipped"] * 4]
    assert records[1]["error"] == "RuntimeError: planted"
