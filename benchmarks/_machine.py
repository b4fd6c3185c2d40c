"""The machine a benchmark ran on, in words, for the tables in docs/benchmarks.md."""

from __future__ import annotations

import platform

import torch


def machine_name(device: torch.device) -> str:
    """GPU name for CUDA; otherwise the CPU model, architecture and torch's thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{cpu} ({platform.machine()}), {threads} threads, torch {torch.__version__}"
