"""Whole-model training step time: the same model with jumpout in its dropout slots vs nn.Dropout,
in each precision, memory format and compilation the engine can train with.

A step is what `jumpout.engine.fit` does per batch: forward, cross-entropy, backward and a Nesterov
SGD step, under the autocast of the case's precision (``fp32``: none; ``bf16``), channels_last
on CUDA for the convolutional models (as in the engine), eager or ``torch.compile``d. The two
variants of each case are built from the same seed and timed in interleaved rounds, so machine
noise hits them alike. A round times ``--steps`` consecutive steps and waits for the device once,
at its end (CUDA events around the round; a per-step synchronisation would add a host round trip
to every step and hide the launch overlap the real loop has). The table reports the median over
rounds of the time per step, images per second and the jumpout/dropout ratio.

On the CPU the batch is reduced (the models are the paper's, the batch is not); on CUDA it is the
recipe's 128.

    python benchmarks/model_step.py [--device cuda] [--models cnn_small wrn_28_10]
        [--precisions bf16 fp32] [--compile off on] [--rounds 5] [--steps 10] [--batch N]
        [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _machine import machine_name

from jumpout.models import Regularizer, create_model

# model -> (input channels, image size, CPU batch, CUDA batch, dropout rate of its recipe)
MODELS = {
    "cnn_small": (3, 32, 32, 128, 0.5),
    "wrn_16_8": (3, 32, 8, 128, 0.3),
    "wrn_28_10": (3, 32, 4, 128, 0.3),
}
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(name: str, kind: str, device: torch.device, channels_last: bool, compiled: bool):
    channels, size, *_, rate = MODELS[name]
    torch.manual_seed(0)
    regularizer = Regularizer(kind, rate=rate) if kind == "dropout" else Regularizer(kind)
    model = create_model(name, 10, channels, regularizer, image_size=size).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    step_model = torch.compile(model) if compiled else model
    return step_model, optimizer


def train_step(model, optimizer, x, y, precision: str) -> None:
    dtype = AUTOCAST[precision]
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def round_seconds(model, optimizer, x, y, precision: str, steps: int) -> float:
    """Seconds per step over ``steps`` consecutive steps, with one wait for the device."""
    if x.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            train_step(model, optimizer, x, y, precision)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / steps
    began = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, x, y, precision)
    return (time.perf_counter() - began) / steps


def measure(
    name: str,
    device: torch.device,
    *,
    precision: str,
    compiled: bool,
    channels_last: bool,
    rounds: int,
    steps: int,
    batch: int | None,
    warmup: int = 3,
) -> dict:
    channels, size, cpu_batch, cuda_batch, _ = MODELS[name]
    batch = batch or (cuda_batch if device.type == "cuda" else cpu_batch)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, size, size, generator=generator).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    variants = {
        kind: build(name, kind, device, channels_last, compiled) for kind in ("dropout", "jumpout")
    }
    compile_seconds = {}
    for kind, (model, optimizer) in variants.items():
        # Warm-up: the allocator, cuDNN's autotuning and, compiled, the compilation itself.
        began = time.perf_counter()
        round_seconds(model, optimizer, x, y, precision, max(1, warmup))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compile_seconds[kind] = time.perf_counter() - began
    times: dict[str, list[float]] = {kind: [] for kind in variants}
    for _ in range(rounds):
        for kind, (model, optimizer) in variants.items():
            times[kind].append(round_seconds(model, optimizer, x, y, precision, steps))
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    return {
        "model": name,
        "precision": precision,
        "compiled": compiled,
        "channels_last": channels_last,
        "batch": batch,
        "dropout_s": medians["dropout"],
        "jumpout_s": medians["jumpout"],
        "dropout_images_per_s": batch / medians["dropout"],
        "jumpout_images_per_s": batch / medians["jumpout"],
        "ratio": medians["jumpout"] / medians["dropout"],
        "warmup_s": compile_seconds,
    }


def table_row(row: dict) -> str:
    mode = ("compiled" if row["compiled"] else "eager") + (
        ", channels_last" if row["channels_last"] else ""
    )
    return (
        f"| {row['model']} | {row['precision']} | {mode} | {row['batch']} "
        f"| {1e3 * row['dropout_s']:.2f} | {1e3 * row['jumpout_s']:.2f} "
        f"| {row['dropout_images_per_s']:.0f} | {row['jumpout_images_per_s']:.0f} "
        f"| {row['ratio']:.3f}x |"
    )


TABLE_HEADER = (
    "| model | precision | mode | batch | dropout ms/step | jumpout ms/step | dropout img/s "
    "| jumpout img/s | jumpout/dropout |\n|---|---|---|---:|---:|---:|---:|---:|---:|"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    # Defaults: every case on CUDA; on the CPU the eager fp32 ones (a compile or a CPU bf16 step
    # of wrn_28_10 takes minutes there).
    parser.add_argument("--models", nargs="+", default=None, choices=MODELS)
    parser.add_argument("--precisions", nargs="+", default=None, choices=AUTOCAST)
    parser.add_argument("--compile", nargs="+", default=None, choices=("off", "on"))
    parser.add_argument(
        "--channels-last",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: on CUDA, as the engine does",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--batch", type=int, default=None, help="override the batch size")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    args.models = args.models or (["cnn_small", "wrn_28_10"] if cuda else ["cnn_small", "wrn_16_8"])
    args.precisions = args.precisions or (["bf16", "fp32"] if cuda else ["fp32"])
    args.compile = args.compile or (["off", "on"] if cuda else ["off"])
    channels_last = {"on": True, "off": False, "auto": device.type == "cuda"}[args.channels_last]
    print(
        f"Machine: {machine_name(device)}; device {device.type}; "
        f"{args.rounds} rounds of {args.steps} steps\n",
        flush=True,
    )
    print(TABLE_HEADER, flush=True)
    rows, failures = [], []
    for name in args.models:
        for compiled in (mode == "on" for mode in args.compile):
            for precision in args.precisions:
                case = dict(precision=precision, compiled=compiled, channels_last=channels_last)
                try:
                    row = measure(
                        name,
                        device,
                        rounds=args.rounds,
                        steps=args.steps,
                        batch=args.batch,
                        warmup=args.warmup,
                        **case,
                    )
                except Exception as exc:  # one failing case must not hide the others
                    failures.append(
                        {"model": name, **case, "error": f"{type(exc).__name__}: {exc}"}
                    )
                    print(f"| {name} | {precision} | compiled={compiled} | FAILED: {exc} |")
                    continue
                rows.append(row)
                print(table_row(row), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"machine": machine_name(device), "rows": rows, "failures": failures},
                handle,
                indent=2,
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
