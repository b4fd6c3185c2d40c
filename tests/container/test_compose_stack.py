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
Last, the README's monitoring block: a token for Prometheus, `--profile monitoring up -d`, and
Prometheus has scraped the API's /metrics with it.
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

    def shell(self, script: str, *, env: dict[str, str] | None = None, timeout: float = 600) -> str:
        """`script` run by bash in this tree (with `docker compose` spelled for this machine);
        its stdout, after asserting it succeeded."""
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", self.prelude + script], cwd=self.root,
            env=self.env if env is None else env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        assert done.returncode == 0, f"{script}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    def compose(self, *args: str, timeout: float = 600) -> str:
        return self.shell("docker compose " + " ".join(args), timeout=timeout)

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
            # The profile named, or Compose leaves its container (and the network) behind.
            deployment.compose(
                "--profile", "monitoring", "down", "--volumes", "--remove-orphans", timeout=300
            )  # fmt: skip


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
    # 600 epochs: still running when `docker compose restart` reaches the worker.
    long = d.submit(dataset="digits", architecture="mlp", method="jumpout", epochs=600)
    d.wait_for(long["id"], lambda j: j["status"] == "running" and j["progress"]["epoch"] >= 2)
    d.compose("restart", "worker-cpu", timeout=300)
    finished = d.wait_for(long["id"], lambda j: j["finished_at"] is not None, timeout=600)
    assert finished["status"] == "succeeded", d.diagnostics(long["id"])
    assert d.epochs(long["id"]) == list(range(1, 601))
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


def test_the_monitoring_profile_scrapes_the_api_with_its_own_token(deployment):
    """The README's monitoring block as written: a token for Prometheus, the profile up; then
    Prometheus (the local stand-in of `prom/prometheus` on a machine without a registry) has
    scraped the API's /metrics on the compose network with that token."""
    d = deployment
    d.wait_healthy()
    prometheus_port = free_port()
    env = {**d.env, "JUMPOUT_PROMETHEUS_PORT": str(prometheus_port)}
    block = block_with(readme_blocks(), "--profile monitoring")
    d.shell(block, env=env, timeout=900)
    prometheus = f"http://127.0.0.1:{prometheus_port}/api/v1"

    def scraped() -> dict | None:
        with contextlib.suppress(httpx.HTTPError, KeyError, IndexError):
            targets = httpx.get(f"{prometheus}/targets", timeout=5).json()["data"]
            target = targets["activeTargets"][0]
            if target["health"] == "up":
                return target
        return None

    deadline = time.monotonic() + 120  # scrape_interval 15 s (deploy/prometheus.yml)
    while not (target := scraped()) and time.monotonic() < deadline:
        time.sleep(2)
    last = httpx.get(f"{prometheus}/targets", timeout=5).text if not target else ""
    assert target, f"the API was never scraped: {last[-2000:]}\n{d.logs()}"
    assert target["labels"]["job"] == "jumpout-api" and target["scrapeUrl"].endswith("/metrics")
    # What it scraped: the service's own series, the broker's and the database's state among them.
    query = httpx.get(f"{prometheus}/query", params={"query": "jumpout_database_up"}, timeout=10)
    results = query.json()["data"]["result"]
    assert [r["value"][1] for r in results] == ["1"], query.text
    jobs = httpx.get(f"{prometheus}/query", params={"query": "jumpout_jobs"}, timeout=10).json()
    assert jobs["data"]["result"], jobs
    # Without a token /metrics is refused: Prometheus got in with its own, which may read
    # nothing else (scope metrics).
    assert httpx.get(d.base_url + "/metrics", timeout=10).status_code == 401
    scraper = {"Authorization": f"Bearer {(d.root / 'prometheus.token').read_text().strip()}"}
    assert httpx.get(d.base_url + "/metrics", headers=scraper, timeout=10).status_code == 200
    assert httpx.get(d.base_url + "/v1/jobs", headers=scraper, timeout=10).status_code == 403


def this_machines_address() -> str | None:
    """An IPv4 address of this machine that its containers can reach (the default route's
    source), standing in for the API box's private address; None on a machine with no route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.connect(("192.0.2.254", 9))  # no packet is sent: the route's source is read
        address = sock.getsockname()[0]
        return None if address.startswith("127.") else address
    return None


def test_a_second_box_joins_with_urls_and_its_checkpoints_reach_the_api(deployment, tmp_path):
    """The README's "second GPU box joins" block, both boxes on this machine: the API's box is the
    deployment (its CPU worker stopped, so that only the second box can take the job), the second
    box another copy of the tree with its own compose project, volumes and .env (no filesystem
    shared), this machine's address as the private one. The CPU overrides replace the GPU
    workers (README); otherwise the block's commands run as written."""
    d = deployment
    address = this_machines_address()
    if address is None:
        pytest.skip("no IPv4 address besides loopback for the boxes to meet on")
    block = block_with(readme_blocks(), "docker-compose.remote-workers.yml up -d")
    api_box, _, second_box = block.partition("# on the second box")
    api_box = api_box.replace("10.0.0.1", address).replace(
        "-f docker-compose.yml -f docker-compose.remote-workers.yml",
        "-f docker-compose.yml -f docker-compose.cpu.yml -f docker-compose.remote-workers.yml",
    )
    second_box = second_box.partition("\n")[2].replace("10.0.0.1", address)
    second_box = second_box.replace(
        "-f docker-compose.worker.yml",
        "-f docker-compose.worker.yml -f docker-compose.worker-cpu.yml",
    )
    assert "docker-compose.worker-cpu.yml up -d --build" in second_box, second_box

    d.shell(api_box, env={k: v for k, v in d.env.items() if k != "COMPOSE_FILE"}, timeout=900)
    box2 = tmp_path / "box2"
    box2.mkdir()
    copy_working_tree(box2)
    # "the same POSTGRES_PASSWORD, REDIS_PASSWORD and JUMPOUT_WORKER_SECRET": the only lines shared.
    shared = [
        line
        for line in (d.root / ".env").read_text().splitlines()
        if line.startswith(("POSTGRES_PASSWORD=", "REDIS_PASSWORD=", "JUMPOUT_WORKER_SECRET="))
    ]
    assert len(shared) == 3, shared
    (box2 / ".env").write_text("\n".join(shared) + "\n")
    box2_env = {
        **{k: v for k, v in d.env.items() if k != "COMPOSE_FILE"},
        "COMPOSE_PROJECT_NAME": d.env["COMPOSE_PROJECT_NAME"] + "box2",
    }
    second = Deployment(box2, box2_env, 0)
    # The first test ended on new volumes (a cold start): its token went with the old database.
    token = d.compose(
        "exec", "-T", "api", "python", "-m", "api", "token", "create", "--name", "carol"
    )
    d.headers = {"Authorization": f"Bearer {token.strip().splitlines()[-1]}"}
    try:
        d.compose("stop", "worker-cpu", timeout=300)
        second.shell(second_box, timeout=900)
        d.wait_healthy()  # a worker again: the second box's
        job = d.submit(dataset="digits", architecture="mlp", method="jumpout", epochs=3)
        done = d.wait_for(job["id"], lambda j: j["finished_at"] is not None)
        assert done["status"] == "succeeded", d.diagnostics(job["id"]) + second.logs()
        assert done["worker"] == "box2", done["worker"]
        assert d.epochs(job["id"]) == [1, 2, 3]
        # Written on the second box, shipped to the artifact service, served by the API.
        d.checkpoint_is_served_intact(job["id"])
        log = d.get(f"/v1/jobs/{job['id']}/log")
        assert log.headers["X-Log-Complete"] == "true" and "epoch 3" in log.text, log.text
    finally:
        with contextlib.suppress(Exception):
            second.compose(
                "-f", "docker-compose.worker.yml", "-f", "docker-compose.worker-cpu.yml",
                "down", "--volumes", timeout=300,
            )  # fmt: skip
