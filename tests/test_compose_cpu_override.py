"""docker-compose.cpu.yml, the worker on the CPU for a machine without an NVIDIA GPU (README, "The
team deployment"), read with yaml: it turns the GPU worker off (a profile) and starts a worker
that is the GPU one but for what makes it a GPU worker: the device reservation, /dev/shm's size,
JUMPOUT_DEVICE and the worker's name. A change to the GPU worker that is not made to the CPU one
fails here. The same for a second box's worker (docker-compose.worker.yml) and its CPU override
(docker-compose.worker-cpu.yml). tests/container/test_compose_stack.py runs both for real.
"""

from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
GPU_ONLY = {"deploy", "shm_size"}


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.fixture(scope="module")
def files() -> tuple[dict, dict]:
    return load("docker-compose.yml"), load("docker-compose.cpu.yml")


def test_the_gpu_worker_is_off_unless_asked_for(files):
    _, override = files
    assert override["services"]["worker"] == {"profiles": ["gpu"]}
    assert set(override["services"]) == {"worker", "worker-cpu"}


def test_the_cpu_worker_is_the_gpu_worker_on_the_cpu(files):
    main, override = files
    gpu, cpu = main["services"]["worker"], override["services"]["worker-cpu"]
    assert_the_same_worker_on_the_cpu(gpu, cpu)
    assert cpu["environment"]["JUMPOUT_WORKER_NAME"] != gpu["environment"]["JUMPOUT_WORKER_NAME"]


def test_a_second_box_without_a_gpu_runs_the_same_worker_on_the_cpu():
    # docker-compose.worker-cpu.yml over docker-compose.worker.yml (README, a second box joins).
    remote, override = load("docker-compose.worker.yml"), load("docker-compose.worker-cpu.yml")
    assert set(override["services"]) == {"worker", "worker-cpu"}
    assert override["services"]["worker"] == {"profiles": ["gpu"]}
    gpu, cpu = remote["services"]["worker"], override["services"]["worker-cpu"]
    assert_the_same_worker_on_the_cpu(gpu, cpu)
    # Built like every other image: sources from the build arguments, on the host network.
    assert (
        gpu["build"]
        == cpu["build"]
        == load("docker-compose.cpu.yml")["services"]["worker-cpu"]["build"]
    )


def assert_the_same_worker_on_the_cpu(gpu: dict, cpu: dict) -> None:
    assert "deploy" not in cpu, "a device reservation fails on a host without the NVIDIA runtime"
    assert set(cpu) == set(gpu) - {"deploy"}, set(cpu) ^ set(gpu)
    for key in set(gpu) - GPU_ONLY - {"environment", "command"}:
        assert cpu[key] == gpu[key], key
    gpu_env, cpu_env = dict(gpu["environment"]), dict(cpu["environment"])
    assert cpu_env.pop("JUMPOUT_DEVICE") == "cpu" and gpu_env.pop("JUMPOUT_DEVICE") == "cuda"
    # Its name: its own on the main file's box (cpu0, gpu0), the box's name on a second box.
    cpu_env.pop("JUMPOUT_WORKER_NAME"), gpu_env.pop("JUMPOUT_WORKER_NAME")
    assert cpu_env == gpu_env
    assert cpu["command"][:-1] == gpu["command"][:-1] and cpu["command"][-2] == "-n"


def test_builds_take_their_sources_from_build_arguments_on_the_host_network(files):
    main, override = files
    services = {**main["services"], "worker-cpu": override["services"]["worker-cpu"]}
    built = {name: s["build"] for name, s in services.items() if "build" in s}
    assert set(built) == {"migrate", "api", "reaper", "worker", "worker-cpu"}
    for name, build in built.items():
        assert build["network"] == "host", name
        assert {"PYTHON_IMAGE", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"} <= set(
            build["args"]
        ), name
        # The public image and PyPI unless told otherwise.
        assert build["args"]["PYTHON_IMAGE"].endswith(":-python:3.11-slim}"), name
        assert build["args"]["PIP_INDEX_URL"].endswith(":-https://pypi.org/simple}"), name
    assert main["services"]["postgres"]["image"].endswith(":-postgres:16-alpine}")
    assert main["services"]["redis"]["image"].endswith(":-redis:7-alpine}")
