"""A worker on another box (`worker.artifacts`) against the artifact service, in one process: the
uploader records a checkpoint only once the service has it, prunes the API box's copies by the
engine's rule even after the local files are gone, and fails the attempt when it cannot send;
a resume fetches the newest checkpoint whose sha256 matches; the log shipper appends each
attempt's output once, in order. The worker's directory is never the service's."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from jobstore import db, joblog, jobs
from jobstore.settings import get_settings
from jobstore.tables import Checkpoint, EpochMetric
from worker import artifacts

SECRET = "s3cret-for-the-workers-only"


@pytest.fixture
def service(job_store, monkeypatch):
    monkeypatch.setenv("JUMPOUT_WORKER_SECRET", SECRET)
    get_settings.cache_clear()
    from api.artifact_service import create_app

    with TestClient(create_app()) as http:
        yield http


@pytest.fixture
def client(service):
    return artifacts.ArtifactClient(secret=SECRET, http=service, retry_s=0)


@pytest.fixture
def job_id(job_store) -> str:
    spec = {"dataset": "digits", "architecture": "mlp", "epochs": 4}
    return db.call(jobs.create_job, spec=spec, owner_id=None).id


def record(job_id: str):
    """What the trainer records with each upload (`worker.trainer._checkpoint_uploader`)."""

    def write(session, epochs: list[dict], checkpoint: dict | None) -> None:
        jobs.record_epochs(session, job_id, epochs)
        if checkpoint is not None:
            jobs.record_checkpoint(session, job_id, **checkpoint)

    return lambda epochs, checkpoint: db.call(write, epochs, checkpoint)


def metrics(epoch: int) -> dict:
    return {"epoch": epoch, "train_loss": 1.0, "test_accuracy": 0.1 * epoch, "seconds": 1.0}


def write_checkpoint(directory: Path, epoch: int) -> tuple[Path, str]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"checkpoint-epoch{epoch:04d}.pt"
    path.write_bytes(f"weights of epoch {epoch}".encode() * 100)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def recorded(job_id: str) -> list[tuple[str, bool]]:
    def read(session):
        rows = session.execute(
            select(Checkpoint.path, Checkpoint.is_best)
            .where(Checkpoint.job_id == job_id)
            .order_by(Checkpoint.epoch)
        ).all()
        session.commit()
        return [(Path(path).name, is_best) for path, is_best in rows]

    return db.call(read)


def test_uploads_are_recorded_once_stored_and_pruned_there_by_the_engines_rule(
    client, job_id, tmp_path
):
    worker_dir = tmp_path / "worker-box" / job_id  # not the service's artifact_dir
    service_dir = get_settings().artifact_dir / "jobs" / job_id
    uploader = artifacts.CheckpointUploader(
        job_id, client, record(job_id), keep_last=2, keep_best=True, queue_size=1
    )
    for epoch in (1, 2, 3, 4):
        path, sha256 = write_checkpoint(worker_dir, epoch)
        uploader.checkpoint(str(path), epoch=epoch, sha256=sha256, size_bytes=path.stat().st_size,
                            is_best=epoch == 1, epochs=[metrics(epoch)])  # fmt: skip
        path.unlink()  # the engine prunes its local file, maybe before the upload: no matter
    uploader.epochs([])
    uploader.close(timeout=30)

    names = ["checkpoint-epoch0001.pt", "checkpoint-epoch0003.pt", "checkpoint-epoch0004.pt"]
    assert recorded(job_id) == [(names[0], True), (names[1], False), (names[2], False)]
    assert sorted(p.name for p in service_dir.glob("checkpoint-*.pt")) == names
    assert list((worker_dir / artifacts.STAGING_DIR).iterdir()) == []
    for row in db.call(jobs.list_checkpoints, job_id):
        assert jobs.verify_checkpoint_file(row).parent == service_dir  # served by the API
    epochs = db.call(lambda s: s.scalars(select(EpochMetric.epoch).order_by("epoch")).all())
    assert epochs == [1, 2, 3, 4]


def test_a_checkpoint_that_cannot_be_sent_is_never_recorded_and_fails_the_attempt(
    service, job_id, tmp_path
):
    refused = artifacts.ArtifactClient(secret="not-" + SECRET, http=service, retry_s=0)
    uploader = artifacts.CheckpointUploader(
        job_id, refused, record(job_id), keep_last=3, keep_best=False
    )
    path, sha256 = write_checkpoint(tmp_path / "worker-box", 1)
    uploader.checkpoint(str(path), epoch=1, sha256=sha256, size_bytes=path.stat().st_size,
                        is_best=False, epochs=[metrics(1)])  # fmt: skip
    with pytest.raises(artifacts.UploadFailed, match="401"):
        uploader.close(timeout=30)
    assert recorded(job_id) == []
    assert db.call(jobs.get_job, job_id).epoch == 0


def test_a_resume_on_another_box_fetches_the_newest_checkpoint_that_matches(
    client, job_id, tmp_path
):
    uploader = artifacts.CheckpointUploader(
        job_id, client, record(job_id), keep_last=3, keep_best=False
    )
    for epoch in (1, 2):
        path, sha256 = write_checkpoint(tmp_path / "box-a", epoch)
        uploader.checkpoint(str(path), epoch=epoch, sha256=sha256,
                            size_bytes=path.stat().st_size, is_best=False, epochs=[])  # fmt: skip
    uploader.close(timeout=30)

    box_b = tmp_path / "box-b"
    fetched = artifacts.fetch_checkpoint(job_id, client, into=box_b)
    assert fetched == box_b / "checkpoint-epoch0002.pt"
    assert fetched.read_bytes() == (tmp_path / "box-a" / fetched.name).read_bytes()

    # The API box's newest file was damaged: the next older one, checked, rather than garbage.
    (get_settings().artifact_dir / "jobs" / job_id / fetched.name).write_bytes(b"damaged")
    box_c = tmp_path / "box-c"
    assert artifacts.fetch_checkpoint(job_id, client, into=box_c) == (
        box_c / "checkpoint-epoch0001.pt"
    )
    assert not (box_c / "checkpoint-epoch0002.pt").exists()
    # A box that still holds a matching copy uses it without downloading.
    assert artifacts.fetch_checkpoint(job_id, client, into=box_b) == fetched


def test_the_log_of_each_attempt_is_appended_once_in_order(client, job_id, tmp_path):
    box_a, box_b = tmp_path / "box-a.log", tmp_path / "box-b.log"
    box_a.write_bytes(b"earlier output of box a\n")
    offset = box_a.stat().st_size
    with open(box_a, "ab") as out:
        out.write(b"\n=== attempt 1 ===\nepoch 1\n")
    shipper = artifacts.LogShipper(job_id, box_a, offset, client, interval=0.05)
    with open(box_a, "ab") as out:
        out.write(b"epoch 2\nTraceback: killed\n")
    shipper.close(timeout=10)
    box_b.write_bytes(b"\n=== attempt 2 ===\nepoch 3\n")
    artifacts.LogShipper(job_id, box_b, 0, client, interval=60).close(timeout=10)

    stored = (get_settings().artifact_dir / "jobs" / job_id / "trainer.log").read_bytes()
    assert stored == (
        b"\n=== attempt 1 ===\nepoch 1\nepoch 2\nTraceback: killed\n\n=== attempt 2 ===\nepoch 3\n"
    )


def test_a_stale_attempts_log_is_appended_whole_after_its_successors_never_into_it(
    client, job_id, tmp_path
):
    """The job was given to box b while box a's shipper still ran: a's next chunk lands where
    b's output already is. Before, the service took the overlap for a resend and wrote a's tail
    from the middle of a line; now it refuses (409 `log_conflict`) and a resends at the end."""
    box_a, box_b = tmp_path / "box-a.log", tmp_path / "box-b.log"
    box_a.write_bytes(b"\n=== attempt 1 ===\nepoch 1\n")
    stale = artifacts.LogShipper(job_id, box_a, 0, client, interval=60)
    assert stale.ship()
    box_b.write_bytes(b"\n=== attempt 2 ===\n")
    artifacts.LogShipper(job_id, box_b, 0, client, interval=60).close(timeout=10)
    with open(box_a, "ab") as out:
        out.write(b"epoch 2, stopping: the job is no longer ours\n")
    stale.close(timeout=10)

    stored = (get_settings().artifact_dir / "jobs" / job_id / "trainer.log").read_bytes()
    assert stored == (
        b"\n=== attempt 1 ===\nepoch 1\n\n=== attempt 2 ===\n"
        b"epoch 2, stopping: the job is no longer ours\n"
    )


def test_a_shipper_behind_the_local_cut_sends_the_marker_not_zeros(client, job_id, tmp_path):
    """The supervisor bounds the local log by punching a hole (`joblog.cut_log`); a shipper that
    had not sent that range yet read zeros there and sent them."""
    local = tmp_path / "box-a.log"
    local.write_bytes(b"".join(b"epoch %06d\n" % n for n in range(20_000)))  # 240 kB
    shipper = artifacts.LogShipper(job_id, local, 0, client, interval=60)
    assert joblog.cut_log(local, 64 * 1024) is not None
    shipper.close(timeout=10)

    stored = (get_settings().artifact_dir / "jobs" / job_id / "trainer.log").read_bytes()
    assert b"\0" not in stored
    assert stored.startswith(b"epoch 000000\n") and stored.endswith(b"epoch 019999\n")
    assert b"bytes of this log were dropped here" in stored


def test_a_hung_artifact_service_holds_the_jobs_end_a_bounded_time(job_id, tmp_path, monkeypatch):
    """A service that accepts connections and never answers: before, `close` joined a shipping
    thread stuck in a request with a 300 s read timeout, and the job's end (no heartbeat
    meanwhile) waited until the reaper requeued the succeeded job."""
    from worker import supervisor

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # connections complete in the backlog; nothing is ever read or answered
    monkeypatch.setenv("JUMPOUT_ARTIFACT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("JUMPOUT_WORKER_SECRET", SECRET)
    get_settings.cache_clear()
    monkeypatch.setattr(artifacts, "LOG_REQUEST_TIMEOUT_S", 0.5, raising=False)
    local = tmp_path / "box-a.log"
    local.write_bytes(b"\n=== attempt 1 ===\nepoch 1\n")
    try:
        shipper = supervisor._log_shipper(job_id, local, 0)
        time.sleep(1.2)  # the thread is in its first request
        closing = threading.Thread(target=shipper.close, kwargs={"timeout": 1.0}, daemon=True)
        started = time.monotonic()
        closing.start()
        closing.join(10)
        assert not closing.is_alive(), "close() still waiting on the hung service"
        assert time.monotonic() - started < 4.0
    finally:
        listener.close()


def test_two_downloads_of_one_checkpoint_use_their_own_temporary_files(tmp_path):
    """Two trainers of one box fetching one checkpoint: with one fixed temporary name, the second
    wrote into the first's file and renamed it away under it (FileNotFoundError). A failed
    download leaves no temporary file."""
    name = "checkpoint-epoch0001.pt"
    data = b"weights" * 1000
    digest = hashlib.sha256(data).hexdigest()
    destination = tmp_path / "box" / name
    broken: list[bool] = []

    def body():
        if not nested_done:
            nested_done.append(True)  # meanwhile, another trainer fetches the same file
            client.download_checkpoint("j", name, destination, sha256=digest)
        if broken:
            yield data[:100]
            raise httpx.ReadError("connection reset")
        yield data

    nested_done: list[bool] = []
    http = httpx.Client(
        transport=httpx.MockTransport(lambda request: httpx.Response(200, content=body())),
        base_url="http://artifacts",
    )
    client = artifacts.ArtifactClient(secret=SECRET, http=http, retry_s=0)
    assert client.download_checkpoint("j", name, destination, sha256=digest) == destination
    assert destination.read_bytes() == data
    assert [p.name for p in destination.parent.iterdir()] == [name]

    broken.append(True)
    destination.unlink()
    with pytest.raises(artifacts.ArtifactError, match="connection reset"):
        client.download_checkpoint("j", name, destination, sha256=digest)
    broken.clear()
    with pytest.raises(artifacts.DownloadMismatch):
        client.download_checkpoint("j", name, destination, sha256="0" * 64)
    assert list(destination.parent.iterdir()) == []


def test_after_a_hand_over_the_uploader_sends_and_records_nothing(client, job_id, tmp_path):
    assert db.call(jobs.claim_job, job_id, worker="box-a") is not None  # attempt 1
    service_dir = get_settings().artifact_dir / "jobs" / job_id
    uploader = artifacts.CheckpointUploader(
        job_id, client, record(job_id), keep_last=3, keep_best=False, attempt=1
    )
    assert db.call(jobs.requeue_job, job_id, attempt=1, error="stale", count_attempt=True)
    path, sha256 = write_checkpoint(tmp_path / "box-a", 1)
    uploader.checkpoint(str(path), epoch=1, sha256=sha256, size_bytes=path.stat().st_size,
                        is_best=False, epochs=[metrics(1)])  # fmt: skip
    with pytest.raises(jobs.AttemptSuperseded):  # itself, not an UploadFailed: no retry
        uploader.close(timeout=30)
    assert not service_dir.exists() or not list(service_dir.glob("checkpoint-*"))
    assert recorded(job_id) == []


def test_an_abandoned_uploader_discards_what_is_queued(client, job_id, tmp_path):
    uploader = artifacts.CheckpointUploader(
        job_id, client, record(job_id), keep_last=3, keep_best=False
    )
    uploader.abandon()
    path, sha256 = write_checkpoint(tmp_path / "box-a", 1)
    with pytest.raises(jobs.AttemptSuperseded):
        uploader.checkpoint(str(path), epoch=1, sha256=sha256, size_bytes=path.stat().st_size,
                            is_best=False, epochs=[metrics(1)])  # fmt: skip
    uploader._thread.join(timeout=10)
    assert not uploader._thread.is_alive()
    assert recorded(job_id) == []
