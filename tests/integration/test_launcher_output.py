"""What `make run` (`python -m launcher`) prints: a few lines, the ready block only once
`/v1/health` answers 200 (with the URLs and where the data and logs are), none of the children's
chatter (it is in JUMPOUT_HOME/logs), and "jumpout stopped" as the last line after a Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parents[2]
# What the children print at start-up, which the terminal must not show.
CHATTER = (
    "celery@",  # the banner
    "-------------- ",
    "[tasks]",
    "superuser privileges",  # Celery's SecurityWarning when run as root
    "overcommit",  # Redis' vm.overcommit_memory warning
    "Ready to accept connections",  # Redis
    "Uvicorn running",
    "Application startup complete",
    "alembic",
)


def test_make_run_is_quiet_says_ready_only_once_healthy_and_says_stopped(tmp_path, service_kit):
    port = service_kit.free_port()
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUMPOUT_")}
    env.update(
        JUMPOUT_HOME=str(home),
        JUMPOUT_PORT=str(port),
        JUMPOUT_REDIS_PORT=str(service_kit.free_port()),
        JUMPOUT_DEVICE="cpu",
        JUMPOUT_HEALTH_PING_TIMEOUT="0.1",
        PYTHONUNBUFFERED="1",
    )
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launcher"], env=env, cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[tuple[float, str]] = []  # (when it was read, the line)

    def read_stdout():
        for line in launcher.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    polls: list[tuple[float, bool]] = []  # (when the request was sent, answered 200)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)
    try:
        deadline = time.monotonic() + 40
        while not any("jumpout is running" in line for _, line in lines):
            assert launcher.poll() is None, "\n".join(line for _, line in lines)
            assert time.monotonic() < deadline, "no ready line in 40 s:\n" + "\n".join(
                line for _, line in lines
            )
            sent = time.monotonic()
            try:
                polls.append((sent, client.get("/v1/health").status_code == 200))
            except httpx.TransportError:
                polls.append((sent, False))
            time.sleep(0.05)
        ready_at = next(when for when, line in lines if "jumpout is running" in line)
        # Every health request sent after the line was printed answers 200 (the old launcher
        # printed it seconds before the API listened), and one more now, to be sure.
        assert all(ok for sent, ok in polls if sent > ready_at), polls
        assert client.get("/v1/health").status_code == 200
        assert any(not ok for _, ok in polls), "the API was up before the launcher: weak test"

        # Let the worker finish its start-up output (it must not reach stdout): its banner is
        # in its log once it has started.
        worker_log = home / "logs" / "worker.log"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            worker_log.exists() and "[tasks]" in worker_log.read_text()
        ):
            time.sleep(0.2)
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=30) == 0
        reader.join(timeout=5)
        stderr = launcher.stderr.read()
    finally:
        client.close()
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()

    stdout = "\n".join(line for _, line in lines)
    base = f"http://127.0.0.1:{port}"
    for label, value in (
        ("API", base), ("docs", f"{base}/docs"), ("dashboard", f"{base}/"), ("data", home),
        ("database", f"sqlite:///{home}/jumpout.db"), ("logs", home / "logs"),
    ):  # fmt: skip
        assert f"  {label:<12} {value}\n" in stdout + "\n", (label, stdout)
    assert "Ctrl-C to stop" in stdout
    for chatter in CHATTER:
        assert chatter not in stdout + stderr, (chatter, stdout, stderr)
    assert [line for _, line in lines if line.strip()][-1] == "jumpout stopped", stdout
    assert len(lines) < 25, stdout  # a few lines, not a wall of text
    # The chatter is in the logs instead.
    assert "Uvicorn running" in (home / "logs" / "api.log").read_text()
    assert "[tasks]" in (home / "logs" / "worker.log").read_text()
    assert "migrat" in (home / "logs" / "migrate.log").read_text().lower()
