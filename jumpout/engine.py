"""The training engine: one `fit(config)` that the command line and the service both run.

`fit` trains the model a `TrainConfig` describes with its recipe's optimiser and schedule,
evaluates after every epoch, reports through callbacks (epoch metrics, checkpoints written and
pruned, progress) and polls a cooperative stop request every few steps.

Design choices worth knowing:

* Nothing in the inner loop waits for the device. Training loss, accuracy and each Jumpout layer's
  active fraction, rate and whether the rate hit its cap are summed into device tensors; the host
  reads them once per epoch and
  every `PROGRESS_EVERY` steps (to report progress and to check for a non-finite loss, whose first
  step is recorded on the device by a flag tensor).
* Checkpoints (`checkpoint-epochEEEE.pt` after epoch E) hold model, optimiser, schedule, every RNG
  state (python, numpy, torch CPU and CUDA, the sampler's and the loader's generators), the
  metrics history, the final test accuracy and the validation-best epoch, the starting weights'
  record (``init``), the run's provenance (``environment``, `jumpout.provenance`) and what built
  the model (``model_args``, `jumpout.models.model_arguments`: `load_model` rebuilds it). They are
  written atomically (temp file in the same directory, fsync, ``os.replace``, directory fsync)
  and load with ``weights_only=True``.
  A cooperative stop in the middle of epoch E+1 writes ``checkpoint-epochEEEE-stepSSSSSS.pt``
  (E epochs plus S steps done), from which a resume continues at the same step.
* The headline is the last epoch's test accuracy. Nothing is chosen on the test set: with
  ``val_fraction > 0`` a seeded, stratified part of the training set is held out (never
  augmented), evaluated after every epoch, and the epoch with the best validation accuracy is
  the "best" one (``best_val_accuracy``, ``best_epoch``, ``test_accuracy_at_best``); without a
  split there is no best epoch.
* keep-last-N prunes older checkpoint files; with ``keep_best`` the validation-best epoch's file
  is kept as well (no copy is made: that epoch's own file is exempt from pruning).
* Resuming is exact or refused. On the CPU an interrupted-then-resumed run ends with
  bit-identical weights to an uninterrupted one, with or without DataLoader worker processes:
  each epoch's sample order comes from the saved sampler generator, the RNG states are restored
  after the model is built, and a sample's random augmentation is a function of (seed, epoch,
  sample index) (`_SeededAugmentation`; per step on the device path), not of a worker's random
  stream, which no checkpoint holds. A checkpoint trained with a different value of any field
  that changes the trajectory is refused (`ConfigError` naming the fields); only
  `RESUME_NEUTRAL_FIELDS` may differ.
* ``init_from`` starts from saved weights (a state dict or a checkpoint under ``data_dir``, or
  an earlier job's checkpoint that the service resolves): every key and shape must match the
  model (`resolve_init_from`, `_load_initial_weights`). A resume does not apply it again.
* ``precision``: fp32 (the paper's, the default), or autocast to bf16 or fp16 (with a loss
  scaler, whose state checkpoints keep) on the CPU and on CUDA alike.
* On CUDA: channels_last for image models, pinned memory and non-blocking copies, optional
  ``torch.compile``; datasets small enough (digits, synthetic, CIFAR-, SVHN-, Fashion-sized) are
  kept on the GPU as tensors and augmented there in batches, with the policy `jumpout.data`
  declares for the CPU pipeline (``DatasetInfo.augmentation``). The others (ImageNet) stream
  through one DataLoader per split, built once per run with persistent, pinned workers
  (`loader_workers`: min(8, CPUs) unless ``num_workers`` says otherwise).
* Checkpoints hold CPU tensors only (`_on_cpu`): loading one needs no ``map_location``.

`fit` reads as its steps: `_start_run` (seed, data, model, optimiser), `_restore` (from a
checkpoint), then per epoch `_train_epoch`, `_evaluate`, `_record_epoch` and a `_Checkpointer`
save of `_checkpoint_state`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import random
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jumpout.distributed import Ranks, join_process_group
from jumpout.provenance import environment
from jumpout.spec import FP16_NEEDS_CUDA, ConfigError, TrainConfig

__all__ = [
    "CHECKPOINT_PATTERN",
    "Callback",
    "CheckpointWriteError",
    "FitResult",
    "NonFiniteLossError",
    "RESUME_NEUTRAL_FIELDS",
    "PROBE_SIZE",
    "PROGRESS_EVERY",
    "STOP_POLL_EVERY",
    "augment_on_device",
    "checkpoint_name",
    "find_resumable_checkpoint",
    "fit",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "loader_workers",
    "resolve_device",
    "resolve_init_from",
]

PROGRESS_EVERY = 25
"""Steps between host reads of the running loss (progress report and non-finite check)."""
STOP_POLL_EVERY = 10
"""Steps between polls of `Callback.should_stop`."""

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-epoch(\d{4,})(?:-step(\d{6,}))?\.pt$")
_TEMP_PREFIX = ".checkpoint-"
_TEMP_SUFFIX = ".tmp"

# Datasets whose train and test images together (float32) fit in this are kept on the GPU.
_DEVICE_RESIDENT_MAX_BYTES = 4 * 2**30


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite.

    Args:
        epoch: the epoch (1-based) in which it happened.
        step: the step (1-based, within the epoch) at which the loss was first non-finite.
    """

    def __init__(self, epoch: int, step: int) -> None:
        self.epoch = epoch
        self.step = step
        super().__init__(
            f"training loss became NaN or infinite at epoch {epoch}, step {step}; "
            "lower the learning rate (lr) or check the data"
        )


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the disk is full, a quota, an I/O error). Nothing of
    it is left behind (the temporary file is removed) and the checkpoints written before are
    untouched, so a later run resumes from the newest of those. ``errno`` is the write's.

    Args:
        epoch: the epoch whose checkpoint it was.
        error: the write's ``OSError``.
    """

    def __init__(self, epoch: int, error: OSError) -> None:
        super().__init__(
            error.errno, f"could not write the checkpoint of epoch {epoch}: {error.strerror}"
        )
        self.epoch = epoch


class Callback:
    """Receives the engine's reports. Subclass and override what you need; all are no-ops."""

    def on_epoch_end(self, metrics: dict) -> None:
        """One dict per finished epoch (keys: see `fit`)."""

    def before_checkpoint(self, path: str, epoch: int) -> None:
        """A checkpoint file is about to be written at ``path`` (it may replace one there); an
        exception raised here ends the run before the file is touched."""

    def on_checkpoint(
        self, path: str, epoch: int, sha256: str, size_bytes: int, is_best: bool
    ) -> None:
        """A checkpoint file was written (atomically) at ``path``."""

    def on_checkpoint_removed(self, path: str) -> None:
        """keep-last-N prunes the checkpoint file at ``path``. Called just before the file is
        deleted, so a store of checkpoint records forgets the record first: a crash in between
        leaves a file without a record (the next prune deletes it), never a record whose file is
        gone."""

    def should_stop(self) -> bool:
        """Polled every `STOP_POLL_EVERY` steps and at each epoch end; True stops cooperatively."""
        return False

    def on_step(self, epoch: int, step: int, steps: int, loss: float | None) -> None:
        """Called after every step; ``loss`` (the epoch's running mean) is given every
        `PROGRESS_EVERY` steps and at the epoch's last step, else None."""


@dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
        config: the configuration trained.
        history: the per-epoch metrics dicts (including those before a resume).
        final_accuracy: the last finished epoch's test accuracy (fraction): the headline; None
            before the first epoch ends.
        best_val_accuracy: the best validation accuracy over the epochs; None without a
            validation split (``val_fraction`` 0).
        best_epoch: the epoch that reached it (the first on a tie), or None.
        test_accuracy_at_best: that epoch's test accuracy, or None. No figure is ever chosen on
            the test set.
        epochs_completed: number of finished epochs.
        stopped: True if a callback's `should_stop` ended the run early.
        last_checkpoint: path of the last checkpoint written, or None.
        init_source: where the starting weights came from (`resolve_init_from`'s record:
            ``source``, ``kind``, ``path``, ``sha256``), None for a random start.
        environment: what ran (`jumpout.provenance.environment`), also in every checkpoint.
        model: the trained model (on the training device).
    """

    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    final_accuracy: float | None = None
    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    test_accuracy_at_best: float | None = None
    epochs_completed: int = 0
    stopped: bool = False
    last_checkpoint: str | None = None
    init_source: dict | None = None
    environment: dict = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)


# --------------------------------------------------------------------------------------------
# Checkpoint files


def checkpoint_name(epoch: int, step: int = 0) -> str:
    """File name of the checkpoint after ``epoch`` epochs plus ``step`` steps of the next one."""
    if step:
        return f"checkpoint-epoch{epoch:04d}-step{step:06d}.pt"
    return f"checkpoint-epoch{epoch:04d}.pt"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files in ``out_dir``, oldest first (temp files and other names are ignored)."""
    directory = Path(out_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_file():
            found.append(((int(match.group(1)), int(match.group(2) or 0)), path))
    return [path for _, path in sorted(found)]


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by `fit` (``torch.load(..., weights_only=True)``)."""
    return torch.load(path, map_location=map_location, weights_only=True)


MODEL_ARGS_KEY = "model_args"
"""The checkpoint key of the model's construction arguments (`jumpout.models.model_arguments`:
architecture, num_classes, in_channels, image_size, regularizer, options)."""


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """The trained model of a checkpoint written by `fit` (or downloaded from the service),
    rebuilt from the construction arguments the checkpoint stores, its weights loaded, in eval
    mode, on ``map_location``.

    Loads with ``torch.load(..., weights_only=True)``: nothing in the file is executed.

    Example::

        model = jumpout.load_model("model.pt")
        logits = model(images)

    Raises:
        ValueError: the file is not a `fit` checkpoint, or was written before checkpoints held
            the construction arguments (no ``"model_args"``): rebuild such a model with
            `jumpout.models.create_model` from its ``"config"`` and the data set's sizes, then
            ``load_state_dict(state["model"])``.
    """
    from jumpout.models import create_model_from_arguments

    state = load_checkpoint(path, map_location="cpu")
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{Path(path).name} is not a checkpoint written by jumpout's fit")
    arguments = state.get(MODEL_ARGS_KEY)
    if arguments is None:
        raise ValueError(
            f"{Path(path).name} was written before checkpoints stored the model's construction "
            f"arguments ({MODEL_ARGS_KEY!r}): rebuild it with jumpout.models.create_model("
            "architecture, num_classes, in_channels, Regularizer.from_config(config), "
            "image_size=...) from its 'config', then load_state_dict(state['model'])"
        )
    model = create_model_from_arguments(arguments)
    model.load_state_dict(state["model"])
    return model.to(map_location).eval()


def find_resumable_checkpoint(out_dir: str | os.PathLike) -> str | None:
    """Path of the newest checkpoint in ``out_dir`` whose file loads, or None.

    Files that fail to load (truncated, corrupt) are skipped in favour of older ones. The caller
    that recorded sha256 sums verifies them itself.
    """
    for path in reversed(list_checkpoints(out_dir)):
        try:
            state = load_checkpoint(path)
        except Exception:  # noqa: BLE001 - any unreadable file just is not resumable
            continue
        if isinstance(state, dict) and "model" in state and "epoch" in state:
            return str(path)
    return None


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it, so a checkpoint's sha256
    and size come from the write itself instead of reading the file back."""

    def __init__(self, handle) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._handle.write(data)

    def flush(self) -> None:
        self._handle.flush()


def _os_error(error: BaseException) -> OSError | None:
    """The ``OSError`` that ``error`` is or was raised from: ``torch.save`` turns its writer's
    ``OSError`` (ENOSPC on a full disk) into a ``RuntimeError`` ("unexpected pos ...")."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _atomic_save(state: dict, path: Path) -> tuple[str, int]:
    """torch.save ``state`` to ``path`` atomically; return (sha256, size in bytes)."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer = _HashingWriter(handle)
            torch.save(state, writer)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)
    return writer.digest.hexdigest(), writer.size


# --------------------------------------------------------------------------------------------
# RNG states (as tensors and plain values, so that weights_only loading accepts them)


def _capture_rng(sampler: torch.Generator, loader: torch.Generator) -> dict:
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "sampler": sampler.get_state(),
        "loader": loader.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict, sampler: torch.Generator, loader: torch.Generator) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    sampler.set_state(state["sampler"])
    loader.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# --------------------------------------------------------------------------------------------
# Schedule


class _Schedule:
    """Learning rate (and, for ``step_momentum``, momentum) as a function of the iteration.

    Applied per iteration, so milestones fall exactly on epoch boundaries and cosine annealing is
    smooth. Its whole state is the iteration count, which makes checkpoints trivial.
    """

    def __init__(self, config: TrainConfig, optimizer: torch.optim.Optimizer, steps: int) -> None:
        self.config = config
        self.optimizer = optimizer
        self.steps_per_epoch = max(1, steps)
        self.total = self.steps_per_epoch * config.epochs
        self.iteration = 0

    def _passed_milestones(self) -> int:
        return sum(self.iteration >= m * self.steps_per_epoch for m in self.config.milestones)

    def lr(self) -> float:
        config = self.config
        if config.schedule in ("step", "step_momentum"):
            return config.lr * config.gamma ** self._passed_milestones()
        if config.schedule == "cosine":
            progress = min(self.iteration, self.total) / self.total
            return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return config.lr

    def momentum(self) -> float:
        if self.config.schedule == "step_momentum":
            # v3 raises the momentum at each milestone: 0.9, 0.95, 0.975, ... (1 - m halves).
            return 1.0 - (1.0 - self.config.momentum) * 0.5 ** self._passed_milestones()
        return self.config.momentum

    def apply(self) -> None:
        lr, momentum = self.lr(), self.momentum()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["momentum"] = momentum

    def step(self) -> None:
        self.iteration += 1
        self.apply()

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.apply()


# --------------------------------------------------------------------------------------------
# Data


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device",
            "'cuda' was asked for but no CUDA device is available; accepted here: auto, cpu",
        )
    return torch.device(name)


def augment_on_device(
    images: torch.Tensor,
    padding: int,
    flip: bool,
    fill: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop (with ``padding`` pixels of ``fill``) and horizontal flip of a batch, on
    whatever device ``images`` (N, C, H, W) lives, with batched tensor ops.

    ``fill`` (per channel) is what a zero pixel becomes after normalisation, so that padding
    matches torchvision's ``RandomCrop(padding=...)`` applied before ``Normalize``.
    """
    n, channels, height, width = images.shape
    device = images.device
    if padding > 0:
        padded = images.new_empty(n, channels, height + 2 * padding, width + 2 * padding)
        if fill is None:
            padded.zero_()
        else:
            padded.copy_(fill.to(images.dtype).view(1, channels, 1, 1).expand_as(padded))
        padded[:, :, padding : padding + height, padding : padding + width] = images
        offset_y = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
        offset_x = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
        rows = offset_y + torch.arange(height, device=device)  # (n, H)
        cols = offset_x + torch.arange(width, device=device)  # (n, W)
        batch_index = torch.arange(n, device=device).view(n, 1, 1)
        # Advanced indexing gives (n, H, W, C); permute back to (n, C, H, W).
        images = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]]
        images = images.permute(0, 3, 1, 2)
    if flip:
        mirror = torch.rand(n, device=device, generator=generator) < 0.5
        images = torch.where(mirror.view(n, 1, 1, 1), images.flip(3), images)
    return images.contiguous()


# Random streams that are fixed functions of what they are for, not of who draws them or when:
# the tags keep the streams of one seed apart.
_MASK64 = (1 << 64) - 1
_SPLIT_STREAM, _AUGMENT_STREAM, _DEVICE_AUGMENT_STREAM = 1, 2, 3
_RANK_STREAM = 4  # a rank's own torch stream (dropout, Jumpout) in a data-parallel run


def _stream_seed(*values: int) -> int:
    """A 63-bit seed that is a fixed function of ``values`` (splitmix64 over each in turn)."""
    state = 0
    for value in values:
        state = ((state ^ (value & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 31
    return state >> 1


class _SeededAugmentation(torch.utils.data.Dataset):
    """The training set with each sample's random augmentation drawn from the global torch RNG
    seeded by (seed, epoch, sample index).

    torchvision's transforms draw from the global torch RNG. In a DataLoader worker that is the
    worker's own stream, which depends on which worker got the batch and what it drew before,
    and no checkpoint holds it; with ``num_workers=0`` it is the stream dropout draws from.
    Seeded per sample, a sample's augmentation is the same whoever loads it, so a resume in the
    middle of an epoch sees the images the uninterrupted run saw, with any number of workers.
    The caller's RNG state is put back after each sample: the main process's stream (dropout's)
    is untouched. (The transforms must draw from torch's RNG, as torchvision's do.)
    """

    def __init__(self, dataset: Any, seed: int, epoch: int = 0, *, seeded: bool = True) -> None:
        self.dataset, self.seed, self.epoch, self.seeded = dataset, seed, epoch, seeded

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        # `_EpochSampler` asks for (epoch, index): the one loader of a run serves every epoch.
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        if not self.seeded:  # no random transform: nothing to seed
            return self.dataset[index]
        # The CPU generator only: `torch.manual_seed` would also reseed every CUDA generator,
        # and with num_workers=0 (the main process, CUDA initialised) dropout's masks on the GPU
        # would follow each batch's last sample's seed.
        generator = torch.default_generator
        outer = generator.get_state()
        generator.manual_seed(_stream_seed(self.seed, _AUGMENT_STREAM, epoch, index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(outer)


def _dataset_labels(dataset: Any) -> torch.Tensor | None:
    """Every sample's class, read from the dataset's metadata without loading an image; None
    when the dataset does not say."""
    from torch.utils.data import ConcatDataset, Subset, TensorDataset

    if isinstance(dataset, Subset):
        labels = _dataset_labels(dataset.dataset)
        if labels is None:
            return None
        return labels[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        parts = [_dataset_labels(part) for part in dataset.datasets]
        return None if any(part is None for part in parts) else torch.cat(parts)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1].long().flatten()
    for name in ("targets", "labels"):  # torchvision's CIFAR, MNIST, ImageFolder; SVHN, STL10
        values = getattr(dataset, name, None)
        if values is not None:
            labels = torch.as_tensor(np.asarray(values), dtype=torch.long).flatten()
            if len(labels) == len(dataset):
                return labels
    return None


def _validation_split(
    dataset: Any, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, validation indices) of ``dataset``, both ascending: ``fraction`` of it
    held out, stratified by class when the labels are known without loading images (each class
    gives its own share, rounded), drawn by a generator seeded from ``seed`` alone, so every
    run, resume and worker of one seed holds out the same samples."""
    count = len(dataset)
    labels = _dataset_labels(dataset)
    generator = torch.Generator().manual_seed(_stream_seed(seed, _SPLIT_STREAM))
    if labels is None:
        groups = [torch.arange(count)]
    else:
        groups = [(labels == value).nonzero().flatten() for value in labels.unique()]
    held = []
    for group in groups:
        shuffled = group[torch.randperm(len(group), generator=generator)]
        held.append(shuffled[: math.floor(fraction * len(group) + 0.5)])
    validation = torch.cat(held).sort().values
    if len(validation) == 0 or len(validation) == count:
        raise ConfigError(
            "val_fraction",
            f"{fraction:g} holds out {len(validation)} of the {count} training samples; "
            "accepted: a fraction that leaves samples on both sides, or 0 for no validation split",
        )
    keep = torch.ones(count, dtype=torch.bool)
    keep[validation] = False
    return keep.nonzero().flatten(), validation


def _stack_dataset(dataset: Any, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=1024, num_workers=num_workers, generator=torch.Generator()
    )
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return torch.cat(xs), torch.cat(ys).long()


@dataclass
class _Data:
    train_set: Any
    test_set: Any
    info: Any
    resident: bool = False
    train_x: torch.Tensor | None = None
    train_y: torch.Tensor | None = None
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    padding: int = 0
    flip: bool = False
    fill: torch.Tensor | None = None
    # The training set's transforms draw random numbers (loader path): `_SeededAugmentation`.
    random_augmentation: bool = False
    # With ``val_fraction``: (training, validation) indices into the loaded training set, and the
    # held-out part (the test pipeline; ``val_x``/``val_y`` on the device path).
    split: tuple[torch.Tensor, torch.Tensor] | None = None
    val_set: Any = None
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    # The loader path's DataLoaders ("train", "test", "val"), built on first use and reused by
    # every epoch, so that persistent workers are started once per run (`_loader`).
    loaders: dict[str, Any] = field(default_factory=dict)
    train_sampler: _EpochSampler | None = None

    @property
    def train_len(self) -> int:
        return len(self.train_x) if self.resident else len(self.train_set)


def loader_workers(config: TrainConfig, device: torch.device) -> int:
    """DataLoader processes for ``config`` on ``device``: ``num_workers`` when set; else none on
    the CPU (the training shares its cores) and min(8, usable CPUs) on CUDA, where decoding
    (ImageNet's JPEGs) in the main process would leave the GPU waiting."""
    if config.num_workers is not None:
        return config.num_workers
    if device.type != "cuda":
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(8, cpus)


class _EpochSampler(torch.utils.data.Sampler):
    """The sampler of a run's one training DataLoader: each epoch sets the sample order and the
    epoch number, and the loader asks for ``(epoch, index)`` pairs, which carry the epoch to
    `_SeededAugmentation` in worker processes that were started (persistent) in epoch 1."""

    def __init__(self) -> None:
        self.epoch, self.order = 0, []

    def set_epoch(self, epoch: int, order: list[int]) -> None:
        self.epoch, self.order = epoch, order

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, index) for index in self.order)

    def __len__(self) -> int:
        return len(self.order)


def _loader(data: _Data, name: str, build) -> torch.utils.data.DataLoader:
    """``data``'s DataLoader called ``name``, built by ``build()`` the first time."""
    if name not in data.loaders:
        data.loaders[name] = build()
    return data.loaders[name]


def _keep_data_on_device(device: torch.device) -> bool:
    """Whether small datasets live on ``device`` as tensors (a seam for CPU tests of that path)."""
    return device.type == "cuda"


def load_config_dataset(config: TrainConfig, *, augment: bool, download: bool = False):
    """The (train, test, info) of `config`'s dataset, as `jumpout.data.load_dataset` gives them:
    its sizes, and on SVHN its extra split (the paper's train + extra; the spec refuses
    svhn_extra on any other dataset)."""
    from jumpout.data import load_dataset

    return load_dataset(
        config.dataset,
        config.data_dir or ".",
        download=download,
        augment=augment,
        train_size=config.train_size,
        test_size=config.test_size,
        **({"extra": config.svhn_extra} if config.dataset == "svhn" else {}),
    )


def _load_data(config: TrainConfig, device: torch.device) -> _Data:
    from torch.utils.data import Subset

    from jumpout.data import dataset_info, without_augmentation

    policy = dataset_info(config.dataset).augmentation
    resident = _keep_data_on_device(device) and policy.batchable

    # On the device path the augmentation runs on the GPU, so load plain tensors.
    train_set, test_set, info = load_config_dataset(config, augment=config.augment and not resident)
    if resident:
        size = (len(train_set) + len(test_set)) * train_set[0][0].numel() * 4
        if size > _DEVICE_RESIDENT_MAX_BYTES:
            # Too large for the device: the loader path, whose transforms augment.
            resident = False
            if config.augment:
                train_set, test_set, info = load_config_dataset(config, augment=True)
    data = _Data(train_set, test_set, info)
    if config.val_fraction > 0:
        data.split = _validation_split(train_set, config.val_fraction, config.seed)
    if resident:
        data.resident = True
        workers = loader_workers(config, device)
        train_x, train_y = _stack_dataset(train_set, workers)
        test_x, test_y = _stack_dataset(test_set, workers)
        if data.split is not None:
            train_index, val_index = data.split
            data.val_x, data.val_y = train_x[val_index], train_y[val_index]
            data.val_x, data.val_y = data.val_x.to(device), data.val_y.to(device)
            train_x, train_y = train_x[train_index], train_y[train_index]
        data.train_x, data.train_y = train_x.to(device), train_y.to(device)
        data.test_x, data.test_y = test_x.to(device), test_y.to(device)
        if config.augment:
            data.padding, data.flip = policy.crop_padding, policy.flip
        mean = torch.as_tensor(info.mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(info.std, dtype=torch.float32).flatten()
        data.fill = (-mean / std).expand(train_x.shape[1]).to(device)
    if not data.resident:
        random_steps = policy.crop_padding or policy.flip or policy.resized_crop
        data.random_augmentation = bool(config.augment and random_steps)
        if data.split is not None:
            train_index, val_index = data.split
            # The held-out images are seen as the test images are: without augmentation.
            data.val_set = Subset(without_augmentation(train_set, info), val_index.tolist())
            data.train_set = Subset(train_set, train_index.tolist())
    return data


def _train_batches(
    data: _Data,
    config: TrainConfig,
    device: torch.device,
    order: torch.Tensor,
    loader_generator: torch.Generator,
    drop_last: bool,
    epoch: int,
    first_step: int = 0,
    batch_size: int | None = None,
    rank: int = 0,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch ``epoch``'s training batches in ``order`` (which starts at step ``first_step``
    after a mid-epoch resume), augmented as a fixed function of (seed, epoch, sample or step).
    ``batch_size``: a rank's share of the global batch in a data-parallel run (``rank``)."""
    batch = batch_size or config.batch_size
    if data.resident:
        order = order.to(device, non_blocking=True)
        stop = (len(order) // batch) * batch if drop_last else len(order)
        augment = data.padding or data.flip
        generator = torch.Generator(device=device) if augment else None
        for step, start in enumerate(range(0, stop, batch), start=first_step):
            index = order[start : start + batch]
            x = data.train_x[index]
            if augment:
                # Seeded per step, not drawn from the device's global stream (dropout's).
                # A rank other than 0 adds its rank: its crops are not rank 0's.
                extra = (rank,) if rank else ()
                generator.manual_seed(
                    _stream_seed(config.seed, _DEVICE_AUGMENT_STREAM, epoch, step, *extra)
                )
                x = augment_on_device(x, data.padding, data.flip, data.fill, generator)
            yield x, data.train_y[index]
        return

    loader = _loader(
        data,
        "train",
        lambda: _train_loader(data, config, device, loader_generator, drop_last, batch),
    )
    data.train_sampler.set_epoch(epoch, order.tolist())
    for x, y in loader:
        yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)


def _train_loader(
    data: _Data,
    config: TrainConfig,
    device: torch.device,
    loader_generator: torch.Generator,
    drop_last: bool,
    batch: int,
) -> torch.utils.data.DataLoader:
    """The run's one training DataLoader (the loader path); `_EpochSampler` sets each epoch's
    order. Workers, when there are any, persist across epochs; batches are pinned for CUDA.
    ``batch``: ``batch_size``, or a rank's share of it in a data-parallel run."""
    data.train_sampler = _EpochSampler()
    workers = loader_workers(config, device)
    return torch.utils.data.DataLoader(
        _SeededAugmentation(data.train_set, config.seed, seeded=data.random_augmentation),
        batch_size=batch,
        sampler=data.train_sampler,
        drop_last=drop_last,
        num_workers=workers,
        generator=loader_generator,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


def _eval_loader(
    dataset: Any, config: TrainConfig, device: torch.device, batch: int
) -> torch.utils.data.DataLoader:
    """A DataLoader over the test or validation set, built once per run like `_train_loader`."""
    workers = loader_workers(config, device)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        num_workers=workers,
        # Its own generator: evaluation must not consume the global RNG the training uses.
        generator=torch.Generator().manual_seed(config.seed),
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


def _test_batches(
    data: _Data, config: TrainConfig, device: torch.device, split: str = "test"
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of the test set, or with ``split="val"`` of the held-out validation set."""
    batch = min(1024, 2 * config.batch_size)
    validation = split == "val"
    if data.resident:
        xs, ys = (data.val_x, data.val_y) if validation else (data.test_x, data.test_y)
        for start in range(0, len(xs), batch):
            yield xs[start : start + batch], ys[start : start + batch]
        return

    dataset = data.val_set if validation else data.test_set
    for x, y in _loader(data, split, lambda: _eval_loader(dataset, config, device, batch)):
        yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# Model


def _jumpout_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from jumpout.layer import Jumpout

    return [(name, module) for name, module in model.named_modules() if isinstance(module, Jumpout)]


def _model_arguments(config: TrainConfig, info: Any) -> dict:
    """What builds the model of ``config`` on the data set ``info`` describes
    (`jumpout.models.model_arguments`; every checkpoint stores it for `load_model`)."""
    from jumpout.models import Regularizer, model_arguments

    kwargs = {}
    if config.architecture.startswith("cnn"):
        kwargs["batch_norm"] = config.batch_norm
    return model_arguments(
        config.architecture,
        info.num_classes,
        info.in_channels,
        Regularizer.from_config(config),
        image_size=info.image_size,
        **kwargs,
    )


def _build_model(config: TrainConfig, info: Any) -> nn.Module:
    from jumpout.models import create_model_from_arguments

    return create_model_from_arguments(_model_arguments(config, info))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Per-slot statistics: what each Jumpout layer records per step, and the Figure 3 probe

# The attributes a Jumpout layer sets on every training forward (0-dim device tensors), in the
# order of `_EpochProgress.layer_sums`' columns and of the epoch's ``layers`` fields.
_LAYER_STATS = ("last_active_fraction", "last_rate", "last_capped_fraction")

PROBE_SIZE = 256
"""Training images in the fixed batch on which each epoch measures the dropout slots' drift
(the paper's Figure 3, `_measure_drift`); 0 turns the measurement off."""
_PROBE_SEED = 0  # one probe batch for every run, row and seed of a data set: comparable drifts


def _probe_images(run: _Run) -> torch.Tensor:
    """The probe batch: `PROBE_SIZE` training images drawn with a fixed generator, without
    augmentation (on the device path the stored tensors are the plain images; on the loader path
    a view of the training set with the test pipeline). Deterministic, so a resumed run probes the
    same images."""
    data = run.data
    count = min(PROBE_SIZE, data.train_len)
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    index = torch.randperm(data.train_len, generator=generator)[:count].sort().values
    if data.resident:
        return data.train_x[index.to(data.train_x.device)]
    from jumpout.data import without_augmentation

    plain = without_augmentation(data.train_set, data.info)
    # Moved once: the probe is used twice an epoch.
    return torch.stack([torch.as_tensor(plain[i][0]) for i in index.tolist()]).to(run.device)


def _slot_moments(run: _Run, slots: list[nn.Module], images: torch.Tensor) -> torch.Tensor:
    """Per slot, the statistics of its output over the probe: (slots, 2) rows of (sum over
    channels of the channel means, sum over channels of the channel variances), float64 on the
    device. The channel is dimension 1 (a conv's channel or a dense layer's unit), each channel's
    statistics taken over the other dimensions: what a BN after the slot's next layer
    normalises."""
    sums: list[list[torch.Tensor] | None] = [None] * len(slots)

    def recorder(position: int):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            values = output.detach().double()
            dims = [d for d in range(values.dim()) if d != 1] if values.dim() > 1 else [0]
            moments = [values.sum(dims), values.square().sum(dims)]
            moments.append(values.numel() // moments[0].numel())  # the count, a Python int
            if sums[position] is None:
                sums[position] = moments
            else:
                sums[position] = [a + b for a, b in zip(sums[position], moments, strict=True)]

        return hook

    handles = [slot.register_forward_hook(recorder(i)) for i, slot in enumerate(slots)]
    try:
        chunk = max(1, min(run.config.batch_size, len(images)))
        for start in range(0, len(images), chunk):
            x = images[start : start + chunk].to(run.device, non_blocking=True)
            if run.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with run.autocast:
                run.model(x)
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for moments in sums:
        if moments is None:  # a slot the forward never reached
            rows.append(torch.full((2,), math.nan, dtype=torch.float64, device=run.device))
            continue
        total, square, count = moments
        mean = total / count
        variance = (square / count - mean.square()).clamp_(min=0)
        rows.append(torch.stack([mean.sum(), variance.sum()]))
    return torch.stack(rows)


@torch.no_grad()
def _measure_drift(run: _Run) -> list[tuple[float | None, float | None]] | None:
    """The paper's Figure 3, measured: per Jumpout slot, the mean and the variance of its output
    on the fixed probe batch with the slots in training mode, divided by the same in evaluation
    mode (mean over channels of the per-channel statistics, so a following BN's view).

    Everything but the slots stays in evaluation mode (batch norm uses and keeps its running
    statistics); the slots run in training mode all at once, so a slot's input carries the drift
    of the slots before it, as in training. No gradients; the global RNG states (CPU and the
    device's) and the slots' last statistics are restored, so training and resumes are unchanged.
    Returns None when there is nothing to measure.
    """
    if PROBE_SIZE <= 0 or not run.layers or run.data.train_len == 0:
        return None
    slots = [module for _, module in run.layers]
    saved_stats = [[getattr(slot, name) for name in _LAYER_STATS] for slot in slots]
    cpu_rng = torch.get_rng_state()
    device_rng = torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None
    was_training = run.model.training
    try:
        if run.probe is None:
            run.probe = _probe_images(run)
        run.model.eval()
        evaluation = _slot_moments(run, slots, run.probe)
        for slot in slots:
            slot.train()
        training = _slot_moments(run, slots, run.probe)
    finally:
        torch.set_rng_state(cpu_rng)
        if device_rng is not None:
            torch.cuda.set_rng_state(device_rng, run.device)
        for slot, values in zip(slots, saved_stats, strict=True):
            for name, value in zip(_LAYER_STATS, values, strict=True):
                setattr(slot, name, value)
        run.model.train(was_training)
    drifts = []
    training_rows, evaluation_rows = torch.stack((training, evaluation)).tolist()  # one sync
    for train_row, eval_row in zip(training_rows, evaluation_rows, strict=True):
        # Undefined where the slot's output is (nearly) all zero in evaluation mode.
        drifts.append(
            tuple(
                mine / theirs if math.isfinite(mine) and abs(theirs) > 1e-12 else None
                for mine, theirs in zip(train_row, eval_row, strict=True)
            )
        )
    return drifts


def _add_drift(metrics: dict, run: _Run) -> None:
    """Fill each ``layers`` entry's ``mean_drift`` and ``var_drift`` (`_measure_drift`)."""
    drifts = _measure_drift(run)
    if drifts is None:
        return
    for layer, (mean_drift, var_drift) in zip(metrics["layers"], drifts, strict=True):
        layer["mean_drift"], layer["var_drift"] = mean_drift, var_drift


# --------------------------------------------------------------------------------------------
# Callbacks and checkpointing


class _Callbacks:
    """The callbacks given to `fit`, called in order; any may lack any method."""

    def __init__(
        self, callbacks: Callback | Sequence[Any] | None, ranks: Ranks | None = None
    ) -> None:
        self.ranks = ranks  # a data-parallel run's: every stop poll is agreed among the ranks
        if callbacks is None:
            callbacks = ()
        elif not isinstance(callbacks, list | tuple):
            callbacks = (callbacks,)
        self.items = list(callbacks)

    def call(self, name: str, *args: Any) -> None:
        for callback in self.items:
            method = getattr(callback, name, None)
            if method is not None:
                method(*args)

    def should_stop(self) -> bool:
        # Every callback is polled, even after one said stop: a poll may do work of its own
        # (the worker's checks the database for a cancel request).
        stop = False
        for callback in self.items:
            method = getattr(callback, "should_stop", None)
            if method is not None and method():
                stop = True
        # Every rank polls at the same steps; a stop asked of any rank stops them all there.
        return stop if self.ranks is None else self.ranks.any(stop)


class _Checkpointer:
    """A run's checkpoint directory: writes each checkpoint atomically, then prunes the
    directory to the newest ``keep_last`` files (plus, with ``keep_best``, the best epoch's),
    reporting each file written and removed to the callbacks."""

    def __init__(
        self,
        out_dir: Path,
        keep_last: int,
        keep_best: bool,
        hooks: _Callbacks,
        ranks: Ranks | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.hooks = hooks
        # In a data-parallel run rank 0 alone writes; every rank waits for the file.
        self.ranks = ranks
        self.writes = ranks is None or ranks.rank == 0
        if not self.writes:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        for leftover in out_dir.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)  # a save interrupted by a kill

    def save(self, state: dict, is_best: bool) -> str:
        """Write ``state`` (see `_checkpoint_state`) under the name of its epoch and step, then
        prune; return the path written."""
        epoch = state["epoch"]
        path = self.out_dir / checkpoint_name(epoch, state["step"])
        if not self.writes:
            self.ranks.barrier()  # rank 0 has written and pruned
            return str(path)
        self.hooks.call("before_checkpoint", str(path), epoch)
        try:
            sha256, size = _atomic_save(state, path)
        except Exception as error:
            cause = _os_error(error)
            if cause is None:
                raise
            raise CheckpointWriteError(epoch, cause) from error
        self.hooks.call("on_checkpoint", str(path), epoch, sha256, size, is_best)
        self._prune(path, state["best_epoch"])
        if self.ranks is not None:
            self.ranks.barrier()
        return str(path)

    def _prune(self, newest: Path, best_epoch: int | None) -> None:
        files = list_checkpoints(self.out_dir)
        keep = set(files[-self.keep_last :])
        keep.add(newest)
        if self.keep_best and best_epoch is not None:
            # The best epoch's own file is exempt, so keep-best costs no copy.
            keep.add(self.out_dir / checkpoint_name(best_epoch))
        for path in files:
            if path not in keep:
                self.hooks.call("on_checkpoint_removed", str(path))
                path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Starting weights (init_from) and what a resume may change

RESUME_NEUTRAL_FIELDS = (
    "data_dir",
    "out_dir",
    "device",
    "num_workers",
    "keep_last",
    "keep_best",
    "compile",
)
"""The fields a resume may change: where the data and checkpoints are, what trains and with how
many loader processes (the result does not depend on it), what is kept, whether the model is
compiled. Every other field changes the trajectory or what the run reports (``epochs`` reshapes
a cosine schedule, ``test_size`` the test figures), so a checkpoint trained with another value
is refused. Bit-identical continuation is promised on the same device type only."""


def _check_resumable(recorded: dict, config: TrainConfig, checkpoint: str | os.PathLike) -> None:
    """Refuse a resume whose config differs from the checkpoint's outside
    `RESUME_NEUTRAL_FIELDS`; the error names every such field. A field the checkpoint does not
    record (written before the field existed) is not compared."""
    current = config.to_dict()
    differing = [
        name
        for name, value in current.items()
        if name not in RESUME_NEUTRAL_FIELDS and name in recorded and recorded[name] != value
    ]
    if differing:
        shown = ", ".join(
            f"{name}={recorded[name]!r} (asked: {current[name]!r})" for name in differing
        )
        raise ConfigError(
            differing[0],
            f"cannot resume from {Path(checkpoint).name}: it was trained with {shown}; these "
            "change the training, so a resume keeps the checkpoint's values (only "
            f"{', '.join(RESUME_NEUTRAL_FIELDS)} may differ); start afresh in another out_dir "
            "to change them",
        )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_init_from(
    config: TrainConfig, *, job_checkpoint: str | os.PathLike | None = None
) -> dict | None:
    """Where ``config.init_from``'s weights are, as the record a run keeps: ``{"source"`` (the
    field's value), ``"kind"`` (``"file"`` or ``"job"``), ``"path"`` (resolved), ``"sha256"}``;
    None without ``init_from``.

    A path is resolved against ``config.data_dir`` and must stay inside it once symlinks are
    resolved. ``job:<id>`` names a job of the training service, which resolves it to that job's
    newest valid checkpoint and passes the file as ``job_checkpoint``; the library alone cannot.

    Raises:
        ConfigError: (field ``init_from``) the file is missing, outside the data directory, or a
            job source came without its checkpoint.
    """
    source = config.init_from
    if source is None:
        return None
    if source.startswith("job:"):
        if job_checkpoint is None:
            raise ConfigError(
                "init_from",
                f"{source!r} names a job of the training service, which resolves it to that "
                "job's checkpoint; outside the service give a file path relative to data_dir",
            )
        kind, path = "job", Path(job_checkpoint).resolve()
    else:
        if not config.data_dir:
            raise ConfigError(
                "init_from", f"{source!r} is a path relative to data_dir, and data_dir is not set"
            )
        root = Path(config.data_dir).resolve()
        kind, path = "file", (root / source).resolve()
        if not path.is_relative_to(root):
            raise ConfigError(
                "init_from",
                f"{source!r} leads outside the data directory (through a symbolic link); "
                "accepted: a weights file inside data_dir",
            )
    if not path.is_file():
        where = "the data directory" if kind == "file" else "the job's checkpoints"
        raise ConfigError("init_from", f"{source!r}: no such weights file in {where}")
    return {"source": source, "kind": kind, "path": str(path), "sha256": _file_sha256(path)}


def _first_names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _load_initial_weights(model: nn.Module, source: dict) -> None:
    """Copy the weights `resolve_init_from`'s record ``source`` names into ``model``, after
    checking that the file is still the one hashed, that it loads with ``weights_only=True``
    (a state dict, or a checkpoint dict whose ``"model"`` is one) and that its keys and shapes
    are exactly the model's: a different classifier head, a prefix such as ``module.`` or any
    other difference is refused with the keys named, never silently half-loaded."""
    name = source["source"]
    raw = Path(source["path"]).read_bytes()
    if hashlib.sha256(raw).hexdigest() != source["sha256"]:
        raise ConfigError("init_from", f"{name!r} changed after it was resolved (sha256 differs)")
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same answer
        raise ConfigError(
            "init_from",
            f"{name!r} is not a weights file torch.load(weights_only=True) reads "
            f"({type(error).__name__}); accepted: a state dict, or a checkpoint with a 'model' "
            "state dict",
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise ConfigError(
            "init_from",
            f"{name!r} holds no state dict (names to tensors); accepted: a state dict, or a "
            "checkpoint with a 'model' state dict",
        )
    own = model.state_dict()
    mismatched = [
        f"{key} {tuple(state[key].shape)} (model: {tuple(value.shape)})"
        for key, value in own.items()
        if key in state and state[key].shape != value.shape
    ]
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    problems = []
    if mismatched:
        problems.append("shapes differ: " + _first_names(mismatched))
    if missing:
        problems.append("missing: " + _first_names(missing))
    if unexpected:
        problems.append("not in the model: " + _first_names(unexpected))
    if problems:
        raise ConfigError(
            "init_from",
            f"the weights in {name!r} do not fit this model ({'; '.join(problems)}); every key "
            "and shape must match",
        )
    model.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# The loop


def fit(
    config: TrainConfig,
    callbacks: Callback | Sequence[Any] = (),
    *,
    resume_from: str | os.PathLike | None = None,
    init_source: dict | None = None,
    checkpoint_every_s: float = 0.0,
) -> FitResult:
    """Train and evaluate the model ``config`` describes.

    Args:
        config: a resolved `TrainConfig` (see `jumpout.spec.resolve_config`).
        callbacks: a `Callback` or a sequence of objects with any of its methods.
        resume_from: a checkpoint written by an earlier `fit` of the same configuration (up to
            `RESUME_NEUTRAL_FIELDS`); training continues from it exactly, and ``init_from`` is
            not applied again (the checkpoint's weights win).
        init_source: ``config.init_from`` already resolved by `resolve_init_from` (the service
            resolves ``job:<id>`` sources so); by default `fit` resolves it.
        checkpoint_every_s: 0 (the default) checkpoints every epoch; otherwise an epoch is
            checkpointed only when this many seconds have passed since the last checkpoint (or
            the start), besides the last epoch and a stop, which always are. For sub-second
            epochs, where writing a checkpoint per epoch costs as much as the epoch; a crash then
            repeats at most this many seconds of epochs. ``keep_best`` keeps the best of the
            epochs checkpointed.

    Each epoch's metrics dict has the keys ``epoch, train_loss, train_accuracy, test_loss,
    test_accuracy, val_loss, val_accuracy, lr, seconds, images_per_second, layers``: accuracies
    are fractions (``val_*`` on the held-out ``val_fraction`` of the training set, None without
    one), ``lr`` is the learning rate of the epoch's last step, ``seconds`` its wall time
    (training, the test and validation passes and the drift probe; not checkpointing),
    ``images_per_second`` the training throughput, ``layers`` one
    ``{"name", "active_fraction", "rate", "capped_fraction", "mean_drift", "var_drift"}`` per
    Jumpout layer: the first three means over the epoch's steps (``capped_fraction``: the fraction
    of training calls, or of samples with ``per_sample``, whose rate reached ``max_rate``), the
    drifts measured after the epoch on a fixed probe batch (`_measure_drift`; None when
    undefined or with `PROBE_SIZE` 0).

    Raises:
        NonFiniteLossError: the training loss became NaN or infinite.
        ConfigError: the device asked for is not available, the checkpoint was trained with
            another configuration, or the ``init_from`` weights are missing or do not fit.
        jumpout.data.DatasetNotFoundError: the dataset files are missing.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    # devices > 1: this process is one rank of a launched run (`jumpout.distributed`).
    ranks = join_process_group(config, resolve_device(config.device))
    try:
        return _fit(
            config,
            _Callbacks(callbacks, ranks),
            ranks,
            resume_from=resume_from,
            init_source=init_source,
            checkpoint_every_s=checkpoint_every_s,
        )
    finally:
        if ranks is not None:
            ranks.leave()


def _fit(
    config: TrainConfig,
    hooks: _Callbacks,
    ranks: Ranks | None,
    *,
    resume_from: str | os.PathLike | None,
    init_source: dict | None,
    checkpoint_every_s: float,
) -> FitResult:
    """`fit`'s run in this process: all of it, or with ``ranks`` this rank's part."""
    device = resolve_device(config.device) if ranks is None else ranks.device
    _check_precision(config.precision, device)
    checkpointer = None
    if config.out_dir:
        checkpointer = _Checkpointer(
            Path(config.out_dir), config.keep_last, config.keep_best, hooks, ranks
        )
    if resume_from is None and config.init_from is not None:
        # Before the data loads: a missing or misplaced file fails at once.
        if init_source is None:
            init_source = resolve_init_from(config)
        elif init_source.get("source") != config.init_from:
            raise ValueError(
                f"init_source describes {init_source.get('source')!r}, not config.init_from "
                f"{config.init_from!r}"
            )
    run = _start_run(config, device, ranks)
    result = FitResult(config=config, model=run.model)
    epochs_done, steps_done, partial = 0, 0, None
    if resume_from is not None:
        epochs_done, steps_done, partial = _restore(run, result, resume_from)
    elif config.init_from is not None:
        _load_initial_weights(run.model, init_source)
        result.init_source = init_source
    result.environment = environment(config, device=device, init_source=result.init_source)

    last_saved = time.monotonic()
    for epoch in range(epochs_done + 1, config.epochs + 1):
        progress = _train_epoch(run, hooks, epoch, steps_done, partial)
        steps_done, partial = 0, None  # only the first epoch after a resume starts part-way
        if progress.stopped:
            if checkpointer is not None:
                state = _checkpoint_state(run, result, epoch - 1, interrupted=progress)
                result.last_checkpoint = checkpointer.save(state, is_best=False)
            result.stopped = True
            return result

        test_loss, test_accuracy = _evaluate(
            run.eval_model, run.data, config, device, run.autocast, ranks=ranks
        )
        metrics = progress.metrics(test_loss, test_accuracy, run.layers)
        metrics["val_loss"] = metrics["val_accuracy"] = None
        if run.data.split is not None:
            metrics["val_loss"], metrics["val_accuracy"] = _evaluate(
                run.eval_model, run.data, config, device, run.autocast, split="val", ranks=ranks
            )
        _add_drift(metrics, run)
        # The epoch's wall time covers all of its measurements: training, the test and
        # validation passes and the Figure-3 probe (what an epoch of this spec costs).
        metrics["seconds"] = progress.elapsed()
        is_best = _record_epoch(result, metrics)
        hooks.call("on_epoch_end", metrics)
        stop = epoch < config.epochs and hooks.should_stop()
        due = time.monotonic() - last_saved >= checkpoint_every_s or epoch == config.epochs
        # A new validation-best epoch is always written when it is to be kept: otherwise the
        # interval could skip the very checkpoint `keep_best` promises.
        keep = is_best and checkpointer is not None and checkpointer.keep_best
        if checkpointer is not None and (due or stop or keep):
            state = _checkpoint_state(run, result, epoch)
            result.last_checkpoint = checkpointer.save(state, is_best)
            last_saved = time.monotonic()
        if stop:
            result.stopped = True
            return result
    return result


@dataclass
class _Run:
    """What one `fit` trains with: built once by `_start_run`, shared by the steps below."""

    config: TrainConfig
    device: torch.device
    data: _Data
    model: nn.Module
    model_args: dict  # what built ``model`` (`_model_arguments`), stored in every checkpoint
    step_model: nn.Module  # the compiled model with ``config.compile``, else ``model``
    layers: list[tuple[str, nn.Module]]  # the Jumpout layers, whose statistics are reported
    optimizer: torch.optim.Optimizer
    schedule: _Schedule
    sampler_generator: torch.Generator  # draws each epoch's sample order
    loader_generator: torch.Generator  # the DataLoader's (seeds its workers)
    steps: int  # per epoch
    drop_last: bool
    channels_last: bool
    autocast: torch.autocast  # per ``config.precision`` (`_autocast`); disabled for fp32
    scaler: torch.amp.GradScaler  # fp16's loss scaler; disabled (a pass-through) otherwise
    probe: torch.Tensor | None = None  # the fixed images of `_measure_drift`, taken on first use
    ranks: Ranks | None = None  # this rank's place in a data-parallel run; None for one device

    @property
    def eval_model(self) -> nn.Module:
        """What evaluates. In a data-parallel run the bare model: DDP's forward broadcasts the
        buffers, a collective that ranks with test shards of unequal sizes would wait on."""
        return self.step_model if self.ranks is None else self.model


def _start_run(config: TrainConfig, device: torch.device, ranks: Ranks | None = None) -> _Run:
    """Seed every RNG, then load the data and build the model, optimiser and schedule.

    The order matters for exact resumes and seeded reproducibility: the model's initial
    weights and (on the CPU path) the first augmented sample come from the seeded global RNG.
    """
    use_cuda = device.type == "cuda"
    _seed_everything(config.seed)
    sampler_generator = torch.Generator().manual_seed(config.seed)
    loader_generator = torch.Generator().manual_seed(config.seed + 1)
    data = _load_data(config, device)
    model_args = _model_arguments(config, data.info)
    model = _build_model(config, data.info).to(device)
    image_model = data.train_x.ndim == 4 if data.resident else data.train_set[0][0].ndim == 3
    channels_last = use_cuda and image_model
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if use_cuda:
        torch.backends.cudnn.benchmark = True
    step_model = model
    if ranks is not None:
        step_model = ranks.data_parallel(model)
        # The weights came from the run's seed on every rank; from here each rank draws its
        # dropout and Jumpout randomness from its own stream: each rank's batch is a batch.
        torch.manual_seed(_stream_seed(config.seed, _RANK_STREAM, ranks.rank))
        _shard_evaluation(data, ranks)
    if config.compile:
        step_model = torch.compile(step_model)
    layers = _jumpout_layers(model)

    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    drop_last = data.train_len >= config.batch_size
    if ranks is not None and not drop_last:
        raise ConfigError(
            "batch_size",
            f"a data-parallel run needs at least one whole global batch: the training set has "
            f"{data.train_len} samples, batch_size is {config.batch_size}",
        )
    steps = data.train_len // config.batch_size if drop_last else 1
    schedule = _Schedule(config, optimizer, steps)
    schedule.apply()
    return _Run(
        config=config,
        device=device,
        data=data,
        model=model,
        model_args=model_args,
        step_model=step_model,
        layers=layers,
        optimizer=optimizer,
        schedule=schedule,
        sampler_generator=sampler_generator,
        loader_generator=loader_generator,
        steps=steps,
        drop_last=drop_last,
        channels_last=channels_last,
        autocast=_autocast(config.precision, device),
        scaler=torch.amp.GradScaler(device.type, enabled=config.precision == "fp16"),
        ranks=ranks,
    )


def _shard_evaluation(data: _Data, ranks: Ranks) -> None:
    """Give this rank every ``world``-th sample of the test and validation sets; `_evaluate`
    adds the ranks' sums, so the figures are the whole sets'."""
    from torch.utils.data import Subset

    mine = slice(ranks.rank, None, ranks.world)
    if data.resident:
        data.test_x, data.test_y = data.test_x[mine], data.test_y[mine]
        if data.val_x is not None:
            data.val_x, data.val_y = data.val_x[mine], data.val_y[mine]
        return
    data.test_set = Subset(data.test_set, list(ranks.shard_indices(len(data.test_set))))
    if data.val_set is not None:
        data.val_set = Subset(data.val_set, list(ranks.shard_indices(len(data.val_set))))


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Where fp16 runs (a seam: the CPU tests of the loss-scaler path add "cpu").
_FP16_DEVICE_TYPES = ("cuda",)


def _check_precision(precision: str, device: torch.device) -> None:
    """Refuse fp16 where it has no fast kernels (``device=auto`` that found no GPU)."""
    if precision == "fp16" and device.type not in _FP16_DEVICE_TYPES:
        raise ConfigError("precision", FP16_NEEDS_CUDA)


def _autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context of ``precision`` on ``device``: fp32 runs without one (the paper's
    arithmetic); bf16 and fp16 autocast on the CPU as on CUDA (docs/fidelity.md, "Precision")."""
    dtype = _AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _restore(
    run: _Run, result: FitResult, checkpoint: str | os.PathLike
) -> tuple[int, int, dict | None]:
    """Load ``checkpoint`` into ``run`` and ``result``.

    Returns (epochs finished, steps finished of the next epoch, that epoch's running sums
    ``partial`` or None).
    """
    state = load_checkpoint(checkpoint, map_location="cpu")
    _check_resumable(state.get("config", {}), run.config, checkpoint)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["scheduler"])
    if run.scaler.is_enabled() and "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    # After the model is built, so that its initialisation does not disturb the restored RNG.
    rng = state["rng"]
    if run.ranks is not None and "rng_ranks" in state:
        rng = state["rng_ranks"][run.ranks.rank]  # each rank continues its own streams
    _restore_rng(rng, run.sampler_generator, run.loader_generator)
    epochs_done = int(state["epoch"])
    result.history = list(state.get("metrics", []))
    result.epochs_completed = epochs_done
    if result.history:
        result.final_accuracy = result.history[-1]["test_accuracy"]
    if "best_val_accuracy" in state:
        # An older checkpoint's best_epoch was chosen on the test set: it is not carried over.
        result.best_val_accuracy = state["best_val_accuracy"]
        result.best_epoch = state.get("best_epoch")
        result.test_accuracy_at_best = state.get("test_accuracy_at_best")
    result.init_source = state.get("init")
    partial = state.get("partial")
    if partial is not None and run.ranks is not None:
        partial = run.ranks.local_partial(partial)
    return epochs_done, int(state.get("step", 0)), partial


@dataclass
class _EpochProgress:
    """One training epoch as it runs: its running sums, kept on the device so that the inner
    loop never waits for the host, and what a checkpoint in its middle must save."""

    epoch: int  # 1-based
    started: float  # time.perf_counter() at its start
    # The generators' states at the epoch's start: a mid-epoch checkpoint saves these, so that
    # a resume redraws the same sample order and skips the steps already done.
    sampler_state: torch.Tensor
    loader_state: torch.Tensor
    loss_sum: torch.Tensor
    correct: torch.Tensor
    layer_sums: torch.Tensor  # (layers, 3): active fraction, rate, capped fraction; summed
    first_bad_step: torch.Tensor  # the first step with a non-finite loss; -1 while none
    step: int = 0
    seen: int = 0
    last_lr: float = 0.0
    train_seconds: float = 0.0
    seconds_before_resume: float = 0.0  # wall time of this epoch spent before a resume
    stopped: bool = False

    @classmethod
    def begin(cls, epoch: int, run: _Run) -> _EpochProgress:
        device = run.device
        return cls(
            epoch=epoch,
            started=time.perf_counter(),
            sampler_state=run.sampler_generator.get_state(),
            loader_state=run.loader_generator.get_state(),
            loss_sum=torch.zeros((), device=device),
            correct=torch.zeros((), dtype=torch.long, device=device),
            layer_sums=torch.zeros(len(run.layers), len(_LAYER_STATS), device=device),
            first_bad_step=torch.full((), -1, dtype=torch.long, device=device),
        )

    def add_partial(self, partial: dict, steps_done: int) -> None:
        """Continue from a mid-epoch checkpoint's ``partial`` after ``steps_done`` steps."""
        device = self.loss_sum.device
        self.step = steps_done
        self.loss_sum += partial["loss_sum"].to(device)
        self.correct += partial["correct"].to(device)
        saved = partial["layer_sums"].to(device)
        # A checkpoint from before capped_fraction holds two columns; the third starts at 0.
        self.layer_sums[:, : saved.shape[1]] += saved
        self.seen = int(partial["seen"])
        self.train_seconds = float(partial["train_seconds"])
        self.seconds_before_resume = float(partial["seconds"])

    def partial(self) -> dict:
        """The running sums as a mid-epoch checkpoint's ``partial`` (on the CPU)."""
        return {
            "loss_sum": self.loss_sum.cpu(),
            "correct": self.correct.cpu(),
            "layer_sums": self.layer_sums.cpu(),
            "seen": self.seen,
            "train_seconds": self.train_seconds,
            "seconds": self.elapsed(),
        }

    def add_step(
        self,
        loss: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        lr: float,
        layers: list[tuple[str, nn.Module]],
    ) -> None:
        """Count one finished step, on the device only."""
        self.step += 1
        self.last_lr = lr
        detached = loss.detach().float()
        self.first_bad_step = torch.where(
            (self.first_bad_step < 0) & ~torch.isfinite(detached), self.step, self.first_bad_step
        )
        self.loss_sum += detached * labels.shape[0]
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.seen += labels.shape[0]
        if layers:
            stats = [
                value
                for _, module in layers
                for value in (getattr(module, name) for name in _LAYER_STATS)
                if value is not None
            ]
            if len(stats) == len(_LAYER_STATS) * len(layers):
                # The layers keep 0-d float32 batch means: one stack and one add per step.
                self.layer_sums += torch.stack(stats).view(len(layers), len(_LAYER_STATS))

    def running_loss(self) -> float:
        """The epoch's mean training loss so far: one host read, which also raises
        `NonFiniteLossError` if any step's loss so far was not finite."""
        running, bad = torch.stack(
            [self.loss_sum / self.seen, self.first_bad_step.float()]
        ).tolist()
        if bad >= 0:
            raise NonFiniteLossError(self.epoch, int(bad))
        return running

    def raise_if_non_finite(self) -> None:
        bad = int(self.first_bad_step.item())
        if bad >= 0:
            raise NonFiniteLossError(self.epoch, bad)

    def elapsed(self) -> float:
        """Wall time of this epoch so far, including the part before a resume."""
        return time.perf_counter() - self.started + self.seconds_before_resume

    def metrics(
        self, test_loss: float, test_accuracy: float, layers: list[tuple[str, nn.Module]]
    ) -> dict:
        """The finished epoch's metrics dict (keys: see `fit`)."""
        layer_means = (self.layer_sums / max(1, self.step)).tolist()
        return {
            "epoch": self.epoch,
            "train_loss": (self.loss_sum / max(1, self.seen)).item(),
            "train_accuracy": self.correct.item() / max(1, self.seen),
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "lr": self.last_lr,
            "seconds": self.elapsed(),
            "images_per_second": self.seen / self.train_seconds if self.train_seconds > 0 else 0.0,
            "layers": [
                {
                    "name": name,
                    "active_fraction": fraction,
                    "rate": rate,
                    "capped_fraction": capped,
                    "mean_drift": None,  # filled by `_measure_drift`
                    "var_drift": None,
                }
                for (name, _), (fraction, rate, capped) in zip(layers, layer_means, strict=True)
            ],
        }


def _train_epoch(
    run: _Run, hooks: _Callbacks, epoch: int, steps_done: int = 0, partial: dict | None = None
) -> _EpochProgress:
    """Train epoch ``epoch`` (after a mid-epoch resume: the rest of it, from ``steps_done``
    steps and their running sums ``partial``), reporting each step and polling for a stop.

    Returns the epoch's progress; ``stopped`` says a callback ended it early.
    """
    config = run.config
    progress = _EpochProgress.begin(epoch, run)
    order = torch.randperm(run.data.train_len, generator=run.sampler_generator)
    if partial is not None and steps_done:
        order = order[steps_done * config.batch_size :]
        progress.add_partial(partial, steps_done)
    batch, rank = config.batch_size, 0
    if run.ranks is not None:  # this rank's slice of each global batch
        order = run.ranks.shard(order, config.batch_size)
        batch, rank = config.batch_size // run.ranks.world, run.ranks.rank

    run.model.train()
    train_started = time.perf_counter()
    progress.last_lr = run.optimizer.param_groups[0]["lr"]
    batches = _train_batches(
        run.data, config, run.device, order, run.loader_generator, run.drop_last, epoch,
        first_step=progress.step, batch_size=batch, rank=rank,
    )  # fmt: skip
    for x, y in batches:
        loss, logits, lr = _train_step(run, x, y)
        progress.add_step(loss, logits, y, lr, run.layers)
        step = progress.step
        report = None
        if step % PROGRESS_EVERY == 0 or step == run.steps:
            report = progress.running_loss()
        hooks.call("on_step", epoch, step, run.steps, report)
        if step % STOP_POLL_EVERY == 0 and step < run.steps and hooks.should_stop():
            progress.stopped = True
            break

    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    progress.train_seconds += time.perf_counter() - train_started
    progress.raise_if_non_finite()
    if run.ranks is not None:
        run.ranks.combine(progress)  # the epoch's sums over every rank's batches
    return progress


def _train_step(
    run: _Run, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimiser step on a batch; returns its loss, its logits and the learning rate used."""
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with run.autocast:
        logits = run.step_model(x)
        loss = F.cross_entropy(logits, y)
    run.optimizer.zero_grad(set_to_none=True)
    # Without fp16 the scaler is a pass-through. With it, `step` reads one found-inf flag per
    # step (a host sync) and skips a step whose gradients overflowed.
    run.scaler.scale(loss).backward()
    lr = run.optimizer.param_groups[0]["lr"]
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.schedule.step()
    return loss, logits, lr


def _record_epoch(result: FitResult, metrics: dict) -> bool:
    """Add a finished epoch's metrics to ``result``; return whether it is the best so far on
    validation (never without a validation split: the test set chooses nothing). A tie keeps
    the earlier epoch, as the store does."""
    epoch, test_accuracy = metrics["epoch"], metrics["test_accuracy"]
    result.history.append(metrics)
    result.epochs_completed = epoch
    result.final_accuracy = test_accuracy
    val_accuracy = metrics.get("val_accuracy")
    if val_accuracy is None:
        return False
    is_best = result.best_epoch is None or val_accuracy > result.best_val_accuracy
    if is_best:
        result.best_val_accuracy, result.best_epoch = val_accuracy, epoch
        result.test_accuracy_at_best = test_accuracy
    return is_best


def _checkpoint_state(
    run: _Run, result: FitResult, epochs_done: int, interrupted: _EpochProgress | None = None
) -> dict:
    """What a checkpoint holds after ``epochs_done`` epochs, plus the steps ``interrupted``
    finished of the next one."""
    rng = _capture_rng(run.sampler_generator, run.loader_generator)
    if interrupted is not None:
        # Mid-epoch: the sample order must be redrawn from the epoch's start.
        rng["sampler"] = interrupted.sampler_state
        rng["loader"] = interrupted.loader_state
    # A data-parallel run's ranks each draw from their own streams: the checkpoint keeps all.
    rng_ranks = run.ranks.gather(rng) if run.ranks is not None else None
    state = {
        "model": run.model.state_dict(),
        MODEL_ARGS_KEY: run.model_args,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.schedule.state_dict(),
        "rng": rng,
        "epoch": epochs_done,
        "step": interrupted.step if interrupted is not None else 0,
        "partial": interrupted.partial() if interrupted is not None else None,
        "config": run.config.to_dict(),
        "metrics": result.history,
        "final_accuracy": result.final_accuracy,
        "best_val_accuracy": result.best_val_accuracy,
        "best_epoch": result.best_epoch,
        "test_accuracy_at_best": result.test_accuracy_at_best,
        "init": result.init_source,
        "environment": result.environment,
    }
    if run.scaler.is_enabled():
        state["scaler"] = run.scaler.state_dict()
    if rng_ranks is not None:
        state["rng_ranks"] = rng_ranks
    return _on_cpu(state)


def _on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (dicts, lists and tuples walked) on the CPU: a
    checkpoint of a CUDA run loads anywhere without ``map_location``, and ``torch.save`` does
    not keep the GPU's copies alive. CPU tensors are returned as they are (no copy)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_on_cpu(item) for item in value]
    if isinstance(value, tuple):
        items = [_on_cpu(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    data: _Data,
    config: TrainConfig,
    device: torch.device,
    autocast: torch.autocast,
    split: str = "test",
    ranks: Ranks | None = None,
) -> tuple[float, float]:
    """(mean loss, accuracy) on the test set, or with ``split="val"`` the validation set. With
    ``ranks``: on this rank's shard (`_shard_evaluation`), the sums added over the ranks."""
    if ranks is not None:
        ranks.sync_buffers(model)  # rank 0's batch-norm statistics, as the checkpoint's
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    channels_last = device.type == "cuda"
    for x, y in _test_batches(data, config, device, split):
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        count += y.shape[0]
    model.train()
    totals = torch.stack([loss_sum.double(), correct.double()])
    if ranks is not None:
        totals = ranks.sum(torch.cat([totals, totals.new_tensor([count])]))
        count = int(totals[2].item())
    if count == 0:
        return 0.0, 0.0
    loss, hits = totals[:2].tolist()
    return loss / count, hits / count
