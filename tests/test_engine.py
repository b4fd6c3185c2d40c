"""The training engine: metrics, checkpoints, cooperative stop, exact resume, non-finite loss."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from jumpout import data, engine
from jumpout.data import Augmentation, dataset_info
from jumpout.engine import (
    Callback,
    NonFiniteLossError,
    augment_on_device,
    find_resumable_checkpoint,
    fit,
    list_checkpoints,
    load_checkpoint,
)
from jumpout.spec import ConfigError, resolve_config

METRIC_KEYS = {
    "epoch",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "lr",
    "seconds",
    "images_per_second",
    "layers",
}


def small_config(tmp_path: Path | None = None, **overrides):
    """digits + mlp, capped small: a CPU epoch takes a fraction of a second."""
    values = dict(
        epochs=2,
        batch_size=32,
        train_size=320,
        test_size=200,
        device="cpu",
        method="jumpout",
        lr=0.05,
        seed=3,
    )
    if tmp_path is not None:
        values["out_dir"] = str(tmp_path)
    values.update(overrides)
    return resolve_config("digits", "mlp", **values)


class Recorder(Callback):
    def __init__(self, stop_after_steps: int | None = None) -> None:
        self.epochs: list[dict] = []
        self.checkpoints: list[tuple] = []
        self.removed: list[str] = []
        self.steps: list[tuple] = []
        self.stop_after_steps = stop_after_steps

    def on_epoch_end(self, metrics):
        self.epochs.append(metrics)

    def on_checkpoint(self, path, epoch, sha256, size_bytes, is_best):
        self.checkpoints.append((path, epoch, sha256, size_bytes, is_best))

    def on_checkpoint_removed(self, path):
        self.removed.append(path)

    def on_step(self, epoch, step, steps, loss):
        self.steps.append((epoch, step, steps, loss))

    def should_stop(self):
        return self.stop_after_steps is not None and len(self.steps) >= self.stop_after_steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 3-epoch jumpout run shared by the metric and checkpoint tests."""
    out = tmp_path_factory.mktemp("run")
    recorder = Recorder()
    config = small_config(out, epochs=3, keep_last=1, train_size=480)
    result = fit(config, recorder)
    return config, recorder, result, out


def test_fit_learns_above_chance(trained):
    _, _, result, _ = trained
    assert result.epochs_completed == 3
    assert not result.stopped
    assert result.final_accuracy > 0.5  # chance is 0.1
    assert result.best_accuracy >= result.final_accuracy


def test_metrics_keys_and_ranges(trained):
    _, recorder, result, _ = trained
    assert recorder.epochs == result.history
    for number, metrics in enumerate(recorder.epochs, start=1):
        assert set(metrics) == METRIC_KEYS
        assert metrics["epoch"] == number
        assert 0.0 <= metrics["train_accuracy"] <= 1.0
        assert 0.0 <= metrics["test_accuracy"] <= 1.0
        assert metrics["train_loss"] > 0 and metrics["test_loss"] > 0
        assert metrics["seconds"] > 0 and metrics["images_per_second"] > 0
        assert 0.0 <= metrics["lr"] <= 0.05
    json.dumps(result.history)  # plain JSON values only


def test_layer_statistics_present_for_jumpout(trained):
    _, recorder, _, _ = trained
    layers = recorder.epochs[-1]["layers"]
    assert len(layers) == 2  # the mlp's two hidden slots
    for layer in layers:
        assert set(layer) == {"name", "active_fraction", "rate"}
        assert 0.0 < layer["active_fraction"] <= 1.0
        assert 0.0 < layer["rate"] <= 1.0


def test_no_layer_statistics_for_dropout():
    result = fit(small_config(epochs=1, method="dropout", train_size=96))
    assert result.history[0]["layers"] == []


def test_progress_reports_loss_every_few_steps(trained):
    _, recorder, _, _ = trained
    steps_per_epoch = 480 // 32
    assert len(recorder.steps) == 3 * steps_per_epoch
    reported = [entry for entry in recorder.steps if entry[3] is not None]
    # Every PROGRESS_EVERY steps and at each epoch's last step; None otherwise.
    assert all(step % engine.PROGRESS_EVERY == 0 or step == steps for _, step, steps, _ in reported)
    assert {step for _, step, _, _ in reported} >= {steps_per_epoch}


def test_checkpoints_load_weights_only_and_sha256_matches(trained):
    _, recorder, result, out = trained
    assert len(recorder.checkpoints) == 3
    for path, epoch, *_ in recorder.checkpoints:
        assert Path(path).name == f"checkpoint-epoch{epoch:04d}.pt"
    path, epoch, sha256, size, _ = recorder.checkpoints[-1]
    data = Path(path).read_bytes()
    assert hashlib.sha256(data).hexdigest() == sha256
    assert len(data) == size
    state = torch.load(path, weights_only=True)
    assert set(state) >= {
        "model",
        "optimizer",
        "scheduler",
        "rng",
        "epoch",
        "config",
        "metrics",
        "best_accuracy",
    }
    assert state["epoch"] == 3
    assert state["config"] == result.config.to_dict()
    assert state["metrics"] == result.history


def test_keep_last_and_keep_best_pruning(trained):
    _, recorder, result, out = trained
    kept = {path.name for path in list_checkpoints(out)}
    best = f"checkpoint-epoch{result.best_epoch:04d}.pt"
    assert kept == {"checkpoint-epoch0003.pt", best}
    written = {Path(entry[0]).name for entry in recorder.checkpoints}
    assert {Path(path).name for path in recorder.removed} == written - kept
    flagged = [entry[1] for entry in recorder.checkpoints if entry[4]]
    assert flagged[-1] == result.best_epoch


def test_keep_last_without_keep_best_and_stale_temp_files_removed(tmp_path):
    stale = tmp_path / ".checkpoint-killed.tmp"
    stale.write_bytes(b"a save interrupted by a kill")
    recorder = Recorder()
    fit(small_config(tmp_path, epochs=3, train_size=64, keep_last=1, keep_best=False), recorder)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-epoch0003.pt"]
    assert len(recorder.removed) == 2
    assert not stale.exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_leftover_temp_file_is_ignored(trained, tmp_path):
    _, _, _, out = trained
    for path in list_checkpoints(out):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / ".checkpoint-abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "checkpoint-epoch0009.pt").write_bytes(b"truncated")  # newest, but corrupt
    found = find_resumable_checkpoint(tmp_path)
    assert Path(found).name == "checkpoint-epoch0003.pt"
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "checkpoint-epoch0009.pt"
    assert find_resumable_checkpoint(tmp_path / "missing") is None


def test_cooperative_stop_writes_checkpoint_and_resume_is_exact(tmp_path, monkeypatch):
    """Stopped mid-epoch 2, resumed: bit-identical weights to the uninterrupted run."""
    monkeypatch.setattr(engine, "STOP_POLL_EVERY", 4)
    overrides = dict(epochs=3, train_size=320, keep_last=10)
    full = fit(small_config(tmp_path / "full", **overrides))

    steps_per_epoch = 320 // 32
    recorder = Recorder(stop_after_steps=steps_per_epoch + 3)
    partial = fit(small_config(tmp_path / "cut", **overrides), recorder)
    assert partial.stopped and partial.epochs_completed == 1
    last = recorder.checkpoints[-1]
    assert Path(last[0]).name == "checkpoint-epoch0001-step000004.pt"
    assert find_resumable_checkpoint(tmp_path / "cut") == last[0]

    resumed = fit(small_config(tmp_path / "cut", **overrides), resume_from=last[0])
    assert resumed.epochs_completed == 3 and not resumed.stopped
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert [m["test_accuracy"] for m in resumed.history] == [
        m["test_accuracy"] for m in full.history
    ]
    assert resumed.history[1]["train_loss"] == pytest.approx(full.history[1]["train_loss"])


class StopAfterEpochs(Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs, self.finished = epochs, 0

    def on_epoch_end(self, metrics):
        self.finished += 1

    def should_stop(self):
        return self.finished >= self.epochs


def test_resume_at_epoch_boundary_is_exact(tmp_path):
    overrides = dict(epochs=2, train_size=160, keep_last=10)
    full = fit(small_config(tmp_path / "full", **overrides))
    first = fit(small_config(tmp_path / "cut", **overrides), StopAfterEpochs(1))
    assert first.stopped and first.epochs_completed == 1
    resumed = fit(small_config(tmp_path / "cut", **overrides), resume_from=first.last_checkpoint)
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    state = load_checkpoint(resumed.last_checkpoint)
    assert state["epoch"] == 2 and len(state["metrics"]) == 2


def test_resume_refuses_a_different_method(tmp_path):
    run = fit(small_config(tmp_path, epochs=1, train_size=64))
    other = small_config(tmp_path, method="dropout", train_size=64)
    with pytest.raises(ConfigError, match="method"):
        fit(other, resume_from=run.last_checkpoint)


def test_deterministic_under_seed():
    first = fit(small_config(epochs=1, train_size=96))
    second = fit(small_config(epochs=1, train_size=96))
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name])


def test_non_finite_loss_names_epoch_and_step(monkeypatch):
    real_build = engine._build_model

    class PoisonAfter(torch.nn.Module):
        """Returns NaN logits from the 4th training forward on."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            out = self.inner(x)
            if self.training:
                self.calls += 1
                if self.calls >= 4:
                    out = out * float("nan")
            return out

    monkeypatch.setattr(engine, "_build_model", lambda c, i: PoisonAfter(real_build(c, i)))
    with pytest.raises(NonFiniteLossError) as caught:
        fit(small_config(epochs=1, train_size=320))
    assert (caught.value.epoch, caught.value.step) == (1, 4)
    assert "epoch 1, step 4" in str(caught.value)


def test_absurd_learning_rate_raises_non_finite():
    # The spec refuses lr > 10, but the engine must still catch a run that diverges: bypass it.
    config = small_config(epochs=1, train_size=320, momentum=0.99, nesterov=True)
    config = dataclasses.replace(config, lr=100.0)
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        fit(config)


def test_augment_on_device_crops_and_flips():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    generator = torch.Generator().manual_seed(0)
    out = augment_on_device(images, 2, True, torch.tensor([-1.0, -2.0, -3.0]), generator)
    assert out.shape == images.shape
    # Every output pixel is an input pixel of the same channel or that channel's fill.
    for channel, fill in enumerate((-1.0, -2.0, -3.0)):
        allowed = set(images[:, channel].flatten().tolist()) | {fill}
        assert set(out[:, channel].flatten().tolist()) <= allowed
    same = augment_on_device(images, 0, False)
    assert torch.equal(same, images)


def test_device_resident_path_matches_loader_path(monkeypatch):
    """The GPU path (data kept as tensors) exercised on the CPU: without augmentation it sees the
    same batches in the same order as the DataLoader path, so the weights are identical."""
    loader_run = fit(small_config(epochs=2, train_size=160))
    monkeypatch.setattr(engine, "_keep_data_on_device", lambda device: True)
    resident_run = fit(small_config(epochs=2, train_size=160))
    for name, tensor in loader_run.model.state_dict().items():
        assert torch.equal(tensor, resident_run.model.state_dict()[name]), name


def test_device_resident_augmentation_resumes_exactly(monkeypatch, tmp_path):
    monkeypatch.setattr(engine, "_keep_data_on_device", lambda device: True)
    padded_and_flipped = Augmentation(crop_padding=1, flip=True)
    digits = dataclasses.replace(dataset_info("digits"), augmentation=padded_and_flipped)
    monkeypatch.setitem(data._DATASETS, "digits", digits)
    overrides = dict(epochs=2, train_size=160, keep_last=10)
    full = fit(small_config(tmp_path / "full", **overrides))
    first = fit(small_config(tmp_path / "cut", **overrides), StopAfterEpochs(1))
    resumed = fit(small_config(tmp_path / "cut", **overrides), resume_from=first.last_checkpoint)
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fit_keeps_small_dataset_on_device(tmp_path):
    result = fit(small_config(tmp_path, device="cuda", epochs=2))
    assert result.final_accuracy > 0.3
    assert next(result.model.parameters()).is_cuda
    state = load_checkpoint(result.last_checkpoint)
    assert "cuda" in state["rng"]
