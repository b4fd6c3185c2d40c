"""Response bodies of `GET /v1/datasets` (`api.routes.datasets`): which data sets this server can
train on, built by `jobstore.datasets.dataset_listing`."""

from __future__ import annotations

from pydantic import BaseModel, Field


class DatasetRead(BaseModel):
    name: str = Field(description="the value of a job's `dataset`")
    available: bool = Field(description="whether this server can train on it now")
    train_size: int | None = Field(
        description="samples in the train split (the most `train_size` may ask for; SVHN with "
        "svhn_extra has its extra split too); null where it depends on the files (imagenet)"
    )
    test_size: int | None = Field(description="samples in the test split; null: as train_size")
    num_classes: int
    input_shape: list[int] = Field(description="(channels, height, width) of one image")
    reason: str | None = Field(
        description="why it is not available and what the server's operator must do; or a "
        "limit of an available one (svhn without its extra split); null otherwise"
    )


class DatasetsPage(BaseModel):
    items: list[DatasetRead]
