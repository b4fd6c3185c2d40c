"""The compose deployment built and run for real in Docker (issue 13), marked `container`
(`make test-container`, and in .ci/run; not in `make test`).

It runs the README's compose section as it is written, in a copy of the working tree (so that its
`> .env` never touches a real one): the no-registry block (scripts/prepare-docker-host, which
installs Debian's docker.io and docker-compose, starts dockerd and builds the local base images
when missing), the no-GPU block (the CPU override) and the deployment's commands (passwords in
.env, `docker compose up -d --build`, a token created in the API container). What the test adds:
a project name and a free host port (JUMPOUT_API_PORT), so that it never meets a real
deployment, and `docker-compose` for `docker compose` where the Docker CLI has no Compose plugin.

Then, from the host, through the published loopback port only: a `digits` job submitted with the
token runs to success, its metrics and trainer log are read and its checkpoint is downloaded and
its sha256 checked (written by the worker container, served by the API container); a second job
has its worker container restarted mid-run and resumes from its checkpoint; `docker compose down`
and `up -d` again, and both jobs are still listed and their checkpoints still served (named
volumes kept). It also checks that only the API publishes a port, on 127.0.0.1, and that the API
image holds no torch, and prints the images' sizes and the stack's start times (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.container, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
SECTION = "## The team deployment"
END_OF_COMMAND = "@@jumpout-end-of-command@@"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def readme_blocks() -> list[str]:
    """The ```sh blocks of the README's compose section, in order."""
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else None]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)


def block_with(blocks: list[str], needle: str) -> str:
    (block,) = [b for b in blocks if needle in b]
    return block


def deployment_block(blocks: list[str]) -> str:
    """The section's first block: the deployment's own commands (later blocks are variants)."""
    block = blocks[0]
    assert "> .env" in block and "up -d --build" in block and "token create" in block, block
    return block


def as_script(block: str) -> str:
    """Each command of the block, followed by a marker line, so that each one's output can be told
    apart (the token is the last command's)."""
    lines = []
    for line in block.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            lines += [line, f"echo {END_OF_COMMAND}"]
    return "\n".join(lines) + "\n"


def compose_prelude() -> str:
    # Debian's Compose 1.29 is the `docker-compose` program, not a `docker compose` plugin.
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ""
    return (
        'docker() { if [ "${1:-}" = compose ]; then shift; docker-compose "$@"; '
        'else command docker "$@"; fi; }\n'
    )


def copy_working_tree(target: Path) -> None:
    """The files git would commit (tracked, and untracked but not ignored): the build context a
    clone of this tree would give, without .venv, var/ or a real .env."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


class Deployment:
    """The copied tree, the environment the README's commands left, and compose commands in it."""

    def __init__(self, root: Path, env: dict[str, str], port: int):
        self.root = root
        self.env = env
        self.base_url = f"http://127.0.0.1:{port}"
        self.prelude = compose_prelude()
        self.headers: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    def compose(self, *args: str, timeout: float = 600) -> str:
        command = self.prelude + "docker compose " + " ".join(args)
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command], cwd=self.root, env=self.env,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        assert done.returncode == 0, f"{args}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    def logs(self) -> str:
        with contextlib.suppress(Exception):
            return self.compose("logs", "--no-color", "--tail=60", timeout=60)[-12000:]
        return "(no logs)"

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.base_url + path, headers=self.headers, timeout=30, **kwargs)

    def wait_healthy(self, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                last = httpx.get(self.base_url + "/v1/health", timeout=5)
                if last.status_code == 200 and last.json().get("workers", 0) >= 1:
                    return last.json()
            time.sleep(1)
        raise AssertionError(f"not healthy: {last and last.text}\n{self.logs()}")

    def submit(self, **spec) -> dict:
        response = httpx.post(
            self.base_url + "/v1/jobs", json=spec, headers=self.headers, timeout=30
        )
        assert response.status_code == 201, response.text
        return response.json()

    def wait_for(self, job_id: str, condition, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(f"/v1/jobs/{job_id}").json()
            if condition(job):
                return job
            time.sleep(1)
        raise AssertionError(f"job {job_id}: {job}\n{self.logs()}")

    def diagnostics(self, job_id: str) -> str:
        job = self.get(f"/v1/jobs/{job_id}").json()
        log = self.get(f"/v1/jobs/{job_id}/log").text
        return f"error: {job.get('error')}\ntrainer log:\n{log[-4000:]}\n{self.logs()}"

    def epochs(self, job_id: str) -> list[int]:
        return [row["epoch"] for row in self.get(f"/v1/jobs/{job_id}/metrics").json()["items"]]

    def checkpoint_is_served_intact(self, job_id: str) -> None:
        listed = self.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"]
        assert listed, f"job {job_id} has no checkpoint"
        response = self.get(f"/v1/jobs/{job_id}/checkpoints/latest/file")
        assert response.status_code == 200, response.text
        digest = hashlib.sha256(response.content).hexdigest()
        assert digest == response.headers["X-Checksum-SHA256"]
        assert digest in {checkpoint["sha256"] for checkpoint in listed}
        assert response.content[:2] == b"PK"  # torch.save's zip container


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("needs root on a Debian machine (scripts/prepare-docker-host installs Docker)")
    root = tmp_path_factory.mktemp("compose-stack")
    copy_working_tree(root)
    port = free_port()
    project = f"jumpoutct{uuid.uuid4().hex[:8]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("JUMPOUT_", "COMPOSE_"))},
        "COMPOSE_PROJECT_NAME": project,
        "JUMPOUT_API_PORT": str(port),
    }
    # Not the repository's var/: the script writes var/docker-local.env into the copy.
    blocks = readme_blocks()
    script = (
        compose_prelude()
        + as_script(block_with(blocks, "prepare-docker-host"))
        + as_script(block_with(blocks, "COMPOSE_FILE="))
        + as_script(deployment_block(blocks))
        + "env -0 > .env-after\n"
    )
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=root, env=env, capture_output=True,
        text=True, timeout=1200,
    )  # fmt: skip
    deployment = Deployment(root, env, port)
    try:
        assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        outputs = done.stdout.split(END_OF_COMMAND + "\n")
        token = outputs[-2].strip().splitlines()[-1]
        assert re.fullmatch(r"[A-Za-z0-9_\-.]{20,}", token), outputs[-2]
        deployment.headers = {"Authorization": f"Bearer {token}"}
        deployment.env = dict(
            item.split("=", 1) for item in (root / ".env-after").read_text().split("\0") if item
        )
        deployment.timings["readme_commands_s"] = time.monotonic() - started
        yield deployment
    finally:
        print(deployment.logs() if done.returncode else "")
        # The test's own project only: its containers, network and volumes.
        with contextlib.suppress(Exception):
            deployment.env.setdefault("COMPOSE_PROJECT_NAME", project)
            deployment.compose("down", "--volumes", "--remove-orphans", timeout=300)


def test_the_readme_deployment_trains_resumes_and_keeps_its_jobs(deployment):
    d = deployment
    health = d.wait_healthy()
    assert health["database"] == "ok" and health["broker"] == "ok", health

    # Only the API publishes a port, on the host's loopback.
    ids = d.compose("ps", "-q").split()
    published = {}
    for line in subprocess.run(
        ["docker", "inspect", "-f", "{{.Name}} {{json .HostConfig.PortBindings}}", *ids],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines():  # fmt: skip
        name, bindings = line.split(" ", 1)
        if bindings not in ("{}", "null"):
            published[name] = bindings
    assert len(published) == 1 and "api" in next(iter(published)), published
    assert '"HostIp":"127.0.0.1"' in next(iter(published.values())), published

    # Without the token: refused.
    assert httpx.get(d.base_url + "/v1/jobs", timeout=10).status_code == 401

    # 1. A digits job runs to success in the worker container.
    job = d.submit(dataset="digits", architecture="mlp", method="jumpout", epochs=3)
    done = d.wait_for(job["id"], lambda j: j["finished_at"] is not None)
    assert done["status"] == "succeeded", d.diagnostics(job["id"])
    assert done["device"] == "cpu"
    assert d.epochs(job["id"]) == [1, 2, 3]
    d.checkpoint_is_served_intact(job["id"])
    log = d.get(f"/v1/jobs/{job['id']}/log")
    assert log.status_code == 200 and log.headers["X-Log-Complete"] == "true", log.text

    # 2. The worker container restarted mid-job: the trainer checkpoints on SIGTERM, the job is
    # requeued and resumes from that checkpoint in the new container.
    long = d.submit(dataset="digits", architecture="mlp", method="jumpout", epochs=150)
    d.wait_for(long["id"], lambda j: j["status"] == "running" and j["progress"]["epoch"] >= 2)
    d.compose("restart", "worker-cpu", timeout=300)
    finished = d.wait_for(long["id"], lambda j: j["finished_at"] is not None, timeout=600)
    assert finished["status"] == "succeeded", d.diagnostics(long["id"])
    assert d.epochs(long["id"]) == list(range(1, 151))
    trainer_log = d.get(f"/v1/jobs/{long['id']}/log").text
    assert "resuming" in trainer_log, trainer_log[-3000:]

    # 3. down and up again: the named volumes keep the database and the checkpoints.
    d.compose("down", timeout=300)
    started = time.monotonic()
    d.compose("up", "-d", timeout=600)
    d.wait_healthy()
    restart_s = time.monotonic() - started
    listed = {j["id"]: j["status"] for j in d.get("/v1/jobs").json()["items"]}
    assert listed.get(job["id"]) == "succeeded" and listed.get(long["id"]) == "succeeded", listed
    d.checkpoint_is_served_intact(job["id"])

    # The API image holds no torch, and its modules import without it.
    no_torch = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "jumpout-api", "python", "-c",
         "import importlib.util, api.main; print(importlib.util.find_spec('torch'))"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert no_torch.stdout.strip() == "None", no_torch.stdout + no_torch.stderr
    sizes = {
        image: int(
            subprocess.run(
                ["docker", "image", "inspect", "-f", "{{.Size}}", image],
                capture_output=True,
                text=True,
                check=True,
            ).stdout  # fmt: skip
        )
        for image in ("jumpout-api", "jumpout-worker")
    }
    # Cold start: new volumes (a fresh database migrated from nothing), images built.
    d.compose("down", "--volumes", timeout=300)
    started = time.monotonic()
    d.compose("up", "-d", timeout=600)
    d.wait_healthy()
    cold_start_s = time.monotonic() - started
    print(
        f"\ncompose figures: cold start (up -d to healthy with a worker) {cold_start_s:.1f} s;"
        f" images {', '.join(f'{k} {v / 1e6:.0f} MB' for k, v in sizes.items())};"
        f" README commands (prepare, build, up, token) {d.timings['readme_commands_s']:.0f} s;"
        f" down then up, volumes kept, to healthy {restart_s:.1f} s"
    )
