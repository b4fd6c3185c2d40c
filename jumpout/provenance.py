"""What reproducing a training run needs, beyond its spec: one dict built in one place.

`environment` is written by the service's trainer into the job's ``environment`` column (served
with the job) and by the engine into every checkpoint, so a run from the command line carries the
same record. The spec itself (every resolved field, the seed among them) is stored beside it: the
job's ``spec`` column, the checkpoint's ``config``.

Keys: ``seed``, ``jumpout_version`` (package metadata), ``git_commit`` and ``git_dirty`` (when
the code runs from a git checkout, else null; dirty ignores untracked files), ``python``,
``torch``, ``torchvision``, ``cuda`` and ``cudnn`` (the versions torch was built with; null on CPU
builds), ``device`` and ``device_name`` (what trains), ``hostname``, and ``init_from`` (where the
starting weights came from: ``{"source", "kind", "path", "sha256"}``, or null).
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["environment", "git_state"]

# A git that hangs (a network file system, a huge tree) must not hold up the start of a run.
_GIT_TIMEOUT_S = 3.0


def _run_git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout this package runs from; (None, None) when it is not
    one (an installed wheel) or git cannot say. Asked once per process."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        # An installed package inside some other repository must not report that one's commit.
        return None, None
    commit = _run_git(root, "rev-parse", "HEAD")
    if commit is None:
        return None, None
    # --no-optional-locks: reading the state must not rewrite the index of a shared checkout.
    status = _run_git(root, "--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    return commit.strip(), (None if status is None else bool(status.strip()))


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_name(device: Any) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_name(index)
    # The CPU's model as Linux names it; platform.processor() often says only "x86_64".
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(
    config: Any | None = None,
    *,
    device: Any = None,
    init_source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of what ran: see the module docstring for the keys.

    Everything but ``seed`` and ``init_from`` is the same for every run of a process on one
    device, so it is worked out once per (process, device) (`_machine_record`): the service's
    trainer builds the record for the job row and `jumpout.engine.fit` again for the checkpoints,
    and the second costs nothing.

    Args:
        config: the run's `jumpout.spec.TrainConfig` (for its seed); None leaves seed null.
        device: the resolved ``torch.device`` (or its name) that trains; None leaves it null.
        init_source: `jumpout.engine.resolve_init_from`'s record of the starting weights.
    """
    import torch

    described = None
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        described = str(device)
    return {
        "seed": getattr(config, "seed", None),
        **_machine_record(described),
        "init_from": dict(init_source) if init_source is not None else None,
    }


@functools.lru_cache(maxsize=8)
def _machine_record(device: str | None) -> dict[str, Any]:
    """The keys of `environment` that depend only on this process and ``device`` (a resolved
    device's name, or None); callers copy it (`environment` spreads it into a new dict)."""
    import torch
    import torchvision

    commit, dirty = git_state()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "jumpout_version": _package_version("jumpout"),
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a TorchVersion: weights_only loading refuses it
        "torchvision": str(torchvision.__version__),
        "cuda": str(torch.version.cuda) if torch.version.cuda else None,
        "cudnn": cudnn,
        "device": device,
        "device_name": _device_name(device) if device is not None else None,
        "hostname": socket.gethostname(),
    }
