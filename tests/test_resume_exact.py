"""Resume is exact or refused.

Exact: a run stopped in the middle of an epoch and resumed ends with bit-identical weights to an
uninterrupted one, with DataLoader worker processes or without, on the real CIFAR-10 loader
(torchvision's class reading tiny files in the real on-disk format, randomly cropped and flipped)
and on the device-resident path. Refused: a checkpoint trained with another value of a field that
changes the training is not continued; the fields that do not change it may differ.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from torchvision import datasets as tv_datasets

from jumpout import data, engine
from jumpout.data import Augmentation, dataset_info
from jumpout.engine import RESUME_NEUTRAL_FIELDS, Callback, fit, load_checkpoint
from jumpout.spec import ConfigError, resolve_config

TRAIN_PER_BATCH = 24  # five batch files: 120 training images
TEST_IMAGES = 30


def write_cifar_batch(path, images: np.ndarray, labels: list[int]) -> None:
    # The real format: a pickled dict, "data" rows of 1024 R, 1024 G, 1024 B bytes.
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    with open(path, "wb") as handle:
        pickle.dump({"data": rows, "labels": labels}, handle)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """A data directory with a tiny CIFAR-10 (random images, balanced labels); torchvision's
    md5 checks pointed at existence-only for the module's tests."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for number in range(1, 6):
        images = rng.integers(0, 256, (TRAIN_PER_BATCH, 32, 32, 3), dtype=np.uint8)
        labels = [(number + i) % 10 for i in range(TRAIN_PER_BATCH)]
        write_cifar_batch(folder / f"data_batch_{number}", images, labels)
    images = rng.integers(0, 256, (TEST_IMAGES, 32, 32, 3), dtype=np.uint8)
    write_cifar_batch(folder / "test_batch", images, [i % 10 for i in range(TEST_IMAGES)])
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, handle)
    cls = tv_datasets.CIFAR10
    with pytest.MonkeyPatch.context() as patch:
        # An md5 of None means an existence-only check.
        patch.setattr(cls, "train_list", [[f"data_batch_{i}", None] for i in range(1, 6)])
        patch.setattr(cls, "test_list", [["test_batch", None]])
        patch.setattr(cls, "meta", {**cls.meta, "md5": None})
        yield root


def cifar_config(cifar_dir, out_dir, **overrides):
    values = dict(
        epochs=2,
        batch_size=16,
        lr=0.02,
        device="cpu",
        method="jumpout",
        seed=5,
        data_dir=str(cifar_dir),
        out_dir=str(out_dir),
        keep_last=10,
        val_fraction=0.2,
    )
    values.update(overrides)
    return resolve_config("cifar10", "mlp", **values)


class StopAfterSteps(Callback):
    """Stops after ``steps`` steps (never with None); records the steps per epoch."""

    def __init__(self, steps: int | None = None) -> None:
        self.steps, self.seen, self.per_epoch = steps, 0, None

    def on_step(self, epoch, step, steps, loss):
        self.seen, self.per_epoch = self.seen + 1, steps

    def should_stop(self):
        return self.steps is not None and self.seen >= self.steps


def assert_same_weights(expected, actual):
    for name, tensor in expected.model.state_dict().items():
        assert torch.equal(tensor, actual.model.state_dict()[name]), name


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_with_loader_workers_is_bit_identical(
    cifar_dir, tmp_path, monkeypatch, num_workers
):
    monkeypatch.setattr(engine, "STOP_POLL_EVERY", 1)
    counter = StopAfterSteps()
    full = fit(cifar_config(cifar_dir, tmp_path / "full", num_workers=num_workers), counter)
    assert counter.per_epoch >= 5  # 120 images less a fifth held out, batches of 16

    cut = fit(
        cifar_config(cifar_dir, tmp_path / "cut", num_workers=num_workers),
        StopAfterSteps(counter.per_epoch + 3),
    )
    assert cut.stopped and cut.epochs_completed == 1
    assert cut.last_checkpoint.endswith("checkpoint-epoch0001-step000003.pt")
    resumed = fit(
        cifar_config(cifar_dir, tmp_path / "cut", num_workers=num_workers),
        resume_from=cut.last_checkpoint,
    )
    assert resumed.epochs_completed == 2 and not resumed.stopped
    assert_same_weights(full, resumed)
    assert [m["val_accuracy"] for m in resumed.history] == [m["val_accuracy"] for m in full.history]


def test_workers_change_nothing_and_the_loader_path_is_really_augmented(cifar_dir, tmp_path):
    without = fit(cifar_config(cifar_dir, tmp_path / "a", epochs=1, num_workers=0))
    with_workers = fit(cifar_config(cifar_dir, tmp_path / "b", epochs=1, num_workers=2))
    assert_same_weights(without, with_workers)
    plain = fit(cifar_config(cifar_dir, tmp_path / "c", epochs=1, augment=False))
    # Crops and flips of random images change what the model sees, hence its weights.
    assert not torch.equal(
        next(iter(plain.model.parameters())), next(iter(without.model.parameters()))
    )


def test_data_too_large_for_the_device_is_still_augmented(cifar_dir, tmp_path, monkeypatch):
    # Loaded plain for the device path, then found too large to keep there: it used to train on
    # the loader path without any augmentation. It must train as the loader path always does.
    loader_path = fit(cifar_config(cifar_dir, tmp_path / "a", epochs=1))
    monkeypatch.setattr(engine, "_keep_data_on_device", lambda device: True)
    monkeypatch.setattr(engine, "_DEVICE_RESIDENT_MAX_BYTES", 1)
    too_large = fit(cifar_config(cifar_dir, tmp_path / "b", epochs=1))
    assert_same_weights(loader_path, too_large)


def test_a_samples_augmentation_is_a_function_of_seed_epoch_and_index(cifar_dir, tmp_path):
    config = cifar_config(cifar_dir, tmp_path, val_fraction=0.0)
    loaded = engine._load_data(config, torch.device("cpu"))
    assert loaded.random_augmentation
    epoch1 = engine._SeededAugmentation(loaded.train_set, config.seed, 1)
    epoch2 = engine._SeededAugmentation(loaded.train_set, config.seed, 2)
    outer = torch.get_rng_state()
    first = torch.stack([epoch1[i][0] for i in range(40)])
    assert torch.equal(torch.get_rng_state(), outer)  # dropout's stream is left alone
    again = torch.stack([epoch1[i][0] for i in reversed(range(40))]).flip(0)
    assert torch.equal(first, again)  # the same whatever was drawn before
    other_epoch = torch.stack([epoch2[i][0] for i in range(40)])
    differs = [not torch.equal(a, b) for a, b in zip(first, other_epoch, strict=True)]
    # 81 crops x 2 flips: two epochs agree on a sample with probability 1/162.
    assert sum(differs) >= 36

    def batches(num_workers):
        loader = torch.utils.data.DataLoader(
            epoch1, batch_size=8, sampler=list(range(40)), num_workers=num_workers
        )
        return torch.cat([x for x, _ in loader])

    assert torch.equal(batches(0), first) and torch.equal(batches(2), first)


def test_device_resident_mid_epoch_resume_with_augmentation_is_exact(monkeypatch, tmp_path):
    """The GPU path (data kept as tensors, augmented in batches) exercised on the CPU."""
    monkeypatch.setattr(engine, "_keep_data_on_device", lambda device: True)
    monkeypatch.setattr(engine, "STOP_POLL_EVERY", 1)
    padded_and_flipped = Augmentation(crop_padding=1, flip=True)
    digits = dataclasses.replace(dataset_info("digits"), augmentation=padded_and_flipped)
    monkeypatch.setitem(data._DATASETS, "digits", digits)

    def config(out_dir, **overrides):
        values = dict(epochs=2, batch_size=32, train_size=160, device="cpu", seed=2,
                      out_dir=str(out_dir), keep_last=10, val_fraction=0.2)  # fmt: skip
        return resolve_config("digits", "mlp", **{**values, **overrides})

    counter = StopAfterSteps()
    full = fit(config(tmp_path / "full"), counter)
    assert counter.per_epoch >= 3  # 160 samples less a fifth held out, batches of 32
    cut = fit(config(tmp_path / "cut"), StopAfterSteps(counter.per_epoch + 2))
    assert cut.last_checkpoint.endswith("checkpoint-epoch0001-step000002.pt")
    resumed = fit(config(tmp_path / "cut"), resume_from=cut.last_checkpoint)
    assert_same_weights(full, resumed)
    plain = fit(config(tmp_path / "plain", augment=False))
    assert not torch.equal(
        next(iter(plain.model.parameters())), next(iter(full.model.parameters()))
    )


# ---------------------------------------------------------------------------------------------
# Refused


def digits_config(out_dir, **overrides):
    values = dict(epochs=3, batch_size=32, train_size=96, device="cpu", seed=1,
                  out_dir=str(out_dir), keep_last=10)  # fmt: skip
    return resolve_config("digits", "mlp", **{**values, **overrides})


class StopAfterEpochs(Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs, self.finished = epochs, 0

    def on_epoch_end(self, metrics):
        self.finished += 1

    def should_stop(self):
        return self.finished >= self.epochs


@pytest.fixture
def stopped_run(tmp_path):
    run = fit(digits_config(tmp_path / "run"), StopAfterEpochs(1))
    assert run.stopped
    return run.last_checkpoint


def test_a_resume_that_changes_the_trajectory_is_refused_naming_every_field(stopped_run, tmp_path):
    changed = digits_config(tmp_path / "run", epochs=5, lr=0.01, sigma=0.2)
    with pytest.raises(ConfigError) as caught:
        fit(changed, resume_from=stopped_run)
    error = caught.value
    assert error.field == "sigma"  # the first in declaration order
    for shown in ("sigma=0.1 (asked: 0.2)", "epochs=3 (asked: 5)", "lr=0.05 (asked: 0.01)"):
        assert shown in error.message
    assert "checkpoint-epoch0001.pt" in error.message
    assert str(tmp_path) not in error.message  # a job's error is shown to its client


@pytest.mark.parametrize(
    "field, value",
    [("seed", 2), ("val_fraction", 0.2), ("train_size", 64), ("test_size", 50),
     ("augment", False), ("init_from", "weights.pt"), ("ii_base_rate", "mean_of_i")],
)  # fmt: skip
def test_each_trajectory_field_is_compared(stopped_run, tmp_path, field, value):
    with pytest.raises(ConfigError, match=f"^{field}: cannot resume"):
        fit(digits_config(tmp_path / "run", **{field: value}), resume_from=stopped_run)


def test_the_neutral_fields_may_change(stopped_run, tmp_path):
    assert set(RESUME_NEUTRAL_FIELDS) == {
        "data_dir", "out_dir", "device", "num_workers", "keep_last", "keep_best", "compile",
    }  # fmt: skip
    full = fit(digits_config(tmp_path / "full"))
    # (device too, which this test leaves alone: exactness is promised on one device type.)
    elsewhere = digits_config(
        tmp_path / "elsewhere", data_dir=str(tmp_path), num_workers=1, keep_last=2,
        keep_best=False,
    )  # fmt: skip
    resumed = fit(elsewhere, resume_from=stopped_run)
    assert resumed.epochs_completed == 3
    assert_same_weights(full, resumed)
    assert load_checkpoint(resumed.last_checkpoint)["config"]["num_workers"] == 1


def test_seeding_a_samples_augmentation_leaves_the_gpu_generators_alone(monkeypatch):
    # With num_workers=0 the samples load in the main process, where dropout draws its GPU masks:
    # reseeding the CUDA generators per sample would tie every mask to a sample's seed.
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    images = torch.utils.data.TensorDataset(torch.zeros(4, 3))
    before = torch.get_rng_state()
    sample = engine._SeededAugmentation(images, seed=1, epoch=2)[3]
    assert torch.equal(sample[0], torch.zeros(3))
    assert reseeded == []
    assert torch.equal(torch.get_rng_state(), before)  # the CPU stream is put back too
