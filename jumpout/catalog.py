"""The dataset catalogue: what each data set holds and which files its loader reads, without torch.

`jumpout.data` loads the data sets with torchvision; this module says, without importing either,
what a data set is (its classes, input shape, split sizes) and which files under ``data_dir``
its loader needs. `jumpout.data` builds its `DatasetInfo` from these entries, so the file lists
checked here are the ones the loader reads. The service uses this module to refuse, at
submission, a job that cannot run on its server (`availability`, `train_pool_size`), and to list
the data sets a server can train on; the API process has no torch.

Layout under ``data_dir`` (each data set gets its own torchvision ``root``)::

    data_dir/cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    data_dir/cifar100/cifar-100-python/{train,test,meta}
    data_dir/fashion_mnist/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
    data_dir/svhn/{train,test,extra}_32x32.mat      (extra only for svhn_extra)
    data_dir/stl10/stl10_binary/{train_X,train_y,test_X,test_y,unlabeled_X}.bin
    data_dir/imagenet/{train,val}/<class>/<image>

A check here is a ``stat`` of each file (ImageNet: its two split folders, each with at least one
class folder), not torchvision's md5 check: a file that is present but corrupted is found by the
loader when the job starts. ImageNet's sizes depend on the folders found (any subset laid out the
same way can be used), so they are unknown here (``None``) until a loader scans them.
"""

from __future__ import annotations

import os
import posixpath
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CATALOG",
    "DatasetEntry",
    "availability",
    "class_folder_count",
    "clear_cache",
    "entry",
    "missing_files",
    "train_pool_size",
]


@dataclass(frozen=True)
class DatasetEntry:
    """Static facts about one data set.

    Attributes:
        name: registry name (`jumpout.spec.DATASETS`).
        num_classes, in_channels, image_size: what a model must accept (square images).
        train_size, test_size: samples in the full splits; ``None`` where they depend on the
            files found (ImageNet).
        extra_size: samples of an optional extra training split (SVHN's ``extra``), else 0.
        subdir: the directory under ``data_dir`` its loader reads (empty: needs no files).
        files: the files its loader needs, relative to ``data_dir``.
        extra_files: the files the extra split needs besides ``files``.
        folders: split folders (relative to ``data_dir``) that must each hold at least one class
            folder (ImageFolder layouts); ``files`` then only describes them in words.
        how_to_get: where the files come from.
        can_download: whether torchvision's ``download=True`` can fetch them.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    train_size: int | None
    test_size: int | None
    extra_size: int = 0
    subdir: str = ""
    files: tuple[str, ...] = ()
    extra_files: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()
    how_to_get: str = ""
    can_download: bool = True

    @property
    def needs_files(self) -> bool:
        return bool(self.subdir)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image as a model receives it."""
        return (self.in_channels, self.image_size, self.image_size)


_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
_FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# torchvision checks unlabeled_X.bin too, although only the labelled splits are read.
_STL10_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin")

CATALOG: dict[str, DatasetEntry] = {
    item.name: item
    for item in (
        DatasetEntry(
            name="cifar10",
            num_classes=10,
            in_channels=3,
            image_size=32,
            train_size=50_000,
            test_size=10_000,
            subdir="cifar10",
            files=tuple(f"cifar10/cifar-10-batches-py/{f}" for f in _CIFAR10_FILES),
            how_to_get="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extracted",
        ),
        DatasetEntry(
            name="cifar100",
            num_classes=100,
            in_channels=3,
            image_size=32,
            train_size=50_000,
            test_size=10_000,
            subdir="cifar100",
            files=tuple(f"cifar100/cifar-100-python/{f}" for f in ("train", "test", "meta")),
            how_to_get="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, extracted",
        ),
        DatasetEntry(
            name="fashion_mnist",
            num_classes=10,
            in_channels=1,
            image_size=28,
            train_size=60_000,
            test_size=10_000,
            subdir="fashion_mnist",
            files=tuple(f"fashion_mnist/FashionMNIST/raw/{f}" for f in _FASHION_FILES),
            how_to_get="the four gunzipped IDX files of github.com/zalandoresearch/fashion-mnist",
        ),
        DatasetEntry(
            name="svhn",
            num_classes=10,
            in_channels=3,
            image_size=32,
            train_size=73_257,
            test_size=26_032,
            # The paper's split is train + extra: 73,257 + 531,131 = 604,388 images.
            extra_size=531_131,
            subdir="svhn",
            files=("svhn/train_32x32.mat", "svhn/test_32x32.mat"),
            extra_files=("svhn/extra_32x32.mat",),
            how_to_get="http://ufldl.stanford.edu/housenumbers/ (format 2, cropped digits)",
        ),
        DatasetEntry(
            name="stl10",
            num_classes=10,
            in_channels=3,
            image_size=96,
            train_size=5_000,
            test_size=8_000,
            subdir="stl10",
            files=tuple(f"stl10/stl10_binary/{f}" for f in _STL10_FILES),
            how_to_get="http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz, extracted",
        ),
        DatasetEntry(
            name="imagenet",
            # ILSVRC-2012's; a subset in the same layout has as many as it has class folders.
            num_classes=1000,
            in_channels=3,
            image_size=224,
            train_size=None,
            test_size=None,
            subdir="imagenet",
            files=("imagenet/train/<class>/<image>", "imagenet/val/<class>/<image>"),
            folders=("imagenet/train", "imagenet/val"),
            how_to_get="it cannot be downloaded automatically: get ILSVRC2012 from image-net.org "
            "and put the train and val images in one folder per class",
            can_download=False,
        ),
        DatasetEntry(
            name="digits",
            num_classes=10,
            in_channels=1,
            image_size=8,
            train_size=1_437,
            test_size=360,
            how_to_get="bundled with scikit-learn",
            can_download=False,
        ),
        DatasetEntry(
            name="synthetic",
            num_classes=10,
            in_channels=3,
            image_size=32,
            train_size=512,
            test_size=128,
            how_to_get="generated in memory",
            can_download=False,
        ),
    )
}
"""Every data set, by name (the names of `jumpout.spec.DATASETS`)."""


def entry(name: str) -> DatasetEntry:
    """The catalogue entry of ``name``; ValueError listing the known names if unknown."""
    try:
        return CATALOG[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(CATALOG))}"
        ) from None


def train_pool_size(name: str, *, extra: bool = False) -> int | None:
    """How many training samples a job on ``name`` draws from (the split its ``train_size``
    caps, before any validation split is held out of it): the train split, plus SVHN's extra
    split with ``extra``. ``None`` where it depends on the files (ImageNet)."""
    item = entry(name)
    if item.train_size is None:
        return None
    return item.train_size + (item.extra_size if extra else 0)


def _has_subfolder(directory: Path) -> bool:
    """Whether ``directory`` exists and holds at least one folder (stops at the first)."""
    try:
        with os.scandir(directory) as entries:
            return any(item.is_dir() for item in entries)
    except OSError:
        return False


def missing_files(
    name: str, data_dir: str | os.PathLike[str], *, extra: bool = False
) -> tuple[str, ...]:
    """The files (relative to ``data_dir``) that ``name``'s loader needs and that are not there:
    a ``stat`` each. For an ImageFolder layout, the split folders that are missing or hold no
    class folder, as ``imagenet/train/<class>/``. Empty: nothing is missing."""
    item = entry(name)
    root = Path(data_dir)
    missing = [
        relative
        for relative in (*item.files, *(item.extra_files if extra else ()))
        if not item.folders and not (root / relative).is_file()
    ]
    missing += [
        f"{folder}/<class>/" for folder in item.folders if not _has_subfolder(root / folder)
    ]
    return tuple(missing)


# Positive answers only are remembered, for a few seconds: a submission, or an experiment's
# hundreds of jobs, then costs a stat per file once; files an operator has just added are seen
# at once.
_CACHE_SECONDS = 10.0
_available_until: dict[tuple[str, str, bool], float] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget the remembered availability answers (tests that add or remove files)."""
    with _cache_lock:
        _available_until.clear()


def availability(
    name: str,
    data_dir: str | os.PathLike[str],
    *,
    extra: bool = False,
    where: str | None = None,
    fetch_hint: str | None = None,
) -> tuple[bool, str | None]:
    """Whether a job on ``name`` can find its files under ``data_dir``, and if not, why and
    what whoever runs the machine must do.

    Args:
        extra: SVHN with its extra split (``svhn_extra``).
        where: how the message names ``data_dir`` (a service names its setting rather than a
            path of its server); default: the path itself.
        fetch_hint: how files that torchvision can download are fetched on this side (e.g. a
            command line); default: torchvision's ``download=True``.

    Returns:
        ``(True, None)`` or ``(False, reason)``. Data sets that need no files are always
        available.
    """
    item = entry(name)
    if not item.needs_files:
        return True, None
    key = (name, os.fspath(data_dir), extra)
    now = time.monotonic()
    if _available_until.get(key, 0.0) > now:
        return True, None
    missing = missing_files(name, data_dir, extra=extra)
    if not missing:
        with _cache_lock:
            _available_until[key] = now + _CACHE_SECONDS
        return True, None
    place = where or os.fspath(data_dir)
    shown = _shorten(missing)
    if item.can_download:
        fetch = fetch_hint or "torchvision's download=True on a machine with internet access"
        remedy = f"fetch them with {fetch}, or copy them there from {item.how_to_get}"
    else:
        remedy = item.how_to_get
    extra_only = extra and set(missing) <= set(item.extra_files)
    subject = f"{name}'s extra split" if extra_only else f"{name}'s files"
    reason = f"{subject} are not under {place}: missing {shown}; {remedy}"
    if extra_only:
        reason += "; or train on the train split alone with svhn_extra=false"
    return False, reason


def _shorten(paths: tuple[str, ...]) -> str:
    """``a/b/{x, y}`` for several files of one folder, else the paths, comma-separated."""
    folders = {posixpath.dirname(path) for path in paths}
    if len(paths) > 1 and len(folders) == 1:
        names = ", ".join(posixpath.basename(path) for path in paths)
        return f"{folders.pop()}/{{{names}}}"
    return ", ".join(paths)


def class_folder_count(folder: str | os.PathLike[str]) -> int:
    """The number of class folders in an ImageFolder split (one directory listing)."""
    try:
        with os.scandir(folder) as entries:
            return sum(1 for item in entries if item.is_dir())
    except OSError:
        return 0
