"""The training engine: metrics, checkpoints, cooperative stop, exact resume, non-finite loss,
model selection on a validation split (never on the test set), starting weights (init_from)."""

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
    "val_loss",
    "val_accuracy",
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
        self.announced: list[tuple] = []
        self.removed: list[str] = []
        self.steps: list[tuple] = []
        self.stop_after_steps = stop_after_steps

    def on_epoch_end(self, metrics):
        self.epochs.append(metrics)

    def before_checkpoint(self, path, epoch):
        self.announced.append((path, epoch))

    def on_checkpoint(self, path, epoch, sha256, size_bytes, is_best):
        assert self.announced[-1] == (path, epoch), "written without before_checkpoint"
        self.checkpoints.append((path, epoch, sha256, size_bytes, is_best))

    def on_checkpoint_removed(self, path):
        # Told before the file goes, so a store forgets its record first (a crash in between
        # must not leave a record whose file is gone).
        assert Path(path).is_file(), f"{path} was deleted before on_checkpoint_removed"
        self.removed.append(path)

    def on_step(self, epoch, step, steps, loss):
        self.steps.append((epoch, step, steps, loss))

    def should_stop(self):
        return self.stop_after_steps is not None and len(self.steps) >= self.stop_after_steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 3-epoch jumpout run with a quarter of its 480 training samples held out for
    validation, shared by the metric, selection and checkpoint tests."""
    out = tmp_path_factory.mktemp("run")
    recorder = Recorder()
    config = small_config(out, epochs=3, keep_last=1, train_size=480, val_fraction=0.25)
    result = fit(config, recorder)
    return config, recorder, result, out


def test_fit_learns_above_chance(trained):
    _, _, result, _ = trained
    assert result.epochs_completed == 3
    assert not result.stopped
    assert result.final_accuracy > 0.5  # chance is 0.1
    assert not hasattr(result, "best_accuracy")  # no test-selected figure under any name


def test_a_checkpoint_interval_never_skips_the_validation_best_epoch(tmp_path):
    # Epochs far shorter than the interval: only the last epoch is due, yet keep_best must still
    # find the best epoch's file (a new best is always written).
    recorder = Recorder()
    config = small_config(tmp_path, epochs=4, keep_last=1, train_size=480, val_fraction=0.25)
    result = fit(config, recorder, checkpoint_every_s=3600)
    best = result.best_epoch
    val = [metrics["val_accuracy"] for metrics in result.history]
    new_bests = {e for e in range(1, 5) if val[e - 1] > max(val[: e - 1], default=-1.0)}
    written = {epoch for _, epoch, _, _, _ in recorder.checkpoints}
    assert 1 in new_bests and best in new_bests  # the first epoch is always a new best
    assert written == new_bests | {config.epochs}
    kept = sorted(path.name for path in tmp_path.glob("checkpoint-*.pt"))
    assert f"checkpoint-epoch{best:04d}.pt" in kept


def test_final_test_accuracy_is_the_last_epoch_and_best_is_chosen_on_validation(trained):
    _, _, result, _ = trained
    history = result.history
    assert result.final_accuracy == history[-1]["test_accuracy"]
    val = [metrics["val_accuracy"] for metrics in history]
    assert all(0.0 <= value <= 1.0 for value in val)
    assert all(metrics["val_loss"] > 0 for metrics in history)
    best_epoch = 1 + val.index(max(val))  # the first epoch on a tie
    assert result.best_epoch == best_epoch
    assert result.best_val_accuracy == max(val)
    assert result.test_accuracy_at_best == history[best_epoch - 1]["test_accuracy"]


def test_validation_split_is_seeded_stratified_disjoint_and_not_trained_on():
    config = small_config(train_size=480, val_fraction=0.25)
    loaded = engine._load_data(config, torch.device("cpu"))
    train_index, val_index = loaded.split
    labels = engine._dataset_labels(data.load_dataset("digits", ".", train_size=480)[0])
    assert set(train_index.tolist()).isdisjoint(val_index.tolist())
    assert sorted(train_index.tolist() + val_index.tolist()) == list(range(480))
    # The engine trains on the rest only, and evaluates the held-out part.
    assert loaded.train_len == len(train_index) and len(loaded.val_set) == len(val_index)
    # Stratified: each class gives a quarter of its samples (rounded).
    for value in labels.unique():
        in_class = int((labels == value).sum())
        held = int((labels[val_index] == value).sum())
        assert abs(held - 0.25 * in_class) <= 0.5
    # Fixed by the seed: the same split again, another one for another seed.
    again = engine._load_data(config, torch.device("cpu")).split[1]
    other = engine._load_data(small_config(train_size=480, val_fraction=0.25, seed=4),
                              torch.device("cpu")).split[1]  # fmt: skip
    assert torch.equal(again, val_index) and not torch.equal(other, val_index)


def test_a_split_that_leaves_nothing_on_one_side_is_refused():
    with pytest.raises(ConfigError, match="val_fraction"):
        fit(small_config(train_size=1, val_fraction=0.5))


def test_without_a_split_there_is_no_best_epoch_and_keep_best_keeps_nothing_extra(tmp_path):
    recorder = Recorder()
    result = fit(small_config(tmp_path, epochs=3, train_size=96, keep_last=1), recorder)
    assert (result.best_val_accuracy, result.best_epoch, result.test_accuracy_at_best) == (
        None,
        None,
        None,
    )
    assert all(m["val_loss"] is None and m["val_accuracy"] is None for m in result.history)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-epoch0003.pt"]
    assert not any(entry[4] for entry in recorder.checkpoints)  # nothing flagged best
    state = load_checkpoint(result.last_checkpoint)
    assert state["best_epoch"] is None and state["final_accuracy"] == result.final_accuracy


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
        assert set(layer) == {
            "name",
            "active_fraction",
            "rate",
            "capped_fraction",
            "mean_drift",
            "var_drift",
        }
        assert 0.0 < layer["active_fraction"] <= 1.0
        assert 0.0 < layer["rate"] <= 1.0


def test_no_layer_statistics_for_dropout():
    result = fit(small_config(epochs=1, method="dropout", train_size=96))
    assert result.history[0]["layers"] == []


def test_progress_reports_loss_every_few_steps(trained):
    _, recorder, _, _ = trained
    steps_per_epoch = (480 - 120) // 32  # a quarter held out for validation
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
        "final_accuracy",
        "best_val_accuracy",
        "best_epoch",
        "test_accuracy_at_best",
        "init",
        "environment",
    }
    assert "best_accuracy" not in state
    assert state["epoch"] == 3
    assert state["config"] == result.config.to_dict()
    assert state["metrics"] == result.history
    assert state["final_accuracy"] == result.final_accuracy
    assert (state["best_val_accuracy"], state["best_epoch"], state["test_accuracy_at_best"]) == (
        result.best_val_accuracy,
        result.best_epoch,
        result.test_accuracy_at_best,
    )
    assert state["environment"] == result.environment
    assert state["environment"]["seed"] == 3 and state["environment"]["device"] == "cpu"
    assert state["init"] is None


def test_keep_last_and_keep_best_pruning(trained):
    _, recorder, result, out = trained
    kept = {path.name for path in list_checkpoints(out)}
    best = f"checkpoint-epoch{result.best_epoch:04d}.pt"
    assert kept == {"checkpoint-epoch0003.pt", best}
    written = {Path(entry[0]).name for entry in recorder.checkpoints}
    assert {Path(path).name for path in recorder.removed} == written - kept
    flagged = [entry[1] for entry in recorder.checkpoints if entry[4]]
    assert flagged[-1] == result.best_epoch  # the validation-best epoch


def test_keep_last_without_keep_best_and_stale_temp_files_removed(tmp_path):
    stale = tmp_path / ".checkpoint-killed.tmp"
    stale.write_bytes(b"a save interrupted by a kill")
    recorder = Recorder()
    fit(small_config(tmp_path, epochs=3, train_size=64, keep_last=1, keep_best=False), recorder)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-epoch0003.pt"]
    assert len(recorder.removed) == 2
    assert not stale.exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_refused_checkpoint_is_never_written(tmp_path):
    # The worker refuses the write of a trainer whose job went to another attempt: the file
    # already there (the new attempt's) must stay as it is.
    class Refusing(Recorder):
        def before_checkpoint(self, path, epoch):
            super().before_checkpoint(path, epoch)
            if epoch == 2:
                raise RuntimeError("not this run's to write")

    theirs = tmp_path / "checkpoint-epoch0002.pt"
    theirs.write_bytes(b"the new attempt's checkpoint")
    recorder = Refusing()
    with pytest.raises(RuntimeError, match="not this run's"):
        fit(small_config(tmp_path, epochs=3, train_size=64, keep_last=5), recorder)
    assert theirs.read_bytes() == b"the new attempt's checkpoint"
    assert [entry[1] for entry in recorder.checkpoints] == [1]
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


# ---------------------------------------------------------------------------------------------
# init_from: starting weights


@pytest.fixture(scope="module")
def saved_weights(tmp_path_factory):
    """A data directory holding the state dict and the checkpoint of 1 epoch of digits/mlp."""
    data_dir = tmp_path_factory.mktemp("data")
    run = fit(small_config(data_dir / "run", epochs=1, train_size=96))
    (data_dir / "weights").mkdir()
    torch.save(run.model.state_dict(), data_dir / "weights" / "mlp.pt")
    (data_dir / "weights" / "checkpoint.pt").write_bytes(Path(run.last_checkpoint).read_bytes())
    return data_dir, {name: t.clone() for name, t in run.model.state_dict().items()}


def first_training_forward(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record (input, logits) of every training forward of the models `fit` builds."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_build = engine._build_model

    def build(config, info):
        model = real_build(config, info)

        def record(module, inputs, output):
            if module.training:
                calls.append((inputs[0].detach().clone(), output.detach().clone()))

        model.register_forward_hook(record)
        return model

    monkeypatch.setattr(engine, "_build_model", build)
    return calls


@pytest.mark.parametrize("file", ["weights/mlp.pt", "weights/checkpoint.pt"])
def test_init_from_starts_from_the_saved_weights(saved_weights, monkeypatch, file):
    data_dir, weights = saved_weights
    calls = first_training_forward(monkeypatch)
    # method none: the first forward is deterministic, so it can be compared exactly.
    config = small_config(epochs=1, train_size=64, method="none", data_dir=str(data_dir),
                          init_from=file)  # fmt: skip
    result = fit(config)
    reference = engine._build_model(config, dataset_info("digits"))
    reference.load_state_dict(weights)
    x, logits = calls[0]
    assert torch.equal(logits, reference(x))
    path = data_dir / file
    assert result.init_source == {
        "source": file,
        "kind": "file",
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    assert result.environment["init_from"] == result.init_source


def test_init_from_a_model_of_another_shape_is_refused_naming_the_keys(saved_weights):
    data_dir, _ = saved_weights
    # synthetic images are 3x32x32, digits 1x8x8: the mlp's first layer differs.
    config = resolve_config("synthetic", "mlp", epochs=1, device="cpu", data_dir=str(data_dir),
                            init_from="weights/mlp.pt")  # fmt: skip
    with pytest.raises(ConfigError, match="init_from") as caught:
        fit(config)
    first = next(iter(engine._build_model(config, dataset_info("synthetic")).state_dict()))
    assert f"shapes differ: {first}" in caught.value.message


def test_init_from_with_missing_or_extra_keys_is_refused_naming_them(saved_weights):
    data_dir, weights = saved_weights
    extra = {**weights, "head.weight": torch.zeros(2)}
    torch.save(extra, data_dir / "weights" / "extra.pt")
    partial = {name: t for name, t in list(weights.items())[1:]}
    torch.save(partial, data_dir / "weights" / "partial.pt")
    with pytest.raises(ConfigError, match="not in the model: head.weight"):
        fit(small_config(epochs=1, data_dir=str(data_dir), init_from="weights/extra.pt"))
    with pytest.raises(ConfigError, match=f"missing: {next(iter(weights))}"):
        fit(small_config(epochs=1, data_dir=str(data_dir), init_from="weights/partial.pt"))


def test_init_from_refuses_files_outside_the_data_dir_missing_files_and_job_sources(
    saved_weights, tmp_path
):
    data_dir, _ = saved_weights
    outside = tmp_path / "outside.pt"
    outside.write_bytes((data_dir / "weights" / "mlp.pt").read_bytes())
    link = data_dir / "weights" / "link.pt"
    link.symlink_to(outside)
    with pytest.raises(ConfigError, match="outside the data directory"):
        fit(small_config(epochs=1, data_dir=str(data_dir), init_from="weights/link.pt"))
    with pytest.raises(ConfigError, match="no such weights file"):
        fit(small_config(epochs=1, data_dir=str(data_dir), init_from="weights/none.pt"))
    with pytest.raises(ConfigError, match="training service"):
        fit(small_config(epochs=1, data_dir=str(data_dir), init_from="job:" + "0" * 32))
    (data_dir / "weights" / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="weights_only"):
        fit(small_config(epochs=1, data_dir=str(data_dir), init_from="weights/junk.pt"))


def test_a_resume_does_not_apply_init_from_again(saved_weights, tmp_path):
    data_dir, _ = saved_weights
    weights = data_dir / "weights" / "moved.pt"
    weights.write_bytes((data_dir / "weights" / "mlp.pt").read_bytes())
    overrides = dict(epochs=2, train_size=96, keep_last=5, data_dir=str(data_dir),
                     init_from="weights/moved.pt")  # fmt: skip
    full = fit(small_config(tmp_path / "full", **overrides))
    first = fit(small_config(tmp_path / "cut", **overrides), StopAfterEpochs(1))
    assert load_checkpoint(first.last_checkpoint)["init"] == first.init_source
    weights.unlink()  # the checkpoint holds the weights now
    resumed = fit(small_config(tmp_path / "cut", **overrides), resume_from=first.last_checkpoint)
    assert resumed.init_source == first.init_source == full.init_source
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_torchvisions_resnet18_state_dict_loads_into_the_imagenet_model(tmp_path):
    import torchvision

    from jumpout.models import Regularizer, create_model

    (tmp_path / "weights").mkdir()
    pretrained = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(pretrained, tmp_path / "weights" / "resnet18.pth")
    config = resolve_config("imagenet", "resnet18", device="cpu", data_dir=str(tmp_path),
                            init_from="weights/resnet18.pth")  # fmt: skip
    model = create_model("resnet18", 1000, 3, Regularizer.from_config(config), image_size=224)
    engine._load_initial_weights(model, engine.resolve_init_from(config))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, pretrained[name]), name
    # A head for another number of classes (an ImageNet subset) is refused, naming fc.
    subset = create_model("resnet18", 10, 3, Regularizer.from_config(config), image_size=224)
    with pytest.raises(ConfigError, match=r"shapes differ: fc\.weight \(1000, 512\)"):
        engine._load_initial_weights(subset, engine.resolve_init_from(config))
