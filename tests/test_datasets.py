"""Dataset loading through the real torchvision classes, on tiny fixtures in the exact on-disk
formats (see docs/recipes.md, "On-disk formats"). torchvision md5-checks most files on every
construction, so each test points the class's checksum attributes at the fixture's md5s."""

from __future__ import annotations

import hashlib
import pickle
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from jumpout import data
from jumpout.data import (
    DatasetInfo,
    DatasetNotFoundError,
    dataset_info,
    list_datasets,
    load_dataset,
)


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_normalised(image: torch.Tensor, info: DatasetInfo, raw_value: float, channel: int = 0):
    """A pixel whose raw 8-bit value was ``raw_value`` must come out as (v/255 - mean) / std."""
    expected = (raw_value / 255.0 - info.mean[channel]) / info.std[channel]
    assert image[channel].flatten()[0].item() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# CIFAR10 / CIFAR100


def write_cifar_batch(path, images: np.ndarray, labels: list[int], label_key: str) -> None:
    # (n, 32, 32, 3) -> rows of 1024 R, 1024 G, 1024 B values.
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    with open(path, "wb") as f:
        pickle.dump({"data": rows, label_key: labels}, f)


def constant_images(values: list[int], size: int, channels: int = 3) -> np.ndarray:
    """One image per value, every pixel of channel c equal to (value + c) % 256."""
    images = np.zeros((len(values), size, size, channels), dtype=np.uint8)
    for i, value in enumerate(values):
        for c in range(channels):
            images[i, :, :, c] = (value + c) % 256
    return images


def test_cifar10_loads_through_torchvision(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_lists = []
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", constant_images([10 * i], 32), [i], "labels")
        train_lists.append([f"data_batch_{i}", md5(folder / f"data_batch_{i}")])
    write_cifar_batch(folder / "test_batch", constant_images([7, 8], 32), [3, 9], "labels")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    cls = tv_datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", train_lists)
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(
        cls, "meta", {**cls.meta, "filename": "batches.meta", "md5": md5(folder / "batches.meta")}
    )

    train, test, info = load_dataset("cifar10", tmp_path, augment=False)

    assert (len(train), len(test)) == (5, 2)
    assert [train[i][1] for i in range(5)] == [1, 2, 3, 4, 5]
    image, label = test[1]
    assert label == 9 and image.shape == (3, 32, 32) and image.dtype == torch.float32
    for channel in range(3):
        assert_normalised(image, info, 8 + channel, channel)


def test_cifar10_augmentation_keeps_the_shape(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_cifar_batch(folder / name, constant_images([1], 32), [0], "labels")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["a"]}, f)
    cls = tv_datasets.CIFAR10
    # An md5 of None means an existence-only check.
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", None] for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", None]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})

    train, _, _ = load_dataset("cifar10", tmp_path, augment=True)

    image, _ = train[0]
    assert image.shape == (3, 32, 32)
    # Random crop with zero padding: some padded (raw 0) pixels may appear, nothing else new.
    assert image.abs().max() < 10


def test_cifar100_uses_fine_labels(tmp_path, monkeypatch):
    folder = tmp_path / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    write_cifar_batch(
        folder / "train", constant_images([0, 255, 128], 32), [0, 99, 42], "fine_labels"
    )
    write_cifar_batch(folder / "test", constant_images([5], 32), [17], "fine_labels")
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    cls = tv_datasets.CIFAR100
    monkeypatch.setattr(cls, "train_list", [["train", md5(folder / "train")]])
    monkeypatch.setattr(cls, "test_list", [["test", md5(folder / "test")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / "meta")})

    train, test, info = load_dataset("cifar100", tmp_path, augment=False)

    assert info.num_classes == 100
    assert [label for _, label in train] == [0, 99, 42]
    assert test[0][1] == 17
    assert_normalised(train[1][0], info, 255)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


def write_idx_images(path, images: np.ndarray) -> None:
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", 2051, n, rows, cols) + images.tobytes())


def write_idx_labels(path, labels: list[int]) -> None:
    path.write_bytes(struct.pack(">II", 2049, len(labels)) + bytes(labels))


def test_fashion_mnist_reads_raw_idx_files(tmp_path):
    raw = tmp_path / "fashion_mnist" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx_images(raw / "train-images-idx3-ubyte", np.full((3, 28, 28), 200, dtype=np.uint8))
    write_idx_labels(raw / "train-labels-idx1-ubyte", [9, 0, 4])
    write_idx_images(raw / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), dtype=np.uint8))
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", [1, 2])

    train, test, info = load_dataset("fashion_mnist", tmp_path, augment=False)

    assert (len(train), len(test)) == (3, 2)
    assert [label for _, label in train] == [9, 0, 4]
    image, _ = train[0]
    assert image.shape == (1, 28, 28)
    assert_normalised(image, info, 200)
    assert_normalised(test[0][0], info, 0)


# ---------------------------------------------------------------------------------------------
# SVHN


def test_svhn_reads_mat_files_and_maps_label_10_to_0(tmp_path, monkeypatch):
    from scipy.io import savemat

    root = tmp_path / "svhn"
    root.mkdir()
    x = np.zeros((32, 32, 3, 3), dtype=np.uint8)
    x[:, :, 0, :] = 100
    savemat(root / "train_32x32.mat", {"X": x, "y": np.array([[10], [1], [5]], dtype=np.uint8)})
    # Two test images: torchvision squeezes y, and a single label would become 0-dimensional.
    savemat(root / "test_32x32.mat", {"X": x[..., :2], "y": np.array([[10], [2]], dtype=np.uint8)})
    cls = tv_datasets.SVHN
    split_list = {
        split: [cls.split_list[split][0], f"{split}_32x32.mat", md5(root / f"{split}_32x32.mat")]
        for split in ("train", "test")
    }
    monkeypatch.setattr(cls, "split_list", {**cls.split_list, **split_list})

    train, test, info = load_dataset("svhn", tmp_path, augment=True)

    assert [label for _, label in train] == [0, 1, 5]
    assert [label for _, label in test] == [0, 2]
    image, _ = train[0]
    assert image.shape == (3, 32, 32)
    assert_normalised(image, info, 100, channel=0)
    assert_normalised(image, info, 0, channel=1)


def write_svhn(root, splits: dict[str, tuple[np.ndarray, list[int]]], monkeypatch) -> None:
    """``{split: (X (32, 32, 3, N) uint8, labels 1..10)}`` as ``{split}_32x32.mat`` files, and
    torchvision's md5 table pointed at them."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    cls = tv_datasets.SVHN
    table = dict(cls.split_list)
    for split, (x, labels) in splits.items():
        path = root / f"{split}_32x32.mat"
        savemat(path, {"X": x, "y": np.array([[label] for label in labels], dtype=np.uint8)})
        table[split] = [cls.split_list[split][0], path.name, md5(path)]
    monkeypatch.setattr(cls, "split_list", table)


def svhn_images(values: list[int]) -> np.ndarray:
    """(32, 32, 3, N): image i has every red pixel equal to values[i], the rest 0."""
    x = np.zeros((32, 32, 3, len(values)), dtype=np.uint8)
    for i, value in enumerate(values):
        x[:, :, 0, i] = value
    return x


def write_svhn_with_extra(root, monkeypatch) -> None:
    """train: red 10, 20 (labels 1, 2); test: 30, 40 (3, 4); extra: 50, 60, 70 (10, 5, 6)."""
    write_svhn(
        root,
        {
            "train": (svhn_images([10, 20]), [1, 2]),
            "test": (svhn_images([30, 40]), [3, 4]),
            "extra": (svhn_images([50, 60, 70]), [10, 5, 6]),
        },
        monkeypatch,
    )


def test_svhn_extra_is_concatenated_after_train(tmp_path, monkeypatch):
    root = tmp_path / "svhn"
    write_svhn_with_extra(root, monkeypatch)

    train, test, info = load_dataset("svhn", tmp_path, augment=False, extra=True)

    assert len(train) == 5 and info.train_size == 5
    assert [label for _, label in train] == [1, 2, 0, 5, 6]  # extra's 10 is digit 0 too
    assert_normalised(train[2][0], info, 50, channel=0)
    assert "svhn/extra_32x32.mat" in info.files
    assert [label for _, label in test] == [3, 4]
    # Without extra (the library's default) only train is read.
    train_only, _, plain_info = load_dataset("svhn", tmp_path, augment=False)
    assert len(train_only) == 2 and plain_info.train_size == 73_257


def test_svhn_extra_missing_names_the_file(tmp_path, monkeypatch):
    root = tmp_path / "svhn"
    write_svhn(
        root,
        {"train": (svhn_images([10, 20]), [1, 2]), "test": (svhn_images([30, 40]), [3, 4])},
        monkeypatch,
    )
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("svhn", tmp_path, extra=True)
    message = str(caught.value)
    assert "extra_32x32.mat" in message
    assert str(root) in message
    assert "svhn_extra=false" in message


def test_svhn_extra_is_refused_for_other_datasets():
    from jumpout.spec import ConfigError, resolve_config

    assert resolve_config("svhn", "wrn_16_8").svhn_extra is True  # the paper's split
    assert resolve_config("cifar10", "wrn_28_10").svhn_extra is False
    assert resolve_config("svhn", "wrn_16_8", svhn_extra=False).svhn_extra is False
    with pytest.raises(ConfigError) as caught:
        resolve_config("cifar10", "wrn_28_10", svhn_extra=True)
    assert caught.value.field == "svhn_extra"
    assert "svhn" in caught.value.message


def test_engine_loads_extra_when_the_spec_says_so(tmp_path, monkeypatch):
    from jumpout import engine
    from jumpout.spec import resolve_config

    root = tmp_path / "svhn"
    write_svhn_with_extra(root, monkeypatch)
    for extra, expected in ((True, 5), (False, 2)):
        config = resolve_config(
            "svhn", "cnn_small", data_dir=str(tmp_path), device="cpu", svhn_extra=extra
        )
        loaded = engine._load_data(config, torch.device("cpu"))
        assert loaded.train_len == expected


def test_measure_normalisation_gives_the_raw_pixel_statistics(tmp_path, monkeypatch):
    root = tmp_path / "svhn"
    write_svhn(
        root,
        {"train": (svhn_images([0, 255]), [1, 2]), "test": (svhn_images([30, 40]), [3, 4])},
        monkeypatch,
    )
    mean, std = data.measure_normalisation("svhn", tmp_path)
    # Red: half the pixels 0, half 1 -> mean 0.5, population std 0.5; the others all 0.
    assert mean == pytest.approx((0.5, 0.0, 0.0), abs=1e-6)
    assert std == pytest.approx((0.5, 0.0, 0.0), abs=1e-6)


def test_without_augmentation_shares_the_data_and_drops_the_random_steps(tmp_path, monkeypatch):
    info = dataset_info("cifar10")
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_cifar_batch(folder / name, images, [0, 1, 2, 3], "labels")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    cls = tv_datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", None] for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", None]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})

    train, _, info = load_dataset("cifar10", tmp_path, augment=True, train_size=3)
    plain = data.without_augmentation(train, info)
    assert len(plain) == len(train) == 3
    assert plain.dataset.data is train.dataset.data  # shared, not copied
    torch.manual_seed(0)
    first = plain[1][0]
    torch.manual_seed(1)
    assert torch.equal(first, plain[1][0])  # no random step left
    # The original keeps its augmentation, and the view equals the un-augmented load.
    assert any(isinstance(t, T.RandomCrop) for t in train.dataset.transform.transforms)
    reference, _, _ = load_dataset("cifar10", tmp_path, augment=False, train_size=3)
    assert torch.equal(first, reference[1][0])
    tensors = TensorDataset(torch.zeros(2, 3))
    assert data.without_augmentation(tensors, info) is tensors


# ---------------------------------------------------------------------------------------------
# STL10


def test_stl10_reads_binaries(tmp_path, monkeypatch):
    folder = tmp_path / "stl10" / "stl10_binary"
    folder.mkdir(parents=True)
    # (N, C, W, H) column-major per channel; a constant per-channel image sidesteps the order.
    train_x = np.zeros((2, 3, 96, 96), dtype=np.uint8)
    train_x[:, 2] = 50
    (folder / "train_X.bin").write_bytes(train_x.tobytes())
    (folder / "train_y.bin").write_bytes(bytes([1, 10]))
    (folder / "test_X.bin").write_bytes(np.zeros((1, 3, 96, 96), dtype=np.uint8).tobytes())
    (folder / "test_y.bin").write_bytes(bytes([3]))
    (folder / "unlabeled_X.bin").write_bytes(b"")
    cls = tv_datasets.STL10
    monkeypatch.setattr(
        cls,
        "train_list",
        [[name, md5(folder / name)] for name in ("train_X.bin", "train_y.bin", "unlabeled_X.bin")],
    )
    monkeypatch.setattr(
        cls, "test_list", [[name, md5(folder / name)] for name in ("test_X.bin", "test_y.bin")]
    )

    train, test, info = load_dataset("stl10", tmp_path, augment=False)

    assert [label for _, label in train] == [0, 9]
    assert test[0][1] == 2
    image, _ = train[0]
    assert image.shape == (3, 96, 96)
    assert_normalised(image, info, 50, channel=2)


# ---------------------------------------------------------------------------------------------
# ImageNet (ImageFolder layout)


def test_imagenet_reads_image_folders(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for wnid, colour in (("n01440764", (255, 0, 0)), ("n01443537", (0, 0, 255))):
            folder = tmp_path / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            Image.new("RGB", (40, 30), colour).save(folder / "a.png")

    train, test, info = load_dataset("imagenet", tmp_path, augment=True)

    assert info.num_classes == 2 and (info.train_size, info.test_size) == (2, 2)
    assert [label for _, label in test] == [0, 1]
    assert train[0][0].shape == (3, 224, 224)
    image, _ = test[0]
    assert image.shape == (3, 224, 224)
    assert_normalised(image, info, 255, channel=0)


# ---------------------------------------------------------------------------------------------
# Missing files


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "fashion_mnist", "svhn", "stl10"])
def test_missing_dataset_names_directory_files_and_remedy(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset(name, tmp_path / "nowhere")
    message = str(caught.value)
    assert str(tmp_path / "nowhere" / name) in message
    assert dataset_info(name).files[0] in message
    assert "download=True" in message
    assert isinstance(caught.value, FileNotFoundError)


def test_missing_imagenet_says_it_cannot_be_downloaded(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="image-net.org") as caught:
        load_dataset("imagenet", tmp_path)
    assert str(tmp_path / "imagenet" / "train") in str(caught.value)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="cifar10.*digits"):
        dataset_info("mnist-ish")
    with pytest.raises(ValueError, match="known datasets"):
        load_dataset("mnist-ish", "/tmp")


# ---------------------------------------------------------------------------------------------
# In-memory datasets


def test_digits_has_1797_images_in_10_classes_and_a_fixed_split():
    train, test, info = load_dataset("digits", "/unused")

    assert isinstance(train, TensorDataset)
    assert len(train) + len(test) == 1797 and (len(train), len(test)) == (1437, 360)
    assert info.num_classes == 10 and info.in_channels == 1 and info.image_size == 8
    images, labels = train.tensors
    assert images.shape == (1437, 1, 8, 8) and images.dtype == torch.float32
    assert set(labels.tolist()) == set(range(10)) == set(test.tensors[1].tolist())
    # Normalised with the train split's own statistics.
    assert abs(images.mean().item()) < 1e-3 and images.std().item() == pytest.approx(1, abs=1e-2)
    again, _, _ = load_dataset("digits", "/unused")
    assert torch.equal(again.tensors[0], images)


def test_synthetic_is_deterministic_with_the_requested_shape():
    kwargs = dict(num_classes=3, image_size=6, in_channels=1, size=12)
    train, test, info = load_dataset("synthetic", "/unused", **kwargs)
    again, _, _ = load_dataset("synthetic", "/unused", **kwargs)
    other, _, _ = load_dataset("synthetic", "/unused", seed=1, **kwargs)

    assert train.tensors[0].shape == (12, 1, 6, 6) and len(test) == 3
    assert (info.num_classes, info.in_channels, info.image_size) == (3, 1, 6)
    assert len(info.mean) == 1
    assert set(train.tensors[1].tolist()) == {0, 1, 2}
    assert torch.equal(train.tensors[0], again.tensors[0])
    assert torch.equal(train.tensors[1], again.tensors[1])
    assert not torch.equal(train.tensors[0], other.tensors[0])


def test_synthetic_classes_are_separable_by_their_mean_image():
    train, test, _ = load_dataset("synthetic", "/unused", num_classes=4, image_size=4, size=64)
    images, labels = train.tensors
    centroids = torch.stack([images[labels == c].mean(0) for c in range(4)]).flatten(1)
    test_images, test_labels = test.tensors
    predicted = torch.cdist(test_images.flatten(1), centroids).argmin(1)
    assert (predicted == test_labels).float().mean() > 0.9


def test_synthetic_rejects_unknown_keywords():
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("synthetic", "/unused", imagesize=8)


def test_size_caps_take_a_fixed_subset():
    train, test, _ = load_dataset("digits", "/unused", train_size=100, test_size=20)
    again, _, _ = load_dataset("digits", "/unused", train_size=100, test_size=20)
    assert (len(train), len(test)) == (100, 20)
    assert torch.equal(train.tensors[0], again.tensors[0])
    assert len(set(train.tensors[1].tolist())) == 10
    with pytest.raises(ValueError, match="train_size"):
        load_dataset("digits", "/unused", train_size=0)


def test_list_datasets_matches_the_registry():
    names = list_datasets()
    assert names == sorted(names)
    assert {"cifar10", "cifar100", "fashion_mnist", "svhn", "stl10", "imagenet"} <= set(names)
    assert {"digits", "synthetic"} <= set(names)
    for name in names:
        info = dataset_info(name)
        assert len(info.mean) == len(info.std) == info.in_channels


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "fashion_mnist", "svhn", "stl10"])
def test_cpu_augmentation_follows_the_declared_policy(name):
    """One declaration per dataset: the torchvision pipeline applies exactly
    ``info.augmentation`` (the engine's GPU path reads the same fields)."""
    info = dataset_info(name)
    policy = info.augmentation
    train, test = data._transforms(info, augment=True)
    crops = [step for step in train.transforms if isinstance(step, T.RandomCrop)]
    flips = [step for step in train.transforms if isinstance(step, T.RandomHorizontalFlip)]
    assert [crop.padding for crop in crops] == (
        [policy.crop_padding] if policy.crop_padding else []
    )
    assert len(flips) == int(policy.flip)
    assert policy.batchable
    if not (policy.crop_padding or policy.flip):
        assert train is test
    plain, plain_test = data._transforms(info, augment=False)
    assert plain is plain_test
    assert not any(
        isinstance(step, T.RandomCrop | T.RandomHorizontalFlip) for step in plain.transforms
    )
