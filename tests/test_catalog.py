"""The torch-free dataset catalogue (`jumpout.catalog`) against the loaders (`jumpout.data`): the
same names, shapes and sizes; every file the catalogue lists is one the loader cannot do without
(removing any one of them makes the real torchvision loader fail), and with all of them the
catalogue says available and the loader loads. The catalogue imports no torch (the API uses it).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_datasets import constant_images, write_cifar_batch, write_idx_images, write_idx_labels
from torchvision import datasets as tv_datasets

from jumpout import catalog
from jumpout.data import DatasetNotFoundError, dataset_info, list_datasets, load_dataset
from jumpout.spec import DATASETS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_answers():
    catalog.clear_cache()
    yield
    catalog.clear_cache()


def test_the_catalogue_names_every_dataset_and_agrees_with_the_loaders():
    assert sorted(catalog.CATALOG) == sorted(DATASETS) == list_datasets()
    for name, item in catalog.CATALOG.items():
        info = dataset_info(name)
        assert (info.num_classes, info.in_channels, info.image_size) == (
            item.num_classes,
            item.in_channels,
            item.image_size,
        )
        assert (info.train_size, info.test_size) == (item.train_size, item.test_size)
        assert (info.files, info.subdir, info.can_download) == (
            item.files,
            item.subdir,
            item.can_download,
        )
        assert all(path.startswith(item.subdir + "/") for path in item.files + item.extra_files)


def test_the_catalogue_imports_no_torch():
    code = "import sys, jumpout.catalog; print(sorted(m for m in sys.modules if 'torch' in m))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def write_cifar10(data_dir: Path, monkeypatch) -> None:
    folder = data_dir / "cifar10" / "cifar-10-batches-py"
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


def write_fashion_mnist(data_dir: Path, monkeypatch) -> None:
    raw = data_dir / "fashion_mnist" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        write_idx_images(raw / f"{split}-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
        write_idx_labels(raw / f"{split}-labels-idx1-ubyte", [0, 1])


@pytest.mark.parametrize(
    ("name", "write"), [("cifar10", write_cifar10), ("fashion_mnist", write_fashion_mnist)]
)
def test_each_listed_file_is_one_the_loader_needs(tmp_path, monkeypatch, name, write):
    for missing in catalog.entry(name).files:
        data_dir = tmp_path / missing.replace("/", "_")
        write(data_dir, monkeypatch)
        assert catalog.availability(name, data_dir) == (True, None)
        load_dataset(name, data_dir, augment=False)
        (data_dir / missing).unlink()
        catalog.clear_cache()  # "available" is remembered for a few seconds

        available, reason = catalog.availability(name, data_dir)
        assert not available and f"missing {missing};" in reason
        with pytest.raises(DatasetNotFoundError):
            load_dataset(name, data_dir, augment=False)


def test_the_reason_names_the_place_as_told_and_the_remedy(tmp_path):
    available, reason = catalog.availability(
        "cifar100", tmp_path, where="THE PLACE", fetch_hint="THE COMMAND"
    )
    assert not available
    assert "not under THE PLACE: missing cifar100/cifar-100-python/{train, test, meta}" in reason
    assert "THE COMMAND" in reason and str(tmp_path) not in reason
    assert "image-net.org" in catalog.availability("imagenet", tmp_path)[1]
    assert catalog.availability("digits", tmp_path / "nowhere") == (True, None)


def test_svhn_pool_counts_extra_only_when_asked():
    assert catalog.train_pool_size("svhn") == 73_257
    assert catalog.train_pool_size("svhn", extra=True) == 604_388
    assert catalog.train_pool_size("digits", extra=False) == 1_437
    assert catalog.train_pool_size("imagenet") is None
