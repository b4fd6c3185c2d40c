"""Whole-model training step time: the same model with jumpout in its dropout slots vs nn.Dropout.

A step is what `jumpout.engine.fit` does per batch: forward, cross-entropy, backward and a Nesterov
SGD step (bf16 autocast and channels_last on CUDA, as in the engine). The two variants of each
model are built from the same seed and timed in interleaved rounds, so machine noise hits them
alike; the table reports median step time, images per second and the jumpout/dropout ratio.
On the CPU the batch is reduced (the models are the paper's, the batch is not); on CUDA it is the
recipe's 128. Times on CUDA come from CUDA events.

    python benchmarks/model_step.py [--device cuda] [--rounds 10] [--batch N] [--models cnn_small]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _machine import machine_name

from jumpout.models import Regularizer, create_model

# model -> (input channels, image size, CPU batch, CUDA batch, dropout rate of its recipe)
MODELS = {
    "cnn_small": (3, 32, 32, 128, 0.5),
    "wrn_16_8": (3, 32, 8, 128, 0.3),
}


def build(name: str, kind: str, rate: float, device: torch.device):
    channels, size, *_ = MODELS[name]
    torch.manual_seed(0)
    regularizer = Regularizer(kind, rate=rate) if kind == "dropout" else Regularizer(kind)
    model = create_model(name, 10, channels, regularizer, image_size=size).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    return model, optimizer


def step_seconds(model, optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    cuda = x.device.type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        began = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if cuda:
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return time.perf_counter() - began


def measure(name: str, device: torch.device, rounds: int, batch: int | None) -> dict:
    channels, size, cpu_batch, cuda_batch, rate = MODELS[name]
    batch = batch or (cuda_batch if device.type == "cuda" else cpu_batch)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, size, size, generator=generator).to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    variants = {kind: build(name, kind, rate, device) for kind in ("dropout", "jumpout")}
    for model, optimizer in variants.values():  # warm-up (allocator, cuDNN autotuning)
        for _ in range(2):
            step_seconds(model, optimizer, x, y)
    times: dict[str, list[float]] = {kind: [] for kind in variants}
    for _ in range(rounds):
        for kind, (model, optimizer) in variants.items():
            times[kind].append(step_seconds(model, optimizer, x, y))
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    return {"model": name, "batch": batch, **medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=None, help="override the batch size")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"Machine: {machine_name(device)}; device {device.type}; {args.rounds} rounds\n")
    print(
        "| model | batch | dropout ms/step | jumpout ms/step | dropout img/s | jumpout img/s "
        "| jumpout/dropout |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        row = measure(name, device, args.rounds, args.batch)
        print(
            f"| {name} | {row['batch']} | {1e3 * row['dropout']:.1f} | {1e3 * row['jumpout']:.1f} "
            f"| {row['batch'] / row['dropout']:.0f} | {row['batch'] / row['jumpout']:.0f} "
            f"| {row['jumpout'] / row['dropout']:.2f}x |"
        )


if __name__ == "__main__":
    main()
