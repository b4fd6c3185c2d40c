"""`/v1/experiments` on SQLite and PostgreSQL: submitting rows x seeds as ordinary jobs in one
transaction, every refusal naming its field (and row) with nothing stored, listing, progress and
ETA, cancelling, the report's numbers against a calculation here, and ownership.

Job states are set through the service functions the worker uses (`claim_job`, `record_epoch`,
`finish_job`), so the aggregates are checked on the rows the worker would write.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import time

import pytest
from scipy import stats
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from api import auth
from api.experiment_schemas import ExperimentRead, ExperimentReport, ExperimentsPage
from api.routes.experiments import report_cache
from jobstore import experiments, jobs
from jobstore.tables import Experiment, Job, JobStatus

BASE = {"dataset": "synthetic", "architecture": "mlp", "epochs": 4}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(client, headers=None, **request) -> dict:
    response = client.post("/v1/experiments", json={"base": BASE, **request}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def stored_counts(session) -> tuple[int, int]:
    count = (
        session.scalar(select(func.count()).select_from(Experiment)),
        session.scalar(select(func.count()).select_from(Job)),
    )
    session.commit()
    return count


def finish(session, job_id: str, accuracies: list[float], *, layers=None, seconds=2.0) -> None:
    """Run a job to success as the worker would: claim, one epoch dict per accuracy, finish."""
    assert jobs.claim_job(session, job_id, worker="w") is not None
    for epoch, accuracy in enumerate(accuracies, start=1):
        metrics = {"epoch": epoch, "test_accuracy": accuracy, "seconds": seconds}
        if layers is not None:
            metrics["layers"] = layers(epoch)
        jobs.record_epoch(session, job_id, metrics)
    assert jobs.finish_job(session, job_id, status=JobStatus.SUCCEEDED)


@pytest.fixture(autouse=True)
def _fresh_report_cache():
    report_cache.clear()
    yield
    report_cache.clear()


# --- submitting --------------------------------------------------------------------------------


def test_a_grid_becomes_one_queued_job_per_row_and_seed_published_after_commit(
    client, enqueued, session
):
    response = client.post(
        "/v1/experiments",
        json={"name": "sigma sweep", "base": BASE, "grid": {"sigma": [0.1, 0.2]}, "seeds": [5, 9]},
    )
    assert response.status_code == 201, response.text
    body = ExperimentRead.model_validate(response.json()).model_dump(mode="json")
    assert response.headers["Location"] == f"/v1/experiments/{body['id']}"
    assert body["name"] == "sigma sweep" and body["preset"] is None and body["baseline"] is None
    assert [row["label"] for row in body["rows"]] == ["sigma=0.1", "sigma=0.2"]
    assert body["seeds"] == [5, 9] and body["job_count"] == 4
    assert body["counts"] == {"queued": 4, "running": 0, "succeeded": 0, "failed": 0,
                              "cancelled": 0}  # fmt: skip
    assert [(job["row_label"], job["seed"]) for job in body["jobs"]] == [
        ("sigma=0.1", 5), ("sigma=0.1", 9), ("sigma=0.2", 5), ("sigma=0.2", 9),
    ]  # fmt: skip
    # Every job published once, in plan order, and each an ordinary job.
    assert enqueued == [job["id"] for job in body["jobs"]]
    for planned in body["jobs"]:
        job = client.get(f"/v1/jobs/{planned['id']}").json()
        assert job["experiment_id"] == body["id"] and job["row_label"] == planned["row_label"]
        assert job["spec"]["seed"] == planned["seed"] and job["status"] == "queued"
        assert job["spec"]["sigma"] == float(planned["row_label"].split("=")[1])
        assert job["spec"]["epochs"] == 4 and job["priority"] == 0
    assert stored_counts(session) == (1, 4)


def test_explicit_rows_carry_their_labels_and_every_job_the_priority(client, enqueued):
    body = submit(
        client,
        rows=[{"label": "plain", "method": "dropout"}, {"label": "jump", "method": "jumpout"}],
        seeds=3,
        baseline="plain",
        priority=7,
    )
    assert body["baseline"] == "plain" and body["priority"] == 7 and body["seeds"] == [0, 1, 2]
    assert [row["params"] for row in body["rows"]] == [{"method": "dropout"}, {"method": "jumpout"}]
    for planned in body["jobs"]:
        job = client.get(f"/v1/jobs/{planned['id']}").json()
        assert job["priority"] == 7
        assert job["method"] == ("dropout" if planned["row_label"] == "plain" else "jumpout")


def test_a_preset_gives_the_papers_rows_with_dropout_as_the_baseline(client, enqueued):
    body = submit(client, preset="table1", seeds=[1, 2])
    labels = [row["label"] for row in body["rows"]]
    assert len(labels) == 8 and labels[0] == "dropout" and labels[-1] == "jumpout"
    assert body["preset"] == "table1" and body["baseline"] == "dropout"
    assert body["job_count"] == 16 and len(enqueued) == 16
    table2 = submit(client, preset="table2", seeds=2)
    assert [row["label"] for row in table2["rows"]] == ["dropout", "jumpout"]


def test_experiment_jobs_do_not_count_against_the_single_job_queue_limit(
    client, configure, enqueued
):
    configure(max_queued_per_token=2)
    submit(client, grid={"sigma": [0.1, 0.2, 0.3]}, seeds=2)  # six queued jobs
    for _ in range(2):
        assert client.post("/v1/jobs", json=BASE).status_code == 201
    refused = client.post("/v1/jobs", json=BASE)
    assert refused.status_code == 429 and "max_queued_per_token" in refused.text


REFUSALS = [
    pytest.param(
        {"rows": [{"label": "ok"}, {"label": "bad", "sigma": -1.0}], "seeds": 2},
        "rows.1.sigma",
        "row 'bad'",
        id="a bad row value names the row and field",
    ),
    pytest.param(
        {"grid": {"sigma": [0.1, 11]}, "seeds": 2}, "grid.sigma", "[0, 10]", id="a bad grid value"
    ),
    pytest.param(
        {"grid": {"sigma": [0.1, 0.2]}, "seeds": 4},
        "seeds",
        "max_experiment_jobs = 6",
        id="too many jobs names the limit",
    ),
    pytest.param({"preset": "table9", "seeds": 2}, "preset", "table1", id="unknown preset"),
    pytest.param(
        {"base": {**BASE, "seed": 3}, "rows": [{}], "seeds": 2},
        "base.seed",
        "seeds",
        id="a seed in base",
    ),
    pytest.param(
        {"rows": [{"label": "short"}, {"label": "long", "epochs": 9}], "seeds": 2},
        "rows.1.epochs",
        "row 'long': at most 8 on this server (max_epochs)",
        id="a row over the server's epochs limit",
    ),
    pytest.param(
        {"base": {**BASE, "epochs": 9}, "rows": [{"label": "a"}], "seeds": 1},
        "base.epochs",
        "row 'a'",
        id="a base over the server's epochs limit",
    ),
    pytest.param(
        {"grid": {"batch_size": [32, 128]}, "seeds": 1},
        "grid.batch_size",
        "row 'batch_size=128': at most 64 on this server (max_batch_size)",
        id="a grid value over the server's batch size limit",
    ),
    pytest.param({"seeds": 2}, "rows", "exactly one of", id="no rows at all"),
    pytest.param(
        {"rows": [{}], "preset": "table2", "seeds": 2}, "preset", "exactly one", id="two sources"
    ),
    pytest.param({"rows": [{}], "seeds": [1, 1]}, "seeds.1", "twice", id="a repeated seed"),
    pytest.param({"rows": [{}], "seeds": 0}, "seeds", "a count n in [1, 1000]", id="no seeds"),
    pytest.param({"rows": [{}], "seeds": [-1]}, "seeds", "or a list", id="a negative seed"),
    pytest.param(
        {"rows": [{}], "seeds": 1, "priority": 101}, "priority", "100", id="priority bound"
    ),
    pytest.param(
        {"rows": [{}], "seeds": 1, "baseline": "nope"}, "baseline", "accepted", id="bad baseline"
    ),
    pytest.param(
        {"rows": [{}], "seeds": 1, "colour": "red"},
        "colour",
        "accepted fields: name, base",
        id="unknown request field",
    ),
    pytest.param(
        {"rows": [{"out_dir": "/tmp"}], "seeds": 1}, "rows.0.out_dir", "", id="operator field"
    ),
]


@pytest.mark.parametrize(("request_body", "field", "says"), REFUSALS)
def test_every_refusal_is_a_422_naming_the_field_and_stores_nothing(
    client, configure, enqueued, session, request_body, field, says
):
    configure(max_experiment_jobs=6, max_epochs=8, max_batch_size=64)
    response = client.post("/v1/experiments", json={"base": BASE, **request_body})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_spec"
    assert [f["field"] for f in error["fields"]] == [field], error
    assert says in error["fields"][0]["message"], error
    assert stored_counts(session) == (0, 0) and enqueued == []


def test_a_row_over_a_limit_is_named_once_whatever_its_seeds(client, configure, enqueued):
    configure(max_epochs=8)
    request = {
        "base": BASE,
        "rows": [{"label": "a", "epochs": 9}, {"label": "b"}, {"label": "c", "epochs": 10}],
        "seeds": 5,
    }
    fields = client.post("/v1/experiments", json=request).json()["error"]["fields"]
    assert [f["field"] for f in fields] == ["rows.0.epochs", "rows.2.epochs"]


def test_a_failure_while_storing_the_jobs_leaves_no_experiment_and_no_job(
    session, settings, monkeypatch
):
    """All or nothing: the last job's insert fails (a status the table's CHECK refuses) after the
    experiment row and the other jobs were written in the same transaction."""
    real_values = jobs.job_values
    made = []

    def values(*args, **kwargs):
        row = real_values(*args, **kwargs)
        made.append(row)
        if len(made) == 6:
            row["status"] = "exploded"
        return row

    monkeypatch.setattr(jobs, "job_values", values)
    with pytest.raises(IntegrityError):
        experiments.create_experiment(
            session, request={"base": BASE, "grid": {"sigma": [0.1, 0.2]}, "seeds": 3},
            owner_id=None,
        )  # fmt: skip
    session.rollback()
    assert len(made) == 6 and stored_counts(session) == (0, 0)


# --- reading -----------------------------------------------------------------------------------


def test_the_list_pages_newest_first(client, enqueued):
    created = [submit(client, name=f"e{i}", rows=[{}], seeds=1)["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = ExperimentsPage.model_validate(client.get("/v1/experiments", params=params).json())
        assert len(page.items) <= 2
        seen += [item.id for item in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == created[::-1]
    bad = client.get("/v1/experiments", params={"cursor": "bm9wZQ"})
    assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"] == "cursor"


def test_counts_progress_and_eta_follow_the_jobs(client, enqueued, session):
    body = submit(client, grid={"sigma": [0.1, 0.2, 0.3]}, seeds=2)  # 6 jobs of 4 epochs
    ids = [job["id"] for job in body["jobs"]]
    finish(session, ids[0], [0.5, 0.6, 0.7, 0.8], seconds=2.0)  # succeeded: 4 epochs of 2 s
    assert jobs.claim_job(session, ids[1], worker="w")
    jobs.record_epoch(session, ids[1], {"epoch": 1, "test_accuracy": 0.4, "seconds": 5.0})
    assert jobs.claim_job(session, ids[2], worker="w")  # running, no epoch yet
    assert jobs.claim_job(session, ids[3], worker="w")
    assert jobs.finish_job(session, ids[3], status=JobStatus.FAILED, error="boom")
    jobs.cancel_jobs(session, Job.id == ids[4])  # a queued job cancelled
    session.commit()

    view = client.get(f"/v1/experiments/{body['id']}").json()
    ExperimentRead.model_validate(view)
    assert view["counts"] == {"queued": 1, "running": 2, "succeeded": 1, "failed": 1,
                              "cancelled": 1}  # fmt: skip
    progress = view["progress"]
    assert progress["finished"] == 3 and progress["total"] == 6 and progress["fraction"] == 0.5
    # Finished jobs count all their epochs (3 x 4), the running one its 1 done, of 6 x 4.
    assert progress["epochs_done"] == 13 and progress["epochs_total"] == 24
    assert progress["epoch_fraction"] == pytest.approx(13 / 24)
    # Epochs left: 3 + 4 + 4 = 11; mean epoch time over timed epochs (4 x 2 s + 1 x 5 s) / 5;
    # two of the experiment's jobs running now.
    assert progress["running"] == 2
    assert progress["eta_seconds"] == pytest.approx(11 * (13 / 5) / 2)
    statuses = {job["id"]: job["status"] for job in view["jobs"]}
    assert [statuses[i] for i in ids] == [
        "succeeded", "running", "running", "failed", "cancelled", "queued",
    ]  # fmt: skip
    summary = client.get("/v1/experiments").json()["items"][0]
    assert summary["counts"] == view["counts"] and summary["progress"] == progress


def test_an_unknown_experiment_is_a_404(client):
    for path in ("", "/report"):
        response = client.get(f"/v1/experiments/{'0' * 32}{path}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "experiment_not_found"
    assert client.post("/v1/experiments/not-an-id/cancel").status_code == 404


# --- cancelling --------------------------------------------------------------------------------


def test_cancel_cancels_queued_jobs_flags_running_ones_and_leaves_finished_ones(
    client, enqueued, session
):
    body = submit(client, rows=[{}], seeds=4)
    ids = [job["id"] for job in body["jobs"]]
    finish(session, ids[0], [0.5, 0.5, 0.5, 0.5])
    assert jobs.claim_job(session, ids[1], worker="w")

    response = client.post(f"/v1/experiments/{body['id']}/cancel")
    assert response.status_code == 202, response.text
    view = response.json()
    assert view["cancel_requested"] is True
    assert view["counts"] == {"queued": 0, "running": 1, "succeeded": 1, "failed": 0,
                              "cancelled": 2}  # fmt: skip
    running = client.get(f"/v1/jobs/{ids[1]}").json()
    assert running["status"] == "running" and running["cancel_requested"] is True
    assert jobs.cancel_requested(session, ids[1])
    # What the worker then does: the running job ends cancelled; nothing is left to run.
    assert jobs.finish_job(session, ids[1], status=JobStatus.CANCELLED, attempt=1)
    assert jobs.claim_job(session, ids[2], worker="w") is None
    # Cancelling again is not an error and changes nothing.
    again = client.post(f"/v1/experiments/{body['id']}/cancel")
    assert again.status_code == 202 and again.json()["counts"]["succeeded"] == 1
    assert again.json()["counts"]["cancelled"] == 3


def test_cancel_tells_the_event_streams_of_the_jobs_it_cancelled_or_flagged(
    client, enqueued, session
):
    import redis

    from jobstore import events
    from jobstore.settings import get_settings

    body = submit(client, rows=[{}], seeds=3)
    ids = [job["id"] for job in body["jobs"]]
    finish(session, ids[0], [0.5, 0.5, 0.5])
    assert jobs.claim_job(session, ids[1], worker="w")
    broker = redis.Redis.from_url(get_settings().broker_url)
    listener = broker.pubsub(ignore_subscribe_messages=True)
    # These jobs' channels only: pub/sub ignores the db number, so a pattern would hear the
    # other tests on this Redis.
    listener.subscribe(*map(events.channel, ids))
    try:
        listener.get_message(timeout=1)  # the subscription's confirmation
        assert client.post(f"/v1/experiments/{body['id']}/cancel").status_code == 202
        heard = []
        deadline = time.monotonic() + 5
        while len(heard) < 2 and time.monotonic() < deadline:
            message = listener.get_message(timeout=0.5)
            if message:
                heard.append((message["channel"].decode(), json.loads(message["data"])))
        assert listener.get_message(timeout=0.5) is None  # and nothing for the finished one
    finally:
        listener.close()
        broker.close()
    # The queued one (cancelled) and the running one (flagged); not the finished one.
    assert sorted(heard) == sorted(
        (events.channel(job_id), {"kind": "changed"}) for job_id in ids[1:]
    ), heard


# --- the report --------------------------------------------------------------------------------


def slot_layers(rate: float):
    return lambda epoch: [
        {"name": "fc1", "active_fraction": 0.5 + 0.01 * epoch, "rate": rate,
         "capped_fraction": 0.0},
        {"name": "fc2", "active_fraction": 0.4, "rate": rate / 2, "capped_fraction": None},
    ]  # fmt: skip


@pytest.fixture
def finished_experiment(client, enqueued, session):
    """2 rows x 4 seeds of 3 epochs: every run succeeded but seed 3 of `jump`, which failed."""
    body = submit(
        client,
        base={**BASE, "epochs": 3},
        rows=[{"label": "plain", "method": "dropout"}, {"label": "jump", "method": "jumpout"}],
        seeds=[10, 11, 12, 13],
        baseline="plain",
    )
    final = {
        ("plain", 10): 0.80, ("plain", 11): 0.82, ("plain", 12): 0.79, ("plain", 13): 0.81,
        ("jump", 10): 0.84, ("jump", 11): 0.83, ("jump", 12): 0.80,
    }  # fmt: skip
    for job in body["jobs"]:
        key = (job["row_label"], job["seed"])
        if key in final:
            rate = 0.3 if job["row_label"] == "plain" else 0.2
            finish(session, job["id"], [0.5, 0.6, final[key]], layers=slot_layers(rate))
        else:
            assert jobs.claim_job(session, job["id"], worker="w")
            assert jobs.finish_job(session, job["id"], status=JobStatus.FAILED, error="nan loss")
    return body, final


def test_the_report_matches_a_calculation_here(client, finished_experiment):
    body, final = finished_experiment
    response = client.get(f"/v1/experiments/{body['id']}/report")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    report = ExperimentReport.model_validate(response.json()).model_dump(mode="json")
    assert report["baseline"] == "plain" and report["n_jobs"] == 8
    failed = next(job for job in body["jobs"] if (job["row_label"], job["seed"]) == ("jump", 13))
    assert report["excluded"] == [
        {"label": "jump", "seed": 13, "job_id": failed["id"], "status": "failed"}
    ]
    rows = {row["label"]: row for row in report["rows"]}
    for label in ("plain", "jump"):
        values = [100 * v for (row, _), v in final.items() if row == label]
        row = rows[label]
        assert row["n"] == len(values)
        assert row["mean"] == pytest.approx(statistics.mean(values), abs=1e-9)
        assert row["std"] == pytest.approx(statistics.stdev(values), abs=1e-9)
        sem = statistics.stdev(values) / math.sqrt(len(values))
        half = stats.t.ppf(0.975, len(values) - 1) * sem
        assert row["ci95"] == pytest.approx([row["mean"] - half, row["mean"] + half], abs=1e-9)
    # Paired by seed: only the three seeds both rows finished.
    diffs = [100 * (final[("jump", s)] - final[("plain", s)]) for s in (10, 11, 12)]
    versus = rows["jump"]["vs_baseline"]
    assert versus["pairs"] == 3 and versus["diff"] == pytest.approx(statistics.mean(diffs))
    assert (versus["wins"], versus["ties"], versus["losses"]) == (3, 0, 0)
    assert rows["plain"]["vs_baseline"] is None
    # Each slot averaged over the epochs (then over the runs): fc1's active fraction is the
    # mean of 0.51, 0.52, 0.53; a field never measured stays empty.
    plain_fc1, plain_fc2 = rows["plain"]["layers"]
    assert plain_fc1["name"] == "fc1" and plain_fc1["active_fraction"] == pytest.approx(0.52)
    assert plain_fc1["rate"] == pytest.approx(0.3) and rows["jump"]["layers"][1]["rate"] == (
        pytest.approx(0.1)
    )
    assert plain_fc2.get("capped_fraction") is None


def test_the_report_as_csv_and_markdown(client, finished_experiment):
    body, _ = finished_experiment
    url = f"/v1/experiments/{body['id']}/report"
    report = client.get(url).json()
    as_csv = client.get(url, params={"format": "csv"})
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    lines = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [line["label"] for line in lines] == ["plain", "jump"]
    assert [int(line["n"]) for line in lines] == [4, 3]
    assert float(lines[1]["diff"]) == pytest.approx(report["rows"][1]["vs_baseline"]["diff"])
    markdown = client.get(url, params={"format": "markdown"})
    assert markdown.headers["content-type"].startswith("text/markdown")
    assert "| jump | 3 |" in markdown.text and "jump seed 13 (failed" in markdown.text
    assert client.get(url, params={"format": "xml"}).status_code == 422


def test_the_report_is_cached_until_a_job_changes_state(client, enqueued, session):
    body = submit(client, rows=[{"label": "a"}, {"label": "b"}], seeds=2, baseline="a")
    ids = {(job["row_label"], job["seed"]): job["id"] for job in body["jobs"]}
    url = f"/v1/experiments/{body['id']}/report"
    finish(session, ids[("a", 0)], [0.5])
    first = client.get(url).json()
    assert [row["n"] for row in first["rows"]] == [1, 0]
    assert len(report_cache.entries) == 1
    assert client.get(url).json() == first
    finish(session, ids[("b", 0)], [0.7])
    second = client.get(url).json()
    assert [row["n"] for row in second["rows"]] == [1, 1]
    assert second["rows"][1]["vs_baseline"]["diff"] == pytest.approx(20.0)


# --- ownership ---------------------------------------------------------------------------------


def test_experiments_are_their_owners_and_admins_only(client, configure, session, enqueued):
    configure(auth_required=True)
    _, alice = auth.create_token(session, name="alice")
    _, bob = auth.create_token(session, name="bob")
    _, root = auth.create_token(session, name="root", is_admin=True)
    body = submit(client, headers=bearer(alice), rows=[{}], seeds=2)
    assert body["owner"] == "alice"
    url = f"/v1/experiments/{body['id']}"
    for method, path in (("GET", ""), ("GET", "/report"), ("POST", "/cancel")):
        response = client.request(method, url + path, headers=bearer(bob))
        assert response.status_code == 404, (method, path, response.text)
    assert client.get("/v1/experiments", headers=bearer(bob)).json()["items"] == []
    assert client.get(url, headers=bearer(alice)).status_code == 200
    listed = client.get("/v1/experiments", headers=bearer(root)).json()["items"]
    assert [item["id"] for item in listed] == [body["id"]]
    cancelled = client.post(url + "/cancel", headers=bearer(root))
    assert cancelled.status_code == 202 and cancelled.json()["counts"]["cancelled"] == 2
    assert client.get("/v1/experiments").status_code == 401


def test_an_experiment_starts_only_from_its_callers_jobs(client, configure, session, enqueued):
    configure(auth_required=True)
    _, alice = auth.create_token(session, name="alice")
    _, bob = auth.create_token(session, name="bob")
    alices_job = client.post("/v1/jobs", json=BASE, headers=bearer(alice)).json()["id"]
    request = {"base": BASE, "rows": [{}, {"init_from": f"job:{alices_job}"}], "seeds": 2}

    refused = client.post("/v1/experiments", json=request, headers=bearer(bob))
    assert refused.status_code == 422, refused.text
    assert "init_from" in refused.text and alices_job in refused.text
    assert stored_counts(session) == (0, 1)  # alice's job only: nothing of bob's was stored

    accepted = client.post("/v1/experiments", json=request, headers=bearer(alice))
    assert accepted.status_code == 201, accepted.text


def test_the_jobs_list_filters_by_experiment(client, enqueued):
    first = submit(client, rows=[{}], seeds=3)
    submit(client, rows=[{}], seeds=2)
    assert client.post("/v1/jobs", json=BASE).status_code == 201
    page = client.get("/v1/jobs", params={"experiment_id": first["id"]}).json()
    assert {job["id"] for job in page["items"]} == {job["id"] for job in first["jobs"]}
    assert len(client.get("/v1/jobs").json()["items"]) == 6
    refused = client.get("/v1/jobs", params={"experiment_id": "nope"})
    assert refused.status_code == 422 and "experiment_id" in refused.text
