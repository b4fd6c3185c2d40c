"""Dataset registry: the paper's datasets, their statistics, and where they live on disk.

:func:`load_dataset` returns ``(train_set, test_set, info)`` ready for a ``DataLoader``:
images are normalised float tensors ``(C, H, W)``, labels are ints in ``[0, num_classes)``.
The real datasets are read with torchvision's own classes and never downloaded unless the
caller asks (``download=True``, the CLI's ``--download``); a missing dataset raises
:class:`DatasetNotFoundError` naming the directory, the files expected and how to get them.

The layout under ``data_dir`` (each dataset gets its own torchvision ``root``), the files each
loader reads, the classes, shapes and split sizes are declared once, without torch, in
`jumpout.catalog` (the service checks a job's files against it at submission); `DatasetInfo`
takes them from there.

ImageNet is read with ``torchvision.datasets.ImageFolder`` rather than the ``ImageNet``
class: that class also wants the devkit's ``meta.bin`` only to attach human-readable names,
and both sort the WordNet ids the same way, so the class indices agree. It also lets any
ImageNet subset laid out the same way (e.g. Imagenette) be used; ``info.num_classes`` is then
the number of class folders found.

Two datasets need no files: ``digits`` (scikit-learn's 1797 8x8 handwritten digits, the real
data available offline everywhere) and ``synthetic`` (seeded, class-dependent random images
for smoke tests). Both are returned as in-memory ``TensorDataset``\\ s without augmentation.

Each dataset's random training augmentation (``docs/recipes.md``) is declared once, as its
``DatasetInfo.augmentation``: the torchvision pipeline here and the engine's batched GPU
version (`jumpout.engine.augment_on_device`) both read it from there. CIFAR: random crop 32
(4 px zero padding) and horizontal flip; Fashion-MNIST crop 28 (4 px padding) and flip; STL10
crop 96 (12 px padding, the same eighth of the side as CIFAR's 4 of 32) and flip; SVHN none
(its digits are not mirror-symmetric and the WRN paper trains SVHN without augmentation);
ImageNet RandomResizedCrop(224) and flip, evaluated on Resize(256) + CenterCrop(224).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.datasets.vision import StandardTransform

from jumpout import catalog

__all__ = [
    "Augmentation",
    "DatasetInfo",
    "DatasetNotFoundError",
    "dataset_info",
    "list_datasets",
    "load_dataset",
    "measure_normalisation",
    "without_augmentation",
]


@dataclass(frozen=True)
class Augmentation:
    """The random augmentation a dataset's training images get (test images get none).

    Attributes:
        crop_padding: pixels of zero padding added on every side before a random crop back to
            the image's own size; 0 for no crop.
        flip: mirror left-right with probability 1/2.
        resized_crop: side of a ``RandomResizedCrop`` taken instead of the padded crop (ImageNet,
            whose images differ in size); 0 for none.
    """

    crop_padding: int = 0
    flip: bool = False
    resized_crop: int = 0

    @property
    def batchable(self) -> bool:
        """Whether it can be applied to a batch of equal-sized tensors on the device
        (`jumpout.engine.augment_on_device`): a resized crop needs each image's own size."""
        return not self.resized_crop


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    Attributes:
        name: registry name (``load_dataset``'s first argument).
        num_classes, in_channels, image_size: what the model must accept (square images).
        mean, std: per-channel normalisation statistics.
        train_size, test_size: number of samples in the full splits, ``None`` if unknown.
        subdir: directory under ``data_dir`` passed to torchvision as ``root``
            (empty for datasets that need no files).
        files: files expected, relative to ``data_dir``.
        how_to_get: what a user can do when they are missing.
        can_download: whether ``download=True`` can fetch it.
        stats_source: where ``mean``/``std`` come from.
        augmentation: the random training augmentation (`load_dataset`'s ``augment``); none
            by default.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int | None = None
    test_size: int | None = None
    subdir: str = ""
    files: tuple[str, ...] = ()
    how_to_get: str = ""
    can_download: bool = True
    stats_source: str = ""
    augmentation: Augmentation = Augmentation()

    def root(self, data_dir: str | os.PathLike[str]) -> Path:
        """The directory torchvision reads this dataset from."""
        return Path(data_dir) / self.subdir

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        return dataclasses.asdict(self)


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are missing (or fail torchvision's integrity check).

    The message names the directory searched, the files expected and how to get them.
    """

    def __init__(self, info: DatasetInfo, directory: str | os.PathLike[str], detail: str = ""):
        self.dataset = info.name
        self.directory = str(directory)
        self.files = info.files
        remedy = info.how_to_get
        if info.can_download:
            remedy = (
                f"pass download=True (CLI: --download) to let torchvision fetch it, "
                f"or copy the files there ({info.how_to_get})"
            )
        message = (
            f"dataset {info.name!r} not found (or corrupted) in {self.directory}: "
            f"expected {', '.join(info.files)}; {remedy}"
        )
        if detail:
            message += f" [{detail}]"
        super().__init__(message)


def _from_catalog(name: str, **training: Any) -> DatasetInfo:
    """`DatasetInfo` of ``name``: its shape, split sizes, files and provenance from the
    catalogue (`jumpout.catalog`, which the service checks submissions against), so the files
    checked there are the files read here; ``training`` adds the normalisation and the
    augmentation."""
    item = catalog.entry(name)
    return DatasetInfo(
        name=name,
        num_classes=item.num_classes,
        in_channels=item.in_channels,
        image_size=item.image_size,
        train_size=item.train_size,
        test_size=item.test_size,
        subdir=item.subdir,
        files=item.files,
        how_to_get=item.how_to_get,
        can_download=item.can_download,
        **training,
    )


_RECIPES_STATS = "docs/recipes.md (hysts/pytorch_image_classification)"
_DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        _from_catalog(
            "cifar10",
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            stats_source=_RECIPES_STATS,
            augmentation=Augmentation(crop_padding=4, flip=True),
        ),
        _from_catalog(
            "cifar100",
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
            stats_source=_RECIPES_STATS,
            augmentation=Augmentation(crop_padding=4, flip=True),
        ),
        _from_catalog(
            "fashion_mnist",
            mean=(0.2860,),
            std=(0.3530,),
            stats_source=_RECIPES_STATS,
            augmentation=Augmentation(crop_padding=4, flip=True),
        ),
        _from_catalog(
            "svhn",
            # Source: none primary. hysts/pytorch_image_classification (the recipes' source) has
            # no SVHN; these are the values copied across many public repositories as "the SVHN
            # train split's" per-channel mean and std of pixels in [0, 1]. They could not be
            # recomputed here (no copy of the data on this machine);
            # `measure_normalisation("svhn", data_dir)` computes them from the files, and
            # docs/fidelity.md says how to replace them. They are of the train split alone, also
            # used for train + extra (extra's statistics differ slightly; one normalisation for
            # both splits keeps runs with and without extra comparable).
            mean=(0.4377, 0.4438, 0.4728),
            std=(0.1980, 0.2010, 0.1970),
            stats_source="unverified: values copied across public repositories as the SVHN "
            "train split's; recompute with measure_normalisation",
            # No augmentation: its digits are not mirror-symmetric, and the WRN paper trains
            # SVHN without any.
            augmentation=Augmentation(),
        ),
        _from_catalog(
            "stl10",
            # Source: none primary, as for SVHN: the values copied across public repositories
            # as the STL10 train split's (5,000 labelled images) per-channel mean and std; not
            # recomputed here (no copy of the data); `measure_normalisation("stl10", data_dir)`
            # computes them from the files.
            mean=(0.4467, 0.4398, 0.4066),
            std=(0.2603, 0.2566, 0.2713),
            stats_source="unverified: values copied across public repositories as the STL10 "
            "train split's; recompute with measure_normalisation",
            # The same eighth of the side as CIFAR's 4 of 32.
            augmentation=Augmentation(crop_padding=12, flip=True),
        ),
        _from_catalog(
            "imagenet",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            stats_source=_RECIPES_STATS,
            augmentation=Augmentation(resized_crop=224, flip=True),
        ),
        _from_catalog(
            "digits",
            mean=(0.3054,),
            std=(0.3761,),
            stats_source="computed on the 1437-image train split, pixels scaled to [0, 1]",
        ),
        _from_catalog(
            "synthetic",
            mean=(0.5, 0.5, 0.5),
            std=(0.2082, 0.2082, 0.2082),
            stats_source="of the generating distribution 0.6 U(0,1) + 0.4 U(0,1)",
        ),
    )
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return sorted(_DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """Static facts about ``name``; ValueError listing the known names if unknown."""
    try:
        return _DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}"
        ) from None


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str],
    *,
    download: bool = False,
    augment: bool = True,
    train_size: int | None = None,
    test_size: int | None = None,
    **kwargs: Any,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Load the train and test splits of ``name``.

    Args:
        name: one of :func:`list_datasets`.
        data_dir: the directory holding every dataset (see the module docstring for layout).
        download: let torchvision fetch missing files. Off by default: jobs must not reach
            the network unless asked to.
        augment: random training augmentation as in ``docs/recipes.md``; the test split is
            never augmented. Ignored by ``digits`` and ``synthetic``.
        train_size, test_size: keep only this many samples of a split (a seeded random
            subset, so classes stay balanced), for smoke tests; ``None`` keeps all.
        **kwargs: for ``svhn``: ``extra`` (False): train on train + extra (604,388 images, the
            paper's split; needs ``extra_32x32.mat``). For ``synthetic``: ``num_classes`` (10),
            ``image_size`` (32),
            ``in_channels`` (3), ``size`` (training images, 512; the test split has a quarter
            as many, at least one per class) and ``seed`` (0). For ``digits``: ``seed`` of the
            stratified split (0).

    Returns:
        ``(train_set, test_set, info)``; ``info`` reflects what was loaded (e.g. the synthetic
        shape asked for, or the number of ImageFolder classes found).

    Raises:
        ValueError: unknown name or unexpected keyword arguments.
        DatasetNotFoundError: the files are missing or corrupted.
    """
    info = dataset_info(name)
    loader = _LOADERS[name]
    allowed = _LOADER_KWARGS.get(name, ())
    unexpected = sorted(set(kwargs) - set(allowed))
    if unexpected:
        accepted = ", ".join(allowed) if allowed else "none"
        raise ValueError(
            f"load_dataset({name!r}) got unexpected keyword arguments {unexpected}; "
            f"accepted: {accepted}"
        )
    train_set, test_set, info = loader(
        info, Path(data_dir), download=download, augment=augment, **kwargs
    )
    return _cap(train_set, train_size, "train_size"), _cap(test_set, test_size, "test_size"), info


# --------------------------------------------------------------------------------------------
# torchvision-backed datasets


def _transforms(info: DatasetInfo, augment: bool) -> tuple[T.Compose, T.Compose]:
    """(train, test) pipelines; the train one applies ``info.augmentation`` when ``augment``."""
    policy = info.augmentation
    normalise = [T.ToTensor(), T.Normalize(info.mean, info.std)]
    if policy.resized_crop:
        # Images of differing sizes: evaluate on the centre of the usual 256-pixel resize.
        test = T.Compose([T.Resize(256), T.CenterCrop(policy.resized_crop), *normalise])
    else:
        test = T.Compose(normalise)
    random_steps = []
    if policy.resized_crop:
        random_steps.append(T.RandomResizedCrop(policy.resized_crop))
    elif policy.crop_padding:
        random_steps.append(T.RandomCrop(info.image_size, padding=policy.crop_padding))
    if policy.flip:
        random_steps.append(T.RandomHorizontalFlip())
    if not augment or not random_steps:
        return test, test
    return T.Compose([*random_steps, *normalise]), test


def _construct(info: DatasetInfo, data_dir: Path, build):
    """Call ``build(root)`` and turn torchvision's "not found" errors into ours."""
    root = info.root(data_dir)
    try:
        return build(str(root))
    except RuntimeError as error:
        # torchvision's wording: "Dataset not found or corrupted. You can use download=True
        # ..." (CIFAR, SVHN, STL10), "Dataset not found. ..." (MNIST family), "Dataset
        # metadata file not found or corrupted" (CIFAR meta).
        if "not found" in str(error):
            raise DatasetNotFoundError(info, root) from error
        raise


def _load_cifar(info, data_dir, *, download, augment):
    cls = tv_datasets.CIFAR10 if info.name == "cifar10" else tv_datasets.CIFAR100
    train_tf, test_tf = _transforms(info, augment)
    train = _construct(info, data_dir, lambda root: cls(root, True, train_tf, download=download))
    test = _construct(info, data_dir, lambda root: cls(root, False, test_tf, download=download))
    return train, test, info


def _load_fashion_mnist(info, data_dir, *, download, augment):
    train_tf, test_tf = _transforms(info, augment)
    cls = tv_datasets.FashionMNIST
    train = _construct(info, data_dir, lambda root: cls(root, True, train_tf, download=download))
    test = _construct(info, data_dir, lambda root: cls(root, False, test_tf, download=download))
    return train, test, info


_SVHN_EXTRA_FILE = Path(catalog.entry("svhn").extra_files[0]).name  # extra_32x32.mat


def _load_svhn(info, data_dir, *, download, augment, extra=False):
    train_tf, test_tf = _transforms(info, augment)
    cls = tv_datasets.SVHN
    # torchvision maps the label 10 (digit 0) to 0 itself.
    train = _construct(info, data_dir, lambda root: cls(root, "train", train_tf, download=download))
    test = _construct(info, data_dir, lambda root: cls(root, "test", test_tf, download=download))
    if extra:
        # The paper's Table 4 trains SVHN on train + extra: 73,257 + 531,131 = 604,388 images.
        info = dataclasses.replace(info, files=(*info.files, *catalog.entry("svhn").extra_files))
        root = info.root(data_dir)
        try:
            extra_set = cls(str(root), "extra", train_tf, download=download)
        except RuntimeError as error:
            if "not found" not in str(error):
                raise
            raise DatasetNotFoundError(
                info,
                root,
                f"{_SVHN_EXTRA_FILE} is missing or corrupted; svhn_extra=true trains on train + "
                "extra (the paper's split), svhn_extra=false on train only",
            ) from error
        train = ConcatDataset([train, extra_set])
        info = dataclasses.replace(info, train_size=len(train))
    return train, test, info


def _load_stl10(info, data_dir, *, download, augment):
    train_tf, test_tf = _transforms(info, augment)
    cls = tv_datasets.STL10
    # The paper trains on the 5000 labelled images only (no unlabeled split, no folds).
    train = _construct(
        info, data_dir, lambda root: cls(root, "train", transform=train_tf, download=download)
    )
    test = _construct(
        info, data_dir, lambda root: cls(root, "test", transform=test_tf, download=download)
    )
    return train, test, info


def _load_imagenet(info, data_dir, *, download, augment):
    train_tf, test_tf = _transforms(info, augment)
    root = info.root(data_dir)
    splits = []
    for split, transform in (("train", train_tf), ("val", test_tf)):
        directory = root / split
        if not directory.is_dir():
            raise DatasetNotFoundError(info, directory, "directory missing")
        try:
            splits.append(tv_datasets.ImageFolder(str(directory), transform=transform))
        except FileNotFoundError as error:
            raise DatasetNotFoundError(info, directory, str(error)) from error
    train, test = splits
    if train.classes != test.classes:
        missing = sorted(set(train.classes) ^ set(test.classes))
        raise ValueError(
            f"imagenet: {root / 'train'} and {root / 'val'} must hold the same class folders; "
            f"these are in only one of them: {missing[:10]}"
        )
    info = dataclasses.replace(
        info, num_classes=len(train.classes), train_size=len(train), test_size=len(test)
    )
    return train, test, info


# --------------------------------------------------------------------------------------------
# In-memory datasets


def _load_digits(info, data_dir, *, download, augment, seed=0):
    images, targets, train_idx, test_idx = digits_arrays(info.test_size, seed)
    # New tensors (the arithmetic and the indexing copy): the cached arrays stay as they are.
    images = (torch.from_numpy(images).unsqueeze(1) - info.mean[0]) / info.std[0]
    labels = torch.from_numpy(targets)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    train = TensorDataset(images[train_idx], labels[train_idx])
    test = TensorDataset(images[test_idx], labels[test_idx])
    return train, test, info


@functools.lru_cache(maxsize=4)
def digits_arrays(
    test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits, pixels scaled to [0, 1] (float32, N x 8 x 8), labels (int64) and
    the stratified split's train and test indices: numpy only, read once per process (about
    0.5 MB). The service's trainer template calls it before forking, so every trainer it forks
    shares the arrays instead of reading and splitting the CSV again (25-35 ms of a small job).
    Callers must not modify them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are 0..16; scale to [0, 1] like ToTensor does for 8-bit images.
    images = digits.images.astype(np.float32) / 16.0
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed
    )
    return images, labels, train_idx, test_idx


def _load_synthetic(
    info,
    data_dir,
    *,
    download,
    augment,
    num_classes=10,
    image_size=32,
    in_channels=3,
    size=512,
    seed=0,
):
    if num_classes < 1 or image_size < 1 or in_channels < 1 or size < 1:
        raise ValueError(
            "synthetic: num_classes, image_size, in_channels and size must be >= 1, got "
            f"{num_classes}, {image_size}, {in_channels}, {size}"
        )
    test_count = max(size // 4, num_classes)
    generator = torch.Generator().manual_seed(seed)
    shape = (in_channels, image_size, image_size)
    # One random prototype per class plus per-image noise: learnable, yet not trivially so.
    prototypes = torch.rand((num_classes, *shape), generator=generator)

    def split(count: int) -> TensorDataset:
        labels = torch.arange(count) % num_classes
        labels = labels[torch.randperm(count, generator=generator)]
        noise = torch.rand((count, *shape), generator=generator)
        images = 0.6 * prototypes[labels] + 0.4 * noise
        return TensorDataset((images - info.mean[0]) / info.std[0], labels)

    train, test = split(size), split(test_count)
    info = dataclasses.replace(
        info,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=(info.mean[0],) * in_channels,
        std=(info.std[0],) * in_channels,
        train_size=size,
        test_size=test_count,
    )
    return train, test, info


def _cap(dataset: Dataset, limit: int | None, field_name: str) -> Dataset:
    """A seeded random subset of ``limit`` samples (in index order), or the dataset itself."""
    if limit is None:
        return dataset
    if limit < 1:
        raise ValueError(f"{field_name} must be >= 1 or None, got {limit}")
    total = len(dataset)
    if limit >= total:
        return dataset
    # Fixed seed: the same cap gives the same samples in every run and every process.
    generator = torch.Generator().manual_seed(0)
    indices = torch.randperm(total, generator=generator)[:limit].sort().values
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(tensor[indices] for tensor in dataset.tensors))
    return Subset(dataset, indices.tolist())


def without_augmentation(dataset: Dataset, info: DatasetInfo) -> Dataset:
    """A view of a training set returned by :func:`load_dataset` that yields its images
    without the random augmentation (the test pipeline), sharing the loaded data.

    For measurements on fixed images (the engine's Figure 3 probe). Subsets and concatenations
    are rebuilt around views of their parts; in-memory sets are never augmented and come back
    as they are.
    """
    if isinstance(dataset, Subset):
        return Subset(without_augmentation(dataset.dataset, info), dataset.indices)
    if isinstance(dataset, ConcatDataset):
        return ConcatDataset([without_augmentation(part, info) for part in dataset.datasets])
    if isinstance(dataset, tv_datasets.VisionDataset) and dataset.transform is not None:
        plain = copy.copy(dataset)  # shallow: the image arrays are shared, not copied
        plain.transform = _transforms(info, augment=False)[1]
        plain.transforms = StandardTransform(plain.transform, plain.target_transform)
        return plain
    return dataset


def measure_normalisation(
    name: str, data_dir: str | os.PathLike[str], **kwargs: Any
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the training split's pixels in [0, 1], over
    every pixel of every image (the definition of the recipes' CIFAR values): how the
    ``DatasetInfo.mean``/``std`` of a data set can be checked or recomputed from its files.

    ``kwargs`` go to :func:`load_dataset` (e.g. ``extra=True`` for SVHN's train + extra).
    """
    train, _, info = load_dataset(name, data_dir, augment=False, **kwargs)
    total = square = None
    count = 0
    loader = torch.utils.data.DataLoader(train, batch_size=1024, generator=torch.Generator())
    for images, _ in loader:
        values = images.double().transpose(0, 1).flatten(1)  # (C, pixels of the batch)
        batch_sum, batch_square = values.sum(1), values.square().sum(1)
        total = batch_sum if total is None else total + batch_sum
        square = batch_square if square is None else square + batch_square
        count += values.shape[1]
    if total is None:
        raise ValueError(f"{name}: the training split is empty")
    # The loaded images are normalised: undo it, exactly, in the statistics.
    mean_loaded = total / count
    std_loaded = (square / count - mean_loaded.square()).clamp(min=0).sqrt()
    base_mean = torch.tensor(info.mean, dtype=torch.float64)
    base_std = torch.tensor(info.std, dtype=torch.float64)
    mean = mean_loaded * base_std + base_mean
    std = std_loaded * base_std
    return tuple(mean.tolist()), tuple(std.tolist())


_LOADERS = {
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "fashion_mnist": _load_fashion_mnist,
    "svhn": _load_svhn,
    "stl10": _load_stl10,
    "imagenet": _load_imagenet,
    "digits": _load_digits,
    "synthetic": _load_synthetic,
}
_LOADER_KWARGS: dict[str, tuple[str, ...]] = {
    "digits": ("seed",),
    "svhn": ("extra",),
    "synthetic": ("num_classes", "image_size", "in_channels", "size", "seed"),
}
