"""The devices of one worker box: can this worker run jobs on its configured device, how many
device slots it has, and which slots each job gets.

**The check at start.** A worker whose device cannot run anything must not take jobs: before
this, ``device=cuda`` on a box without a usable GPU failed every job it took as an invalid spec
and went on to the next, draining the queue. So the Celery parent probes its device once when it
starts (`probe`, from ``worker.celery_app``'s ``celeryd_init`` hook), in a subprocess
(``python -m worker.devices``): the parent never imports torch or touches CUDA, since CUDA does
not survive the fork of the pool processes. The probe makes a real CUDA call on every visible GPU
(an allocation, a kernel, a synchronisation): the NVML-based availability check that the worker
uses elsewhere says "available" on a driver too old for the wheel's CUDA line, and only a real
call finds that out. A worker whose probe fails consumes nothing from the queue, says why in its
log (an ERROR line) and in ``GET /v1/health`` (``unusable_workers``), and stays up answering
pings, so that the operator sees it instead of a restart loop.

**A device that breaks while a job runs** (`is_device_failure`: the GPU fell off the bus, an
uncorrectable ECC error, the driver went away, the configured CUDA device vanished): the trainer
exits ``EXIT_DEVICE``; the supervisor puts the job back in the queue without using one of its
attempts (it was not the job's fault) and the worker stops taking jobs (`mark_unusable`). The
same job's next device failure in a row counts as a crash instead (an attempt used, the worker
left usable): a job whose own error matches a device pattern must not disable every worker.

**Device slots.** A box's visible GPUs are its slots (``JUMPOUT_DEVICE_SLOTS`` may declare fewer;
on the CPU it declares N simulated slots, 1 by default), and the Celery worker runs one pool
process per slot, so that ``celery -A worker.celery_app worker`` is the one command a box needs.
A pool process claims a job only when enough slots are free for it (`DeviceSlots.lease`, with
`jobstore.devicefit.claim_fitting`), and holds them until its trainer exits: each slot is an
``flock`` on a file under ``{home}/slots`` named after the device (``gpu-<id>.lock``), so no GPU is
ever given to two jobs, even by two workers that see the same GPU, and a supervisor that dies
releases its slots with its last file descriptor. The trainer sees only its slots
(``CUDA_VISIBLE_DEVICES``; `job_environment`) and records them in the job's ``environment``
(``device_slots``). The starvation rule is in `jobstore.devicefit`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from jobstore.settings import Settings, get_settings

log = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_TIMEOUT_S = 180.0
"""The longest the start-up probe may take (importing torch and initialising CUDA on every GPU)."""

SLOTS_ENV = "JUMPOUT_JOB_SLOTS"
"""The trainer's environment variable naming the slots its job was given (comma-separated)."""

# The oldest NVIDIA driver each CUDA major version of the torch wheel runs on (Linux, CUDA's
# minor-version compatibility; from the CUDA toolkit release notes, table 3).
MIN_DRIVER = {"11": "450.80.02", "12": "525.60.13", "13": "580.65.06"}

# What the CUDA runtime, the driver and torch say when the device itself, not the job, is the
# problem: a retry on the same device fails the same way, another device would not.
_DEVICE_FAILURES = re.compile(
    "|".join(
        (
            r"no CUDA-capable device is detected",
            r"CUDA-capable device\(s\) is/are busy or unavailable",
            r"driver version is insufficient",
            r"found no NVIDIA driver",
            r"NVIDIA driver on your system is too old",
            r"CUDA driver initialization failed",
            r"initialization error",
            r"uncorrectable ECC error",
            r"GPU is lost",
            r"fallen off the bus",
            r"system not yet initialized",
            r"device not ready",
            r"cudaErrorDevicesUnavailable",
            r"cudaErrorNoDevice",
            r"cudaErrorInsufficientDriver",
            r"cudaErrorECCUncorrectable",
            r"no CUDA device is available",
        )
    ),
    re.IGNORECASE,
)


@dataclass
class DevicePlan:
    """What the start-up probe found: the device jobs run on, its slots, and whether it works."""

    device: str  # "cuda" or "cpu"
    slots: list[str]  # CUDA device ids (CUDA_VISIBLE_DEVICES entries) or "0".."n-1" on the CPU
    usable: bool = True
    reason: str | None = None  # why not usable: for the log, /v1/health and the operator
    names: list[str] = field(default_factory=list)  # the GPUs' names
    driver: str | None = None
    torch_cuda: str | None = None  # the CUDA line the torch wheel was built for

    def summary(self) -> dict[str, Any]:
        return asdict(self)


# --- readable reasons ------------------------------------------------------------------------


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (``/proc/driver/nvidia/version``), None without one."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return found.group(1) if found else None


def required_driver(torch_cuda: str | None) -> str | None:
    """The oldest driver the torch wheel's CUDA line (e.g. ``"13.0"``) runs on, if known."""
    return MIN_DRIVER.get((torch_cuda or "").split(".")[0]) if torch_cuda else None


def driver_too_old(torch_cuda: str | None, driver: str | None) -> bool:
    needed = required_driver(torch_cuda)
    return bool(needed and driver) and _version_tuple(driver) < _version_tuple(needed)


def driver_advice(torch_cuda: str | None, driver: str | None) -> str:
    """What the operator must do when the driver is older than the wheel's CUDA line needs."""
    needed = required_driver(torch_cuda)
    have = f"the NVIDIA driver {driver}" if driver else "the NVIDIA driver"
    return (
        f"{have} is too old for this torch build (CUDA {torch_cuda} needs driver >= {needed}): "
        "update the host's driver, or build the worker image for an older CUDA line "
        "(docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126)"
    )


def is_device_failure(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) says the device, not the job, is broken."""
    seen = 0
    while error is not None and seen < 8:
        if _DEVICE_FAILURES.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def device_failure_reason(
    error: BaseException | str, *, torch_cuda: str | None = None, driver: str | None = None
) -> str:
    """A device failure in one readable line for the operator (the driver advice when the driver
    is what is wrong)."""
    text = " ".join(str(error).split())[:300]
    driver = driver if driver is not None else driver_version()
    if driver_too_old(torch_cuda, driver) or re.search(
        r"driver version is insufficient|too old|InsufficientDriver", text, re.IGNORECASE
    ):
        return f"{driver_advice(torch_cuda, driver)} ({text})"
    return f"the device is not usable: {text}"


# --- the probe -------------------------------------------------------------------------------


def visible_gpu_ids(environ: dict[str, str] | None = None) -> list[str] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs), None when it is not set."""
    value = (environ if environ is not None else os.environ).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def _nvidia_present() -> bool:
    """Whether this machine could have an NVIDIA GPU at all, without importing torch."""
    return Path("/proc/driver/nvidia").exists() or Path("/dev/nvidia0").exists()


def cpu_plan(settings: Settings) -> DevicePlan:
    """The plan of a CPU worker: ``device_slots`` simulated slots (1 by default)."""
    count = settings.device_slots or 1
    return DevicePlan(device="cpu", slots=[str(index) for index in range(count)])


def probe(settings: Settings | None = None, *, timeout: float = PROBE_TIMEOUT_S) -> DevicePlan:
    """This worker's device plan. ``device=cpu``, or ``auto`` on a machine with no NVIDIA driver,
    needs no probe; otherwise ``python -m worker.devices`` imports torch and tries every GPU."""
    settings = settings or get_settings()
    device = str(settings.device)
    if device == "cpu" or (device == "auto" and not _nvidia_present()):
        return cpu_plan(settings)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "worker.devices", device],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"},
            check=False,
        )
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        found = {"error": f"the device probe did not finish in {timeout:.0f} s"}
    except (OSError, ValueError, IndexError):
        found = {"error": f"the device probe failed: {' '.join(done.stderr.split()[-40:])}"}
    if found.get("device") == "cpu":
        return cpu_plan(settings)
    gpus = [str(gpu) for gpu in found.get("ids", [])]
    plan = DevicePlan(
        device="cuda",
        slots=gpus,
        names=found.get("names", []),
        driver=found.get("driver"),
        torch_cuda=found.get("torch_cuda"),
    )
    if found.get("error"):
        plan.usable, plan.reason = False, found["error"]
    elif not gpus:
        plan.usable, plan.reason = False, "no CUDA device is visible to this worker"
    elif settings.device_slots:
        if settings.device_slots > len(gpus):
            log.warning(
                "JUMPOUT_DEVICE_SLOTS=%d but only %d GPUs are visible: %d slots",
                settings.device_slots,
                len(gpus),
                len(gpus),
            )
        plan.slots = gpus[: settings.device_slots]
    return plan


def _probe_here(device: str) -> dict[str, Any]:
    """In the probe's subprocess: import torch and make a real call on every visible GPU."""
    import torch

    driver = driver_version()
    torch_cuda = torch.version.cuda
    found: dict[str, Any] = {"driver": driver, "torch_cuda": torch_cuda}
    if device == "auto" and not torch.cuda.is_available():
        return {**found, "device": "cpu"}
    if not torch.cuda.is_available():
        why = (
            "JUMPOUT_DEVICE=cuda but no CUDA device is available"
            + (" (torch was built without CUDA)" if torch_cuda is None else "")
            + ("; no NVIDIA driver is loaded" if driver is None and torch_cuda else "")
        )
        return {**found, "error": device_failure_reason(why, torch_cuda=torch_cuda, driver=driver)}
    ids = visible_gpu_ids()
    try:
        count = torch.cuda.device_count()
        names = []
        for index in range(count):
            probe_tensor = torch.ones(64, device=f"cuda:{index}")
            probe_tensor.mul_(2).sum().item()  # a kernel and a copy back: the driver works
            torch.cuda.synchronize(index)
            names.append(torch.cuda.get_device_name(index))
    except Exception as error:  # noqa: BLE001 - any failure here is the device's
        return {
            **found,
            "error": device_failure_reason(error, torch_cuda=torch_cuda, driver=driver),
        }
    ids = ids[:count] if ids is not None else [str(index) for index in range(count)]
    return {**found, "device": "cuda", "ids": ids, "names": names}


# --- this worker's state ---------------------------------------------------------------------

_plan: DevicePlan | None = None
_hostname: str | None = None  # the Celery worker's node name, for `mark_unusable`
_lock = threading.Lock()


def set_plan(plan: DevicePlan, *, hostname: str | None = None) -> None:
    """Set in the Celery parent by the start-up probe; the pool processes inherit it."""
    global _plan, _hostname
    with _lock:
        _plan = plan
        if hostname is not None:
            _hostname = hostname


def current_plan() -> DevicePlan:
    """This worker's plan: the probe's, or (without one: a supervisor run outside Celery, a test)
    the settings' without probing."""
    global _plan
    with _lock:
        if _plan is None:
            settings = get_settings()
            plan = cpu_plan(settings)
            if str(settings.device) != "cpu" and _nvidia_present():
                ids = visible_gpu_ids() or [str(i) for i in range(settings.device_slots or 1)]
                plan = DevicePlan(device="cuda", slots=ids[: settings.device_slots or len(ids)])
            _plan = plan
        return _plan


def hostname() -> str | None:
    return _hostname


def mark_unusable(reason: str) -> None:
    """This worker's device broke under a job: take no more jobs here, and tell the Celery
    parent (it stops consuming from the queue and reports it in /v1/health). Best effort: the
    flag alone already stops this pool process from claiming."""
    plan = current_plan()
    with _lock:
        plan.usable, plan.reason = False, reason
    log.error("this worker's device is not usable; it takes no more jobs: %s", reason)
    if _hostname is None:
        return
    try:
        from worker.celery_app import app

        app.control.broadcast(
            "jumpout_device_unusable", arguments={"reason": reason}, destination=[_hostname]
        )
    except Exception as error:  # noqa: BLE001 - the flag in this process still holds
        log.warning("could not tell the worker to stop consuming: %s", error)


# --- slots -----------------------------------------------------------------------------------


def _slot_file_name(device: str, slot: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", slot)
    return f"{'gpu' if device == 'cuda' else 'cpu'}-{safe}.lock"


@dataclass
class SlotLease:
    """The slots one job holds until its trainer exits (`release`)."""

    slots: list[str]
    device: str
    _fds: list[int] = field(default_factory=list, repr=False)

    def release(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the last descriptor releases the flock
        self._fds = []

    def environment(self) -> dict[str, str]:
        """What the trainer's environment gets: its slots, and on GPUs only its GPUs."""
        return job_environment(self.device, self.slots)


def job_environment(device: str, slots: list[str]) -> dict[str, str]:
    env = {SLOTS_ENV: ",".join(slots)}
    if device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(slots)
    return env


def job_slots() -> list[str] | None:
    """In the trainer: the slots its job was given (None: run outside a slotted worker)."""
    value = os.environ.get(SLOTS_ENV)
    return value.split(",") if value else None


class DeviceSlots:
    """One box's slots, shared by every process on it through flocks under ``directory``."""

    def __init__(self, plan: DevicePlan, directory: Path) -> None:
        self.plan = plan
        self.directory = Path(directory)

    @property
    def total(self) -> int:
        return len(self.plan.slots)

    @contextlib.contextmanager
    def _claim_lock(self) -> Iterator[None]:
        """One claim at a time on this box: the free slots counted are still free when the
        claimed job takes them."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "claim.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _try_slot(self, slot: str) -> int | None:
        path = self.directory / _slot_file_name(self.plan.device, slot)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def free_slots(self) -> list[str]:
        """The slots no job holds now (a snapshot, for tests and health)."""
        with self._claim_lock():
            free = []
            for slot in self.plan.slots:
                fd = self._try_slot(slot)
                if fd is not None:
                    os.close(fd)
                    free.append(slot)
            return free

    def lease(
        self, claim: Callable[[int, int], tuple[T | None, int]]
    ) -> tuple[T | None, SlotLease]:
        """Count the free slots, let ``claim(free, total)`` take a job that fits (it returns the
        job and how many slots it needs, or None), and keep that many slots for it: the first
        free ones in slot order. The lease is empty when nothing was claimed."""
        with self._claim_lock():
            held: dict[str, int] = {}
            try:
                for slot in self.plan.slots:
                    fd = self._try_slot(slot)
                    if fd is not None:
                        held[slot] = fd
                job, need = claim(len(held), self.total) if held else (None, 0)
                keep = list(held)[:need] if job is not None else []
                lease = SlotLease(keep, self.plan.device, [held.pop(slot) for slot in keep])
            finally:
                for fd in held.values():
                    os.close(fd)
        return job, lease


def box_slots(settings: Settings | None = None) -> DeviceSlots:
    settings = settings or get_settings()
    return DeviceSlots(current_plan(), Path(settings.home) / "slots")


def main(argv: list[str] | None = None) -> int:
    """``python -m worker.devices [auto|cuda]``: the probe's JSON on the last line of stdout."""
    args = sys.argv[1:] if argv is None else argv
    device = args[0] if args else "auto"
    try:
        found = _probe_here(device)
    except Exception as error:  # noqa: BLE001 - importing torch failed: the worker says why
        found = {"error": f"the device probe failed: {type(error).__name__}: {error}"}
    print(json.dumps(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
