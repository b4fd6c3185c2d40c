"""`jumpout-client` as the installed console script against the real service (uvicorn, a Celery
worker, Redis, SQLite): submit a digits job and watch it to success, list, show, read its log,
download its checkpoint (sha256 checked), a spec the server refuses, cancel a long job and watch
exit with the cancelled status, an experiment and its report, auth with the token from the
environment and from the config file, a watched server that goes away.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CLIENT = Path(sys.executable).parent / "jumpout-client"
QUICK = ["--dataset", "digits", "--arch", "mlp", "--method", "jumpout", "--epochs", "2",
         "--train-size", "256", "--test-size", "128"]  # fmt: skip
LONG = ["--dataset", "digits", "--arch", "mlp", "--epochs", "300"]


def client_env(server: str, **extra: str) -> dict[str, str]:
    """The client's environment: no JUMPOUT_* from the test run, no config file of the user."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUMPOUT_")}
    env.update({"JUMPOUT_SERVER": server, "JUMPOUT_CLIENT_CONFIG": os.devnull, **extra})
    return env


def run(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLIENT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory, service_kit):
    """The whole service on SQLite, once for the module (the client does not care which store)."""
    with service_kit.running_stack(tmp_path_factory.mktemp("client-stack")) as service:
        yield service


@pytest.fixture(scope="module")
def env(stack):
    return client_env(f"http://127.0.0.1:{stack.port}")


@pytest.fixture(scope="module")
def quick_job(stack, env) -> str:
    submitted = run(env, "submit", *QUICK)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert len(job_id) == 32 and "\n" not in job_id  # the id alone: J=$(jumpout-client submit)
    assert f"submitted job {job_id}" in submitted.stderr
    return job_id


def test_submit_then_watch_to_success_exits_0(stack, env, quick_job):
    watched = run(env, "watch", quick_job)
    assert watched.returncode == 0, watched.stderr + stack.diagnostics(quick_job)
    assert f"job {quick_job} succeeded: final test accuracy" in watched.stderr
    job = stack.job(quick_job)
    assert job["status"] == "succeeded"
    assert f"{100 * job['result']['final_accuracy']:.2f}%" in watched.stderr
    # Each epoch printed at most once (epochs already done when watch connects come quietly
    # with the snapshot: this 2-epoch job may be over by then).
    printed = [line.split()[1] for line in watched.stderr.splitlines() if line.startswith("epoch ")]
    assert len(printed) == len(set(printed)) and set(printed) <= {"1/2", "2/2"}, printed


def test_ls_and_show(stack, env, quick_job):
    stack.wait_finished(quick_job)
    listed = run(env, "ls", "--status", "succeeded", "--method", "jumpout")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if quick_job in line)
    assert "succeeded" in row and "digits" in row and "2/2" in row
    as_json = json.loads(run(env, "ls", "--json", "--limit", "5").stdout)
    assert quick_job in [item["id"] for item in as_json["items"]]
    shown = run(env, "show", quick_job)
    assert shown.returncode == 0, shown.stderr
    assert "status:" in shown.stdout and "succeeded" in shown.stdout
    assert "  epochs = 2" in shown.stdout and "  dataset = digits" in shown.stdout
    assert json.loads(run(env, "show", quick_job, "--json").stdout)["id"] == quick_job


def test_logs_print_the_trainers_output(stack, env, quick_job):
    stack.wait_finished(quick_job)
    logged = run(env, "logs", quick_job)
    assert logged.returncode == 0, logged.stderr
    assert logged.stdout.strip(), "empty log"
    followed = run(env, "logs", "-f", quick_job, timeout=30)  # a final job: returns at once
    assert followed.returncode == 0 and followed.stdout == logged.stdout


def test_download_verifies_the_checksum(stack, env, quick_job, tmp_path):
    stack.wait_finished(quick_job)
    downloaded = run(env, "download", quick_job, "-o", str(tmp_path) + "/")
    assert downloaded.returncode == 0, downloaded.stderr
    path = Path(downloaded.stdout.strip())
    assert path.parent == tmp_path and path.exists()
    assert "verified" in downloaded.stderr
    listed = stack.client.get(f"/v1/jobs/{quick_job}/checkpoints").json()["items"]
    newest = max(listed, key=lambda item: item["epoch"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == newest["sha256"]
    by_epoch = run(env, "download", quick_job, "--epoch", "1", "-o", str(tmp_path / "e1.pt"))
    assert by_epoch.returncode == 0, by_epoch.stderr
    first = next(item for item in listed if item["epoch"] == 1)
    assert hashlib.sha256((tmp_path / "e1.pt").read_bytes()).hexdigest() == first["sha256"]


def test_a_spec_the_server_refuses_is_one_line(env):
    # Each value passes its own check; together they do not: the server's 422 names the field.
    refused = run(env, "submit", *QUICK, "--p-min", "0.5", "--p-max", "0.4")
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("error: p_min: must be below p_max")
    missing = run(env, "show", "0" * 32)
    assert (missing.returncode, missing.stderr.count("\n")) == (1, 1)
    assert "no job" in missing.stderr


def test_cancel_a_running_job_and_watch_exits_3(stack, env):
    job_id = run(env, "submit", *LONG).stdout.strip()
    stack.wait_running(job_id, 1)
    cancelled = run(env, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    watched = run(env, "watch", job_id)
    assert watched.returncode == 3, watched.stderr + stack.diagnostics(job_id)
    assert f"job {job_id} cancelled" in watched.stderr
    again = run(env, "cancel", job_id)
    assert again.returncode == 1 and again.stderr.startswith("error: ")


def test_experiment_submit_and_report(stack, env):
    submitted = run(
        env, "experiment", "submit", "--name", "cli", "--preset", "table2", "--seeds", "1",
        "--base", "dataset=digits", "--base", "architecture=mlp", "--base", "epochs=1",
        "--base", "train_size=256", "--base", "test_size=128",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    experiment_id = submitted.stdout.strip()
    body = stack.client.get(f"/v1/experiments/{experiment_id}").json()
    for job in body["jobs"]:
        assert stack.wait_finished(job["id"])["status"] == "succeeded"
    shown = run(env, "experiment", "show", experiment_id)
    assert shown.returncode == 0 and "2 succeeded" in shown.stdout
    report = run(env, "experiment", "report", experiment_id)
    assert report.returncode == 0, report.stderr
    assert "| jumpout" in report.stdout and "| dropout" in report.stdout
    as_csv = run(env, "experiment", "report", experiment_id, "--format", "csv")
    assert as_csv.stdout.splitlines()[0].startswith("label")
    bad = run(env, "experiment", "submit", "--base", "dataset=digits", "--base", "p_max=7")
    assert (
        bad.returncode == 2 and bad.stderr == "error: p_max: must be a number in (0, 1), got 7.0\n"
    )


def test_auth_token_from_environment_and_config_file(stack, service_kit, tmp_path):
    """A second API process on the same store with auth required."""
    created = stack.run("-m", "api", "token", "create", "--name", "cli-user")
    token = created.stdout.strip()
    port = service_kit.free_port()
    api_env = {**stack.env, "JUMPOUT_AUTH_REQUIRED": "true", "JUMPOUT_PORT": str(port)}
    argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
            "--port", str(port), "--no-access-log"]  # fmt: skip
    process = service_kit.Process("api-auth", argv, env=api_env, log_dir=stack.logs)
    try:
        server = f"http://127.0.0.1:{port}"
        _wait_for(server)
        anonymous = run(client_env(server), "ls")
        assert anonymous.returncode == 1
        assert anonymous.stderr.startswith("error: ") and "--token" in anonymous.stderr
        from_env = run(client_env(server, JUMPOUT_TOKEN=token), "ls")
        assert from_env.returncode == 0, from_env.stderr
        config = tmp_path / "client.toml"
        config.write_text(f'server = "{server}"\ntoken = "{token}"\n')
        config.chmod(0o600)
        file_env = client_env(server, JUMPOUT_CLIENT_CONFIG=str(config))
        del file_env["JUMPOUT_SERVER"]  # the server from the file too
        from_file = run(file_env, "submit", *QUICK)
        assert from_file.returncode == 0, from_file.stderr
        job_id = from_file.stdout.strip()
        assert stack.job(job_id)["owner"] == "cli-user"
        wrong = run(client_env(server, JUMPOUT_TOKEN="jo_wrong"), "ls", "--token", token)
        assert wrong.returncode == 0  # the flag beats the environment
        for result in (anonymous, from_env, from_file, wrong):
            assert token not in result.stdout + result.stderr

        # The server goes away while a job is watched: exit 4 once it cannot be resumed.
        long_id = run(client_env(server, JUMPOUT_TOKEN=token), "submit", *LONG).stdout.strip()
        stack.wait_running(long_id, 1)
        watcher = subprocess.Popen(
            [str(CLIENT), "watch", long_id, "--reconnect-for", "2"],
            env=client_env(server, JUMPOUT_TOKEN=token), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _wait_for_text(watcher, f"job {long_id}")
        process.kill()
        _, err = watcher.communicate(timeout=60)
        assert watcher.returncode == 4, err
        assert err.strip().splitlines()[-1].startswith("error: lost the connection")
        stack.client.post(f"/v1/jobs/{long_id}/cancel")
    finally:
        process.stop()


def _wait_for(server: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{server}/v1/health", timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"{server} did not start")


def _wait_for_text(process: subprocess.Popen, text: str, timeout: float = 30.0) -> None:
    """Read the watcher's stderr until `text` shows (it is connected and streaming)."""
    selector = selectors.DefaultSelector()
    selector.register(process.stderr, selectors.EVENT_READ)
    seen = ""
    deadline = time.monotonic() + timeout
    while text not in seen:
        if time.monotonic() > deadline or process.poll() is not None:
            raise AssertionError(f"watcher never showed {text!r}: {seen}")
        if selector.select(timeout=0.5):
            seen += process.stderr.readline()
