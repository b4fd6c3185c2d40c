"""Data-parallel training of one run on several devices: torch.distributed, PyTorch's launcher.

A run with ``devices = N > 1`` trains in N processes (ranks), one per GPU with the NCCL backend,
or N CPU processes with gloo. `launch` starts them through PyTorch's elastic launcher (what
``torchrun --standalone --nproc-per-node N`` runs: a local c10d rendezvous, no restarts, one
node); each rank calls `jumpout.engine.fit`, which joins the process group from the launcher's
environment (`join_process_group`) and trains its share:

* the batch: ``batch_size`` is the global batch. Every rank draws the same epoch order from the
  run's sampler generator (the one a checkpoint saves) and step ``s`` gives rank ``r`` the
  ``r``-th of N equal slices of the global batch ``s`` (`Ranks.shard`): the ranks see disjoint
  shares, reshuffled every epoch (what ``DistributedSampler`` with ``set_epoch`` gives), and the
  union of one step's shares is exactly the one-process run's batch of that step. DDP averages
  the ranks' mean gradients, which is then the global batch's mean gradient;
* random streams: the model is built from the run's seed on every rank (DDP checks the copies
  agree); then each rank's torch generator is reseeded from (seed, rank), so that Jumpout's
  rates and masks and dropout's masks are drawn per rank: each rank's batch is a batch;
* reports: the epoch's training sums are added over the ranks (`Ranks.combine`), the test and
  validation sets are split among the ranks and their sums added (whole-set figures, with rank
  0's batch-norm statistics broadcast first), so every rank holds the same metrics; the caller
  gives its reporting callbacks to rank 0 only;
* stopping: every poll of ``should_stop`` is agreed (`Ranks.any`): a stop asked of any rank (a
  signal, the service's cancel flag read by rank 0) stops all of them at the same step;
* checkpoints: written by rank 0 alone (holding every rank's random-generator states, so that a
  resume continues each rank's streams), then a barrier, so no rank goes on, or exits, before
  the file is complete.

A rank that dies takes the run down: the launcher stops the others (gloo notices the closed
connection at once; an NCCL rank waiting in a collective is stopped by the launcher's
shutdown), and `launch` raises `RanksFailed` with every failed rank's exit code.

This module never imports the service (``api``, ``jobstore``, ``worker``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from jumpout.spec import ConfigError, TrainConfig

__all__ = ["Ranks", "RanksFailed", "in_launched_rank", "join_process_group", "launch"]

# What PyTorch's launcher sets in each rank's environment (torchrun, elastic_launch).
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

SHUTDOWN_TIMEOUT_S = 15
"""Seconds the launcher gives the other ranks, once one has failed or the launcher got a signal,
to stop by themselves (a signalled rank checkpoints) before it kills them."""


def in_launched_rank() -> bool:
    """Whether this process is a rank started by PyTorch's launcher (its variables are set)."""
    return all(name in os.environ for name in LAUNCHER_ENV)


class RanksFailed(RuntimeError):
    """A rank of a launched run exited with a failure; the launcher stopped the others.

    Args:
        exit_codes: each failed rank's exit code (negative: killed by that signal), by rank.
    """

    def __init__(self, exit_codes: dict[int, int]) -> None:
        self.exit_codes = dict(sorted(exit_codes.items()))
        super().__init__(
            "; ".join(f"rank {r}: {describe_exit(c)}" for r, c in self.exit_codes.items())
        )


def describe_exit(exit_code: int) -> str:
    """``exited with code 3`` or ``killed by SIGKILL``."""
    import signal

    if exit_code < 0:
        try:
            return f"killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"killed by signal {-exit_code}"
    return f"exited with code {exit_code}"


def launch(entrypoint: Callable[..., Any], args: tuple, nprocs: int) -> dict[int, Any]:
    """Run ``entrypoint(*args)`` in ``nprocs`` ranks on this machine with PyTorch's elastic
    launcher (``torchrun --standalone``'s rendezvous, no restarts: a failed rank fails the run),
    and return each rank's return value by rank.

    The ranks are started with ``spawn`` (fresh interpreters: CUDA must not cross a fork) in
    this process's process group, so a signal to the group reaches every rank; they inherit
    stdout and stderr. ``entrypoint`` must be importable by name (a module-level function).

    Raises:
        RanksFailed: a rank exited with a non-zero code or was killed (the others were stopped).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    options: dict[str, Any] = dict(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nprocs,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a free port, as torchrun --standalone picks
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    if "shutdown_timeout" in LaunchConfig.__dataclass_fields__:  # torch >= 2.12
        options["shutdown_timeout"] = SHUTDOWN_TIMEOUT_S
    try:
        return elastic_launch(LaunchConfig(**options), entrypoint)(*args)
    except ChildFailedError as error:
        codes = {rank: int(failure.exitcode) for rank, failure in error.failures.items()}
        raise RanksFailed(codes) from None


@dataclass
class Ranks:
    """This process's place in a data-parallel run, and the collectives the engine uses."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any (every rank must call it)."""
        value = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), by rank, on every rank."""
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` added over the ranks, in place (on this rank's device)."""
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def data_parallel(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped for data-parallel steps (DDP: rank 0's weights and buffers are
        broadcast at the start, gradients averaged in backward, buffers broadcast from rank 0
        at each training forward)."""
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers are broadcast from rank 0 at each training forward (DDP's default).
        return DistributedDataParallel(model, device_ids=device_ids)

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (batch-norm statistics) on every rank: what the checkpoint holds
        and what evaluation must use on every shard."""
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

    def shard(self, order: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This rank's part of an epoch's sample ``order``: of each global batch of
        ``batch_size`` samples, the ``rank``-th of ``world`` equal slices (an incomplete last
        batch is dropped, as the one-process run drops it)."""
        share = batch_size // self.world
        steps = len(order) // batch_size
        return order[: steps * batch_size].view(steps, self.world, share)[:, self.rank].flatten()

    def shard_indices(self, count: int) -> range:
        """This rank's samples of an evaluation set of ``count`` samples (every world-th)."""
        return range(self.rank, count, self.world)

    def combine(self, progress: Any) -> None:
        """Add an epoch's running sums (`jumpout.engine._EpochProgress`) over the ranks, in
        place, on every rank: loss, correct answers and samples seen are summed, each Jumpout
        layer's per-step statistics averaged over the ranks (each rank's batch drew its own)."""
        packed = torch.cat(
            [
                progress.loss_sum.detach().double().view(1),
                progress.correct.double().view(1),
                torch.tensor([float(progress.seen)], dtype=torch.float64, device=self.device),
                progress.layer_sums.double().flatten(),
            ]
        )
        self.sum(packed)
        progress.loss_sum = packed[0].to(progress.loss_sum.dtype)
        progress.correct = packed[1].round().to(progress.correct.dtype)
        progress.seen = int(packed[2].item())
        shape = progress.layer_sums.shape
        progress.layer_sums = (packed[3:] / self.world).view(shape).to(progress.layer_sums.dtype)

    def local_partial(self, partial: dict) -> dict:
        """A mid-epoch checkpoint's running sums (combined over the ranks when it was written),
        as this rank must resume them: rank 0 takes the sums, the others start them at zero, so
        that the epoch's `combine` counts them once; the layers' averaged statistics are taken
        by every rank, as `combine` averages them again."""
        if self.rank == 0:
            return partial
        return {
            **partial,
            "loss_sum": torch.zeros_like(partial["loss_sum"]),
            "correct": torch.zeros_like(partial["correct"]),
            "seen": 0,
        }

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def join_process_group(config: TrainConfig, device: torch.device) -> Ranks | None:
    """Join the run's process group when ``config.devices > 1`` (None for one device), from the
    launcher's environment: NCCL when ``device`` is CUDA (this rank uses ``cuda:LOCAL_RANK`` of
    the devices it was given, ``CUDA_VISIBLE_DEVICES``), gloo on the CPU.

    Raises:
        ConfigError: (``devices``) not started by a launcher, a launcher of another size, or
            fewer visible GPUs than ranks.
    """
    if config.devices == 1:
        return None
    if not in_launched_rank():
        raise ConfigError(
            "devices",
            f"{config.devices} devices train in {config.devices} processes started by PyTorch's "
            f"launcher: run `python -m jumpout train --devices {config.devices} ...` (it launches "
            f"them), or `torchrun --standalone --nproc-per-node {config.devices} ...`",
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if world != config.devices:
        raise ConfigError(
            "devices", f"asks for {config.devices} processes, the launcher started {world}"
        )
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if visible < world:
            raise ConfigError(
                "devices",
                f"asks for {world} GPUs, {visible} visible to this process "
                "(CUDA_VISIBLE_DEVICES); accepted here: at most "
                f"{visible}",
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return Ranks(rank=rank, world=world, local_rank=local_rank, device=device)
