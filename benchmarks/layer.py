"""Speed and memory of the Jumpout layer against nn.Dropout and a plain scalar multiply.

For each shape and dtype, the candidates run forward + backward in interleaved rounds (so that
machine noise hits them alike) on a post-ReLU input; the table reports the median time, its ratio
to nn.Dropout(0.3), and the bytes autograd saves for backward. On CUDA the candidates are the
fused Triton kernels (``Jumpout()``, per batch and per sample, see jumpout/fused.py), the eager
path (``Jumpout(fused=False)``), nn.Dropout and ``x * 1.5``; times come from CUDA events and every
Jumpout step runs under ``torch.cuda.set_sync_debug_mode("error")``, so any host-device
synchronisation would abort the run. On the CPU there is no fused case (the CPU path is eager).

    python benchmarks/layer.py [--device cuda] [--rounds 15] [--dtypes fp32,bf16] [--json PATH]

``scripts/gpu-check`` calls :func:`run_layer_benchmark` (or this script with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _machine import machine_name
from torch import nn

from jumpout import Jumpout

SHAPES = [(64, 160, 32, 32), (128, 640, 8, 8), (256, 4096)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The target: the fused Jumpout forward+backward at most this times nn.Dropout's.
TARGET_RATIO = 1.0


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


def candidates_for(device: torch.device) -> dict[str, nn.Module]:
    """The layers to time: the fused cases only where they run (CUDA)."""
    candidates: dict[str, nn.Module] = {"nn.Dropout(0.3)": nn.Dropout(0.3)}
    if device.type == "cuda":
        candidates["Jumpout() fused"] = Jumpout()
        candidates["Jumpout(per_sample) fused"] = Jumpout(per_sample=True)
        candidates["Jumpout() eager"] = Jumpout(fused=False)
    else:
        candidates["Jumpout()"] = Jumpout()
    candidates["x * 1.5"] = ScalarMultiply()
    return candidates


def measure(
    shape, device: torch.device, rounds: int, dtype: torch.dtype = torch.float32
) -> list[dict]:
    torch.manual_seed(0)
    input = torch.relu(torch.randn(shape, device=device)).to(dtype).requires_grad_()
    grad = torch.randn(shape, device=device).to(dtype)
    candidates = candidates_for(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(2):  # warm-up: the first fused call compiles the Triton kernels
        for layer in candidates.values():
            step_seconds(layer, input, grad, strict=False)
            input.grad = None
    for _ in range(rounds):
        for name, layer in candidates.items():
            strict = name.startswith("Jumpout")
            times[name].append(step_seconds(layer, input, grad, strict=strict))
            input.grad = None
    dropout_time = statistics.median(times["nn.Dropout(0.3)"])
    rows = []
    for name, layer in candidates.items():
        median = statistics.median(times[name])
        rows.append(
            {
                "shape": "x".join(map(str, shape)),
                "dtype": str(dtype).removeprefix("torch."),
                "layer": name,
                "ms": median * 1e3,
                "ratio": median / dropout_time,
                "saved_bytes_per_element": saved_bytes(layer, input) / input.numel(),
            }
        )
    return rows


def run_layer_benchmark(
    device: str | torch.device = "cuda",
    rounds: int = 15,
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    shapes=SHAPES,
    print_rows: bool = True,
) -> dict:
    """Every shape x dtype x candidate; prints the markdown table as it goes (GPU time is scarce:
    a crash part-way still leaves the rows so far) and returns ``{"machine", "device", "rounds",
    "rows": [...], "fused_within_target": bool | None}`` (None where there is no fused case)."""
    device = torch.device(device)
    machine = machine_name(device)
    if print_rows:
        print(f"Machine: {machine}; device {device.type}; {rounds} rounds\n")
        print(
            "| shape | dtype | layer | forward+backward ms (median) | vs nn.Dropout "
            "| saved bytes/element |"
        )
        print("|---|---|---|---:|---:|---:|")
    rows = []
    for dtype_name in dtypes:
        for shape in shapes:
            for row in measure(shape, device, rounds, DTYPES[dtype_name]):
                rows.append(row)
                if print_rows:
                    print(
                        f"| {row['shape']} | {row['dtype']} | {row['layer']} | {row['ms']:.3f} "
                        f"| {row['ratio']:.2f}x | {row['saved_bytes_per_element']:.2f} |",
                        flush=True,
                    )
    fused = [row for row in rows if row["layer"] == "Jumpout() fused"]
    within = all(row["ratio"] <= TARGET_RATIO for row in fused) if fused else None
    if print_rows and device.type == "cuda":
        print("\nJumpout ran under set_sync_debug_mode('error'): no host-device synchronisation.")
        print(f"Fused Jumpout() within {TARGET_RATIO:.2f}x nn.Dropout everywhere: {within}")
    return {
        "machine": machine,
        "device": device.type,
        "torch": torch.__version__,
        "rounds": rounds,
        "rows": rows,
        "fused_within_target": within,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16,fp16")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    dtypes = tuple(name.strip() for name in args.dtypes.split(",") if name.strip())
    unknown = [name for name in dtypes if name not in DTYPES]
    if unknown:
        parser.error(f"unknown dtype {unknown[0]!r}; accepted: {', '.join(DTYPES)}")
    results = run_layer_benchmark(args.device, args.rounds, dtypes)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
