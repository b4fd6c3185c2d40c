"""The trainer records what reproducing a job needs (its ``environment``), starts a job from an
earlier job's checkpoint (``init_from: job:<id>``), fails a job whose starting weights or resumed
checkpoint do not fit; and a submission may name only a job its caller may start from.

The trainer runs for real: ``worker.trainer.train(job_id)`` in its own process (it installs
signal handlers and owns torch), against the test's SQLite store, on the CPU.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from sqlalchemy import update

from jobstore import jobs
from jobstore.errors import InvalidSpec
from jobstore.tables import ApiToken, Job
from worker.supervisor import EXIT_FAILED, EXIT_SUCCEEDED, RESULT_FILE

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
SMALL = {"dataset": "digits", "architecture": "mlp", "epochs": 1, "train_size": 128,
         "test_size": 64, "batch_size": 32}  # fmt: skip


def run_trainer(job_id: str, home: Path) -> int:
    """``worker.trainer.train(job_id)`` in a process of its own, as the supervisor starts it."""
    env = {
        **os.environ,
        "JUMPOUT_HOME": str(home),
        "JUMPOUT_DATABASE_URL": f"sqlite:///{home / 'jumpout.db'}",
        "JUMPOUT_DEVICE": "cpu",
    }
    code = "import sys; from worker.trainer import train; sys.exit(train(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", code, job_id], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    if done.returncode not in (EXIT_SUCCEEDED, EXIT_FAILED):
        pytest.fail(f"trainer exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.returncode


def submit(job_store, spec, owner_id=None) -> str:
    """A claimed job with its directory made, as the supervisor leaves it for the trainer."""
    job = job_store.call(jobs.create_job, spec=spec, owner_id=owner_id)
    assert job_store.call(jobs.claim_job, job.id, worker="test") is not None
    jobs.job_directory(job.id).mkdir(parents=True, exist_ok=True)
    return job.id


def failure(job_id: str) -> str:
    return json.loads((jobs.job_directory(job_id) / RESULT_FILE).read_text())["error"]


def test_trainer_records_the_environment_and_starts_from_another_jobs_checkpoint(
    job_store, tmp_path
):
    first = submit(job_store, SMALL)
    assert run_trainer(first, tmp_path) == EXIT_SUCCEEDED
    environment = job_store.call(jobs.get_job, first).environment
    git_head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert environment == {
        "seed": 0,
        "jumpout_version": importlib.metadata.version("jumpout"),
        "git_commit": git_head or None,
        "git_dirty": environment["git_dirty"],
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": "cpu",
        "device_name": environment["device_name"],
        "hostname": socket.gethostname(),
        "init_from": None,
    }
    assert environment["git_dirty"] in (True, False, None)
    assert isinstance(environment["device_name"], str) and environment["device_name"]

    source = job_store.call(jobs.newest_valid_checkpoint, first)
    second = submit(job_store, {**SMALL, "seed": 7, "init_from": f"job:{first}"})
    assert run_trainer(second, tmp_path) == EXIT_SUCCEEDED
    record = {
        "source": f"job:{first}",
        "kind": "job",
        "path": str(Path(source.path).resolve()),
        "sha256": source.sha256,
    }
    environment = job_store.call(jobs.get_job, second).environment
    assert environment["seed"] == 7 and environment["init_from"] == record
    assert hashlib.sha256(Path(source.path).read_bytes()).hexdigest() == source.sha256
    written = job_store.call(jobs.newest_valid_checkpoint, second)
    checkpoint = torch.load(written.path, weights_only=True)
    assert checkpoint["init"] == record
    assert checkpoint["environment"]["init_from"] == record


def test_a_resume_whose_spec_changed_fails_the_job_naming_the_fields(job_store, tmp_path):
    job_id = submit(job_store, SMALL)
    assert run_trainer(job_id, tmp_path) == EXIT_SUCCEEDED
    # As if the row had been edited between attempts: the checkpoint says 1 epoch, lr 0.05.
    with job_store.session_scope() as session:
        spec = session.get(Job, job_id).spec
        session.execute(
            update(Job).where(Job.id == job_id).values(spec={**spec, "epochs": 3, "lr": 0.01})
        )
        session.commit()
    assert run_trainer(job_id, tmp_path) == EXIT_FAILED
    error = failure(job_id)
    assert error.startswith("invalid job spec: epochs: cannot resume")
    assert "epochs=1 (asked: 3)" in error and "lr=0.05 (asked: 0.01)" in error


def test_missing_starting_weights_fail_the_job_with_the_reason(job_store, tmp_path):
    never_ran = job_store.call(jobs.create_job, spec=SMALL, owner_id=None).id
    from_job = submit(job_store, {**SMALL, "init_from": f"job:{never_ran}"})
    assert run_trainer(from_job, tmp_path) == EXIT_FAILED
    assert failure(from_job) == (
        f"invalid job spec: init_from: job {never_ran} has no valid checkpoint to start from"
    )
    from_file = submit(job_store, {**SMALL, "init_from": "weights/resnet18.pth"})
    assert run_trainer(from_file, tmp_path) == EXIT_FAILED
    assert "init_from: 'weights/resnet18.pth': no such weights file" in failure(from_file)


def test_init_from_a_job_is_accepted_only_for_its_owner_or_an_admin(job_store):
    with job_store.session_scope() as session:
        for name, admin in (("alice", False), ("bob", False), ("root", True)):
            session.add(ApiToken(name=name, token_hash=name * 8, is_admin=admin))
        session.commit()
    alice, bob, root = 1, 2, 3
    source = job_store.call(jobs.create_job, spec=SMALL, owner_id=alice).id
    spec = {**SMALL, "init_from": f"job:{source}"}
    assert job_store.call(jobs.create_job, spec=spec, owner_id=alice).spec["init_from"] == (
        f"job:{source}"
    )
    assert job_store.call(jobs.create_job, spec=spec, owner_id=root) is not None
    unknown = {**SMALL, "init_from": "job:" + "f" * 32}
    messages = []
    for owner, asked in ((bob, spec), (None, spec), (alice, unknown)):
        with pytest.raises(InvalidSpec) as caught:
            job_store.call(jobs.create_job, spec=asked, owner_id=owner)
        assert caught.value.status_code == 422
        [field] = caught.value.fields
        assert field.field == "init_from"
        messages.append(field.message.split(" that ")[1])
    # "Not yours" and "no such job" read the same: job ids cannot be probed.
    assert len(set(messages)) == 1
