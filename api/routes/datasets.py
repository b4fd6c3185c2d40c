"""`/v1/datasets`: the data sets a job may name, and whether this server can train on each now
(`jobstore.datasets`)."""

from __future__ import annotations

from fastapi import APIRouter

from api import queries
from api.dataset_schemas import DatasetsPage
from api.deps import BearerDep, presented_token
from api.schemas import error_responses
from jobstore import datasets

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.get(
    "",
    operation_id="list_datasets",
    response_model=DatasetsPage,
    responses=error_responses(401),
)
def list_datasets(credentials: BearerDep) -> DatasetsPage:
    queries.caller(presented_token(credentials))
    return DatasetsPage(items=datasets.dataset_listing())
