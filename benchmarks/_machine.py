"""The machine a benchmark ran on, in words, for the tables in docs/benchmarks.md."""

from __future__ import annotations

import contextlib
import os
import platform


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (or what platform knows)."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return cpu


def host_name() -> str:
    """Host, CPU, core count and Python: for the service benchmarks (no torch involved)."""
    return (
        f"{platform.node()}, {cpu_model()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )


def machine_name(device) -> str:
    """GPU name for CUDA; otherwise the CPU model, architecture and torch's thread count."""
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    return f"{cpu_model()} ({platform.machine()}), {threads} threads, torch {torch.__version__}"
