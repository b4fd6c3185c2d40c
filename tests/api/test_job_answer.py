"""The job's answer: its spec shows what the run reads and no server path; its result says
"latest" until the job has succeeded. SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from jobstore import jobs
from jobstore.tables import Job, JobStatus
from jumpout.spec import applicable_fields

METHOD_FIELDS = {"dropout_rate", "sigma", "p_min", "p_max", "ablation", "ii_base_rate"}


def epoch(number: int, accuracy: float) -> dict:
    return {"epoch": number, "test_accuracy": accuracy, "seconds": 1.0, "layers": []}


@pytest.mark.parametrize(
    ("spec", "shown"),
    [
        ({"method": "jumpout"}, {"sigma", "p_min", "p_max", "ablation"}),
        ({"method": "dropout"}, {"dropout_rate"}),
        ({"method": "none"}, set()),
        # Table-1 rows: a random rate reads sigma/p_min/p_max, a fixed one dropout_rate, and
        # the rows with II but not I also ii_base_rate.
        ({"ablation": "dropout+I+III"}, {"sigma", "p_min", "p_max", "ablation"}),
        ({"ablation": "dropout+III"}, {"dropout_rate", "ablation"}),
        ({"ablation": "dropout+II"}, {"dropout_rate", "ii_base_rate", "ablation"}),
        (
            {"ablation": "dropout+II", "ii_base_rate": "mean_of_i"},
            {"sigma", "p_min", "p_max", "ii_base_rate", "ablation"},
        ),
    ],
)
def test_the_spec_shows_the_fields_its_method_reads(client, spec, shown):
    job = client.post("/v1/jobs", json={"dataset": "digits", "architecture": "mlp", **spec}).json()
    assert set(job["spec"]) & METHOD_FIELDS == shown
    listed = client.get("/v1/jobs").json()["items"][0]
    assert listed["spec"] == job["spec"] == client.get(f"/v1/jobs/{job['id']}").json()["spec"]


def test_no_server_path_is_shown_but_the_stored_spec_keeps_everything(client, session, settings):
    job = client.post("/v1/jobs", json={"dataset": "digits", "architecture": "mlp"}).json()
    shown = job["spec"]
    assert not {"data_dir", "out_dir", "batch_norm", "svhn_extra"} & set(shown)
    assert str(settings.artifact_dir) not in str(shown)
    assert str(settings.data_dir) not in str(client.get(f"/v1/jobs/{job['id']}").text)
    # The worker trains from the stored row: it keeps the whole resolved spec.
    stored = session.get(Job, job["id"]).spec
    assert stored["out_dir"] == str(settings.artifact_dir / "jobs" / job["id"])
    assert stored["data_dir"] == str(settings.data_dir)
    assert {"dropout_rate", "batch_norm"} <= set(stored)


def test_model_specific_fields_show_where_they_apply(client):
    cnn = client.post("/v1/jobs", json={"dataset": "synthetic", "architecture": "cnn_small"})
    assert cnn.json()["spec"]["batch_norm"] is False
    assert set(applicable_fields({"dataset": "svhn", "architecture": "mlp"})) >= {"svhn_extra"}


def test_a_step_schedules_fields_show_only_under_a_step_schedule(client):
    mlp = {"dataset": "digits", "architecture": "mlp"}
    step = client.post(
        "/v1/jobs", json={**mlp, "schedule": "step", "milestones": [2], "gamma": 0.5}
    )
    assert (step.json()["spec"]["milestones"], step.json()["spec"]["gamma"]) == ([2], 0.5)
    for schedule in ("cosine", "constant"):
        other = client.post("/v1/jobs", json={**mlp, "schedule": schedule})
        assert other.status_code == 201, other.text
        assert not {"milestones", "gamma"} & set(other.json()["spec"]), schedule
    fields = applicable_fields({"schedule": "step_momentum", "architecture": "mlp"})
    assert {"milestones", "gamma"} <= set(fields)


def test_final_accuracy_is_null_until_the_job_succeeded(client, session, make_job):
    job_id = make_job(epochs=3)
    jobs.claim_job(session, job_id, worker="w1")
    jobs.record_epoch(session, job_id, epoch(1, 0.4))
    jobs.record_epoch(session, job_id, epoch(2, 0.6))

    running = client.get(f"/v1/jobs/{job_id}").json()["result"]
    assert (running["final_accuracy"], running["latest_accuracy"]) == (None, 0.6)
    listed = client.get("/v1/jobs").json()["items"][0]["result"]
    assert listed == running

    jobs.record_epoch(session, job_id, epoch(3, 0.7))
    assert jobs.finish_job(session, job_id, status=JobStatus.SUCCEEDED)
    done = client.get(f"/v1/jobs/{job_id}").json()["result"]
    assert (done["final_accuracy"], done["latest_accuracy"]) == (0.7, 0.7)


def test_a_cancelled_job_has_a_latest_accuracy_but_no_final_one(client, session, make_job):
    job_id = make_job(epochs=3)
    jobs.claim_job(session, job_id, worker="w1")
    jobs.record_epoch(session, job_id, epoch(1, 0.5))
    assert jobs.finish_job(session, job_id, status=JobStatus.CANCELLED)
    result = client.get(f"/v1/jobs/{job_id}").json()["result"]
    assert (result["final_accuracy"], result["latest_accuracy"]) == (None, 0.5)


def test_the_starting_weights_server_path_is_not_shown(client, session, make_job):
    from sqlalchemy import update

    job_id = make_job()
    record = {"source": "weights/resnet.pt", "kind": "file", "path": "/srv/data/weights/resnet.pt"}
    session.execute(
        update(Job).where(Job.id == job_id).values(environment={"seed": 0, "init_from": record})
    )
    session.commit()
    shown = client.get(f"/v1/jobs/{job_id}").json()["environment"]
    assert shown["init_from"] == {"source": "weights/resnet.pt", "kind": "file"}
    assert session.get(Job, job_id).environment["init_from"]["path"] == record["path"]
