"""Speed and memory of the Jumpout layer against nn.Dropout and a plain scalar multiply.

For each shape, the three candidates run forward + backward in interleaved rounds (so that machine
noise hits them alike) on a post-ReLU input; the table reports the median time, its ratio to
nn.Dropout(0.3), and the bytes autograd saves for backward. On CUDA, times come from CUDA events
and the Jumpout step runs under ``torch.cuda.set_sync_debug_mode("error")``, so any host-device
synchronisation would abort the run.

    python benchmarks/layer.py [--device cuda] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _machine import machine_name
from torch import nn

from jumpout import Jumpout

SHAPES = [(64, 160, 32, 32), (128, 640, 8, 8), (256, 4096)]


class ScalarMultiply(nn.Module):
    """The memory-bound floor: one read and one write per element, nothing saved."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input * 1.5


def saved_bytes(layer: nn.Module, input: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward (not counting the input itself)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if tensor.data_ptr() != input.data_ptr():
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(input)
    return total


def step_seconds(layer: nn.Module, input: torch.Tensor, grad: torch.Tensor, strict: bool) -> float:
    if input.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if strict:
            torch.cuda.set_sync_debug_mode("error")
        try:
            layer(input).backward(grad)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    began = time.perf_counter()
    layer(input).backward(grad)
    return time.perf_counter() - began


def measure(shape, device: torch.device, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    input = torch.relu(torch.randn(shape, device=device)).requires_grad_()
    grad = torch.randn(shape, device=device)
    candidates = {
        "nn.Dropout(0.3)": nn.Dropout(0.3),
        "Jumpout()": Jumpout(),
        "x * 1.5": ScalarMultiply(),
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for layer in candidates.values():  # warm-up
        step_seconds(layer, input, grad, strict=False)
        input.grad = None
    for _ in range(rounds):
        for name, layer in candidates.items():
            times[name].append(step_seconds(layer, input, grad, strict=name == "Jumpout()"))
            input.grad = None
    dropout_time = statistics.median(times["nn.Dropout(0.3)"])
    rows = []
    for name, layer in candidates.items():
        median = statistics.median(times[name])
        rows.append(
            {
                "shape": "x".join(map(str, shape)),
                "layer": name,
                "ms": median * 1e3,
                "ratio": median / dropout_time,
                "saved_bytes_per_element": saved_bytes(layer, input) / input.numel(),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"Machine: {machine_name(device)}; device {device.type}; {args.rounds} rounds\n")
    print("| shape | layer | forward+backward ms (median) | vs nn.Dropout | saved bytes/element |")
    print("|---|---|---:|---:|---:|")
    for shape in SHAPES:
        for row in measure(shape, device, args.rounds):
            print(
                f"| {row['shape']} | {row['layer']} | {row['ms']:.2f} | {row['ratio']:.2f}x "
                f"| {row['saved_bytes_per_element']:.2f} |"
            )
    if device.type == "cuda":
        print("\nJumpout ran under set_sync_debug_mode('error'): no host-device synchronisation.")


if __name__ == "__main__":
    main()
