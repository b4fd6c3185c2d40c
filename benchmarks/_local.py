"""What the service benchmarks share: a free port on loopback, percentiles, and the environment
a checkout under test runs with."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def checkout_environment(checkout: Path, home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without its JUMPOUT_* settings, running `checkout`'s code with
    its home in `home`, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUMPOUT_")}
    env.update(PYTHONPATH=str(checkout), JUMPOUT_HOME=str(home), PYTHONUNBUFFERED="1", **extra)
    return env
