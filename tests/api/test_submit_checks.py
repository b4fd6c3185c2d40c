"""A job that cannot run on this server is refused when it is submitted (issue 12), on SQLite and
PostgreSQL: a data set whose files are not under the server's data directory, SVHN's extra split
missing, a `train_size` / `test_size` larger than the data set; for single jobs and for every
row of an experiment. Nothing is stored or enqueued, the answer names the field and says what
the server's operator must do, without a server path. `GET /v1/datasets` says which data sets
this server can train on. The data directory is `tmp_path / "data"` (tests/api/conftest.py); the
files written here are tiny ones in the real on-disk formats (the writers of test_datasets.py).
"""

from __future__ import annotations

import pickle

import pytest
from sqlalchemy import func, select
from test_datasets import constant_images, write_cifar_batch

from jobstore.tables import Experiment, Job
from jumpout import catalog
from jumpout.spec import DATASETS

CIFAR10 = {"dataset": "cifar10", "architecture": "mlp", "epochs": 1}


@pytest.fixture(autouse=True)
def fresh_catalog_answers():
    # Each test has its own data directory; still, no remembered answer crosses tests.
    catalog.clear_cache()
    yield
    catalog.clear_cache()


def write_tiny_cifar10(data_dir) -> None:
    """Every file the cifar10 loader reads, in its real format (one image a batch)."""
    folder = data_dir / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_cifar_batch(folder / name, constant_images([1], 32), [0], "labels")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def stored_jobs(session) -> int:
    count = session.scalar(select(func.count()).select_from(Job))
    session.commit()
    return count


def refusal(response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_spec"
    return {field["field"]: field["message"] for field in error["fields"]}


def test_a_dataset_without_its_files_is_refused_saying_what_the_operator_must_do(
    client, settings, session, enqueued
):
    fields = refusal(client.post("/v1/jobs", json=CIFAR10))

    assert set(fields) == {"dataset"}
    message = fields["dataset"]
    assert "missing cifar10/cifar-10-batches-py/{data_batch_1, data_batch_2," in message
    assert "JUMPOUT_DATA_DIR" in message and "operator" in message
    assert "python -m jumpout fetch cifar10" in message
    assert "GET /v1/datasets" in message
    # Advice an API client cannot follow, and the server's own paths, stay out of it.
    assert "download=True" not in message and "--download" not in message
    assert str(settings.data_dir) not in message and str(settings.home) not in message
    assert stored_jobs(session) == 0 and enqueued == []


def test_the_same_dataset_with_its_files_in_place_is_accepted(client, settings, enqueued):
    write_tiny_cifar10(settings.data_dir)

    response = client.post("/v1/jobs", json=CIFAR10)

    assert response.status_code == 201, response.text
    assert enqueued == [response.json()["id"]]


def test_one_missing_file_is_named(client, settings):
    write_tiny_cifar10(settings.data_dir)
    (settings.data_dir / "cifar10" / "cifar-10-batches-py" / "test_batch").unlink()

    message = refusal(client.post("/v1/jobs", json=CIFAR10))["dataset"]

    assert "missing cifar10/cifar-10-batches-py/test_batch;" in message
    assert "data_batch_1" not in message


def test_a_train_size_over_the_dataset_is_refused_naming_the_maximum(client, session, enqueued):
    spec = {"dataset": "digits", "architecture": "mlp"}
    fields = refusal(client.post("/v1/jobs", json={**spec, "train_size": 10_000_000}))

    assert set(fields) == {"train_size"}
    assert "at most 1437" in fields["train_size"] and "10000000" in fields["train_size"]
    fields = refusal(client.post("/v1/jobs", json={**spec, "test_size": 361}))
    assert set(fields) == {"test_size"} and "at most 360" in fields["test_size"]
    assert stored_jobs(session) == 0 and enqueued == []
    # The whole split, exactly, is a valid cap.
    for field, size in (("train_size", 1437), ("test_size", 360)):
        assert client.post("/v1/jobs", json={**spec, field: size}).status_code == 201


def test_svhn_counts_its_extra_split_and_names_it_when_missing(client, settings):
    svhn = settings.data_dir / "svhn"
    svhn.mkdir(parents=True)
    for split in ("train", "test"):
        (svhn / f"{split}_32x32.mat").write_bytes(b"present; read only by the worker")
    spec = {"dataset": "svhn", "architecture": "mlp", "epochs": 1}

    # The svhn recipe trains on train + extra: without extra_32x32.mat, svhn_extra is at fault.
    fields = refusal(client.post("/v1/jobs", json=spec))
    assert set(fields) == {"svhn_extra"}
    assert "extra_32x32.mat" in fields["svhn_extra"] and "svhn_extra=false" in fields["svhn_extra"]
    plain = {**spec, "svhn_extra": False}
    fields = refusal(client.post("/v1/jobs", json={**plain, "train_size": 73_258}))
    assert set(fields) == {"train_size"} and "at most 73257" in fields["train_size"]
    assert client.post("/v1/jobs", json={**plain, "train_size": 73_257}).status_code == 201

    (svhn / "extra_32x32.mat").write_bytes(b"present")
    catalog.clear_cache()
    assert client.post("/v1/jobs", json={**spec, "train_size": 604_388}).status_code == 201
    fields = refusal(client.post("/v1/jobs", json={**spec, "train_size": 604_389}))
    assert "at most 604388" in fields["train_size"]


def test_imagenet_needs_both_split_folders_with_a_class_folder_each(client, settings):
    spec = {"dataset": "imagenet", "architecture": "resnet18", "epochs": 1}
    assert "imagenet/train/<class>/" in refusal(client.post("/v1/jobs", json=spec))["dataset"]
    (settings.data_dir / "imagenet" / "train" / "n01440764").mkdir(parents=True)
    (settings.data_dir / "imagenet" / "val").mkdir(parents=True)
    message = refusal(client.post("/v1/jobs", json=spec))["dataset"]
    assert "imagenet/val/<class>/" in message and "imagenet/train/" not in message
    assert "image-net.org" in message  # it cannot be fetched: the operator gets it there

    (settings.data_dir / "imagenet" / "val" / "n01440764").mkdir()
    # Sizes depend on the folders found: a cap is not checked (it keeps every sample).
    assert client.post("/v1/jobs", json={**spec, "train_size": 99_999_999}).status_code == 201


def test_an_experiment_is_refused_with_the_row_and_field_and_nothing_stored(
    client, session, enqueued
):
    request = {"base": CIFAR10, "preset": "table2", "seeds": 2}
    fields = refusal(client.post("/v1/experiments", json=request))

    assert set(fields) == {"base.dataset"}
    assert "cifar10" in fields["base.dataset"] and "JUMPOUT_DATA_DIR" in fields["base.dataset"]
    request = {
        "base": {"dataset": "digits", "architecture": "mlp", "epochs": 1},
        "rows": [{"label": "small", "train_size": 100}, {"label": "huge", "train_size": 5000}],
        "seeds": 1,
    }
    fields = refusal(client.post("/v1/experiments", json=request))
    assert set(fields) == {"rows.1.train_size"}
    assert "row 'huge'" in fields["rows.1.train_size"] and "1437" in fields["rows.1.train_size"]
    assert session.scalar(select(func.count()).select_from(Experiment)) == 0
    assert stored_jobs(session) == 0 and enqueued == []


def test_an_experiment_on_a_dataset_with_its_files_is_accepted(client, settings, enqueued):
    write_tiny_cifar10(settings.data_dir)
    response = client.post(
        "/v1/experiments", json={"base": CIFAR10, "preset": "table2", "seeds": 2}
    )
    assert response.status_code == 201, response.text
    assert len(enqueued) == 4


def test_the_listing_says_which_datasets_this_server_can_train_on(client, settings):
    def listing() -> dict[str, dict]:
        response = client.get("/v1/datasets")
        assert response.status_code == 200, response.text
        return {item["name"]: item for item in response.json()["items"]}

    items = listing()
    assert list(items) == list(DATASETS)
    assert {name for name, item in items.items() if item["available"]} == {"digits", "synthetic"}
    cifar10 = items["cifar10"]
    assert (cifar10["train_size"], cifar10["test_size"], cifar10["num_classes"]) == (
        50_000,
        10_000,
        10,
    )
    assert cifar10["input_shape"] == [3, 32, 32]
    assert (
        "JUMPOUT_DATA_DIR" in cifar10["reason"] and str(settings.data_dir) not in cifar10["reason"]
    )
    assert items["digits"]["reason"] is None and items["digits"]["input_shape"] == [1, 8, 8]
    assert items["imagenet"]["train_size"] is None

    write_tiny_cifar10(settings.data_dir)
    for name in ("train", "val"):
        for wnid in ("n01", "n02", "n03"):
            (settings.data_dir / "imagenet" / name / wnid).mkdir(parents=True)
    svhn = settings.data_dir / "svhn"
    svhn.mkdir()
    for split in ("train", "test"):
        (svhn / f"{split}_32x32.mat").write_bytes(b"x")
    catalog.clear_cache()

    items = listing()
    assert items["cifar10"]["available"] and items["cifar10"]["reason"] is None
    assert items["imagenet"]["available"] and items["imagenet"]["num_classes"] == 3
    assert items["svhn"]["available"] and "svhn_extra=false" in items["svhn"]["reason"]
