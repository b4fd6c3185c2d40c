"""Checkpoints downloaded by a name a person can guess: `latest`, `best`, `epoch/<n>`, with the
integrity checks of the download by id, and a 404 that says why when there is none. SQLite and
PostgreSQL."""

from __future__ import annotations

import hashlib

import pytest

from jobstore import jobs


@pytest.fixture
def job_dir(settings):
    directory = settings.artifact_dir / "jobs" / "named"
    directory.mkdir(parents=True)
    return directory


def keep(session, job_id, job_dir, name: str, epoch: int, is_best: bool = False) -> bytes:
    """Write a checkpoint file and record it as the worker does; returns its bytes."""
    content = f"{name} of {job_id}".encode() * 20
    path = job_dir / name
    path.write_bytes(content)
    jobs.record_checkpoint(
        session, job_id, path=str(path), epoch=epoch, sha256=hashlib.sha256(content).hexdigest(),
        size_bytes=len(content), is_best=is_best,
    )  # fmt: skip
    return content


def download(client, job_id: str, name: str):
    return client.get(f"/v1/jobs/{job_id}/checkpoints/{name}/file")


def test_latest_best_and_epoch_name_the_files(client, session, make_job, job_dir):
    job_id = make_job(val_fraction=0.2, keep_last=2)
    best = keep(session, job_id, job_dir, "checkpoint-epoch0003.pt", 3, is_best=True)
    epoch5 = keep(session, job_id, job_dir, "checkpoint-epoch0005.pt", 5)
    keep(session, job_id, job_dir, "checkpoint-epoch0006.pt", 6)
    # A stop in the middle of epoch 7 records 6 epochs done, in a file of its own.
    mid_seven = keep(session, job_id, job_dir, "checkpoint-epoch0006-step000012.pt", 6)

    latest = download(client, job_id, "latest")
    assert latest.status_code == 200 and latest.content == mid_seven
    assert latest.headers["X-Checksum-SHA256"] == hashlib.sha256(mid_seven).hexdigest()
    assert f'filename="{job_id}-epoch0006.pt"' in latest.headers["content-disposition"]

    assert download(client, job_id, "best").content == best
    assert download(client, job_id, "epoch/5").content == epoch5
    sixth = download(client, job_id, "epoch/6")
    assert sixth.status_code == 200 and b"checkpoint-epoch0006.pt" in sixth.content


def test_a_pruned_epoch_is_a_404_naming_the_epochs_kept(client, session, make_job, job_dir):
    job_id = make_job(keep_last=2)
    for epoch in (4, 5):
        keep(session, job_id, job_dir, f"checkpoint-epoch{epoch:04d}.pt", epoch)
    response = download(client, job_id, "epoch/1")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "checkpoint_not_found"
    assert "epoch 1" in error["message"] and "epochs with one: 4, 5" in error["message"]
    assert "keep_last=2" in error["message"]


def test_without_a_validation_split_there_is_no_best_and_the_404_says_so(
    client, session, make_job, job_dir
):
    job_id = make_job()  # val_fraction 0
    keep(session, job_id, job_dir, "checkpoint-epoch0001.pt", 1)
    response = download(client, job_id, "best")
    assert response.status_code == 404
    assert "no validation split (val_fraction 0)" in response.json()["error"]["message"]
    assert download(client, job_id, "latest").status_code == 200


def test_a_job_without_checkpoints_yet(client, make_job):
    job_id = make_job(val_fraction=0.1)
    for name, says in (("latest", "no checkpoint yet"), ("best", "no best checkpoint yet")):
        response = download(client, job_id, name)
        assert response.status_code == 404 and says in response.json()["error"]["message"]
    assert "it has none yet" in download(client, job_id, "epoch/2").json()["error"]["message"]


def test_named_downloads_check_integrity_and_confinement(client, session, make_job, job_dir):
    job_id = make_job(val_fraction=0.2)
    keep(session, job_id, job_dir, "checkpoint-epoch0001.pt", 1, is_best=True)
    (job_dir / "checkpoint-epoch0001.pt").write_bytes(b"x" * 10)
    for name in ("latest", "best", "epoch/1"):
        response = download(client, job_id, name)
        assert response.status_code == 409, name
        assert response.json()["error"]["code"] == "checksum_mismatch"

    other = make_job()
    outside = job_dir.parent.parent.parent / "outside.pt"  # beside the artifact directory
    outside.write_bytes(b"secret")
    jobs.record_checkpoint(
        session, other, path=str(outside), epoch=1, sha256=hashlib.sha256(b"secret").hexdigest(),
        size_bytes=6, is_best=False,
    )  # fmt: skip
    response = download(client, other, "latest")
    assert response.status_code == 409 and response.json()["error"]["code"] == "checkpoint_refused"
    assert str(outside) not in response.text


@pytest.mark.parametrize("name", ["epoch/-1", "epoch/x", "epoch/1001", "newest"])
def test_bad_names_are_refused(client, make_job, name):
    response = download(client, make_job(), name)
    assert response.status_code in (404, 422), response.text
    assert set(response.json()) == {"error"}


def test_unknown_job_is_404(client):
    assert download(client, "0" * 32, "latest").json()["error"]["code"] == "job_not_found"
