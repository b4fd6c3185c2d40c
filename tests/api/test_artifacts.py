"""Per-epoch metrics and checkpoint files of a job."""

from __future__ import annotations

import hashlib

import pytest

from jobstore import jobs


def epoch_metrics(epoch: int, accuracy: float, **extra) -> dict:
    return {
        "epoch": epoch,
        "train_loss": 1.0 / epoch,
        "train_accuracy": accuracy + 0.05,
        "test_loss": 1.2 / epoch,
        "test_accuracy": accuracy,
        "lr": 0.05,
        "seconds": 2.0,
        "images_per_second": 1000.0,
        "layers": [{"name": "features.1", "active_fraction": 0.5, "rate": 0.2}],
        **extra,
    }


def test_metrics_upsert_never_duplicates_an_epoch(client, session, make_job):
    job_id = make_job(epochs=3)
    jobs.claim_job(session, job_id, worker="w1")
    jobs.record_epoch(session, job_id, epoch_metrics(1, 0.4, val_accuracy=0.3))
    jobs.record_epoch(session, job_id, epoch_metrics(2, 0.7, val_accuracy=0.9))
    # A resumed run repeats epoch 2 with other numbers: it replaces the row.
    jobs.record_epoch(session, job_id, epoch_metrics(2, 0.6, lr=0.01, val_accuracy=0.35))
    # The test set's best epoch (2) is not the validation split's (3): "best" follows validation.
    jobs.record_epoch(session, job_id, epoch_metrics(3, 0.5, val_accuracy=0.4))

    items = client.get(f"/v1/jobs/{job_id}/metrics").json()["items"]
    assert [item["epoch"] for item in items] == [1, 2, 3]
    assert items[1]["test_accuracy"] == 0.6 and items[1]["lr"] == 0.01
    assert items[0]["layers"] == [
        {"name": "features.1", "active_fraction": 0.5, "rate": 0.2}
        | {"capped_fraction": None, "mean_drift": None, "var_drift": None}
    ]
    assert set(items[0]) == {
        "epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "val_loss",
        "val_accuracy", "lr", "seconds", "images_per_second", "layers",
    }  # fmt: skip

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["progress"]["epoch"] == 3 and job["progress"]["fraction"] == 1.0
    assert job["result"] == {
        "final_accuracy": None,  # the job has not succeeded
        "latest_accuracy": 0.5,
        "best_val_accuracy": 0.4,
        "best_epoch": 3,
        "test_accuracy_at_best": 0.5,
    }


def test_non_finite_metrics_are_stored_as_null(client, session, make_job):
    job_id = make_job()
    jobs.record_epoch(session, job_id, epoch_metrics(1, 0.5, train_loss=float("nan")))
    item = client.get(f"/v1/jobs/{job_id}/metrics").json()["items"][0]
    assert item["train_loss"] is None and item["test_accuracy"] == 0.5


@pytest.fixture
def artifacts(settings):
    """Where the worker writes checkpoints: the only directory the API serves files from."""
    directory = settings.artifact_dir / "jobs" / "test"
    directory.mkdir(parents=True)
    return directory


def write_checkpoint(directory, name: str, content: bytes) -> tuple[str, str]:
    path = directory / name
    path.write_bytes(content)
    return str(path), hashlib.sha256(content).hexdigest()


def record(session, job_id, path, sha, content, epoch, is_best=False):
    return jobs.record_checkpoint(
        session, job_id, path=path, epoch=epoch, sha256=sha, size_bytes=len(content),
        is_best=is_best,
    )  # fmt: skip


def test_checkpoints_list_and_download_with_checksum(client, session, make_job, artifacts):
    job_id = make_job()
    content = b"checkpoint bytes " * 100
    path, sha = write_checkpoint(artifacts, "checkpoint-epoch0001.pt", content)
    first = record(session, job_id, path, sha, content, epoch=1, is_best=True)
    path2, sha2 = write_checkpoint(artifacts, "checkpoint-epoch0002.pt", content + b"2")
    second = record(session, job_id, path2, sha2, content + b"2", epoch=2, is_best=True)

    items = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"]
    assert [(i["id"], i["epoch"], i["is_best"]) for i in items] == [
        (first.id, 1, False),
        (second.id, 2, True),
    ]
    assert items[0]["sha256"] == sha and items[0]["size_bytes"] == len(content)
    assert "path" not in items[0]  # server paths are not exposed

    response = client.get(f"/v1/jobs/{job_id}/checkpoints/{first.id}/file")
    assert response.status_code == 200
    assert response.content == content
    assert response.headers["X-Checksum-SHA256"] == sha
    assert response.headers["ETag"] == f'"{sha}"'
    assert hashlib.sha256(response.content).hexdigest() == sha


def test_a_corrupted_or_missing_checkpoint_is_not_served(client, session, make_job, artifacts):
    job_id = make_job()
    content = b"good bytes" * 10
    path, sha = write_checkpoint(artifacts, "checkpoint-epoch0001.pt", content)
    checkpoint = record(session, job_id, path, sha, content, epoch=1)
    url = f"/v1/jobs/{job_id}/checkpoints/{checkpoint.id}/file"

    (artifacts / "checkpoint-epoch0001.pt").write_bytes(b"evil bytes" * 10)  # same size
    response = client.get(url)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "checksum_mismatch"
    assert "sha256" in response.json()["error"]["message"]

    (artifacts / "checkpoint-epoch0001.pt").unlink()
    response = client.get(url)
    assert response.status_code == 410
    assert response.json()["error"]["code"] == "checkpoint_missing"


def test_checkpoints_are_addressed_by_job_and_id_only(client, session, make_job, artifacts):
    job_id, other = make_job(), make_job()
    content = b"x"
    path, sha = write_checkpoint(artifacts, "a.pt", content)
    checkpoint = record(session, job_id, path, sha, content, epoch=1)
    assert client.get(f"/v1/jobs/{other}/checkpoints/{checkpoint.id}/file").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/checkpoints/999/file").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/checkpoints/{2**31 - 1}/file").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/checkpoints/{2**31}/file").status_code == 422
    assert client.get(f"/v1/jobs/{'x' * 5000}").status_code == 404
    response = client.get(f"/v1/jobs/{job_id}/checkpoints/..%2F..%2Fetc%2Fpasswd/file")
    assert response.status_code in (404, 422)


def test_forget_and_newest_valid_checkpoint(session, make_job, artifacts):
    job_id = make_job()
    recorded = []
    for epoch in (1, 2, 3):
        content = f"epoch {epoch}".encode()
        path, sha = write_checkpoint(artifacts, f"checkpoint-epoch{epoch:04d}.pt", content)
        recorded.append(record(session, job_id, path, sha, content, epoch=epoch))
    assert jobs.newest_valid_checkpoint(session, job_id).id == recorded[2].id
    (artifacts / "checkpoint-epoch0003.pt").write_bytes(b"torn write")
    assert jobs.newest_valid_checkpoint(session, job_id).id == recorded[1].id
    jobs.forget_checkpoint(session, job_id, path=recorded[1].path)
    assert jobs.newest_valid_checkpoint(session, job_id).id == recorded[0].id
    assert [c.epoch for c in jobs.list_checkpoints(session, job_id)] == [1, 3]
    # Re-recording the same file (a resumed run rewrote it) updates the row, no duplicate.
    content = b"epoch 3 again"
    path, sha = write_checkpoint(artifacts, "checkpoint-epoch0003.pt", content)
    again = record(session, job_id, path, sha, content, epoch=3)
    assert again.id == recorded[2].id and again.sha256 == sha
    assert jobs.newest_valid_checkpoint(session, job_id).id == recorded[2].id
