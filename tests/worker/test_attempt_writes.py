"""A trainer's writes are its attempt's: refused once the job is another attempt's, and its epochs
and the checkpoint covering them land together or not at all (on SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from jobstore import db, jobs
from jobstore.settings import get_settings
from worker import artifacts, ranks, trainer
from worker.supervisor import EXIT_SUPERSEDED


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path, monkeypatch):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jumpout.db'}"
        db.migrate(url)
        db.dispose_engines()
    else:
        url = request.getfixturevalue("postgres_url")  # each test makes its own jobs
    monkeypatch.setenv("JUMPOUT_HOME", str(tmp_path))
    monkeypatch.setenv("JUMPOUT_DATABASE_URL", url)
    get_settings.cache_clear()
    yield db
    db.dispose_engines()
    get_settings.cache_clear()


def claimed(store) -> str:
    spec = {"dataset": "digits", "architecture": "mlp", "epochs": 9}
    job = store.call(jobs.create_job, spec=spec, owner_id=None)
    assert store.call(jobs.claim_job, job.id, worker="first") is not None  # attempt 1
    return job.id


def hand_over(store, job_id: str) -> None:
    """What the reaper and another worker do when attempt 1's heartbeats are late."""
    assert store.call(jobs.requeue_job, job_id, attempt=1, error="stale", count_attempt=True)
    assert store.call(jobs.claim_job, job_id, worker="second").attempt == 2


def epoch(number: int) -> dict:
    return {"epoch": number, "train_loss": 1.0 / number, "test_accuracy": 0.1 * number}


def checkpoint(job_id: str, number: int) -> dict:
    path = jobs.job_directory(job_id) / f"checkpoint-epoch{number:04d}.pt"
    return dict(path=str(path), epoch=number, sha256=f"{number:064x}", size_bytes=1, is_best=False)


def stored(store, job_id: str) -> tuple[list[int], list[int]]:
    epochs = [row.epoch for row in store.call(jobs.list_metrics, job_id)]
    return epochs, [row.epoch for row in store.call(jobs.list_checkpoints, job_id)]


def test_epochs_and_the_checkpoint_covering_them_are_one_transaction(store):
    job_id = claimed(store)
    broken = {**checkpoint(job_id, 1), "sha256": None}  # fails inside record_checkpoint
    with pytest.raises(AttributeError):
        store.call(trainer._record_progress, job_id, [epoch(1)], broken, attempt=1)
    assert stored(store, job_id) == ([], [])
    assert store.call(jobs.get_job, job_id).epoch == 0


def test_a_superseded_attempts_writes_are_refused_and_change_nothing(store):
    job_id = claimed(store)
    for number in (1, 2):
        store.call(trainer._record_progress, job_id, [epoch(number)],
                   checkpoint(job_id, number), attempt=1)  # fmt: skip
    hand_over(store, job_id)
    writes = [
        (trainer._record_progress, (job_id, [epoch(3)], checkpoint(job_id, 3)), {}),
        (
            trainer._as_attempt,
            (jobs.forget_checkpoint, job_id),
            {"path": checkpoint(job_id, 1)["path"]},
        ),
        (artifacts.prune_records, (job_id,), {"keep_last": 1, "keep_best": False}),
        (trainer.read_stop_request, (job_id, 1), {}),
        (trainer._as_attempt, (jobs.set_environment, job_id), {"environment": {"seed": 7}}),
    ]
    for write, args, kwargs in writes:
        if write is not trainer.read_stop_request:
            kwargs = {**kwargs, "attempt": 1}
        with pytest.raises(jobs.AttemptSuperseded, match="no longer runs as attempt 1"):
            store.call(write, *args, **kwargs)
    assert stored(store, job_id) == ([1, 2], [1, 2])
    assert store.call(jobs.get_job, job_id).environment != {"seed": 7}
    # The job's new attempt writes as before.
    store.call(trainer._record_progress, job_id, [epoch(3)], checkpoint(job_id, 3), attempt=2)
    assert store.call(artifacts.prune_records, job_id, keep_last=1, keep_best=False, attempt=2)
    assert stored(store, job_id) == ([1, 2, 3], [3])


def test_a_finished_job_takes_no_more_writes_from_its_attempt(store):
    job_id = claimed(store)
    store.call(jobs.finish_job, job_id, status="succeeded", attempt=1)
    with pytest.raises(jobs.AttemptSuperseded, match="succeeded as attempt 1"):
        store.call(trainer._record_progress, job_id, [epoch(9)], attempt=1)


def test_the_callback_stops_at_once_and_writes_nothing_more(store):
    job_id = claimed(store)
    callback = trainer.StoreCallback(
        job_id, attempt=1, stop_event=threading.Event(), parent_pid=os.getppid()
    )
    callback.on_epoch_end(epoch(1))
    assert callback.should_stop() is False
    hand_over(store, job_id)
    callback._cancel_checked_at = float("-inf")  # the next poll is due
    with pytest.raises(jobs.AttemptSuperseded):
        callback.should_stop()  # raised, not True: a stop would write a checkpoint
    assert callback.superseded
    with pytest.raises(jobs.AttemptSuperseded):
        callback.on_checkpoint_removed(checkpoint(job_id, 1)["path"])
    fresh = trainer.StoreCallback(
        job_id, attempt=1, stop_event=threading.Event(), parent_pid=os.getppid()
    )
    with pytest.raises(jobs.AttemptSuperseded):  # asked before the file is written
        fresh.before_checkpoint(checkpoint(job_id, 1)["path"], 1)
    assert fresh.superseded
    with pytest.raises(jobs.AttemptSuperseded):
        callback.flush()  # refused too: the new attempt trains epoch 1 again and records it
    assert stored(store, job_id) == ([], [])


# SQLite serialises every transaction already (BEGIN IMMEDIATE).
@pytest.mark.parametrize("store", ["postgresql"], indirect=True)
def test_postgresql_holds_the_jobs_row_until_the_write_commits(store):
    job_id = claimed(store)
    requeued: list[bool] = []
    with db.get_sessionmaker()() as session:
        jobs.hold_attempt(session, job_id, attempt=1)
        reaper = threading.Thread(
            target=lambda: requeued.append(
                db.call(jobs.requeue_job, job_id, attempt=1, error="stale", count_attempt=True)
            )
        )
        reaper.start()
        time.sleep(0.5)
        assert reaper.is_alive(), "the requeue did not wait for the attempt's write"
        jobs.record_epochs(session, job_id, [epoch(1)], commit=False)
        session.commit()
    reaper.join(timeout=10)
    assert requeued == [True]
    assert stored(store, job_id) == ([1], [])


def test_ranks_of_a_superseded_attempt_report_nothing(tmp_path):
    assert ranks.outcome({0: EXIT_SUPERSEDED, 1: -9}, tmp_path, 2) == (EXIT_SUPERSEDED, None)
