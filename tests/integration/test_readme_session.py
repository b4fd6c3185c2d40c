"""The README's "Using the service" session, run as written against `python -m launcher` (what
`make run` starts), and checkpoints downloaded by name (`latest`, `best`, `epoch/<n>`) from that
real stack.

The session is the README's ```sh blocks of that section, joined and run by bash with
``-euo pipefail``, so any command that fails (a 404 is a non-zero exit with ``curl -f``) fails
the test; only the line ``B=http://127.0.0.1:8000`` is pointed at this stack's port. It runs in
a scratch directory whose ``.venv`` links to this interpreter's, as a user's checkout has one.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
BASE_LINE = "B=http://127.0.0.1:8000"


def readme_session() -> str:
    """The ```sh blocks of the README's "Using the service" section, in order."""
    text = (REPO / "README.md").read_text()
    start = text.index("## Using the service")
    section = text[start : text.index("\n## ", start + 1)]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert blocks and blocks[0].startswith(BASE_LINE + "\n"), "the session must start with B="
    return "\n".join(blocks)


class Launcher:
    """`python -m launcher` on free ports under a home of its own."""

    def __init__(self, home: Path, free_port) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("JUMPOUT_")}
        env.update(
            JUMPOUT_HOME=str(home),
            JUMPOUT_PORT=str(self.port),
            JUMPOUT_REDIS_PORT=str(free_port()),
            JUMPOUT_DEVICE="cpu",
            PYTHONUNBUFFERED="1",
        )
        self.log = home.parent / f"{home.name}-launcher.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "launcher"], env=env, cwd=REPO, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.base = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.base, timeout=30)
        deadline = time.monotonic() + 90
        while "jumpout is running" not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the launcher did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.2)

    def close(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def launcher(tmp_path_factory, service_kit) -> Iterator[Launcher]:
    stack = Launcher(tmp_path_factory.mktemp("readme") / "home", service_kit.free_port)
    try:
        yield stack
    finally:
        stack.close()


def test_the_readme_session_runs_as_written(launcher, tmp_path):
    for tool in ("bash", "curl", "jq"):
        if shutil.which(tool) is None:
            pytest.fail(f"the README's session needs {tool}; install it (apt-get install {tool})")
    script = readme_session().replace(BASE_LINE, f"B={launcher.base}", 1)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)

    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
        text=True, timeout=240,
    )  # fmt: skip

    shown = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, f"{shown}\nlauncher:\n{launcher.log.read_text()[-3000:]}"
    # The downloaded file is a checkpoint (not an error body), and load_model rebuilt it.
    assert (tmp_path / "model.pt").stat().st_size > 100_000, shown
    assert "Jumpout(sigma=0.1" in done.stdout and '"succeeded"' in done.stdout, shown
    assert '"final_accuracy": 0.' in done.stdout, shown
    assert "data_dir" not in done.stdout and "out_dir" not in done.stdout, shown


def test_checkpoints_download_by_name_from_a_real_stack(launcher, tmp_path):
    import torch

    import jumpout

    client = launcher.client
    spec = {
        "dataset": "digits", "architecture": "mlp", "epochs": 6, "val_fraction": 0.2,
        "keep_last": 2, "train_size": 512,
    }  # fmt: skip
    job = client.post("/v1/jobs", json=spec).json()
    deadline = time.monotonic() + 120
    while (job := client.get(f"/v1/jobs/{job['id']}").json())["finished_at"] is None:
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    assert job["status"] == "succeeded", job
    url = f"/v1/jobs/{job['id']}/checkpoints"
    listed = client.get(url).json()["items"]
    by_epoch = {item["epoch"]: item for item in listed}

    def fetch(name: str) -> httpx.Response:
        return client.get(f"{url}/{name}/file")

    latest = fetch("latest")
    assert latest.status_code == 200
    assert hashlib.sha256(latest.content).hexdigest() == by_epoch[6]["sha256"]
    assert f"{job['id']}-epoch0006.pt" in latest.headers["content-disposition"]
    for epoch, item in by_epoch.items():
        assert hashlib.sha256(fetch(f"epoch/{epoch}").content).hexdigest() == item["sha256"]
    best = fetch("best")
    marked = next(item for item in listed if item["is_best"])
    assert marked["epoch"] == job["result"]["best_epoch"]
    assert best.headers["X-Checksum-SHA256"] == marked["sha256"]

    gone = next(epoch for epoch in range(1, 7) if epoch not in by_epoch)
    missing = fetch(f"epoch/{gone}")
    assert missing.status_code == 404
    kept = ", ".join(str(epoch) for epoch in sorted(by_epoch))
    assert f"epochs with one: {kept}" in missing.json()["error"]["message"]

    path = tmp_path / "best.pt"
    path.write_bytes(best.content)
    model = jumpout.load_model(path)
    assert not model.training
    with torch.no_grad():
        assert model(torch.rand(4, 1, 8, 8) * 16).shape == (4, 10)
