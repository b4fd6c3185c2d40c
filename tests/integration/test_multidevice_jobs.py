"""A job asking for two devices, through the real service (issue 11 §3): a worker with two
simulated CPU slots runs it as two gloo ranks launched by PyTorch's elastic launcher under one
trainer. A rank killed mid-job fails the attempt, and the retry resumes from the checkpoint;
a cancel stops both ranks."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import running_stack

pytestmark = pytest.mark.timeout(300)


def _rank_pids(trainer_pid: int) -> list[int]:
    """The ranks of a trainer: its children that the launcher spawned."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        parent = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
        if int(parent) == trainer_pid and b"spawn_main" in argv:
            pids.append(int(entry))
    return sorted(pids)


def _wait_for_ranks(stack, job_id: str, count: int = 2, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for trainer in stack.trainer_pids(job_id):
            ranks = _rank_pids(trainer)
            if len(ranks) == count:
                return ranks
        time.sleep(0.2)
    raise AssertionError(f"no {count} ranks for job {job_id}\n{stack.diagnostics(job_id)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:  # reaped between the two looks
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("multidevice")
    # A long heartbeat timeout: a trainer template starting under load (two pool processes
    # import torch at once) must not look like a lost attempt; these tests count attempts.
    with running_stack(home, JUMPOUT_DEVICE_SLOTS="2", JUMPOUT_HEARTBEAT_TIMEOUT="120") as service:
        yield service


@pytest.mark.slow  # a kill and a retry of two spawned ranks: over a minute on the 2-core VM
def test_a_killed_rank_fails_the_attempt_and_the_retry_resumes(stack):
    # 16 epochs: the ranks must still be there when the poll sees epoch 2.
    job = stack.submit(dataset="digits", architecture="mlp", epochs=16, devices=2)
    assert job["spec"]["devices"] == 2
    attempt = stack.wait_running(job["id"], epoch=2, timeout=180)["attempt"]
    ranks = _wait_for_ranks(stack, job["id"])
    os.kill(ranks[-1], signal.SIGKILL)
    retried = stack.wait_for(job["id"], lambda j: j["attempt"] > attempt, timeout=120)
    assert "of 2 killed by SIGKILL" in (retried["error"] or ""), retried["error"]
    done = stack.wait_finished(job["id"], timeout=300)
    assert done["status"] == "succeeded", stack.diagnostics(job["id"])
    assert done["attempt"] == attempt + 1
    assert done["device"].startswith("2 x cpu")
    assert stack.epochs(job["id"]) == list(range(1, 17))  # resumed: no epoch twice
    log = stack.client.get(f"/v1/jobs/{job['id']}/log").text
    assert "resuming job" in log and "launching 2 ranks" in log
    # Checkpoints were written once per epoch, by rank 0 alone, and the last is downloadable.
    response = stack.client.get(f"/v1/jobs/{job['id']}/checkpoints/latest/file")
    assert response.status_code == 200 and len(response.content) > 0


@pytest.mark.slow  # about 20 s: in make test-slow, keeping make test under 15 minutes
def test_a_cancel_stops_every_rank(stack):
    job = stack.submit(dataset="digits", architecture="mlp", epochs=500, devices=2)
    stack.wait_running(job["id"], epoch=1, timeout=180)
    ranks = _wait_for_ranks(stack, job["id"])
    assert stack.client.post(f"/v1/jobs/{job['id']}/cancel").status_code in (200, 202)
    done = stack.wait_finished(job["id"], timeout=120)
    assert done["status"] == "cancelled", stack.diagnostics(job["id"])
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in ranks), stack.diagnostics(job["id"])
