"""Which data sets this server can train on, and the submission check built on that.

A job whose data set's files are not on the server, or whose ``train_size`` / ``test_size`` asks
for more samples than the data set has, is refused when it is submitted (422 ``invalid_spec``
naming the field), not accepted to fail seconds later in the worker. One check serves single
jobs and every run of an experiment: `jobstore.jobs.resolve_job_spec` calls `check_trainable`.

The files are looked up under the server's data directory with `jumpout.catalog` (a ``stat``
per file, torch-free, positive answers remembered for a few seconds). Answers to API clients
never show a server path: they name the setting, ``JUMPOUT_DATA_DIR``, and say what the
server's operator must do. The files' integrity (torchvision's md5 check) is still the worker's
to find; `worker_failure_message` words that failure for the service.
"""

from __future__ import annotations

from typing import Any

from jobstore.errors import FieldError, InvalidSpec
from jobstore.settings import get_settings
from jumpout import catalog
from jumpout.spec import DATASETS, TrainConfig

__all__ = ["check_trainable", "dataset_listing", "server_availability", "worker_failure_message"]

DATA_DIR_PLACE = "this server's data directory (the setting JUMPOUT_DATA_DIR)"


def _fetch_hint(name: str) -> str:
    return (
        f"`python -m jumpout fetch {name} --data-dir <JUMPOUT_DATA_DIR>` on a machine with "
        "internet access"
    )


def server_availability(
    name: str, *, data_dir: Any = None, extra: bool = False
) -> tuple[bool, str | None]:
    """`jumpout.catalog.availability` under this server's data directory (or ``data_dir``),
    worded for an API client: the operator's remedy, no server path."""
    if data_dir is None:
        data_dir = get_settings().data_dir
    return catalog.availability(
        name, data_dir, extra=extra, where=DATA_DIR_PLACE, fetch_hint=_fetch_hint(name)
    )


def check_trainable(config: TrainConfig) -> None:
    """Refuse, with `InvalidSpec` naming each field at fault, a resolved job that cannot run
    here: its data set's files missing under its ``data_dir`` (the server's), SVHN's extra
    split missing with ``svhn_extra``, a ``train_size`` larger than the samples it caps (the
    train split, plus extra with ``svhn_extra``; a validation split is held out after the cap)
    or a ``test_size`` larger than the test split. ImageNet's sizes depend on the folders the
    operator put there, so its caps are not checked (a larger cap keeps every sample)."""
    name = config.dataset
    extra = bool(config.svhn_extra)
    errors = []
    available, reason = server_availability(name, data_dir=config.data_dir, extra=extra)
    if not available:
        train_files_there = extra and server_availability(name, data_dir=config.data_dir)[0]
        field = "svhn_extra" if train_files_there else "dataset"
        message = (
            f"this server cannot train on {name} now: {reason}. The server's operator must "
            "add the files; GET /v1/datasets lists the data sets this server can train on"
        )
        errors.append(FieldError(field, message))
    pool = catalog.train_pool_size(name, extra=extra)
    if config.train_size is not None and pool is not None and config.train_size > pool:
        split = "its train and extra splits" if extra else "its train split"
        errors.append(
            FieldError(
                "train_size",
                f"at most {pool} for {name} ({split}: a validation split is held out of these), "
                f"got {config.train_size}; null trains on all of them",
            )
        )
    test_size = catalog.entry(name).test_size
    if config.test_size is not None and test_size is not None and config.test_size > test_size:
        errors.append(
            FieldError(
                "test_size",
                f"at most {test_size} for {name} (its test split), got {config.test_size}; "
                "null tests on all of it",
            )
        )
    if errors:
        names = ", ".join(error.field for error in errors)
        raise InvalidSpec(f"invalid value for: {names}", fields=errors)


def dataset_listing() -> list[dict[str, Any]]:
    """One item per data set, in `jumpout.spec.DATASETS` order: whether this server can train
    on it now and, if not, why and what its operator must do; its split sizes, classes and
    input shape (ImageNet: the class folders found, sizes unknown until a worker scans them).
    SVHN without its extra split is available, with a reason saying that only
    ``svhn_extra=false`` jobs can run."""
    items = []
    for name in DATASETS:
        item = catalog.entry(name)
        available, reason = server_availability(name)
        num_classes = item.num_classes
        if available and item.folders:
            folder = get_settings().data_dir / item.folders[0]
            num_classes = catalog.class_folder_count(folder) or num_classes
        if available and item.extra_files:
            with_extra, extra_reason = server_availability(name, extra=True)
            if not with_extra:
                reason = (
                    f"only svhn_extra=false jobs can run (the svhn recipe's default is true): "
                    f"{extra_reason}"
                )
        items.append(
            {
                "name": name,
                "available": available,
                "train_size": item.train_size,
                "test_size": item.test_size,
                "num_classes": num_classes,
                "input_shape": list(item.input_shape),
                "reason": reason,
            }
        )
    return items


def worker_failure_message(config: TrainConfig) -> str:
    """The job's error when its data set could not be loaded when it started (files removed
    or never there, or present but failing torchvision's integrity check): what the server's
    operator must do, not the library's advice to pass ``download=True``, which an API client
    cannot."""
    extra = bool(config.svhn_extra)
    available, reason = server_availability(config.dataset, data_dir=config.data_dir, extra=extra)
    if available:
        # The library's own message names server paths: not for an API client.
        reason = (
            f"{config.dataset}'s files are under {DATA_DIR_PLACE} but could not be read "
            "(incomplete, corrupted, or an image folder without images); the server's operator "
            "must replace them"
        )
    return f"dataset not found: {reason}"
