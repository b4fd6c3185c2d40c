"""The training engine: one `fit(config)` that the command line and the service both run.

`fit` trains the model a `TrainConfig` describes with its recipe's optimiser and schedule,
evaluates after every epoch, reports through callbacks (epoch metrics, checkpoints written and
pruned, progress) and polls a cooperative stop request every few steps.

Design choices worth knowing:

* Nothing in the inner loop waits for the device. Training loss, accuracy and each Jumpout layer's
  active fraction and rate are summed into device tensors; the host reads them once per epoch and
  every `PROGRESS_EVERY` steps (to report progress and to check for a non-finite loss, whose first
  step is recorded on the device by a flag tensor).
* Checkpoints (`checkpoint-epochEEEE.pt` after epoch E) hold model, optimiser, schedule, every RNG
  state (python, numpy, torch CPU and CUDA, the sampler's and the loader's generators), the
  metrics history and the best accuracy. They are written atomically (temp file in the same
  directory, fsync, ``os.replace``, directory fsync) and load with ``weights_only=True``.
  A cooperative stop in the middle of epoch E+1 writes ``checkpoint-epochEEEE-stepSSSSSS.pt``
  (E epochs plus S steps done), from which a resume continues at the same step.
* keep-last-N prunes older checkpoint files; with ``keep_best`` the file of the epoch with the best
  test accuracy is kept as well (no copy is made: the best epoch's own file is exempt from pruning).
* Resuming continues exactly: on the CPU an interrupted-then-resumed run ends with bit-identical
  weights to an uninterrupted one (each epoch's sample order comes from the saved sampler
  generator, and the RNG states are restored after the model is built).
* On CUDA: bf16 autocast, channels_last for image models, pinned memory and non-blocking copies,
  optional ``torch.compile``; datasets small enough (digits, synthetic, CIFAR-, SVHN-,
  Fashion-sized) are kept on the GPU as tensors and augmented there in batches, with the
  policy `jumpout.data` declares for the CPU pipeline (``DatasetInfo.augmentation``).

`fit` reads as its steps: `_start_run` (seed, data, model, optimiser), `_restore` (from a
checkpoint), then per epoch `_train_epoch`, `_evaluate`, `_record_epoch` and a `_Checkpointer`
save of `_checkpoint_state`.
"""

from __future__ import annotations

import contextlib
import hashlib
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

from jumpout.spec import ConfigError, TrainConfig

__all__ = [
    "CHECKPOINT_PATTERN",
    "Callback",
    "FitResult",
    "NonFiniteLossError",
    "PROGRESS_EVERY",
    "STOP_POLL_EVERY",
    "augment_on_device",
    "checkpoint_name",
    "find_resumable_checkpoint",
    "fit",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_device",
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


class Callback:
    """Receives the engine's reports. Subclass and override what you need; all are no-ops."""

    def on_epoch_end(self, metrics: dict) -> None:
        """One dict per finished epoch (keys: see `fit`)."""

    def on_checkpoint(
        self, path: str, epoch: int, sha256: str, size_bytes: int, is_best: bool
    ) -> None:
        """A checkpoint file was written (atomically) at ``path``."""

    def on_checkpoint_removed(self, path: str) -> None:
        """keep-last-N pruned the checkpoint file at ``path``."""

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
        best_accuracy: best test accuracy over the epochs (fraction), 0.0 if none finished.
        best_epoch: the epoch that reached it, or None.
        final_accuracy: the last finished epoch's test accuracy, or None.
        epochs_completed: number of finished epochs.
        stopped: True if a callback's `should_stop` ended the run early.
        last_checkpoint: path of the last checkpoint written, or None.
        model: the trained model (on the training device).
    """

    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    best_accuracy: float = 0.0
    best_epoch: int | None = None
    final_accuracy: float | None = None
    epochs_completed: int = 0
    stopped: bool = False
    last_checkpoint: str | None = None
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

    @property
    def train_len(self) -> int:
        return len(self.train_x) if self.resident else len(self.train_set)


def _keep_data_on_device(device: torch.device) -> bool:
    """Whether small datasets live on ``device`` as tensors (a seam for CPU tests of that path)."""
    return device.type == "cuda"


def _load_data(config: TrainConfig, device: torch.device) -> _Data:
    from jumpout.data import dataset_info, load_dataset

    policy = dataset_info(config.dataset).augmentation
    resident = _keep_data_on_device(device) and policy.batchable
    train_set, test_set, info = load_dataset(
        config.dataset,
        config.data_dir or ".",
        download=False,
        # On the device path the augmentation runs on the GPU, so load plain tensors.
        augment=config.augment and not resident,
        train_size=config.train_size,
        test_size=config.test_size,
    )
    data = _Data(train_set, test_set, info)
    if resident:
        sample = train_set[0][0]
        size = (len(train_set) + len(test_set)) * sample.numel() * 4
        if size <= _DEVICE_RESIDENT_MAX_BYTES:
            data.resident = True
            train_x, train_y = _stack_dataset(train_set, config.num_workers)
            test_x, test_y = _stack_dataset(test_set, config.num_workers)
            data.train_x, data.train_y = train_x.to(device), train_y.to(device)
            data.test_x, data.test_y = test_x.to(device), test_y.to(device)
            if config.augment:
                data.padding, data.flip = policy.crop_padding, policy.flip
            mean = torch.as_tensor(info.mean, dtype=torch.float32).flatten()
            std = torch.as_tensor(info.std, dtype=torch.float32).flatten()
            data.fill = (-mean / std).expand(train_x.shape[1]).to(device)
    return data


def _train_batches(
    data: _Data,
    config: TrainConfig,
    device: torch.device,
    order: torch.Tensor,
    loader_generator: torch.Generator,
    drop_last: bool,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    batch = config.batch_size
    if data.resident:
        order = order.to(device, non_blocking=True)
        stop = (len(order) // batch) * batch if drop_last else len(order)
        for start in range(0, stop, batch):
            index = order[start : start + batch]
            x = data.train_x[index]
            if data.padding or data.flip:
                x = augment_on_device(x, data.padding, data.flip, data.fill)
            yield x, data.train_y[index]
        return
    loader = torch.utils.data.DataLoader(
        data.train_set,
        batch_size=batch,
        sampler=order.tolist(),
        drop_last=drop_last,
        num_workers=config.num_workers,
        generator=loader_generator,
        pin_memory=device.type == "cuda",
    )
    for x, y in loader:
        yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)


def _test_batches(
    data: _Data, config: TrainConfig, device: torch.device
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    batch = min(1024, 2 * config.batch_size)
    if data.resident:
        for start in range(0, len(data.test_x), batch):
            yield data.test_x[start : start + batch], data.test_y[start : start + batch]
        return
    loader = torch.utils.data.DataLoader(
        data.test_set,
        batch_size=batch,
        num_workers=config.num_workers,
        # Its own generator: evaluation must not consume the global RNG the training uses.
        generator=torch.Generator().manual_seed(config.seed),
        pin_memory=device.type == "cuda",
    )
    for x, y in loader:
        yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# Model


def _jumpout_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from jumpout.layer import Jumpout

    return [(name, module) for name, module in model.named_modules() if isinstance(module, Jumpout)]


def _build_model(config: TrainConfig, info: Any) -> nn.Module:
    from jumpout.models import Regularizer, create_model

    kwargs = {}
    if config.architecture.startswith("cnn"):
        kwargs["batch_norm"] = config.batch_norm
    return create_model(
        config.architecture,
        info.num_classes,
        info.in_channels,
        Regularizer.from_config(config),
        image_size=info.image_size,
        **kwargs,
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Callbacks and checkpointing


class _Callbacks:
    """The callbacks given to `fit`, called in order; any may lack any method."""

    def __init__(self, callbacks: Callback | Sequence[Any] | None) -> None:
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
        return stop


class _Checkpointer:
    """A run's checkpoint directory: writes each checkpoint atomically, then prunes the
    directory to the newest ``keep_last`` files (plus, with ``keep_best``, the best epoch's),
    reporting each file written and removed to the callbacks."""

    def __init__(self, out_dir: Path, keep_last: int, keep_best: bool, hooks: _Callbacks) -> None:
        self.out_dir = out_dir
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.hooks = hooks
        out_dir.mkdir(parents=True, exist_ok=True)
        for leftover in out_dir.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)  # a save interrupted by a kill

    def save(self, state: dict, is_best: bool) -> str:
        """Write ``state`` (see `_checkpoint_state`) under the name of its epoch and step, then
        prune; return the path written."""
        epoch = state["epoch"]
        path = self.out_dir / checkpoint_name(epoch, state["step"])
        sha256, size = _atomic_save(state, path)
        self.hooks.call("on_checkpoint", str(path), epoch, sha256, size, is_best)
        self._prune(path, state["best_epoch"])
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
                path.unlink(missing_ok=True)
                self.hooks.call("on_checkpoint_removed", str(path))


# --------------------------------------------------------------------------------------------
# The loop


def fit(
    config: TrainConfig,
    callbacks: Callback | Sequence[Any] = (),
    *,
    resume_from: str | os.PathLike | None = None,
) -> FitResult:
    """Train and evaluate the model ``config`` describes.

    Args:
        config: a resolved `TrainConfig` (see `jumpout.spec.resolve_config`).
        callbacks: a `Callback` or a sequence of objects with any of its methods.
        resume_from: a checkpoint written by an earlier `fit` of the same dataset, architecture
            and method; training continues from it exactly.

    Each epoch's metrics dict has the keys ``epoch, train_loss, train_accuracy, test_loss,
    test_accuracy, lr, seconds, images_per_second, layers``: accuracies are fractions, ``lr`` is
    the learning rate of the epoch's last step, ``seconds`` its wall time (training and
    evaluation), ``images_per_second`` the training throughput, ``layers`` one
    ``{"name", "active_fraction", "rate"}`` per Jumpout layer (means over the epoch's steps).

    Raises:
        NonFiniteLossError: the training loss became NaN or infinite.
        ConfigError: the device asked for is not available, or the checkpoint does not match.
        jumpout.data.DatasetNotFoundError: the dataset files are missing.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    hooks = _Callbacks(callbacks)
    device = resolve_device(config.device)
    checkpointer = None
    if config.out_dir:
        checkpointer = _Checkpointer(
            Path(config.out_dir), config.keep_last, config.keep_best, hooks
        )
    run = _start_run(config, device)
    result = FitResult(config=config, model=run.model)
    epochs_done, steps_done, partial = 0, 0, None
    if resume_from is not None:
        epochs_done, steps_done, partial = _restore(run, result, resume_from)

    for epoch in range(epochs_done + 1, config.epochs + 1):
        progress = _train_epoch(run, hooks, epoch, steps_done, partial)
        steps_done, partial = 0, None  # only the first epoch after a resume starts part-way
        if progress.stopped:
            if checkpointer is not None:
                state = _checkpoint_state(run, result, epoch - 1, interrupted=progress)
                result.last_checkpoint = checkpointer.save(state, is_best=False)
            result.stopped = True
            return result

        test_loss, test_accuracy = _evaluate(run.step_model, run.data, config, device, run.autocast)
        metrics = progress.metrics(test_loss, test_accuracy, run.layers)
        is_best = _record_epoch(result, metrics)
        hooks.call("on_epoch_end", metrics)
        if checkpointer is not None:
            state = _checkpoint_state(run, result, epoch)
            result.last_checkpoint = checkpointer.save(state, is_best)
        if epoch < config.epochs and hooks.should_stop():
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
    step_model: nn.Module  # the compiled model with ``config.compile``, else ``model``
    layers: list[tuple[str, nn.Module]]  # the Jumpout layers, whose statistics are reported
    optimizer: torch.optim.Optimizer
    schedule: _Schedule
    sampler_generator: torch.Generator  # draws each epoch's sample order
    loader_generator: torch.Generator  # the DataLoader's (seeds its workers)
    steps: int  # per epoch
    drop_last: bool
    channels_last: bool
    autocast: torch.autocast


def _start_run(config: TrainConfig, device: torch.device) -> _Run:
    """Seed every RNG, then load the data and build the model, optimiser and schedule.

    The order matters for exact resumes and seeded reproducibility: the model's initial
    weights and (on the CPU path) the first augmented sample come from the seeded global RNG.
    """
    use_cuda = device.type == "cuda"
    _seed_everything(config.seed)
    sampler_generator = torch.Generator().manual_seed(config.seed)
    loader_generator = torch.Generator().manual_seed(config.seed + 1)
    data = _load_data(config, device)
    model = _build_model(config, data.info).to(device)
    image_model = data.train_x.ndim == 4 if data.resident else data.train_set[0][0].ndim == 3
    channels_last = use_cuda and image_model
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if use_cuda:
        torch.backends.cudnn.benchmark = True
    step_model = torch.compile(model) if config.compile else model
    layers = _jumpout_layers(model)

    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    drop_last = data.train_len >= config.batch_size
    steps = data.train_len // config.batch_size if drop_last else 1
    schedule = _Schedule(config, optimizer, steps)
    schedule.apply()
    return _Run(
        config=config,
        device=device,
        data=data,
        model=model,
        step_model=step_model,
        layers=layers,
        optimizer=optimizer,
        schedule=schedule,
        sampler_generator=sampler_generator,
        loader_generator=loader_generator,
        steps=steps,
        drop_last=drop_last,
        channels_last=channels_last,
        autocast=torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda),
    )


def _restore(
    run: _Run, result: FitResult, checkpoint: str | os.PathLike
) -> tuple[int, int, dict | None]:
    """Load ``checkpoint`` into ``run`` and ``result``.

    Returns (epochs finished, steps finished of the next epoch, that epoch's running sums
    ``partial`` or None).
    """
    state = load_checkpoint(checkpoint, map_location="cpu")
    recorded = state.get("config", {})
    for key in ("dataset", "architecture", "method", "ablation", "batch_size"):
        if recorded.get(key) != getattr(run.config, key):
            raise ConfigError(
                key,
                f"checkpoint {checkpoint} was trained with {key}={recorded.get(key)!r}, "
                f"not {getattr(run.config, key)!r}; resume with the same {key}",
            )
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["scheduler"])
    # After the model is built, so that its initialisation does not disturb the restored RNG.
    _restore_rng(state["rng"], run.sampler_generator, run.loader_generator)
    epochs_done = int(state["epoch"])
    result.history = list(state.get("metrics", []))
    result.best_accuracy = float(state.get("best_accuracy", 0.0))
    result.best_epoch = state.get("best_epoch")
    result.epochs_completed = epochs_done
    if result.history:
        result.final_accuracy = result.history[-1]["test_accuracy"]
    return epochs_done, int(state.get("step", 0)), state.get("partial")


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
    layer_sums: torch.Tensor  # (layers, 2): active fraction and rate, summed over steps
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
            layer_sums=torch.zeros(len(run.layers), 2, device=device),
            first_bad_step=torch.full((), -1, dtype=torch.long, device=device),
        )

    def add_partial(self, partial: dict, steps_done: int) -> None:
        """Continue from a mid-epoch checkpoint's ``partial`` after ``steps_done`` steps."""
        device = self.loss_sum.device
        self.step = steps_done
        self.loss_sum += partial["loss_sum"].to(device)
        self.correct += partial["correct"].to(device)
        self.layer_sums += partial["layer_sums"].to(device)
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
            "seconds": time.perf_counter() - self.started + self.seconds_before_resume,
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
                for value in (module.last_active_fraction, module.last_rate)
                if value is not None
            ]
            if len(stats) == 2 * len(layers):
                # The layers keep 0-d float32 batch means: one stack and one add per step.
                self.layer_sums += torch.stack(stats).view(len(layers), 2)

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
            "seconds": time.perf_counter() - self.started + self.seconds_before_resume,
            "images_per_second": self.seen / self.train_seconds if self.train_seconds > 0 else 0.0,
            "layers": [
                {"name": name, "active_fraction": fraction, "rate": rate}
                for (name, _), (fraction, rate) in zip(layers, layer_means, strict=True)
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

    run.model.train()
    train_started = time.perf_counter()
    progress.last_lr = run.optimizer.param_groups[0]["lr"]
    batches = _train_batches(
        run.data, config, run.device, order, run.loader_generator, run.drop_last
    )
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
    loss.backward()
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.schedule.step()
    return loss, logits, lr


def _record_epoch(result: FitResult, metrics: dict) -> bool:
    """Add a finished epoch's metrics to ``result``; return whether it is the best so far."""
    epoch, test_accuracy = metrics["epoch"], metrics["test_accuracy"]
    result.history.append(metrics)
    result.epochs_completed = epoch
    result.final_accuracy = test_accuracy
    is_best = result.best_epoch is None or test_accuracy > result.best_accuracy
    if is_best:
        result.best_accuracy, result.best_epoch = test_accuracy, epoch
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
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.schedule.state_dict(),
        "rng": rng,
        "epoch": epochs_done,
        "step": interrupted.step if interrupted is not None else 0,
        "partial": interrupted.partial() if interrupted is not None else None,
        "config": run.config.to_dict(),
        "metrics": result.history,
        "best_accuracy": result.best_accuracy,
        "best_epoch": result.best_epoch,
    }


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    data: _Data,
    config: TrainConfig,
    device: torch.device,
    autocast: torch.autocast,
) -> tuple[float, float]:
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    channels_last = device.type == "cuda"
    for x, y in _test_batches(data, config, device):
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        count += y.shape[0]
    model.train()
    if count == 0:
        return 0.0, 0.0
    loss, hits = torch.stack([loss_sum, correct.float()]).tolist()
    return loss / count, hits / count
