"""Readable failures (issue 12): what a failed attempt's error says, how a full disk is
recognised, and what the trainer writes when it crashes or meets a full disk (in-process; the
real processes are in tests/integration/test_bad_day.py)."""

from __future__ import annotations

import errno
import json
import sqlite3

import pytest
from sqlalchemy.exc import DatabaseError, OperationalError

from jobstore import jobs
from jobstore.settings import get_settings
from jobstore.storage import is_disk_full
from worker import failures, trainer
from worker.supervisor import EXIT_ENVIRONMENT, RESULT_FILE


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("JUMPOUT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("JUMPOUT_ARTIFACT_DIR", str(tmp_path / "srv" / "artifacts"))
    monkeypatch.setenv("JUMPOUT_DATA_DIR", str(tmp_path / "srv" / "data"))
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def test_server_paths_become_names_relative_to_their_directory(dirs):
    text = (
        f"cannot open {dirs.artifact_dir}/jobs/abc/checkpoint-epoch0003.pt and "
        f"'{dirs.data_dir}/cifar10/data_batch_1' from {dirs.home}/jumpout.db"
    )
    assert failures.strip_paths(text) == (
        "cannot open jobs/abc/checkpoint-epoch0003.pt and 'cifar10/data_batch_1' from jumpout.db"
    )


def test_other_absolute_paths_keep_only_their_last_part(dirs):
    text = 'File "/usr/lib/python3.11/site-packages/torch/nn/functional.py", line 12'
    assert failures.strip_paths(text) == 'File ".../functional.py", line 12'


@pytest.mark.parametrize(
    "text",
    ["ratio 1/2 of a/b", "redis://127.0.0.1:6379/0", "https://example.org/x/y", "size 3/4"],
)
def test_what_is_not_an_absolute_path_is_left_alone(dirs, text):
    assert failures.strip_paths(text) == text


def test_an_exception_is_named_with_its_message_on_one_short_line(dirs):
    error = RuntimeError(f"CUDA error: an illegal memory access\nin {dirs.artifact_dir}/x " * 40)
    described = failures.describe_exception(error)
    assert described.startswith("RuntimeError: CUDA error: an illegal memory access in x")
    assert "\n" not in described and str(dirs.artifact_dir) not in described
    assert len(described) <= len("RuntimeError: ") + failures.MESSAGE_CHARS
    assert described.endswith("...")
    assert failures.describe_exception(KeyError()) == "KeyError"


def test_a_crashed_attempts_error_points_to_the_log():
    assert failures.attempt_error("j" * 32, attempt=2, budget=3, reason="RuntimeError: x") == (
        f"attempt 2 of 3: RuntimeError: x (the full output: GET /v1/jobs/{'j' * 32}/log)"
    )


def _with_context(error: BaseException, context: BaseException) -> BaseException:
    error.__context__ = context
    return error


def _sqlite_full() -> sqlite3.OperationalError:
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = 13
    return error


@pytest.mark.parametrize(
    ("error", "full"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        # torch.save turns its writer's ENOSPC into this
        (_with_context(RuntimeError("unexpected pos 64 vs 0"), OSError(errno.ENOSPC, "")), True),
        (OperationalError("INSERT", {}, _sqlite_full()), True),
        (
            OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full")),
            True,
        ),
        (OSError(errno.EACCES, "Permission denied"), False),
        (OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked")), False),
        (RuntimeError("CUDA error"), False),
    ],
)
def test_a_full_disk_is_recognised_however_it_is_wrapped(error, full):
    assert is_disk_full(error) is full


def test_postgresqls_disk_full_is_recognised():
    psycopg = pytest.importorskip("psycopg")
    assert is_disk_full(OperationalError("INSERT", {}, psycopg.errors.DiskFull("no space")))


def _result(job_id: str) -> str:
    return json.loads((jobs.job_directory(job_id) / RESULT_FILE).read_text())["error"]


def test_a_trainer_crash_writes_the_exception_without_paths_and_still_crashes(
    claimed_job, monkeypatch
):
    artifact_dir = get_settings().artifact_dir
    jobs.job_directory(claimed_job).mkdir(parents=True)

    def crash(job_id):
        raise RuntimeError(f"CUDA error: device-side assert at {artifact_dir}/jobs/x/model.pt")

    monkeypatch.setattr(trainer, "train", crash)
    with pytest.raises(RuntimeError):  # a crash stays a crash: the supervisor retries it
        trainer.main([claimed_job])
    assert _result(claimed_job) == "RuntimeError: CUDA error: device-side assert at jobs/x/model.pt"


def test_a_full_disk_in_the_trainer_is_an_environment_failure_naming_the_epochs(
    claimed_job, job_store, monkeypatch
):
    from jumpout.engine import CheckpointWriteError

    out = jobs.job_directory(claimed_job)
    out.mkdir(parents=True)
    kept = out / "checkpoint-epoch0004.pt"
    kept.write_bytes(b"weights")
    job_store.call(
        jobs.record_checkpoint, claimed_job, path=str(kept), epoch=4, is_best=False,
        size_bytes=7, sha256=jobs.file_sha256(kept),
    )  # fmt: skip

    def full(job_id):
        raise CheckpointWriteError(5, OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(trainer, "train", full)
    assert trainer.main([claimed_job]) == EXIT_ENVIRONMENT
    assert _result(claimed_job) == (
        "no space left on the server's disk while writing the checkpoint of epoch 5; the "
        "checkpoint of epoch 4 is intact; once the operator has freed space, resume the job "
        f"(POST /v1/jobs/{claimed_job}/retry)"
    )


def test_a_remote_workers_full_disk_names_the_checkpoint_recorded_on_the_apis_box(
    claimed_job, job_store, monkeypatch
):
    """On a worker with ``artifact_url``, recorded checkpoint paths are the API box's: checking
    them here found none intact and said the job would start over."""
    from jumpout.engine import CheckpointWriteError
    from worker import supervisor

    monkeypatch.setenv("JUMPOUT_ARTIFACT_URL", "http://api-box.invalid:8001")
    get_settings.cache_clear()
    job_store.call(
        jobs.record_checkpoint, claimed_job, epoch=4, is_best=False, size_bytes=7,
        path=f"/srv/api-box/artifacts/jobs/{claimed_job}/checkpoint-epoch0004.pt",
        sha256="ab" * 32,
    )  # fmt: skip
    jobs.job_directory(claimed_job).mkdir(parents=True)

    def full(job_id):
        raise CheckpointWriteError(5, OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(trainer, "train", full)
    assert trainer.main([claimed_job]) == EXIT_ENVIRONMENT
    assert "the checkpoint of epoch 4 is intact" in _result(claimed_job)
    supervisor._fail_for_environment(claimed_job, attempt=1)  # the supervisor's own reason
    row = job_store.call(jobs.get_job, claimed_job)
    assert row.status == "failed" and "the checkpoint of epoch 4 is intact" in row.error


def test_a_store_that_cannot_take_the_last_epochs_does_not_turn_a_failure_into_a_crash(
    claimed_job, monkeypatch
):
    # A diverged run fails once (EXIT_FAILED, never retried) even when the store is down as
    # the trainer flushes its held-back epochs: before, the flush's error replaced the exit
    # code and the reason, and the supervisor retried the run to diverge again.
    import jumpout.engine
    from worker.supervisor import EXIT_FAILED

    monkeypatch.setenv("JUMPOUT_DEVICE", "cpu")
    get_settings.cache_clear()

    def diverge(config, callbacks, **options):
        callbacks[0].on_epoch_end({"epoch": 1, "train_loss": 2.0})
        raise jumpout.engine.NonFiniteLossError(2, 5)

    def store_down(*args, **kwargs):  # what db.call raises once its retries are spent
        raise DatabaseError("INSERT", {}, Exception("the database is down"))

    monkeypatch.setattr(jumpout.engine, "fit", diverge)
    monkeypatch.setattr(trainer, "_record_progress", store_down)
    jobs.job_directory(claimed_job).mkdir(parents=True)
    assert trainer.train(claimed_job) == EXIT_FAILED
    assert _result(claimed_job).startswith("training diverged: training loss became NaN")
